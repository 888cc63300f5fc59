"""Damaged and slow shard streams through the pruning stage, on local disk and on S3.

A truncated tar is webdataset's to judge, through its handler: ``reraise_exception`` (the
default) raises an error naming the shard; ``warn_and_continue`` warns, keeps what the shard
yielded before the damage and goes on with the next shard. The stage decides every sample
that reaches it exactly as from an intact shard. webdataset hands on the last, partial
sample of a truncated shard with the members it read (the stage decides it by its key);
``to_tuple`` then refuses it through its own handler. A slow stream changes nothing.
"""

from __future__ import annotations

import io
import time
import warnings

import pytest
import webdataset as wds
from webdataset.gopen import gopen_schemes

import infobatch_stream as ibs

from .helpers import fill_store, keys_of, reference_weights, snapshot_scores

N_SHARDS, PER_SHARD = 3, 40


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    """Three shards of (bin, cls) samples, the middle one also truncated in the middle of a
    sample's second member; and a store that knows every key (epoch 0)."""
    root = tmp_path_factory.mktemp("faults")
    paths, keys = [], []
    for shard in range(N_SHARDS):
        path = root / f"shard-{shard}.tar"
        shard_keys = keys_of(PER_SHARD, prefix=f"s{shard}-")
        with wds.TarWriter(str(path)) as sink:
            for i, key in enumerate(shard_keys):
                sink.write({"__key__": key, "bin": bytes(2000 + i), "cls": i})
        paths.append(str(path))
        keys.append(shard_keys)
    with open(paths[1], "rb") as f:
        raw = f.read()
    # each sample is two members, "bin" then "cls": cut inside the data of the "cls" member
    # (2 bytes: "21") of a sample past the middle
    import tarfile

    with tarfile.open(paths[1]) as tar:
        members = tar.getmembers()
    cut_member = next(m for m in members if m.offset > len(raw) // 2 and m.name.endswith(".cls"))
    assert cut_member.size == 2
    truncated = root / "shard-1-truncated.tar"
    truncated.write_bytes(raw[:cut_member.offset_data + 1])
    at_boundary = root / "shard-1-cut-between-members.tar"
    at_boundary.write_bytes(raw[:cut_member.offset])  # a shorter, valid-looking tar
    complete = [k for k in keys[1] if any(m.name == f"{k}.cls" and m.offset < cut_member.offset
                                          for m in members)]
    partial = cut_member.name[: -len(".cls")]
    store = ibs.ScoreStore(str(root / "scores"), cache_dir=str(root / "cache"))
    scores = {k: float(i % 7) for i, k in enumerate(k for ks in keys for k in ks)}
    fill_store(store, scores, epoch=0)
    return {"paths": paths, "truncated": str(truncated), "keys": keys, "complete": complete,
            "partial": partial, "store": store, "at_boundary": str(at_boundary)}


def reference(tars, keys) -> dict[str, float]:
    return reference_weights(keys, snapshot_scores(tars["store"], keys), epoch=1, num_epochs=10)


def weights(samples) -> dict[str, float]:
    return {s["__key__"]: s["__weight__"] for s in samples}


def urls_with_truncation(tars, paths=None) -> list[str]:
    paths = list(paths or tars["paths"])
    paths[1] = tars["truncated"] if paths[1] == tars["paths"][1] else paths[1]
    return paths


def run_pipeline(urls, tars, handler):
    ib = ibs.InfoBatch(tars["store"], num_epochs=10)
    return list(wds.WebDataset(urls, shardshuffle=False, handler=handler).compose(ib.stage()))


def check_truncated(tars, urls, damaged_url) -> None:
    with pytest.raises(Exception) as info:  # the default handler re-raises
        run_pipeline(urls, tars, wds.reraise_exception)
    assert "unexpected end of data" in str(info.value) and damaged_url in str(info.value.args)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        samples = run_pipeline(urls, tars, wds.warn_and_continue)
    assert any(damaged_url in str(w.message) for w in caught)
    got = weights(samples)
    arrived = tars["keys"][0] + tars["complete"] + [tars["partial"]] + tars["keys"][2]
    want = reference(tars, arrived)
    assert got == {k: w for k, w in want.items() if w}  # exact decisions, nothing else
    # to_tuple refuses the partial sample (no "cls") through its handler
    ib = ibs.InfoBatch(tars["store"], num_epochs=10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rows = list(wds.WebDataset(urls, shardshuffle=False, handler=wds.warn_and_continue)
                    .compose(ib.stage()).decode()
                    .to_tuple("__key__", "cls", "__weight__", handler=wds.warn_and_continue))
    assert {k for k, _, _ in rows} == {k for k, w in want.items() if w} - {tars["partial"]}


def test_a_truncated_shard_on_local_disk(tars) -> None:
    check_truncated(tars, urls_with_truncation(tars), tars["truncated"])


def test_a_truncated_shard_on_s3(tars, s3_server, s3_bucket, monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    fs = s3_server.filesystem()
    urls = []
    for i, path in enumerate(urls_with_truncation(tars)):
        url = f"s3://{s3_bucket}/data/shard-{i}.tar"
        fs.put_file(path, url)
        urls.append(url)
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # no instance made under other settings
    try:
        check_truncated(tars, urls, urls[1])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_shard_cut_between_members_reads_as_a_shorter_shard(tars) -> None:
    """A tar has no length field: cut exactly between two members (or two samples) it reads
    as a complete, shorter archive, and neither tarfile nor webdataset can tell. The stage
    decides what arrives; a job that must detect this counts samples per shard (the plan's
    ``dataset_size`` against what was trained) or keeps a shard index."""
    urls = list(tars["paths"])
    urls[1] = tars["at_boundary"]
    got = weights(run_pipeline(urls, tars, wds.reraise_exception))  # no error at all
    arrived = tars["keys"][0] + tars["complete"] + [tars["partial"]] + tars["keys"][2]
    assert got == {k: w for k, w in reference(tars, arrived).items() if w}


class _Slow(io.RawIOBase):
    """A file that hands out at most 700 bytes per read, 0.2 ms apart."""

    def __init__(self, path: str):
        self._file = open(path, "rb")  # noqa: SIM115 - a stream: close() closes it

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        time.sleep(0.0002)
        data = self._file.read(min(len(buffer), 700))
        buffer[:len(data)] = data
        return len(data)

    def close(self) -> None:
        self._file.close()
        super().close()


def test_a_slow_stream_changes_nothing(tars, monkeypatch) -> None:
    monkeypatch.setitem(gopen_schemes, "slow", lambda url, mode="rb", bufsize=8192, **_:
                        _Slow(url.removeprefix("slow://")))
    fast = weights(run_pipeline(tars["paths"], tars, wds.reraise_exception))
    slow = weights(run_pipeline([f"slow://{p}" for p in tars["paths"]], tars,
                                wds.reraise_exception))
    assert slow == fast and len(fast) > 0
