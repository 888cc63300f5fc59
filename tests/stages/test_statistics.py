"""What the pruning stage yields, measured over 100k keys of a real committed store.

Bounds are 5 binomial standard deviations: a correct stage fails one of them with a
probability below 1e-6, and the draws are fixed by (seed, epoch, key), so a pass or a
failure is reproducible, never flaky.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import xxhash

import infobatch_stream as ibs

from .helpers import decisions, fill_store, kept, keys_of, memory_samples, reference_weights, snapshot_scores

SIGMAS = 5


def run_stage(stage, keys, **fields) -> dict[str, float]:
    samples = memory_samples(keys)
    for sample in samples:
        sample.update(fields)
    return decisions(stage(iter(samples)))


def within(observed: float, expected: float, sigma: float) -> bool:
    return abs(observed - expected) <= SIGMAS * sigma


@pytest.mark.parametrize("prune_ratio", [0.3, 0.5, 0.7])
def test_below_mean_kept_at_one_minus_r_and_weighted_unbiased(big_store, cache_dir, prune_ratio):
    store = big_store.open(cache_dir)
    ib = ibs.InfoBatch(store, num_epochs=10, prune_ratio=prune_ratio)
    out = run_stage(ib.stage(), big_store.known + big_store.unseen)
    scores = big_store.scores
    values = np.array(list(scores.values()), np.float64)
    mean = store.snapshot().mean
    assert mean == pytest.approx(values.mean(), rel=1e-12)

    below = [k for k in big_store.known if scores[k] < mean]
    n = len(below)
    assert n > 0.55 * len(big_store.known)  # right-skewed losses: most samples are below
    r, w = prune_ratio, 1.0 / (1.0 - prune_ratio)
    kept_below = [k for k in below if k in out]
    assert within(len(kept_below) / n, 1 - r, math.sqrt(r * (1 - r) / n))
    # every kept below-mean sample carries 1/(1-r), so E[kept x weight] = 1 per sample
    assert {out[k] for k in kept_below} == {float(np.float32(w))}
    assert within(sum(out.get(k, 0.0) for k in below) / n, 1.0, w * math.sqrt(r * (1 - r) / n))
    # the draw does not look at the score: the lowest and the highest below-mean halves
    # both keep 1-r of their samples
    ordered = sorted(below, key=scores.__getitem__)
    for half in (ordered[: n // 2], ordered[n // 2:]):
        fraction = sum(k in out for k in half) / len(half)
        assert within(fraction, 1 - r, math.sqrt(r * (1 - r) / len(half)))
    # the point of the weights: the weighted loss of what is kept estimates the full loss
    total = float(values.sum())
    weighted = sum(scores[k] * wk for k, wk in out.items() if k in scores)
    variance = sum(scores[k] ** 2 for k in below) * r / (1 - r)
    assert within(weighted, total, math.sqrt(variance))
    # and the exact decisions are those of the documented construction
    assert set(out.items()) == kept(reference_weights(
        big_store.known + big_store.unseen, scores, epoch=1, num_epochs=10, prune_ratio=r))


def test_at_or_above_mean_and_unseen_always_kept_with_weight_one(tmp_path, cache_dir):
    known = keys_of(50_000)
    # scores 0..4 in turn: the mean is exactly 2.0, so a fifth of the keys sit on it
    scores = {k: float(i % 5) for i, k in enumerate(known)}
    store = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    fill_store(store, scores, epoch=0)
    assert store.snapshot().mean == 2.0
    unseen = keys_of(5_000, prefix="new-")

    samples = memory_samples(known + unseen)
    out = {s["__key__"]: s for s in ibs.InfoBatch(store, num_epochs=10).stage()(iter(samples))}
    for key in known:
        if scores[key] >= 2.0:
            assert out[key]["__weight__"] == 1.0, key
            assert out[key]["__score__"] == scores[key]
    for key in unseen:
        assert out[key]["__weight__"] == 1.0 and math.isnan(out[key]["__score__"])
    below = [k for k in known if scores[k] < 2.0]
    kept_below = [k for k in below if k in out]
    assert within(len(kept_below) / len(below), 0.5, math.sqrt(0.25 / len(below)))
    assert {out[k]["__weight__"] for k in kept_below} == {2.0}
    # the key hash travels as a signed int64 (it collates into a tensor)
    sample = out[known[3]]
    expected = xxhash.xxh3_64_intdigest(known[3].encode())
    assert sample["__key_hash__"] == expected - (1 << 64) * (expected >= 1 << 63)


@pytest.mark.parametrize("num_epochs, delta, start", [(100, 0.29, 29), (10, 0.875, 8), (3, 1.0, 3)])
def test_annealing_epochs_keep_everything_with_weight_one(tmp_path, cache_dir, num_epochs,
                                                          delta, start):
    assert ibs.annealing_start(num_epochs, delta) == start  # 0.29 x 100 is 29, not 28
    keys = keys_of(5_000)
    scores = dict(zip(keys, np.random.default_rng(1).exponential(1.0, len(keys)).tolist(), strict=True))
    store = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    fill_store(store, scores, epoch=0)
    for epoch in range(1, start - 1):  # epochs that trained no sample: the scores stay
        fill_store(store, {}, epoch)
    ib = ibs.InfoBatch(store, num_epochs=num_epochs, delta=delta)
    stage = ib.stage()

    last_pruning = start - 1
    assert ib.epoch == last_pruning
    out = run_stage(stage, keys)
    assert len(out) < len(keys) and set(out.values()) == {1.0, 2.0}
    assert set(out.items()) == kept(reference_weights(
        keys, snapshot_scores(store, keys), epoch=last_pruning, num_epochs=num_epochs,
        delta=delta))

    if start < num_epochs:
        fill_store(store, {}, last_pruning)
        assert ib.epoch == start
        out = run_stage(stage, keys)
        assert out == dict.fromkeys(keys, 1.0)
        assert ib.plan(len(keys)).annealing and ib.plan(len(keys)).samples == len(keys)


@pytest.mark.parametrize("how", ["missing directory", "empty directory"])
def test_epoch_zero_prunes_nothing(tmp_path, cache_dir, how):
    url = tmp_path / "scores"
    if how == "empty directory":
        url.mkdir()
    keys = keys_of(20_000)
    ib = ibs.InfoBatch(str(url), num_epochs=10, cache_dir=cache_dir)
    samples = list(ib.stage()(iter(memory_samples(keys))))
    assert [s["__key__"] for s in samples] == keys
    assert all(s["__weight__"] == 1.0 and math.isnan(s["__score__"]) for s in samples)
    assert ib.plan(len(keys)).samples == len(keys)


def test_prune_ratio_zero_prunes_nothing(big_store, cache_dir):
    ib = ibs.InfoBatch(big_store.open(cache_dir), num_epochs=10, prune_ratio=0.0)
    assert run_stage(ib.stage(), big_store.known) == dict.fromkeys(big_store.known, 1.0)


@pytest.mark.parametrize("policy", ["infobatch", "random"])
@pytest.mark.parametrize("prune_ratio", [0.3, 0.7])
def test_planned_count_is_the_count_the_stage_yields(big_store, cache_dir, policy, prune_ratio):
    ib = ibs.InfoBatch(big_store.open(cache_dir), num_epochs=10, prune_ratio=prune_ratio,
                       policy=policy)
    dataset = big_store.known + big_store.unseen
    plan = ib.plan(dataset_size=len(dataset))
    out = run_stage(ib.stage(), dataset)
    assert plan.epoch == 1 and plan.rule.prunes
    assert plan.samples == len(out)
    assert plan.kept_known == sum(k in out for k in big_store.known)
    assert plan.unseen == len(big_store.unseen)


def test_random_policy_keeps_as_many_as_infobatch_on_average(big_store, cache_dir):
    store = big_store.open(cache_dir)
    r = 0.5
    dataset = big_store.known + big_store.unseen
    n_known = len(big_store.known)
    mean = store.snapshot().mean
    below = sum(v < mean for v in big_store.scores.values())
    above = [k for k in big_store.known if big_store.scores[k] >= mean]
    expected = n_known - r * below + len(big_store.unseen)
    q = r * below / n_known  # RandomPolicy drops any known sample with this probability

    infobatch = run_stage(ibs.InfoBatch(store, num_epochs=10, prune_ratio=r).stage(), dataset)
    assert within(len(infobatch), expected, math.sqrt(below * r * (1 - r)))
    for seed in (0, 1, 2):
        ib = ibs.InfoBatch(store, num_epochs=10, prune_ratio=r, policy="random", seed=seed)
        out = run_stage(ib.stage(), dataset)
        assert within(len(out), expected, math.sqrt(n_known * q * (1 - q)))
        assert set(out.values()) == {1.0}
        assert set(big_store.unseen) <= set(out)
        # uniform: samples at or above the mean are dropped as often as those below
        dropped_above = sum(k not in out for k in above)
        assert within(dropped_above / len(above), q, math.sqrt(q * (1 - q) / len(above)))


def test_no_global_random_state_is_touched(big_store, cache_dir):
    random.seed(11)
    np.random.seed(11)
    torch.manual_seed(11)
    before = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    for policy in ("infobatch", "random"):
        ib = ibs.InfoBatch(big_store.open(cache_dir), num_epochs=10, policy=policy, seed=5)
        out = run_stage(ib.stage(), big_store.known)
        assert len(out) < len(big_store.known)  # it did prune
    after = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    assert after[0] == before[0]
    name, keys, *rest = after[1]
    assert name == before[1][0] and np.array_equal(keys, before[1][1]) and rest == list(before[1][2:])
    assert torch.equal(after[2], before[2])


def test_decisions_depend_on_seed_epoch_and_key_only(big_store, cache_dir, tmp_path):
    keys = big_store.known[:30_000] + big_store.unseen
    store = big_store.open(cache_dir)
    reference = kept(reference_weights(keys, big_store.scores, epoch=1, num_epochs=10, seed=0))
    base = set(run_stage(ibs.InfoBatch(store, num_epochs=10).stage(), keys).items())
    assert base == reference

    # not the order of the samples, the window, other fields, the shard, a new process's store
    shuffled = keys[:]
    random.Random(3).shuffle(shuffled)
    for window in (1, 7, 4096):
        ib = ibs.InfoBatch(big_store.open(cache_dir), num_epochs=10, window=window)
        out = run_stage(ib.stage(), shuffled, __url__="s3://elsewhere/shard-0042.tar",
                        jpg=b"other bytes")
        assert set(out.items()) == reference
    # a subset sees the same fate for each of its samples
    subset = run_stage(ibs.InfoBatch(store, num_epochs=10).stage(), keys[::97])
    assert set(subset.items()) == {p for p in reference if p[0] in set(keys[::97])}

    # another seed: other draws at the same budget
    other_seed = set(run_stage(ibs.InfoBatch(store, num_epochs=10, seed=1).stage(), keys).items())
    assert other_seed != base
    assert other_seed == kept(reference_weights(keys, big_store.scores, epoch=1, num_epochs=10,
                                                seed=1))
    assert abs(len(other_seed) - len(base)) < 0.02 * len(base)

    # another epoch from the very same scores (an epoch that updated nothing): other draws
    private = ibs.ScoreStore(str(tmp_path / "scores"), cache_dir=cache_dir)
    fill_store(private, {k: big_store.scores[k] for k in big_store.known[:30_000]}, epoch=0)
    fill_store(private, {}, epoch=1)
    epoch2 = set(run_stage(ibs.InfoBatch(private, num_epochs=10).stage(), keys).items())
    assert epoch2 != base
    assert epoch2 == kept(reference_weights(keys, snapshot_scores(private, keys), epoch=2,
                                            num_epochs=10))
