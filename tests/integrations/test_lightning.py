"""infobatch_stream.lightning.InfoBatchCallback: examples/lightning/train.py under DDP on 2 CPU
processes as Lightning launches them (it re-executes the script for rank 1), SIGKILLed
mid-epoch and resumed from ``ckpt_path="last"``; and, in one process, the store ahead of or
behind the checkpoint, the epochs' agreement, and the message without Lightning."""

from __future__ import annotations

import importlib.util
import sys

import pytest

import infobatch_stream as ibs

from .conftest import PROBE, check_killed, check_resumed, example, launch, pruned_epochs, python

# Found, not imported: collecting this module stays cheap in every test process.
pytestmark = pytest.mark.skipif(importlib.util.find_spec("lightning") is None,
                                reason="lightning is not installed (the test extra installs it)")

TRAIN = example("lightning", "train.py")
EPOCHS, KILL_EPOCH, KILL_STEP = 4, 2, 3  # epochs 1 and 2 prune; 3 anneals (floor(0.875 * 4))


def test_ddp_killed_mid_epoch_then_resumed_goes_on_as_if_never_killed(digits, tmp_path, cache_dir):
    out = tmp_path / "run"
    command = python(PROBE, "--devices", "2", "--shards", digits, "--out", str(out), "--epochs",
                     str(EPOCHS), "--workers", "1", "--batch-size", "16")
    store = ibs.ScoreStore(str(out / "scores"), cache_dir=cache_dir)
    killed = launch(command, TRAIN, tmp_path / "killed-log", cache_dir,
                    kill_at=f"{KILL_EPOCH}:{KILL_STEP}")
    check_killed(killed, tmp_path / "killed-log", store, KILL_EPOCH)
    resumed = launch(command, TRAIN, tmp_path / "resumed-log", cache_dir)
    assert "Restoring states from the checkpoint path" in resumed.stderr + resumed.stdout
    logs = check_resumed(resumed, tmp_path / "killed-log", tmp_path / "resumed-log", store, EPOCHS,
                         KILL_EPOCH, KILL_STEP)
    assert pruned_epochs(logs, EPOCHS) == [1, 2]


# -- in one process ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def train_script():
    spec = importlib.util.spec_from_file_location("lightning_example", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Per epoch Lightning trains: (Lightning's epoch, InfoBatch's epoch, batches)."""

    def __init__(self, ib: ibs.InfoBatch):
        import lightning.pytorch as L

        recorder = self

        class Hooks(L.Callback):
            def on_train_epoch_start(self, trainer, pl_module):
                recorder.epochs.append([trainer.current_epoch, ib.epoch, 0])

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                recorder.epochs[-1][2] += 1

        self.epochs: list[list[int]] = []
        self.callback = Hooks()


def fit(script, tmp_path, digits, *, epochs=5, ckpt_path=None, store="scores", stop_after=None,
        overlap_commit=False, validate=False):
    """One in-process fit of the example's module and data on 1 CPU process; returns what it did."""
    import lightning.pytorch as L

    from infobatch_stream.lightning import InfoBatchCallback

    args = script.parse_args(["--shards", digits, "--workers", "0", "--batch-size", "16",
                              "--test", digits if validate else ""])
    ib = ibs.InfoBatch(str(tmp_path / store), num_epochs=epochs, cache_dir=str(tmp_path / "cache"))
    infobatch = InfoBatchCallback(ib, overlap_commit=overlap_commit)
    recorder = Recorder(ib)
    callbacks = [infobatch, recorder.callback, L.callbacks.ModelCheckpoint(
        dirpath=tmp_path / "checkpoints", filename="{epoch}", save_top_k=-1,
        save_on_train_epoch_end=not validate)]
    if stop_after is not None:
        class Stop(L.Callback):
            def on_train_epoch_end(self, trainer, pl_module):
                trainer.should_stop = trainer.current_epoch >= stop_after

        callbacks.append(Stop())
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, callbacks=callbacks,
                        reload_dataloaders_every_n_epochs=1, logger=False, deterministic=True,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(script.DigitsModule(ib, 0.05), datamodule=script.DigitsData(args, ib, infobatch),
                ckpt_path=ckpt_path)
    return trainer, ib, recorder.epochs


def test_a_checkpoint_behind_the_store_moves_lightning_to_the_stores_epoch(train_script, tmp_path,
                                                                           digits):
    _, ib, trained = fit(train_script, tmp_path, digits, stop_after=2)
    assert [e[:2] for e in trained] == [[0, 0], [1, 1], [2, 2]]
    assert ib.store.latest_epoch == 2
    # Resumed from epoch 0's checkpoint, as after a kill between a commit and its checkpoint.
    with pytest.warns(UserWarning, match="training continues at epoch 3"):
        trainer, ib, trained = fit(train_script, tmp_path, digits,
                                   ckpt_path=tmp_path / "checkpoints" / "epoch=0.ckpt")
    assert [e[:2] for e in trained] == [[3, 3], [4, 4]]   # Lightning's epochs are the store's
    assert all(batches > 0 for _, _, batches in trained)
    assert ib.store.latest_epoch == 4 and trainer.current_epoch == 5
    # The store holds every epoch: resuming again trains nothing and commits nothing.
    with pytest.warns(UserWarning, match="store's first uncommitted epoch"):
        trainer, ib, trained = fit(train_script, tmp_path, digits,
                                   ckpt_path=tmp_path / "checkpoints" / "epoch=0.ckpt")
    assert trained == [] and ib.store.latest_epoch == 4


def test_with_validation_each_checkpoint_is_taken_after_its_epochs_commit(train_script, tmp_path,
                                                                          digits):
    """A ModelCheckpoint that saves when validation ends does so before on_train_epoch_end:
    the commit must come before, when the epoch's last training batch ends."""
    import torch

    trainer, ib, _ = fit(train_script, tmp_path, digits, epochs=3, validate=True)
    assert "val_accuracy" in trainer.callback_metrics  # validation ran
    assert ib.store.latest_epoch == 2
    for epoch in range(3):
        checkpoint = torch.load(tmp_path / "checkpoints" / f"epoch={epoch}.ckpt", weights_only=False)
        state = next(v for k, v in checkpoint["callbacks"].items() if "InfoBatchCallback" in k)
        assert state["epoch"] == epoch + 1, state  # the store's next epoch: this one committed


@pytest.mark.parametrize("with_state", [True, False], ids=["with-callback-state", "without"])
def test_a_checkpoint_ahead_of_the_store_is_refused(train_script, tmp_path, digits, with_state):
    import torch

    fit(train_script, tmp_path, digits, stop_after=1)
    checkpoint = tmp_path / "checkpoints" / "epoch=1.ckpt"
    if not with_state:  # a checkpoint made before the callback was added
        state = torch.load(checkpoint, weights_only=False)
        state["callbacks"] = {k: v for k, v in state["callbacks"].items() if "InfoBatch" not in k}
        torch.save(state, checkpoint)
    with pytest.raises(ValueError, match="has committed only up to epoch -1") as error:
        fit(train_script, tmp_path, digits, ckpt_path=checkpoint, store="another-store")
    assert "another-store" in str(error.value)


def test_max_epochs_must_be_the_stores_num_epochs(train_script, tmp_path, digits):
    import lightning.pytorch as L

    from infobatch_stream.lightning import InfoBatchCallback

    ib = ibs.InfoBatch(str(tmp_path / "scores"), num_epochs=5)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_epochs=4, logger=False,
                        callbacks=[InfoBatchCallback(ib)], enable_progress_bar=False)
    args = train_script.parse_args(["--shards", digits, "--workers", "0"])
    with pytest.raises(ValueError, match=r"max_epochs=4\) differs from InfoBatch\(num_epochs=5"):
        trainer.fit(train_script.DigitsModule(ib, 0.05),
                    datamodule=train_script.DigitsData(args, ib, InfoBatchCallback(ib)))
    assert ib.store.latest_epoch is None


def test_without_lightning_the_import_says_what_to_install(monkeypatch):
    for name in [m for m in sys.modules if m == "lightning" or m.startswith("lightning.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "lightning", None)  # what an absent package looks like
    monkeypatch.delitem(sys.modules, "infobatch_stream.lightning", raising=False)
    with pytest.raises(ImportError, match=r"pip install 'infobatch-stream\[lightning\]'"):
        importlib.import_module("infobatch_stream.lightning")
    monkeypatch.delitem(sys.modules, "infobatch_stream.lightning", raising=False)


def test_an_overlapped_commit_lands_before_the_next_epoch(train_script, tmp_path, digits):
    _, ib, trained = fit(train_script, tmp_path, digits, epochs=3, overlap_commit=True)
    assert [e[:2] for e in trained] == [[0, 0], [1, 1], [2, 2]]
    assert trained[1][2] < trained[0][2] == trained[2][2]  # epoch 1 pruned from epoch 0's scores
    assert ib.store.latest_epoch == 2


def test_each_epochs_metrics_are_logged(train_script, tmp_path, digits):
    trainer, _, _ = fit(train_script, tmp_path, digits, epochs=2)
    assert "infobatch/saved_fraction" in trainer.logged_metrics
