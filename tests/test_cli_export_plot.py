"""``export --shards`` (a key column read from the shards, local and on S3) and ``plot``'s
log axis for skewed scores."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import webdataset as wds

from infobatch_stream import ScoreStore, cli, hash_keys

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_shards(directory, groups: list[list[str]]) -> list[str]:
    """One shard per group of keys; each sample has two members (as images + labels do),
    and each shard a webdataset ``__meta__`` member, which is no sample."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, keys in enumerate(groups):
        path = str(directory / f"train-{i:06d}.tar")
        with wds.TarWriter(path) as sink:
            for key in keys:
                sink.write({"__key__": key, "jpg": b"\xff\xd8" + key.encode(), "cls": 3})
        paths.append(path)
    return paths


def committed_store(url: str, keys: list[str], **kwargs) -> ScoreStore:
    store = ScoreStore(url, **kwargs)
    with store.writer(0) as writer:
        writer.record(keys, np.arange(1, len(keys) + 1, dtype=np.float32))
    store.commit(0)
    return store


def check_key_column(out, store: ScoreStore, in_shards: set[str]) -> None:
    table = pq.read_table(out)
    assert table.column_names == ["key", "hash", "score", "epoch"]
    assert table.num_rows == len(store.snapshot())
    keys, hashes = table["key"].to_pylist(), table["hash"].to_numpy()
    named = [(k, h) for k, h in zip(keys, hashes, strict=True) if k is not None]
    assert {k for k, _ in named} == in_shards
    assert hash_keys([k for k, _ in named]).tolist() == [h for _, h in named]  # each its own hash
    assert json.loads(table.schema.metadata[b"infobatch_stream"])["key"] in ("key", "shard")


def test_export_with_shards_adds_the_key_strings(tmp_path, capsys):
    scored = [f"{i:05d}" for i in range(100)]
    store = committed_store(str(tmp_path / "scores"), scored)
    # 80 scored keys in the shards, 10 the store never saw; 20 scored keys in no shard
    write_shards(tmp_path / "shards", [scored[:50], scored[50:80] + [f"new{i}" for i in range(10)]])
    out = tmp_path / "scores.parquet"
    pattern = str(tmp_path / "shards" / "train-{000000..000001}.tar")
    assert cli.main(["export", store.url, str(out), "--shards", pattern]) == 0
    printed = capsys.readouterr().out
    assert "key strings from 90 samples of the shards: 80 of 100 rows have one (20 null" in printed
    assert "10 distinct shard keys have no score" in printed
    check_key_column(out, store, set(scored[:80]))


def test_export_with_shard_qualified_keys(tmp_path, capsys):
    groups = [[f"{i:03d}" for i in range(20)], [f"{i:03d}" for i in range(15)]]  # keys repeat
    paths = write_shards(tmp_path / "shards", groups)
    qualified = [f"train-{s:06d}.tar/{k}" for s, keys in enumerate(groups) for k in keys]
    store = committed_store(str(tmp_path / "scores"), qualified)
    out = tmp_path / "scores.parquet"
    argv = ["export", store.url, str(out), "--shards", paths[0], "--shards", paths[1]]
    assert cli.main([*argv, "--key", "shard"]) == 0
    check_key_column(out, store, set(qualified))
    assert cli.main(argv) == 0  # the plain __key__ is not what this store was given
    assert "0 of 35 rows have one" in capsys.readouterr().out


def test_export_with_shards_on_s3(tmp_path, s3_server, s3_bucket, cache_dir, capsys):
    keys = [f"img{i:04d}" for i in range(60)]
    fs = s3_server.filesystem()
    for path in write_shards(tmp_path / "shards", [keys[:30], keys[30:]]):
        fs.put_file(path, f"{s3_bucket}/shards/{path.rsplit('/', 1)[-1]}")
    url = f"s3://{s3_bucket}/runs/a/scores"
    store = committed_store(url, keys, storage_options=s3_server.storage_options,
                            cache_dir=cache_dir)
    options = []
    for key, value in s3_server.storage_options.items():
        options += ["--storage-option", f"{key}={value}"]
    out = tmp_path / "s3.parquet"
    shards = f"s3://{s3_bucket}/shards/train-{{000000..000001}}.tar"
    assert cli.main(["export", url, str(out), "--shards", shards, *options,
                     "--cache-dir", cache_dir]) == 0
    assert "60 of 60 rows have one" in capsys.readouterr().out
    check_key_column(out, store, set(keys))
    missing = f"s3://{s3_bucket}/shards/nothing.tar"
    assert cli.main(["export", url, str(out), "--shards", missing, *options,
                     "--cache-dir", cache_dir]) == 2
    err = capsys.readouterr().err
    assert missing in err and err.count("\n") == 1


def test_export_without_shards_reads_no_shards_and_a_bad_shard_exits_2(tmp_path, capsys):
    store = committed_store(str(tmp_path / "scores"), ["a", "b"])
    out = tmp_path / "plain.parquet"
    assert cli.main(["export", store.url, str(out)]) == 0
    assert pq.read_table(out).column_names == ["hash", "score", "epoch"]
    (tmp_path / "junk.tar").write_bytes(b"not a tar file" * 100)
    assert cli.main(["export", store.url, str(out), "--shards", str(tmp_path / "junk.tar")]) == 2
    err = capsys.readouterr().err
    assert "junk.tar" in err and err.count("\n") == 1


# -- plot's axis ------------------------------------------------------------------------------

@pytest.mark.parametrize("scores, log", [
    (np.random.default_rng(0).lognormal(0, 2.5, 5000), True),    # heavy right tail
    (np.random.default_rng(0).exponential(1.0, 5000), False),    # max/median ~ 13
    (np.random.default_rng(0).normal(5, 1, 5000), False),
    (np.r_[np.zeros(4000), np.random.default_rng(0).lognormal(0, 3, 1000)], True),  # zeros
    (np.zeros(10), False),
])
def test_the_log_axis_is_chosen_for_strongly_right_skewed_scores(scores, log):
    assert cli.wants_log_axis([np.asarray(scores, np.float32)]) is log


def test_log_bins_cover_every_score_including_zero_and_negative():
    scores = np.float32([0.0, 0.0, 1e-9, 0.5, 3.0, 1e4])
    edges, floor = cli.log_bins([scores], 20)
    assert np.all(np.diff(edges) > 0) and edges[0] <= floor and edges[-1] >= 1e4
    assert floor == pytest.approx(1e4 * 1e-6)  # at most six decades below the top
    counts, _ = np.histogram(np.maximum(scores, np.float32(floor)), bins=edges)
    assert counts.sum() == len(scores) and counts[0] == 3  # 0, 0 and 1e-9: the first bin
    _, floor = cli.log_bins([np.float32([0.0, 0.02, 7.0])], 20)
    assert floor == pytest.approx(0.02)  # the smallest positive score, when within range
    edges, floor = cli.log_bins([np.float32([-1.0, 0.0])], 5)  # nothing positive
    assert np.all(np.diff(edges) > 0)


@pytest.mark.parametrize("flag", [[], ["--log"], ["--linear"]])
def test_plot_writes_a_png_on_the_axis_asked_or_chosen(tmp_path, capsys, flag):
    store = ScoreStore(str(tmp_path / "scores"))
    rng = np.random.default_rng(1)
    for epoch in range(2):
        with store.writer(epoch) as writer:
            writer.record([f"k{i}" for i in range(3000)],
                          np.r_[np.zeros(100), rng.lognormal(0, 2.5, 2900)].astype(np.float32))
        store.commit(epoch)
    out = tmp_path / "scores.png"
    assert cli.main(["plot", store.url, str(out), *flag]) == 0
    assert out.read_bytes().startswith(PNG_MAGIC)
    printed = capsys.readouterr().out
    assert ("log x axis" in printed) is (flag != ["--linear"])
    if not flag:
        assert "max/median" in printed  # says why it chose the log axis


def test_log_and_linear_exclude_each_other(tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["plot", str(tmp_path), "x.png", "--log", "--linear"])

