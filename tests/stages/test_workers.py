"""Determinism with real DataLoader worker processes and with ranks that split the shards.

Each sample's fate is a function of (snapshot, epoch, seed, key): however the shards are
split between workers and ranks, the union of what they yield is the same set of
(key, weight) pairs, each sample exactly once.
"""

from __future__ import annotations

import pytest
import torch
import webdataset as wds

import infobatch_stream as ibs

from .helpers import brace_url, fill_store, kept, pairs, reference_weights, snapshot_scores


def expected(shards, store, epoch: int) -> set[tuple[str, float]]:
    return kept(reference_weights(shards.keys, snapshot_scores(store, shards.keys), epoch=epoch,
                                  num_epochs=10))


def dataset(shards, ib, urls=None, **kwargs):
    return wds.WebDataset(urls or brace_url(shards.paths), shardshuffle=False, **kwargs).compose(
        ib.stage()).to_tuple("__key__", "__weight__")


def loader(data, num_workers: int, persistent: bool = False):
    """Forked workers (Linux's default); test_s3 runs spawned ones, which unpickle the stage."""
    return torch.utils.data.DataLoader(data, batch_size=None, num_workers=num_workers,
                                       persistent_workers=persistent and num_workers > 0)


def test_shards_are_uneven(shards):
    assert len(shards.paths) >= 5 and len(set(shards.counts)) > 1
    assert sum(shards.counts) == len(shards.keys)


@pytest.mark.filterwarnings("ignore:This DataLoader will create 4 worker processes")
@pytest.mark.parametrize("num_workers, persistent", [(0, False), (2, False), (2, True),
                                                     (4, False), (4, True)])
def test_same_decisions_for_any_number_of_workers(shards, cache_dir, num_workers, persistent):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    got = pairs(loader(dataset(shards, ib), num_workers, persistent))
    assert len(got) == len(set(got)), "a sample was yielded twice"
    assert set(got) == expected(shards, store, epoch=1)
    assert len(got) == ib.plan(len(shards.keys)).samples


@pytest.mark.parametrize("persistent", [True, False])
def test_workers_follow_a_commit_between_epochs(shards, tmp_path, cache_dir, persistent):
    store = shards.private_store(tmp_path, cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    data_loader = loader(dataset(shards, ib), 2, persistent)

    first = pairs(data_loader)
    assert set(first) == expected(shards, store, epoch=1) and len(first) == len(set(first))
    # the trainer records new losses (another ranking; some keys seen for the first time)
    # and commits epoch 1
    new_losses = {k: 5.0 - v for k, v in list(shards.scores.items())[::3]}
    new_losses.update(dict.fromkeys(shards.keys[::10][:100], 0.01))
    fill_store(store, new_losses, epoch=1)
    workers = [w.pid for w in data_loader._iterator._workers] if persistent else None
    second = pairs(data_loader)  # the same loader (and, when persistent, the same processes)
    if persistent:
        assert [w.pid for w in data_loader._iterator._workers] == workers
    assert set(second) == expected(shards, store, epoch=2) and len(second) == len(set(second))
    assert set(second) != set(first)


def test_two_ranks_split_the_shards_and_together_decide_as_one_process(
        shards, cache_dir, monkeypatch):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    single = pairs(loader(dataset(shards, ib), 0))

    per_rank = []
    for rank in (0, 1):
        # webdataset's split_by_node reads RANK / WORLD_SIZE, as torchrun sets them
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", "2")
        data = dataset(shards, ib, nodesplitter=wds.split_by_node)
        per_rank.append(pairs(loader(data, 2)))
    zero, one = (set(p) for p in per_rank)
    assert zero and one
    assert not {k for k, _ in zero} & {k for k, _ in one}
    assert zero | one == set(single) == expected(shards, store, epoch=1)
    assert len(per_rank[0]) + len(per_rank[1]) == len(single)


def test_ranks_given_their_own_shard_lists(shards, cache_dir):
    store = shards.store(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10)
    rank_shards = [shards.paths[0::2], shards.paths[1::2]]
    per_rank = [set(pairs(loader(dataset(shards, ib, urls=urls), 2))) for urls in rank_shards]
    assert not {k for k, _ in per_rank[0]} & {k for k, _ in per_rank[1]}
    assert per_rank[0] | per_rank[1] == expected(shards, store, epoch=1)
