"""Resampled shards: pruning must save compute in webdataset's fixed-length epochs.

``wds.WebDataset(urls, resampled=True)...with_epoch(n)`` ends a worker's epoch after ``n``
samples leave the pipeline; pruning before that only makes it draw more. With
``ib.stage(epoch_samples=n)`` the epoch is counted in samples drawn before the stage, so
the samples trained fall by the planned fraction.
"""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

import infobatch_stream as ibs
from infobatch_stream.stages import draws as draws_module
from infobatch_stream.stages import prune as prune_module
from infobatch_stream.stages.draws import EpochDraws

from .helpers import fill_store, keys_of, reference_weights, snapshot_scores

# An epoch that ends inside a shard (the stage's count, or with_epoch's own islice) leaves
# webdataset's open shard file to the garbage collector, which reports it as unraisable.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SHARDS, PER_SHARD = 40, 25          # 1000 samples in shards of equal size
EPOCH_SAMPLES = 250                 # per worker: 10 whole shards
WORKERS, RANKS = 2, 2               # 4 workers draw 40 shards per epoch: one dataset's worth
NUM_EPOCHS = 10
SIGMAS = 4.5                        # two-sided tail 7e-6 per check


@pytest.fixture(scope="module")
def shard_urls(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("resampled")
    urls = []
    for shard in range(SHARDS):
        path = str(root / f"shard-{shard:04d}.tar")
        with wds.TarWriter(path) as sink:
            for key in keys_of(PER_SHARD, start=shard * PER_SHARD):
                sink.write({"__key__": key, "txt": key})
        urls.append(path)
    return urls


@pytest.fixture
def store(tmp_path, cache_dir) -> ibs.ScoreStore:
    """Epoch 0 committed: every key known, exponential scores (63% below the mean)."""
    store = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    keys = keys_of(SHARDS * PER_SHARD)
    scores = np.random.default_rng(5).exponential(1.0, len(keys)).astype(np.float32)
    fill_store(store, dict(zip(keys, scores.tolist(), strict=True)), epoch=0)
    return store


def resampled(urls: list[str], stage=None, epoch_samples: int = EPOCH_SAMPLES):
    """webdataset's multi-node pattern: resampled shards, an epoch of ``with_epoch(n)``."""
    ds = wds.WebDataset(urls, resampled=True, shardshuffle=False, nodesplitter=wds.split_by_node)
    if stage is not None:
        ds = ds.compose(stage)
    return ds.to_tuple("__key__").with_epoch(epoch_samples)


def loader(dataset, persistent: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=WORKERS,
                                       persistent_workers=persistent)


def per_shard_kept(store: ibs.ScoreStore, epoch: int) -> np.ndarray:
    """Samples each shard keeps in ``epoch``, from the independent reference decision."""
    keys = keys_of(SHARDS * PER_SHARD)
    weights = reference_weights(keys, snapshot_scores(store, keys), epoch=epoch,
                                num_epochs=NUM_EPOCHS)
    kept = np.array([weights[k] > 0 for k in keys])
    return kept.reshape(SHARDS, PER_SHARD).sum(axis=1)


def check_within_noise(trained: int, store: ibs.ScoreStore, epoch: int, ib: ibs.InfoBatch) -> None:
    """The drawn shards are iid uniform picks, so the samples kept over the epoch's m shards
    have mean m * mean(k_s) and variance m * var(k_s) over the shards' kept counts k_s."""
    drawn_shards = WORKERS * RANKS * EPOCH_SAMPLES // PER_SHARD
    k = per_shard_kept(store, epoch)
    expected = drawn_shards * k.mean()
    sd = math.sqrt(drawn_shards * k.var())
    planned = ib.plan(dataset_size=SHARDS * PER_SHARD).samples_of(WORKERS * RANKS * EPOCH_SAMPLES)
    assert planned == pytest.approx(expected)
    assert abs(trained - expected) <= SIGMAS * sd, (trained, expected, sd)
    assert expected < 0.75 * WORKERS * RANKS * EPOCH_SAMPLES  # the plan does prune a quarter+


def train_epoch(loaders: list, monkeypatch) -> list[list[str]]:
    """The keys each rank trains this epoch (ranks as webdataset's split_by_node sees them)."""
    per_rank = []
    for rank, data in enumerate(loaders):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(RANKS))
        per_rank.append([str(key) for (key,) in data])
    return per_rank


@pytest.mark.parametrize("persistent", [False, True])
def test_resampled_with_epoch_trains_fewer_samples_by_the_planned_fraction(
        shard_urls, store, persistent, monkeypatch, caplog):
    full = SHARDS * PER_SHARD  # samples drawn per epoch: 2 ranks x 2 workers x 250
    # the same pipeline without pruning, and with the stage but no epoch length: n trained
    unpruned = train_epoch([loader(resampled(shard_urls), False) for _ in range(RANKS)],
                           monkeypatch)
    assert [len(keys) for keys in unpruned] == [WORKERS * EPOCH_SAMPLES] * RANKS
    silent = ibs.InfoBatch(store, num_epochs=NUM_EPOCHS)
    replaced = train_epoch([loader(resampled(shard_urls, silent.stage()), False)
                            for _ in range(RANKS)], monkeypatch)
    assert sum(map(len, replaced)) == full  # pruned samples were replaced by more draws

    ib = ibs.InfoBatch(store, num_epochs=NUM_EPOCHS)
    loaders = [loader(resampled(shard_urls, ib.stage(epoch_samples=EPOCH_SAMPLES)), persistent)
               for _ in range(RANKS)]
    assert ib.resampled
    for epoch in (1, 2):
        assert ib.epoch == epoch
        per_rank = train_epoch(loaders, monkeypatch)
        check_within_noise(sum(map(len, per_rank)), store, epoch, ib)
        keys = [k for rank_keys in per_rank for k in rank_keys]
        losses = torch.tensor([float(int(k[-3:]) % 7) for k in keys])  # another ranking
        ib.update(losses, keys)
        with caplog.at_level(logging.WARNING, logger="infobatch_stream"):
            manifest = ib.end_epoch()
        assert manifest.duplicates > 0  # resampling drew some samples twice ...
        assert "collide" not in caplog.text  # ... by design: no "keys collide" warning


def test_the_epoch_length_survives_with_epochs_reruns_and_resets_at_a_commit(
        shard_urls, store, monkeypatch):
    """Finite shards, one process: with_epoch re-runs the pipeline to fill its n outputs; the
    stage's count continues over the re-run and ends the epoch at its n draws."""
    monkeypatch.setattr(draws_module, "_warned_repeat", False)
    ib = ibs.InfoBatch(store, num_epochs=NUM_EPOCHS)
    per_pass = SHARDS * PER_SHARD
    epoch_samples = per_pass + 300  # a pass and a bit
    ds = (wds.WebDataset(shard_urls, shardshuffle=False).compose(ib.stage(epoch_samples=epoch_samples))
          .to_tuple("__key__", "__weight__").with_epoch(10 * per_pass))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "ran again" warning: the length is set
        first = [(str(k), w) for k, w in ds]
    weights = reference_weights(keys_of(per_pass), snapshot_scores(store, keys_of(per_pass)),
                                epoch=1, num_epochs=NUM_EPOCHS)
    expected = [(k, w) for k, w in weights.items() if w] + \
        [(k, w) for k, w in list(weights.items())[:300] if w]
    assert first == expected
    assert [(str(k), w) for k, w in ds] == []  # the same epoch again: its draws are spent
    fill_store(store, {"img-0000000": 1.0}, epoch=1)
    assert len([k for k, _ in ds]) > per_pass // 2  # a new epoch: counted from 0 again


def test_a_pipeline_that_repeats_within_an_epoch_warns_once(shard_urls, store, monkeypatch):
    monkeypatch.setattr(draws_module, "_warned_repeat", False)
    ib = ibs.InfoBatch(store, num_epochs=NUM_EPOCHS)
    per_pass = SHARDS * PER_SHARD
    ds = (wds.WebDataset(shard_urls, shardshuffle=False).compose(ib.stage())
          .to_tuple("__key__").with_epoch(3 * per_pass))
    with pytest.warns(UserWarning, match=r"ran again in epoch 1.*epoch_samples=n") as caught:
        trained = sum(1 for _ in ds)
    assert trained == 3 * per_pass  # what with_epoch does: pruning saved nothing
    assert len([w for w in caught if "ran again" in str(w.message)]) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sum(1 for _ in ds)  # once per process


def test_epoch_draws_belong_to_a_process_and_an_epoch(monkeypatch):
    draws = EpochDraws(5)
    assert list(draws.begin(3, range(100))) == [0, 1, 2, 3, 4]
    draws.took(5)
    assert list(draws.begin(3, range(100))) == []
    monkeypatch.setattr(os, "getpid", lambda: -1)  # a worker forked from a process that counted
    assert len(list(draws.begin(3, range(100)))) == 5
    for bad in (0, -1, True, 2.5):
        with pytest.raises(ValueError, match="epoch_samples"):
            EpochDraws(bad)


def test_bad_epoch_samples_is_refused_and_leaves_the_run_unmarked(store):
    ib = ibs.InfoBatch(store, num_epochs=NUM_EPOCHS)
    with pytest.raises(ValueError, match="epoch_samples"):
        ib.stage(epoch_samples=0)
    assert not ib.resampled


def test_a_commit_with_repeated_keys_names_resampling_unless_expected(tmp_path, caplog):
    store = ibs.ScoreStore(str(tmp_path / "scores"))
    for epoch, expected in ((0, False), (1, True)):
        for _ in range(2):  # two flushes of the same keys: each key updated twice
            with store.writer(epoch) as writer:
                writer.record(["a", "b"], [1.0, 2.0])
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="infobatch_stream"):
            manifest = store.commit(epoch, duplicates_expected=expected)
        assert manifest.duplicates == 2
        if expected:
            assert "collide" not in caplog.text
        else:
            assert "keys collide" in caplog.text and "epoch_samples" in caplog.text


def test_plan_steps_for_resampled_epochs_counts_drawn_times_the_kept_share(store):
    ib = ibs.InfoBatch(store, num_epochs=4, delta=0.5)  # epoch 1 prunes, 2 and 3 anneal
    drawn = 3000
    plan = ib.plan_steps(dataset_size=SHARDS * PER_SHARD, batch_size=10, drawn=drawn)
    share = ib.plan(SHARDS * PER_SHARD).samples / (SHARDS * PER_SHARD)
    first, *rest = plan.epochs
    assert first.samples == round(drawn * share) and not first.exact  # an expectation
    assert [(e.samples, e.exact) for e in rest] == [(drawn, True), (drawn, True)]
    assert plan.total_steps == first.samples // 10 + 2 * drawn // 10
    assert ibs.StepPlan.from_dict(plan.to_dict()) == plan


def test_decoded_samples_before_the_stage_warn_once(shard_urls, store, monkeypatch):
    monkeypatch.setattr(prune_module, "_warned_decoded", False)
    ib = ibs.InfoBatch(store, num_epochs=NUM_EPOCHS)
    raw = wds.WebDataset(shard_urls[:2], shardshuffle=False).compose(ib.stage())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sum(1 for _ in raw) > 0  # raw bytes: no warning

    def decoded():
        return wds.WebDataset(shard_urls[:2], shardshuffle=False).decode().compose(ib.stage())

    with pytest.warns(UserWarning, match=r"\['txt'\].*decoded for nothing.*right after the tar"):
        assert sum(1 for _ in decoded()) > 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sum(1 for _ in decoded())  # once per process


def test_the_readmes_resampled_snippet_runs_and_saves(tmp_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Resampled shards (multi-node)", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False,
                          env=dict(os.environ, OMP_NUM_THREADS="1",
                                   INFOBATCH_STREAM_CACHE=str(tmp_path / "cache")))
    assert done.returncode == 0, done.stderr[-3000:]
    trained = [int(line.split("trained ")[1].split()[0]) for line in done.stdout.splitlines()]
    assert len(trained) == 6 and trained[0] == trained[5] == 400, done.stdout
    assert all(t < 400 for t in trained[1:5]), done.stdout  # pruning epochs draw 400, train fewer
