"""The stages in webdataset's idiom: pipelines, pickling, handlers, key functions, epochs."""

from __future__ import annotations

import io
import math
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import webdataset as wds
import xxhash

import infobatch_stream as ibs
from infobatch_stream.stages.keyfn import MissingKeyError
from infobatch_stream.storage import ScoreSnapshot

from .helpers import (
    brace_url,
    decisions,
    fill_store,
    kept,
    memory_samples,
    pairs,
    reference_weights,
    snapshot_scores,
)


def expected(shards, store, epoch: int = 1, **settings) -> set[tuple[str, float]]:
    return kept(reference_weights(shards.keys, snapshot_scores(store, shards.keys), epoch=epoch,
                                  num_epochs=settings.pop("num_epochs", 10), **settings))


def webdataset(shards, stage, urls=None):
    return wds.WebDataset(urls or brace_url(shards.paths), shardshuffle=False).compose(stage)


def test_stage_in_a_data_pipeline(shards, cache_dir):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(shards.paths), wds.tarfile_to_samples(), ib.stage(),
        wds.to_tuple("__key__", "__weight__"),
    )
    got = pairs(pipeline)
    assert len(got) == len(set(got)) == ib.plan(len(shards.keys)).samples
    assert set(got) == expected(shards, store)
    assert len(got) < len(shards.keys)


def test_stage_composed_into_webdataset_before_decode(shards, cache_dir):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    dataset = webdataset(shards, ib.stage()).decode().to_tuple("__key__", "__weight__", "cls")
    rows = list(dataset)
    assert {(k, w) for k, w, _ in rows} == expected(shards, store)
    assert all(cls == int(k[-7:]) % 10 for k, _, cls in rows)  # decode still sees the bytes


def test_lookup_stage_attaches_scores_and_drops_nothing(shards, cache_dir):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    samples = list(webdataset(shards, ib.lookup_stage()))
    assert [s["__key__"] for s in samples] == shards.keys
    for sample in samples:
        known = shards.scores.get(sample["__key__"])
        assert (math.isnan(sample["__score__"]) if known is None
                else sample["__score__"] == known)


def test_stages_pickle_and_still_work(shards, cache_dir):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    stage = pickle.loads(pickle.dumps(ib.stage()))
    samples = list(wds.DataPipeline(wds.SimpleShardList(shards.paths), wds.tarfile_to_samples(),
                                    stage))
    assert set(decisions(samples).items()) == expected(shards, store)
    # the whole dataset too (what a spawned DataLoader worker receives)
    dataset = pickle.loads(pickle.dumps(webdataset(shards, ib.stage()).to_tuple("__key__", "__weight__")))
    assert set(pairs(dataset)) == expected(shards, store)
    lookup = pickle.loads(pickle.dumps(ib.lookup_stage()))
    assert len(list(lookup(iter(memory_samples(shards.keys))))) == len(shards.keys)


def _drop_key(victim: str):
    def drop(sample):
        if sample["__key__"] == victim:
            del sample["__key__"]
        return sample
    return drop


def test_sample_without_key_is_an_error_naming_field_and_shard(shards, cache_dir):
    ib = ibs.InfoBatch(shards.store(cache_dir), num_epochs=10)
    victim = shards.keys[shards.counts[0] + 5]  # in the second shard
    dataset = wds.WebDataset(shards.paths, shardshuffle=False).map(_drop_key(victim)).compose(
        ib.stage())
    with pytest.raises(MissingKeyError) as info:
        list(dataset)
    message = str(info.value)
    assert "'__key__'" in message and shards.paths[1] in message
    assert isinstance(info.value, KeyError)


def test_sample_without_key_is_skipped_with_warn_and_continue(shards, cache_dir):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    victims = {shards.keys[3], shards.keys[-1]}
    dataset = wds.WebDataset(shards.paths, shardshuffle=False)
    for victim in victims:
        dataset = dataset.map(_drop_key(victim))
    dataset = dataset.compose(ib.stage(handler=wds.warn_and_continue))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = list(dataset)
    assert sum("'__key__'" in str(w.message) for w in caught) == len(victims)
    got = set(decisions(s for s in samples if "__key__" in s).items())
    assert all("__key__" in s for s in samples)
    assert got == {p for p in expected(shards, store) if p[0] not in victims}


def test_a_handler_that_stops_ends_the_stream_at_the_bad_sample(cache_dir, tmp_path):
    store = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    samples = memory_samples([f"k{i}" for i in range(10)])
    del samples[6]["__key__"]
    stage = ibs.InfoBatch(store, num_epochs=10).stage(handler=lambda exn: False)
    assert [s["__key__"] for s in stage(iter(samples))] == [f"k{i}" for i in range(6)]


def _tar(path, keys):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            data = key.encode()
            info = tarfile.TarInfo(f"{key}.txt")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_shard_key_tells_apart_keys_that_repeat_across_shards(tmp_path, cache_dir):
    keys = [f"{i:06d}" for i in range(2000)]
    urls = [str(tmp_path / "train-0000.tar"), str(tmp_path / "train-0001.tar")]
    for url in urls:
        _tar(url, keys)  # the same keys in both shards
    qualified = [f"train-{s:04d}.tar/{k}" for s in range(2) for k in keys]
    store = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    # the second shard's samples all have high losses, the first shard's low ones
    fill_store(store, {q: (0.1 if q.startswith("train-0000") else 10.0) for q in qualified}, 0)

    ib = ibs.InfoBatch(store, num_epochs=10, key="shard")
    samples = list(wds.WebDataset(urls, shardshuffle=False).compose(ib.stage()))
    by_shard = {}
    for sample in samples:
        name = f"{os.path.basename(sample['__url__'])}/{sample['__key__']}"
        assert sample["__key_hash__"] % (1 << 64) == xxhash.xxh3_64_intdigest(name.encode())
        by_shard.setdefault(name.split("/")[0], []).append(sample)
    assert len(by_shard["train-0001.tar"]) == len(keys)  # above the mean: all kept
    assert {s["__weight__"] for s in by_shard["train-0001.tar"]} == {1.0}
    first = by_shard["train-0000.tar"]
    assert abs(len(first) - len(keys) / 2) < 5 * math.sqrt(len(keys) / 4)
    assert {s["__weight__"] for s in first} == {2.0}
    assert {s["__score__"] for s in first} == {float(np.float32(0.1))}
    assert set(ib.weights_for([s["__key_hash__"] for s in first]).tolist()) == {2.0}

    # with the plain key, both shards' samples would be looked up as the same, unknown key
    plain = list(wds.WebDataset(urls, shardshuffle=False).compose(
        ibs.InfoBatch(store, num_epochs=10).stage()))
    assert len(plain) == 2 * len(keys) and all(math.isnan(s["__score__"]) for s in plain)


def label_key(sample: dict) -> str:
    """A key built from a field of the sample (module level, so it pickles)."""
    return "id:" + sample["bin"].decode()


def test_callable_key(cache_dir, tmp_path):
    keys = [f"k{i}" for i in range(4000)]
    store = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    scores = {f"id:{k}": float(i % 7) for i, k in enumerate(keys)}
    fill_store(store, scores, 0)
    samples = [{"__key__": str(i), "__url__": "u", "bin": k.encode()} for i, k in enumerate(keys)]
    for key in (label_key, lambda s: "id:" + s["bin"].decode()):
        ib = ibs.InfoBatch(store, num_epochs=10, key=key)
        stage = pickle.loads(pickle.dumps(ib.stage())) if key is label_key else ib.stage()
        out = list(stage(iter([dict(s) for s in samples])))
        ref = kept(reference_weights(list(scores), scores, epoch=1, num_epochs=10))
        assert {("id:" + s["bin"].decode(), s["__weight__"]) for s in out} == ref
        assert all(s["__score__"] == scores["id:" + s["bin"].decode()] for s in out)


@pytest.mark.parametrize("prune_ratio", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_prune_ratio_outside_zero_one_is_rejected(tmp_path, prune_ratio):
    with pytest.raises(ValueError, match="prune_ratio"):
        ibs.InfoBatch(str(tmp_path / "s"), num_epochs=10, prune_ratio=prune_ratio)
    for policy in (ibs.InfoBatchPolicy, ibs.RandomPolicy):
        with pytest.raises(ValueError, match="prune_ratio"):
            policy(num_epochs=10, prune_ratio=prune_ratio)


@pytest.mark.parametrize("delta", [-0.01, 1.01, float("nan"), float("inf")])
def test_delta_outside_zero_one_is_rejected(tmp_path, delta):
    with pytest.raises(ValueError, match="delta"):
        ibs.InfoBatch(str(tmp_path / "s"), num_epochs=10, delta=delta)
    with pytest.raises(ValueError, match="delta"):
        ibs.InfoBatchPolicy(num_epochs=10, delta=delta)


@pytest.mark.parametrize("prune_ratio, delta", [(0.0, 0.0), (0.999, 1.0), (0.5, 0.5)])
def test_boundary_settings_are_accepted(tmp_path, prune_ratio, delta):
    ibs.InfoBatch(str(tmp_path / "s"), num_epochs=10, prune_ratio=prune_ratio, delta=delta)


@pytest.mark.filterwarnings("ignore:the pruning stage ran again")  # iterates twice per epoch
def test_stage_follows_the_store_to_a_new_epoch_and_reloads_only_then(
        shards, tmp_path, cache_dir, monkeypatch):
    opened = []
    original = ScoreSnapshot.open.__func__

    def counting_open(cls, path, epoch):
        opened.append(epoch)
        return original(cls, path, epoch)

    monkeypatch.setattr(ScoreSnapshot, "open", classmethod(counting_open))
    store = shards.private_store(tmp_path, cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    dataset = webdataset(shards, ib.stage()).to_tuple("__key__", "__weight__")  # built once

    first = set(pairs(dataset))
    assert first == expected(shards, store, epoch=1)
    again = set(pairs(dataset))
    assert again == first
    assert opened == [0]  # the second pass reused the mapped snapshot

    # the trainer records new losses (the reverse ranking) and commits epoch 1
    new_scores = {k: 10.0 - v for k, v in list(shards.scores.items())[::2]}
    fill_store(store, new_scores, epoch=1)
    second = set(pairs(dataset))
    assert opened == [0, 1]
    assert second == expected(shards, store, epoch=2)
    assert second != first
    assert set(pairs(dataset)) == second and opened == [0, 1]


def test_a_key_that_is_not_a_string_names_its_shard(cache_dir, tmp_path):
    store = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    samples = memory_samples([f"k{i}" for i in range(20)], url="s3://bucket/shard-0007.tar")
    samples[4]["score"] = 1.5

    def bad_key(sample):
        return sample.get("score", sample["__key__"])  # a float for one sample

    stage = ibs.InfoBatch(store, num_epochs=10, key=bad_key).stage()
    with pytest.raises(TypeError, match=r"shard s3://bucket/shard-0007\.tar"):
        list(stage(iter([dict(s) for s in samples])))
    skipping = ibs.InfoBatch(store, num_epochs=10, key=bad_key).stage(handler=wds.ignore_and_continue)
    assert [s["__key__"] for s in skipping(iter(samples))] == [f"k{i}" for i in range(20) if i != 4]
