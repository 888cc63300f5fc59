"""InfoBatch: the three lines a training loop adds.

    ib = InfoBatch("s3://bucket/runs/ffhq/scores", num_epochs=100)
    ds = wds.WebDataset(urls).compose(ib.stage()).decode(...).to_tuple("png", "__key__", "__weight__")
    for epoch in ib.epochs():                                # resumes from the store
        for images, keys, weights in ib.bound(loader):       # same number of steps on every rank
            loss = ib.update(per_sample_loss, keys, weights) # records scores, returns weighted mean

The store is the truth about the epoch: ``epochs()`` starts at its first uncommitted epoch,
the stages in the DataLoader workers prune that same epoch from the latest snapshot, and
each epoch ends with one commit (all ranks flush, rank 0 merges, everyone waits for it, or
``end_epoch(wait=False)`` lets evaluation overlap it). Nothing on the step path waits for the
GPU (``recorder``); the boundary and its metrics live in ``boundary``.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
from webdataset.handlers import reraise_exception

from ..stages.draws import EpochDraws
from ..stages.keyfn import KeyFunction, batch_key_hashes, resolve_key, sample_key
from ..stages.plan import EpochPlan, plan_epoch
from ..stages.policy import POLICIES, PruningPolicy
from ..stages.prune import DEFAULT_WINDOW, epoch_to_train, lookup_scores, soft_prune
from ..storage import Manifest, ScoreSnapshot, ScoreStore, hash_keys
from ..storage.checks import check_int
from ..storage.runs import RunLease
from . import distributed
from .boundary import EpochBoundary, EpochClose
from .planning import StepPlan
from .recorder import ScoreRecorder, weighted_mean
from .runs import begin_run, run_settings
from .steps import StepBudget, equal_steps

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _check_policy(policy: Any) -> None:
    """A policy object must offer everything ``PruningPolicy`` declares: its callers use all of it."""
    if not isinstance(policy, PruningPolicy):
        raise TypeError(f"policy must be 'infobatch', 'random' or an object implementing "
                        f"infobatch_stream.PruningPolicy (rule, anneals, settings, prune_ratio, "
                        f"annealing_start), got {policy!r}")


def _per_sample(values: Any, count: int, name: str) -> torch.Tensor:
    """``values`` (a tensor, array or list) as a tensor of ``count`` values; else ValueError."""
    tensor = values if isinstance(values, torch.Tensor) else torch.as_tensor(np.asarray(values))
    if tensor.dim() != 1 or tensor.shape[0] != count:
        raise ValueError(f"update() got {count} losses but {name} of shape {tuple(tensor.shape)}; "
                         f"pass one per sample")
    return tensor


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
        run_id: the identity of this training run, recorded with the store's run records and
            each commit; a store owned by another run is refused (no run id is an identity
            of its own: a run without one resumes a store a run without one owns).
            ``load_state_dict`` restores the checkpoint's. Not torchrun's run id, which
            changes at every launch: a relaunch is the same run.
        takeover: continue a store owned by another run, or written with other settings, on
            purpose.
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
        self.run_id = run_id
        self.takeover = bool(takeover)
        self.flush_rows = check_int(flush_rows, "flush_rows", 1)
        self._epoch: int | None = None        # the epoch in progress, None between epochs
        self._recorder: ScoreRecorder | None = None
        self._rule_cache: tuple | None = None  # (epoch, snapshot, rule) for update()'s weights
        self._budget = StepBudget()
        self._tidied = False                   # whether epochs() finished the last commit
        self._boundary = EpochBoundary()       # the epoch boundary, maybe still in flight
        self._warned_sync = False
        self._just_ended = False               # end_epoch() ran and no epoch has begun since
        self._in_bound = False                 # inside bound()'s loop: a checkpoint is mid-epoch
        self._lease: RunLease | None = None    # this process's incarnation of the run
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
        self._settle()
        if self._epoch is not None:
            return self._epoch
        latest = self.store.latest_epoch
        return 0 if latest is None else latest + 1

    def _begin_epoch(self) -> int:
        self._settle()
        if self._epoch is None:
            epoch = self.epoch
            if epoch >= self.num_epochs:
                raise RuntimeError(
                    f"all {self.num_epochs} epochs of this run are committed in {self.store.url}: "
                    f"there is no epoch left to update(), bound() or end_epoch(). To train "
                    f"longer, construct InfoBatch with a larger num_epochs and takeover=True")
            self._begin_run()
            self._epoch = epoch
            self._just_ended = False
            self._recorder = ScoreRecorder(self.store.writer(
                self._epoch, rank=distributed.rank(), flush_rows=self.flush_rows,
                lease=self._lease, background=True))
            self._budget.at_epoch_start = self._budget.done
        return self._epoch

    def epochs(self) -> Iterator[int]:
        """Yield the epochs still to train, starting at the store's first uncommitted one.

        Each epoch is committed when the loop body ends, unless ``end_epoch()`` was called in
        it (with ``wait=False`` too: its commit is then waited for when the next epoch
        begins). Leaving the loop early (``break``, an exception) commits nothing.
        """
        self._settle()
        self._begin_run()
        self._finish_last_commit()
        while True:
            if self._epoch is None and self.epoch >= self.num_epochs:
                self._budget.report_end(self.num_epochs)
                return
            epoch = self._begin_epoch()
            yield epoch
            if self._epoch == epoch:
                self.end_epoch()

    def _begin_run(self) -> None:
        """Collective, once: take this process's incarnation of the run (before an epoch of
        training, not at its commit, a store owned by another run or written with other
        settings is refused)."""
        if self._lease is None:
            self._lease = begin_run(self.store, self.run_id,
                                    run_settings(self.num_epochs, self.policy, self.key),
                                    self.takeover)

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
            self.store.commit(latest, lease=self._lease, takeover=self.takeover)

    def end_epoch(self, wait: bool = True) -> Manifest | None:
        """Collective: flush every rank's scores and commit the epoch; returns its manifest.

        Every rank returns only once the commit is visible, so the DataLoader workers of the
        next epoch see the new snapshot. An error on any rank is raised on all of them.
        Called again before the next epoch begins, it commits nothing and returns the same
        manifest (an empty epoch committed by mistake would shift every later decision).

        ``wait=False`` hands the flush and the commit to a thread and returns None at once,
        so that evaluation overlaps them. Whatever needs the new snapshot waits for it first
        and raises its error there, on every rank: ``wait()``, the next ``bound()`` (before
        the DataLoader starts reading), ``update()``, ``epochs()``' next epoch, ``plan()``,
        ``plan_steps()``, ``metrics()``, ``state_dict()``. A failed boundary can be re-run
        with ``end_epoch()``: the rows that were not written are still there.

        >>> ib.end_epoch(wait=False)    # doctest: +SKIP
        >>> evaluate(model)             # doctest: +SKIP  (the commit runs meanwhile)
        >>> ib.metrics()["blocking_seconds"]   # doctest: +SKIP
        """
        if self._epoch is None and self._just_ended:
            manifest = self.wait()
            warnings.warn(f"end_epoch() called again after epoch "
                          f"{manifest.epoch if manifest else '?'} ended: nothing to commit",
                          stacklevel=2)
            return manifest if wait else None
        started = time.perf_counter()
        epoch = self._begin_epoch()
        job = EpochClose(
            epoch, self._recorder,
            commit=lambda: self.store.commit(epoch, lease=self._lease, takeover=self.takeover,
                                              duplicates_expected=self.resampled),
            pruned=self._pruned_counter(epoch),
            optimizer_steps=self._budget.done - self._budget.at_epoch_start,
            annealing=self.policy.anneals(epoch), group=distributed.control_group())
        self._epoch, self._recorder = None, None  # the epoch is closing: not committed twice
        self._just_ended = True
        self._boundary.start(job, background=not wait, started=started)
        return self.wait() if wait else None

    def wait(self) -> Manifest | None:
        """Wait for the commit ``end_epoch(wait=False)`` started; its manifest, or its error.

        With nothing in flight, the manifest of the last epoch this object committed (None
        before the first). After an error the epoch is open again: ``end_epoch()`` retries.
        """
        try:
            return self._boundary.wait()
        except BaseException:
            failed = self._boundary.failed
            if failed is not None:
                self._epoch, self._recorder = failed.epoch, failed.recorder
                self._just_ended = False
            raise

    def _settle(self) -> None:
        if self._boundary.pending:
            self.wait()

    def metrics(self) -> dict[str, Any] | None:
        """The last committed epoch's metrics, a plain dict (None before the first commit).

        Keys: ``epoch``, ``samples_trained``, ``samples_pruned``, ``saved_fraction``,
        ``mean_score``, ``keys_updated``, ``optimizer_steps``, ``commit_seconds``,
        ``blocking_seconds``, ``annealing`` (``infobatch_stream.pipeline.boundary`` says
        what each counts). Waits for a commit in flight.

        >>> writer.add_scalars("infobatch", ib.metrics(), epoch)   # doctest: +SKIP
        """
        self._settle()
        metrics = self._boundary.metrics
        return None if metrics is None else dict(metrics)

    def _pruned_counter(self, epoch: int) -> Callable[[], int]:
        """Counts the known keys epoch ``epoch``'s rule dropped (``plan().pruned``), later."""
        cached = self._rule_cache if self._rule_cache and self._rule_cache[0] == epoch else None

        def count() -> int:
            if cached is not None:
                snapshot, rule = cached[1], cached[2]
            else:  # not self._rule(): this may run on the boundary's thread
                snapshot = self.store.snapshot(epoch - 1) if epoch > 0 else ScoreSnapshot.empty()
                rule = self.policy.rule(epoch, snapshot)
            return len(snapshot) - rule.count_kept(snapshot)
        return count

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

    def _batch_keys(self, keys: Any) -> np.ndarray | torch.Tensor:
        """Host key hashes (uint64), or a ``__key_hash__`` tensor left on its device."""
        if isinstance(keys, torch.Tensor) and keys.device.type != "cpu":
            if keys.dim() != 1 or keys.dtype != torch.int64:
                raise TypeError(f"a key tensor must be the batch's '__key_hash__' (int64, shape "
                                f"(batch,)), got {keys.dtype} of shape {tuple(keys.shape)}")
            return keys  # copied to the host without a sync, by the recorder
        return self._key_hashes(keys)

    def _weights_now(self, epoch: int, hashes: np.ndarray | torch.Tensor) -> np.ndarray:
        """The stage's weights, recomputed from the keys (which must be on the host)."""
        if isinstance(hashes, torch.Tensor):
            if not self._warned_sync:
                self._warned_sync = True
                warnings.warn(
                    "update() without weights and with '__key_hash__' on the GPU copies the keys "
                    "to the host and waits for the GPU at every step: pass the batch's "
                    "'__weight__' (e.g. to_tuple(..., '__key_hash__', '__weight__'))", stacklevel=3)
            hashes = hash_keys(hashes)
        snapshot, rule = self._rule(epoch)
        return rule.weights(hashes, snapshot.lookup(hashes))

    def update(self, loss: torch.Tensor, keys: Any, weights: Any = None,
               scores: Any = None) -> torch.Tensor:
        """Record each sample's score (by default its loss); return the weighted mean loss.

        ``loss``: per-sample losses, shape ``(batch,)`` (``reduction="none"``), any dtype and
        device. ``keys``: the batch's ``__key__`` strings or ``__key_hash__`` tensor (on the
        host or the device). ``weights``: the batch's ``__weight__``; None recomputes them
        from the keys. ``scores``: what to record instead of the loss, one per sample, when
        the loss's scale depends on something drawn anew each time (a diffusion timestep):
        e.g. the loss divided by the mean loss at its timestep.

        Returns ``(loss.float() * weights).mean()`` in float32, whatever the loss's dtype and
        autocast. Nothing here waits for the GPU: scores are copied to pinned memory without
        blocking and recorded once the copy is known done (a later call, or the epoch's
        end), weights go to the device without a sync. Only ``weights=None`` with keys on the
        GPU has to wait (it warns once).

        >>> loss = ib.update(F.cross_entropy(model(x), y, reduction="none"), keys, weights)  # doctest: +SKIP
        >>> loss.backward()                                                                  # doctest: +SKIP
        """
        epoch = self._begin_epoch()
        if not isinstance(loss, torch.Tensor) or loss.dim() != 1:
            shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
            raise ValueError(f"update() needs one loss per sample, shape (batch,), got {shape}; "
                             f"compute the loss with reduction='none'")
        count = loss.shape[0]
        hashes = self._batch_keys(keys)
        if hashes.shape[0] != count:
            raise ValueError(f"update() got {count} losses but {hashes.shape[0]} keys")
        recorded = loss if scores is None else _per_sample(scores, count, "scores")
        self._recorder.record(hashes, recorded)
        if weights is None:
            weights = self._weights_now(epoch, hashes)
        else:
            weights = _per_sample(weights, count, "weights")
        return weighted_mean(loss, weights)

    def bound(self, loader: Iterable, gradient_accumulation_steps: int = 1) -> Iterator[Any]:
        """Yield the loader's batches, the same number on every rank, within the step plan.

        Pruning leaves ranks with different sample counts; DDP must never wait for a rank
        that has run out. Each rank fetches the micro-batches of an optimizer step
        (``gradient_accumulation_steps`` of them), then the ranks agree, once per step, on
        the CPU over a gloo group of InfoBatch's own (never waiting for the GPU), that all
        have them; all stop together, on an accumulation boundary. With a step plan
        (``plan_steps``) an epoch also stops where the run's budget of optimizer steps says,
        so an LR schedule never overruns its total. A commit still in flight
        (``end_epoch(wait=False)``) is waited for before the loader is started.

        >>> for i, (x, keys, w) in enumerate(ib.bound(loader, gradient_accumulation_steps=4)):
        ...     (ib.update(per_sample_loss(x), keys, w) / 4).backward()      # doctest: +SKIP
        ...     if i % 4 == 3: opt.step(); opt.zero_grad()                   # doctest: +SKIP
        """
        accumulation = check_int(gradient_accumulation_steps, "gradient_accumulation_steps", 1)
        epoch = self._begin_epoch()
        self._budget.check_world_size(distributed.world_size())
        plan = self._budget.plan
        if plan is not None and plan.gradient_accumulation_steps != accumulation:
            raise ValueError(
                f"plan_steps() counted optimizer steps of {plan.gradient_accumulation_steps} "
                f"micro-batches, but bound() got gradient_accumulation_steps={accumulation}: "
                f"pass the same gradient_accumulation_steps to both")
        limit = self._budget.limit(self.policy, epoch, self.num_epochs, self._rule(epoch)[0])
        self._in_bound = True
        try:
            for micro_batches in equal_steps(loader, limit, accumulation,
                                             distributed.control_group()):
                self._budget.done += 1
                yield from micro_batches
        finally:
            self._in_bound = False

    # -- planning --------------------------------------------------------------------------

    def plan(self, dataset_size: int | None = None) -> EpochPlan:
        """What the coming epoch will keep, counted exactly from the latest snapshot."""
        self._settle()
        epoch, snapshot = epoch_to_train(self.store) if self._epoch is None else (
            self._epoch, self._rule(self._epoch)[0])
        return plan_epoch(self.policy, epoch, snapshot, dataset_size)

    def plan_steps(self, dataset_size: int, batch_size: int, world_size: int | None = None,
                   drop_last: bool = True, gradient_accumulation_steps: int = 1,
                   drawn: int | None = None, *, replan: bool = False) -> StepPlan:
        """The run's optimizer steps: exact for the coming epoch, planned for the rest.

        The first call fixes the run's step budget (``total_steps``), which ``bound()`` then
        keeps; it travels in ``state_dict()``. ``batch_size`` is per rank and micro-batch;
        an optimizer step takes ``gradient_accumulation_steps`` micro-batches per rank (pass
        the same value to ``bound()``). ``drawn``: with resampled shards, the samples an
        epoch draws over all ranks (``epoch_samples`` x workers x ranks); each epoch then
        trains ``drawn`` x its kept share. Called again with other values it refuses, unless
        ``replan=True`` makes a new total from here on (for a new LR schedule). Before any
        score exists the pruned epochs are estimated on the safe side: the run ends a few
        steps short of the total rather than cutting epochs; a cut, if pruning saves less
        than planned, is warned about with its size.

        >>> plan = ib.plan_steps(dataset_size=50_000, batch_size=128)        # doctest: +SKIP
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, 0.1, total_steps=plan.total_steps)
        """
        self._settle()
        world_size = distributed.world_size() if world_size is None else world_size
        epoch, snapshot = epoch_to_train(self.store)
        return self._budget.make_plan(self.policy, epoch, self.num_epochs, snapshot, dataset_size,
                                      batch_size, world_size, drop_last,
                                      gradient_accumulation_steps, drawn, replan)

    # -- checkpoints -----------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {"num_epochs": self.num_epochs, **self.policy.settings()}

    def state_dict(self) -> dict[str, Any]:
        """A small JSON-able state for the checkpoint: settings, epoch, step budget, run id.

        The scores are in the store, not here. Take it after ``end_epoch()`` or at the end of
        the ``epochs()`` loop body: either resumes silently at the next epoch. A checkpoint
        taken inside ``bound()``'s loop is mid-epoch: it resumes at the start of that epoch,
        which re-runs with the same decisions (or, if the store committed that epoch after the
        checkpoint, continues after it with a warning: the model missed part of it). Waits
        for a commit in flight, so the state names the epoch the store is at.
        """
        self._settle()
        in_epoch = self._epoch is not None
        return {
            "version": STATE_VERSION, "store": self.store.url, "settings": self._settings(),
            "epoch": self.epoch, **self._budget.state_dict(in_epoch=in_epoch),
            "steps_in_epoch": self._budget.done - self._budget.at_epoch_start if in_epoch else 0,
            "epoch_trained": in_epoch and not self._in_bound,
            "run_id": self.run_id,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore ``state_dict()``'s state; the store stays the truth about committed epochs."""
        self._settle()
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
        # Taken at the end of an epoch's training, then that epoch committed: the normal case.
        committed_after = store_epoch == state["epoch"] + 1 and state.get("epoch_trained")
        if store_epoch > state["epoch"] and not committed_after:
            warnings.warn(
                f"the store at {self.store.url} has committed epochs up to {store_epoch - 1}, "
                f"after this checkpoint (taken in epoch {state['epoch']}"
                f"{', mid-epoch' if store_epoch == state['epoch'] + 1 else ''}); training "
                f"continues at epoch {store_epoch}, the store's first uncommitted epoch",
                stacklevel=2)
        self._epoch = None
        self._recorder = None
        self._budget.load_state_dict(state)
        # The steps taken in the checkpoint's epoch count, whether that epoch is now committed
        # or re-runs: the LR schedule saved beside this state took them.
        self._budget.done = self._budget.at_epoch_start = (
            self._budget.done + int(state.get("steps_in_epoch", 0)))
        if not self._run_id_given:  # the checkpoint's run id: a restart is the same run
            self.run_id = state.get("run_id")
        if self._lease is not None and self._lease.run_id != self.run_id:
            self._lease = None  # begun under another identity: begin again as the checkpoint's
