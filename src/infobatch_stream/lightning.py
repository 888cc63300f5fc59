"""PyTorch Lightning: InfoBatch's epochs, commits and checkpoint state as a Callback.

    ib = ibs.InfoBatch("s3://bucket/runs/x/scores", num_epochs=30)
    infobatch = InfoBatchCallback(ib)
    trainer = L.Trainer(max_epochs=30, callbacks=[infobatch], reload_dataloaders_every_n_epochs=1)
    # LightningDataModule.train_dataloader: return infobatch.bound(wds.WebLoader(...))
    # LightningModule.training_step:        return ib.update(per_sample_loss, keys, weights)

What Lightning (2.x) does and what the callback does about it:

- Lightning opens the train loader's iterator, and fetches one batch ahead, when the fit
  loop starts (before ``on_train_start``) and, for later epochs, after the previous
  ``on_train_epoch_end`` (with ``reload_dataloaders_every_n_epochs=1``, before
  ``on_train_epoch_start``). The stage in the DataLoader workers reads the store when that
  iterator starts, so each epoch's commit must be visible by then.
- A ``ModelCheckpoint`` saves in ``on_train_epoch_end``, after the other callbacks, or,
  when it saves on validation (``save_on_train_epoch_end=False``,
  ``check_val_every_n_epoch > 1``, validation within the epoch), when the epoch-end
  validation ends, before ``on_train_epoch_end``. Every rank commits when the epoch's last
  training batch ends (``on_train_batch_end``), before either: a checkpoint never runs
  ahead of the store. An epoch cut short (``max_steps``, ``limit_train_batches``) commits
  in ``on_train_epoch_end``.
- Lightning leaves an iterable that is not a ``DataLoader`` (a ``WebLoader``) as it is,
  and never gives a ``DataLoader`` over an ``IterableDataset`` a ``DistributedSampler``:
  webdataset's ``split_by_node`` splits the shards.
- DDP needs the same number of batches on every rank, and pruning leaves the ranks with
  different counts: ``bound(loader)`` wraps the loader in ``ib.bound`` for each epoch.
  ``limit_train_batches`` cannot do it: it is one count for every epoch, fixed at setup.
- ``training_step`` returns ``ib.update(...)``: one call records the scores and returns the
  weighted mean that Lightning backpropagates.

The store is the truth about epochs. A checkpoint behind the store (killed between the
commit and the checkpoint's save, or an older checkpoint chosen on purpose) moves
Lightning's epoch forward to the store's first uncommitted epoch, with a warning: the model
missed those epochs' updates, their scores stand. A checkpoint ahead of the store (another
store, or one that was reset) is refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import Any

try:
    import lightning.pytorch as pl
except ImportError as exc:  # an optional extra
    raise ImportError(
        "infobatch_stream.lightning needs PyTorch Lightning 2.x (the 'lightning' package): "
        "pip install 'infobatch-stream[lightning]'") from exc

from .pipeline.infobatch import InfoBatch

__all__ = ["BoundLoader", "InfoBatchCallback"]


class BoundLoader:
    """``ib.bound(loader)`` as an iterable: each ``iter()`` is one epoch's bounded pass.

    A trainer that calls ``iter()`` on the train loader itself (Lightning) gets the same
    number of batches on every rank, within the run's step plan. Once the store holds every
    epoch it yields nothing.

    >>> loader = BoundLoader(ib, wds.WebLoader(dataset, batch_size=None))   # doctest: +SKIP
    """

    def __init__(self, ib: InfoBatch, loader: Iterable,
                 gradient_accumulation_steps: int | Callable[[], int] = 1):
        self.ib = ib
        self.loader = loader
        self.gradient_accumulation_steps = gradient_accumulation_steps

    def __iter__(self) -> Iterator[Any]:
        if self.ib.epoch >= self.ib.num_epochs:
            return iter(())
        steps = self.gradient_accumulation_steps
        steps = steps() if callable(steps) else steps
        # Each rank's epoch ends on a whole optimizer step.
        return self.ib.bound(self.loader, gradient_accumulation_steps=steps)


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {f"infobatch/{name}": float(value) for name, value in metrics.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class InfoBatchCallback(pl.Callback):
    """Runs ``ib``'s epochs inside a Lightning ``Trainer``: begin, commit, checkpoint, log.

    ``Trainer(max_epochs=...)`` must equal ``ib.num_epochs``. Every rank commits each epoch
    when its last training batch ends; ``ib.state_dict()`` travels in Lightning's checkpoint;
    the metrics of each committed epoch (``ib.metrics()``) are logged as ``infobatch/<name>``.

    ``overlap_commit=True`` only starts the commit there (``ib.end_epoch(wait=False)``) and
    waits for it when validation ends (before its checkpoint) and at ``on_train_epoch_end``,
    so the commit runs while the epoch-end validation does.

    >>> infobatch = InfoBatchCallback(ib)                                     # doctest: +SKIP
    >>> trainer = L.Trainer(max_epochs=ib.num_epochs, callbacks=[infobatch])  # doctest: +SKIP
    """

    def __init__(self, ib: InfoBatch, overlap_commit: bool = False):
        self.ib = ib
        self.overlap_commit = overlap_commit
        self._trainer: pl.Trainer | None = None
        self._epochs: Iterator[int] | None = None
        self._epoch: int | None = None      # the epoch begun (None between epochs)
        self._ended = False                 # whether its end_epoch() was called

    def bound(self, loader: Iterable) -> BoundLoader:
        """Wrap the train loader (in ``train_dataloader``): equal batches on every rank."""
        return BoundLoader(self.ib, loader, self._accumulation)

    def _accumulation(self) -> int:
        return 1 if self._trainer is None else int(self._trainer.accumulate_grad_batches)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.max_epochs != self.ib.num_epochs:
            raise ValueError(
                f"Trainer(max_epochs={trainer.max_epochs}) differs from InfoBatch(num_epochs="
                f"{self.ib.num_epochs}) of the store at {self.ib.store.url}: annealing starts "
                f"at floor(delta * num_epochs); give both the same number of epochs")
        # ib.epochs() begins the store's first uncommitted epoch (None: the store holds them
        # all) and, once per run, finishes the clean-up of a commit killed after its manifest.
        self._epochs = self.ib.epochs()
        self._epoch, self._ended = next(self._epochs, None), False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        store_epoch = self.ib.num_epochs if self._epoch is None else self._epoch
        if store_epoch < trainer.current_epoch:
            raise ValueError(
                f"Lightning resumes at epoch {trainer.current_epoch} but the store at "
                f"{self.ib.store.url} has committed only up to epoch {store_epoch - 1}: it is "
                f"not this run's store, or it was reset")
        if store_epoch > trainer.current_epoch:
            warnings.warn(
                f"the store at {self.ib.store.url} has committed epochs up to {store_epoch - 1}, "
                f"after this checkpoint (epoch {trainer.current_epoch}); training continues at "
                f"epoch {store_epoch}, the store's first uncommitted epoch", stacklevel=2)
            trainer.fit_loop.epoch_progress.increment_by(store_epoch - trainer.current_epoch)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._epoch is None and self._epochs is not None:
            self._epoch = next(self._epochs, None)
        if self._epoch != trainer.current_epoch:
            raise RuntimeError(
                f"Lightning is at epoch {trainer.current_epoch} but InfoBatch at {self._epoch}: "
                f"with InfoBatchCallback, only the callback may call ib.end_epoch()")

    def _end_epoch(self, wait: bool) -> None:
        """Commit the epoch in progress, once; ``wait=False`` leaves the commit in flight."""
        if self._ended:
            return
        self._ended = True
        self.ib.end_epoch(wait=wait)

    def _wait_for_commit(self) -> None:
        self.ib.wait()   # returns at once when no commit is in flight

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # The epoch's training is over with its last batch (bound() ends it on every rank at
        # the same batch): commit before the epoch-end validation and its checkpoint.
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            self._end_epoch(wait=not self.overlap_commit)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._wait_for_commit()  # ModelCheckpoint saves after this: never ahead of the store

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._end_epoch(wait=True)  # an epoch cut short (max_steps, limit_train_batches), or empty
        self._wait_for_commit()
        self._epoch, self._ended = None, False
        metrics = _numbers(self.ib.metrics() or {})
        if metrics:
            pl_module.log_dict(metrics, rank_zero_only=True)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._epochs is not None:
            self._epochs.close()  # leaving the epochs early commits nothing
            self._epochs = None

    def state_dict(self) -> dict[str, Any]:
        return self.ib.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.ib.load_state_dict(state_dict)
