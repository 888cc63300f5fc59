"""InfoBatch: the three lines a training loop adds.

    ib = InfoBatch("s3://bucket/runs/ffhq/scores", num_epochs=100)
    ds = wds.WebDataset(urls).compose(ib.stage()).decode(...).to_tuple("png", "__key__", "__weight__")
    for epoch in ib.epochs():                                # resumes from the store
        for images, keys, weights in ib.bound(loader):       # same number of steps on every rank
            loss = ib.update(per_sample_loss, keys, weights) # records scores, returns weighted mean

The store is the truth about the epoch: ``epochs()`` starts at its first uncommitted epoch,
the stages in the DataLoader workers prune that same epoch from the latest snapshot, and
each epoch ends with one commit (all ranks flush, rank 0 merges, everyone waits for it).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from ..stages.draws import EpochDraws
from ..stages.keyfn import KeyFunction, batch_key_hashes, resolve_key, sample_key
from ..stages.plan import EpochPlan, plan_epoch
from ..stages.policy import InfoBatchPolicy, PruningPolicy, RandomPolicy
from ..stages.prune import DEFAULT_WINDOW, epoch_to_train, lookup_scores, soft_prune
from ..storage import Manifest, ScoreSnapshot, ScoreStore
from ..storage.checks import check_int
from . import distributed
from .planning import StepPlan
from .recorder import ScoreRecorder, weighted_mean
from .steps import StepBudget, equal_batches

log = logging.getLogger(__name__)

STATE_VERSION = 1
POLICIES = {"infobatch": InfoBatchPolicy, "random": RandomPolicy}


def _check_policy(policy: Any) -> None:
    """A policy object must offer everything ``PruningPolicy`` declares: its callers use all of it."""
    if not isinstance(policy, PruningPolicy):
        raise TypeError(f"policy must be 'infobatch', 'random' or an object implementing "
                        f"infobatch_stream.PruningPolicy (rule, anneals, settings, prune_ratio, "
                        f"annealing_start), got {policy!r}")


def launcher_run_id() -> str | None:
    """The run id the launcher gives this job: torchrun's ``TORCHELASTIC_RUN_ID``, if set."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if run_id in (None, "", "none") else run_id


class InfoBatch:
    """InfoBatch's unbiased dynamic data pruning for a webdataset pipeline and its training loop.

    Args:
        store: a ``ScoreStore`` or its URL (local directory, ``s3://...``, any fsspec URL).
        num_epochs: epochs of the whole run (annealing starts at ``floor(delta * num_epochs)``).
        prune_ratio: ``r``, the probability a below-mean sample is dropped.
        delta: the share of epochs that prune; the rest train on all data, weight 1.
        seed: seeds the counter-based draws (no global RNG is touched).
        key: ``"key"`` (``__key__``, default), ``"shard"`` (shard-qualified) or a callable.
        storage_options: fsspec options for the store URL (e.g. an S3 endpoint).
        policy: ``"infobatch"`` (default), ``"random"`` (same budget, a baseline) or an object
            with ``rule(epoch, snapshot)``.
        run_id: the identity of this training run, recorded with each commit; a store whose
            last commit was made by another run is refused. Defaults to torchrun's run id;
            ``load_state_dict`` restores the checkpoint's, so a restart is the same run.
        takeover: continue a store committed by another run, on purpose.
        flush_rows: scores buffered per rank before a delta is written mid-epoch, on a
            background thread, so that little is left to write when the epoch ends (a crash
            keeps what was flushed; the re-run epoch's later writes win).

    >>> ib = InfoBatch("/tmp/scores", num_epochs=10)
    >>> ib.plan(dataset_size=50_000).samples   # epoch 0: nothing is known, nothing pruned
    50000
    """

    def __init__(self, store: ScoreStore | str, num_epochs: int, prune_ratio: float = 0.5,
                 delta: float = 0.875, seed: int = 0, key: str | KeyFunction | None = None,
                 storage_options: dict[str, Any] | None = None, *,
                 policy: str | PruningPolicy = "infobatch", cache_dir: str | None = None,
                 window: int = DEFAULT_WINDOW, run_id: str | None = None,
                 takeover: bool = False, flush_rows: int = 1 << 18):
        self.store = store if isinstance(store, ScoreStore) else ScoreStore(
            store, storage_options, cache_dir)
        if isinstance(policy, str):
            if policy not in POLICIES:
                raise ValueError(f"policy must be one of {sorted(POLICIES)} or a policy object, "
                                 f"got {policy!r}")
            policy = POLICIES[policy](num_epochs, prune_ratio, delta, seed)
        else:
            _check_policy(policy)
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"run_id must be a non-empty str or None, got {run_id!r}")
        self.num_epochs = check_int(num_epochs, "num_epochs", 1)
        self.policy = policy
        self.key = resolve_key(key)
        self.window = check_int(window, "window", 1, numpy=False)
        self._run_id_given = run_id is not None
        self.run_id = run_id if run_id is not None else launcher_run_id()
        self.takeover = bool(takeover)
        self.flush_rows = check_int(flush_rows, "flush_rows", 1)
        self._epoch: int | None = None        # the epoch in progress, None between epochs
        self._recorder: ScoreRecorder | None = None
        self._rule_cache: tuple | None = None  # (epoch, snapshot, rule) for update()'s weights
        self._budget = StepBudget()
        self._tidied = False                   # whether epochs() finished the last commit
        self.resampled = False                 # stage(epoch_samples=...): keys repeat by design

    def __repr__(self) -> str:
        return f"InfoBatch({self.store.url!r}, num_epochs={self.num_epochs}, policy={self.policy})"

    # -- the data side ---------------------------------------------------------------------

    def stage(self, handler=reraise_exception, *, epoch_samples: int | None = None):
        """The pruning stage for ``wds.WebDataset(...).compose(...)`` or ``wds.DataPipeline``.

        Put it right after the tar reader, before shuffle and decode. ``handler`` deals with a
        sample that has no key (``wds.warn_and_continue`` skips it). ``epoch_samples``: for
        resampled shards (``resampled=True``), each worker's epoch ends after this many
        samples drawn, before pruning, so pruned samples are not replaced by more draws
        (``with_epoch(n)`` counts after the stage); the same ``n`` as ``with_epoch(n)`` on
        the dataset. It also marks this run's repeated keys as expected at commit.

        >>> ds = wds.WebDataset(urls, resampled=True, nodesplitter=wds.split_by_node)  # doctest: +SKIP
        >>> ds = ds.compose(ib.stage(epoch_samples=5000)).decode("rgb").with_epoch(5000)  # doctest: +SKIP
        """
        draws = EpochDraws(epoch_samples)
        self.resampled = self.resampled or epoch_samples is not None
        return soft_prune(self.store, self.policy, key=self.key, window=self.window,
                          handler=handler, draws=draws)

    def lookup_stage(self, handler=reraise_exception):
        """A stage that only attaches ``__score__`` and ``__key_hash__`` (no pruning)."""
        return lookup_scores(self.store, key=self.key, window=self.window, handler=handler)

    # -- epochs ----------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """The epoch in progress, or the next one to train (the store's first uncommitted)."""
        if self._epoch is not None:
            return self._epoch
        latest = self.store.latest_epoch
        return 0 if latest is None else latest + 1

    def _begin_epoch(self) -> int:
        if self._epoch is None:
            # Fail before an epoch of training, not at its commit, if another run owns the store.
            self.store.check_owner(self.run_id, self.takeover)
            self._epoch = self.epoch
            self._recorder = ScoreRecorder(self.store.writer(
                self._epoch, rank=distributed.rank(), flush_rows=self.flush_rows,
                run_id=self.run_id, background=True))
            self._budget.at_epoch_start = self._budget.done
        return self._epoch

    def epochs(self) -> Iterator[int]:
        """Yield the epochs still to train, starting at the store's first uncommitted one.

        Each epoch is committed when the loop body ends, unless ``end_epoch()`` was called in
        it. Leaving the loop early (``break``, an exception) commits nothing.
        """
        self._finish_last_commit()
        while True:
            epoch = self._begin_epoch()
            if epoch >= self.num_epochs:
                self._epoch = None
                return
            yield epoch
            if self._epoch == epoch:
                self.end_epoch()

    def _finish_last_commit(self) -> None:
        """Once per run, rank 0 finishes the clean-up of the store's latest commit.

        A commit killed after writing its manifest is complete, but its merged deltas and
        the temporaries of the kill stay behind, and a restarted job never commits that
        epoch again. Re-running the commit of the latest epoch is a no-op that finishes the
        clean-up; it touches only files nobody reads (never the next epoch's deltas), so the
        other ranks need not wait for it.
        """
        if self._tidied:
            return
        self._tidied = True
        if distributed.rank() != 0:
            return
        latest = self.store.latest_epoch
        if latest is not None:
            self.store.commit(latest, run_id=self.run_id, takeover=self.takeover)

    def end_epoch(self) -> Manifest:
        """Collective: flush every rank's scores and commit the epoch; returns its manifest.

        Every rank returns only once the commit is visible, so the DataLoader workers of the
        next epoch see the new snapshot. An error on any rank is raised on all of them.
        """
        epoch = self._begin_epoch()
        error = None
        try:
            self._recorder.flush()
            self._recorder.close()
        except Exception as exc:  # raised on every rank by all_ranks_ok
            error = exc
        distributed.all_ranks_ok(error, f"flushing the scores of epoch {epoch}")
        manifest = distributed.on_rank_zero(
            lambda: self.store.commit(epoch, run_id=self.run_id, takeover=self.takeover,
                                      duplicates_expected=self.resampled),
            f"committing epoch {epoch}")
        self._epoch = None
        self._recorder = None
        return manifest if manifest is not None else self.store.manifest(epoch)

    # -- the training side -----------------------------------------------------------------

    def _key_hashes(self, keys: Any) -> np.ndarray:
        if self.key is not sample_key and isinstance(keys, (list, tuple)) and keys \
                and isinstance(keys[0], (str, bytes)):
            raise TypeError(
                "with a key function other than the default, pass the batch's '__key_hash__' "
                "field to update() (e.g. to_tuple(..., '__key_hash__', '__weight__')): the "
                "'__key__' strings are not the keys the store was given"
            )
        return batch_key_hashes(keys)

    def _rule(self, epoch: int):
        if self._rule_cache is None or self._rule_cache[0] != epoch:
            snapshot = self.store.snapshot(epoch - 1) if epoch > 0 else ScoreSnapshot.empty()
            self._rule_cache = (epoch, snapshot, self.policy.rule(epoch, snapshot))
        return self._rule_cache[1], self._rule_cache[2]

    def weights_for(self, keys: Any) -> np.ndarray:
        """The weights the stage gave these keys this epoch (0 for a key it dropped)."""
        hashes = self._key_hashes(keys)
        snapshot, rule = self._rule(self._begin_epoch())
        return rule.weights(hashes, snapshot.lookup(hashes))

    def update(self, loss: torch.Tensor, keys: Any, weights: Any = None,
               scores: Any = None) -> torch.Tensor:
        """Record each sample's score (by default its loss); return the weighted mean loss.

        ``loss``: per-sample losses, shape ``(batch,)`` (``reduction="none"``), any dtype and
        device. ``keys``: the batch's ``__key__`` strings or ``__key_hash__`` tensor.
        ``weights``: the batch's ``__weight__``; None recomputes them from the keys.
        ``scores``: what to record instead of the loss, one per sample, when the loss's scale
        depends on something drawn anew each time (a diffusion timestep): e.g. the loss
        divided by the mean loss at its timestep. The returned loss is unchanged.
        """
        epoch = self._begin_epoch()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"update() needs one loss per sample, shape (batch,), got {shape}; "
                             f"compute the loss with reduction='none'")
        hashes = self._key_hashes(keys)
        if len(hashes) != loss.shape[0]:
            raise ValueError(f"update() got {loss.shape[0]} losses but {len(hashes)} keys")
        self._recorder.record(hashes, loss if scores is None else torch.as_tensor(scores))
        if weights is None:
            snapshot, rule = self._rule(epoch)
            weights = rule.weights(hashes, snapshot.lookup(hashes))
        return weighted_mean(loss, weights)

    def bound(self, loader: Iterable) -> Iterator[Any]:
        """Yield the loader's batches, the same number on every rank, within the step plan.

        Pruning leaves ranks with different sample counts; DDP must never wait for a rank
        that has run out. Each step the ranks agree (one tiny all-reduce) whether all still
        have a batch, and all stop together. With a step plan (``plan_steps``) an epoch also
        stops where the run's step budget says, so an LR schedule never overruns its total.
        """
        epoch = self._begin_epoch()
        limit = self._budget.limit(self.policy, epoch, self.num_epochs, self._rule(epoch)[0])
        for batch in equal_batches(loader, limit):
            self._budget.done += 1
            yield batch

    # -- planning --------------------------------------------------------------------------

    def plan(self, dataset_size: int | None = None) -> EpochPlan:
        """What the coming epoch will keep, counted exactly from the latest snapshot."""
        epoch, snapshot = epoch_to_train(self.store) if self._epoch is None else (
            self._epoch, self._rule(self._epoch)[0])
        return plan_epoch(self.policy, epoch, snapshot, dataset_size)

    def plan_steps(self, dataset_size: int, batch_size: int, world_size: int | None = None,
                   drop_last: bool = True, drawn: int | None = None) -> StepPlan:
        """The run's optimizer steps: exact for the coming epoch, planned for the rest.

        The first call fixes the run's step budget (``total_steps``), which ``bound()`` then
        keeps; it travels in ``state_dict()``. ``batch_size`` is per rank. ``drawn``: with
        resampled shards, the samples an epoch draws over all ranks (``epoch_samples`` x
        workers x ranks); each epoch then trains ``drawn`` x its kept share.

        >>> plan = ib.plan_steps(dataset_size=50_000, batch_size=128)        # doctest: +SKIP
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=plan.total_steps)
        """
        world_size = distributed.world_size() if world_size is None else world_size
        epoch, snapshot = epoch_to_train(self.store)
        return self._budget.make_plan(self.policy, epoch, self.num_epochs, snapshot, dataset_size,
                                      batch_size, world_size, drop_last, drawn)

    # -- checkpoints -----------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"num_epochs": self.num_epochs, **self.policy.settings()}

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able state for the checkpoint: settings, epoch, step budget, run id.

        The scores are in the store, not here. A checkpoint taken mid-epoch resumes at the
        start of that epoch, which then re-runs with the same decisions.
        """
        return {
            "version": STATE_VERSION, "store": self.store.url, "settings": self._settings(),
            "epoch": self.epoch, **self._budget.state_dict(in_epoch=self._epoch is not None),
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state; the store stays the truth about committed epochs."""
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise ValueError(f"not an InfoBatch state of version {STATE_VERSION}: "
                             f"{str(state)[:200]}")
        mine = self._settings()
        for name, value in state["settings"].items():
            if mine.get(name) != value:
                raise ValueError(
                    f"the checkpoint was made with {name}={value!r}, this InfoBatch has "
                    f"{name}={mine.get(name)!r}: the pruning decisions would differ; construct "
                    f"InfoBatch with the checkpoint's settings")
        store_epoch = self.epoch if self._epoch is None else self._epoch
        if store_epoch < state["epoch"]:
            raise ValueError(
                f"the checkpoint was taken in epoch {state['epoch']} but the store at "
                f"{self.store.url} has committed only up to epoch {store_epoch - 1}: it is not "
                f"this run's store, or it was reset")
        if store_epoch > state["epoch"]:
            warnings.warn(
                f"the store at {self.store.url} has committed epochs up to {store_epoch - 1}, "
                f"after this checkpoint (taken in epoch {state['epoch']}); training continues "
                f"at epoch {store_epoch}, the store's first uncommitted epoch", stacklevel=2)
        self._epoch = None
        self._recorder = None
        self._budget.load_state_dict(state)
        if not self._run_id_given:  # the checkpoint's run id, not this launch's new one
            self.run_id = state.get("run_id")
