"""Samples with bad or missing keys through the pruning stage, property-based.

Every sample reaching the stage is accounted for: it is yielded with the decision its key's
hash gives (identical keys, within a window or across shards, get identical decisions), or
it goes to the handler exactly once with an error that names the field or the key and the
shard (``warn_and_continue`` skips it and warns; the default re-raises). Nothing is dropped
silently and nothing is yielded twice.
"""

from __future__ import annotations

import numpy as np
import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import infobatch_stream as ibs
from infobatch_stream.stages.prune import _soft_prune

from .helpers import fill_store, keys_of

KNOWN = keys_of(40, prefix="k")
MISSING = object()

sample_key = st.one_of(
    st.sampled_from(KNOWN),                           # known to the store (some pruned)
    st.text(max_size=8), st.binary(max_size=8),       # unseen: always kept, weight 1
    st.builds(lambda s: "x" + s, st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)),
    st.none(), st.just(MISSING), st.floats(), st.integers(-(1 << 70), 1 << 70), st.booleans(),
)


def key_hash(key) -> int | None:
    if isinstance(key, str):
        try:
            return xxhash.xxh3_64_intdigest(key.encode())
        except UnicodeEncodeError:
            return None
    if isinstance(key, bytes):
        return xxhash.xxh3_64_intdigest(key)
    if isinstance(key, int) and not isinstance(key, bool) and -(1 << 63) <= key < 1 << 64:
        return key % (1 << 64)  # documented: an integer key is a precomputed hash
    return None


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = ibs.ScoreStore(str(tmp_path_factory.mktemp("props") / "scores"))
    fill_store(store, {k: float(i % 5) for i, k in enumerate(KNOWN)}, epoch=0)
    return store


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(sample_key, max_size=30), st.integers(1, 8))
def test_every_sample_is_decided_or_handled_exactly_once(store, keys, window) -> None:
    samples = []
    for i, key in enumerate(keys):
        sample = {"__url__": f"shard-{i % 3}.tar", "bin": b"x", "i": i}
        if key is not MISSING:
            sample["__key__"] = key
        samples.append(sample)
    handled = []

    def counting_handler(exn: Exception) -> bool:
        handled.append(exn)
        return True  # skip, as warn_and_continue does

    policy = ibs.InfoBatchPolicy(num_epochs=10, prune_ratio=0.5)
    out = list(_soft_prune(iter(samples), store, policy, window=window, handler=counting_handler))
    bad = [s["i"] for s in samples if key_hash(s.get("__key__")) is None]
    assert len(handled) == len(bad)  # each bad sample reached the handler once
    for exn in handled:
        assert "shard-" in str(exn) and ("'__key__'" in str(exn) or "key" in str(exn))
    yielded = [s["i"] for s in out]
    assert len(yielded) == len(set(yielded)) and not set(yielded) & set(bad)
    # the good samples: kept exactly as the rule decides from the key's hash
    rule = policy.rule(1, store.snapshot())
    good = [s for s in samples if s["i"] not in bad]
    hashes = np.array([key_hash(s["__key__"]) for s in good], np.uint64)
    weights = rule.weights(hashes, store.snapshot().lookup(hashes))
    assert yielded == [s["i"] for s, w in zip(good, weights, strict=True) if w]
    for sample in out:
        assert sample["__key_hash__"] == np.int64(np.uint64(key_hash(sample["__key__"]))
                                                  ).item()
    by_hash: dict[int, float] = {}
    for h, w in zip(hashes.tolist(), weights.tolist(), strict=True):  # same key anywhere: same fate
        assert by_hash.setdefault(h, w) == w

    if bad:  # the default handler re-raises the first bad sample's error
        with pytest.raises((KeyError, TypeError, ValueError)):
            list(_soft_prune(iter(samples), store, policy, window=window))
