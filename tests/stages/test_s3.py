"""Shards and the store on S3 (a real S3 server, reached through s3fs): the same decisions
as from local disk, in the main process and in DataLoader workers."""

from __future__ import annotations

import copy
import multiprocessing

import fsspec.config
import pytest
import s3fs
import torch
import webdataset as wds

import infobatch_stream as ibs

from .helpers import fill_store, kept, pairs, reference_weights, snapshot_scores


@pytest.fixture
def fresh_s3fs():
    """No s3fs instance made under other settings (endpoint, keys) leaks in or out."""
    s3fs.S3FileSystem.clear_instance_cache()
    yield
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3_shards(s3_server, s3_bucket, shards, fresh_s3fs):
    """The shards uploaded to s3://<bucket>/data/; returns their brace URL."""
    fs = s3_server.filesystem()
    for path in shards.paths:
        fs.put_file(path, f"{s3_bucket}/data/{path.rsplit('/', 1)[-1]}")
    return f"s3://{s3_bucket}/data/shard-{{0000..{len(shards.paths) - 1:04d}}}.tar"


@pytest.fixture
def shard_options(monkeypatch):
    """Restores fsspec's config and FSSPEC_S3 after ``set_shard_storage_options``."""
    saved = copy.deepcopy(fsspec.config.conf)
    monkeypatch.delenv("FSSPEC_S3", raising=False)
    yield
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved)


def expected(shards, store) -> set[tuple[str, float]]:
    return kept(reference_weights(shards.keys, snapshot_scores(store, shards.keys), epoch=1,
                                  num_epochs=10))


def loader(urls, ib, num_workers: int, context=None):
    data = wds.WebDataset(urls, shardshuffle=False).compose(ib.stage()).to_tuple(
        "__key__", "__weight__")
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers,
                                       multiprocessing_context=context)


def test_s3_shards_and_store_through_the_aws_environment(
        s3_server, s3_bucket, s3_shards, shards, cache_dir, monkeypatch):
    # AWS_ENDPOINT_URL is honoured by botocore (and so by s3fs): nothing else is configured
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    store = ibs.ScoreStore(f"s3://{s3_bucket}/scores", cache_dir=cache_dir)
    fill_store(store, shards.scores, epoch=0)
    ib = ibs.InfoBatch(f"s3://{s3_bucket}/scores", num_epochs=10, cache_dir=cache_dir)

    want = expected(shards, store)
    local = ibs.InfoBatch(shards.store(cache_dir), num_epochs=10)
    assert set(pairs(loader(shards.paths, local, 0))) == want
    for num_workers in (0, 2):
        got = pairs(loader(s3_shards, ib, num_workers))
        assert len(got) == len(set(got)) and set(got) == want
    assert ib.plan(len(shards.keys)).samples == len(want)


def test_s3_shards_with_shard_storage_options_and_spawned_workers(
        s3_server, s3_bucket, s3_shards, shards, cache_dir, shard_options, monkeypatch):
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    ibs.set_shard_storage_options("s3", endpoint_url=s3_server.endpoint_url)
    # the store takes its endpoint from storage_options, as a user passes it
    ib = ibs.InfoBatch(f"s3://{s3_bucket}/scores", num_epochs=10,
                       storage_options=s3_server.storage_options, cache_dir=cache_dir)
    fill_store(ib.store, shards.scores, epoch=0)
    want = expected(shards, ib.store)

    assert set(pairs(loader(s3_shards, ib, 0))) == want
    # spawned workers start from a fresh interpreter: they see the shard options only
    # through the FSSPEC_S3 variable set_shard_storage_options exported
    spawn = multiprocessing.get_context("spawn")
    got = pairs(loader(s3_shards, ib, 2, context=spawn))
    assert len(got) == len(set(got)) and set(got) == want


def test_missing_s3_shard_names_the_url(s3_server, s3_bucket, s3_shards, shards, cache_dir,
                                        monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    ib = ibs.InfoBatch(shards.store(cache_dir), num_epochs=10)
    url = f"s3://{s3_bucket}/data/shard-9999.tar"
    with pytest.raises(FileNotFoundError, match=r"shard-9999\.tar"):
        list(loader(url, ib, 0))
