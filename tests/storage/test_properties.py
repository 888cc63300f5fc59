"""Bad input, property-based: whatever keys, scores and settings a caller passes, each one is
either stored exactly as documented or refused with a clear error, and nothing wrong is ever
persisted.

The central property: for any sequence of record / flush / commit calls mixing valid and
invalid keys (unicode with lone surrogates, empty, very long, bytes, integers in and out of
64 bits, None, floats, duplicates within a batch and across flushes) and scores (NaN, +-inf,
negative, huge, fp16, bf16, integers, wrong length, strings), every committed snapshot equals
a pure-Python model of the documented semantics and holds only finite float32 scores.
"""

from __future__ import annotations

import math
import shutil
import tempfile

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from infobatch_stream.storage import RetryPolicy, ScoreStore, hash_keys, layout

U64 = 1 << 64
PROPERTY = settings(max_examples=60, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# -- keys -------------------------------------------------------------------------------------

valid_text = st.text(max_size=12) | st.just("") | st.just("k" * 20_000)
surrogate_text = st.builds(lambda a, s, b: a + s + b, st.text(max_size=3),
                           st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF),
                           st.text(max_size=3))
any_key = st.one_of(
    valid_text, surrogate_text, st.binary(max_size=12),
    st.integers(-(1 << 64), 1 << 65),  # in range and out of it
    st.none(), st.floats(allow_nan=True), st.booleans(),
)


def reference_hash(key) -> int | None:
    """The documented hash of one key, or None when the key must be refused."""
    if isinstance(key, str):
        try:
            return xxhash.xxh3_64_intdigest(key.encode("utf-8"))
        except UnicodeEncodeError:
            return None
    if isinstance(key, bytes):
        return xxhash.xxh3_64_intdigest(key)
    if isinstance(key, int) and not isinstance(key, bool):
        return key % U64 if -(1 << 63) <= key < U64 else None
    return None


@PROPERTY
@given(st.lists(any_key, max_size=10))
def test_any_keys_hash_as_documented_or_are_refused_naming_the_key(keys) -> None:
    expected = [reference_hash(k) for k in keys]
    if all(h is not None for h in expected):
        assert hash_keys(keys).tolist() == expected
        return
    first_bad = expected.index(None)
    with pytest.raises((TypeError, ValueError)) as info:
        hash_keys(keys)
    assert f"key #{first_bad}" in str(info.value) or "keys must be" in str(info.value)


# -- scores -----------------------------------------------------------------------------------

score_value = st.one_of(
    st.floats(-1e6, 1e6), st.floats(-1e6, 1e6),
    st.floats(allow_nan=True, allow_infinity=True),  # NaN, +-inf, negative, huge, subnormal
    st.sampled_from([0.0, -0.0, -1.5, 3.4e38, 3.5e38, 1e300, 65504.0, 65520.0, 1e-45]),
)
DTYPES = ("list", "float64", "float32", "float16", "bfloat16", "int64", "strings")


def as_given(values: list[float], dtype: str):
    """The scores as a caller would pass them, and the float32 values the store must see
    (None for an input that must be refused)."""
    if dtype == "list":
        with np.errstate(over="ignore"):
            return values, np.array(values, np.float64).astype(np.float32)
    if dtype == "strings":
        return np.array([str(v) for v in values], dtype=str), None
    if dtype == "bfloat16":
        tensor = torch.tensor(values, dtype=torch.float64).to(torch.bfloat16)
        return tensor, tensor.float().numpy()
    if dtype == "int64":
        ints = np.array([int(v) if math.isfinite(v) and abs(v) < 2**62 else 0 for v in values],
                        np.int64)
        return ints, ints.astype(np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        array = np.array(values, np.float64).astype(dtype)
        return array, array.astype(np.float32)


class Model:
    """The documented semantics, in plain Python: per epoch, flushed updates in write order,
    last write wins; NaN/inf dropped at record and counted; unflushed updates are lost."""

    def __init__(self) -> None:
        self.scores: dict[int, float] = {}
        self.buffer: list[tuple[int, float]] = []
        self.rejected_buffered = 0
        self.flushed: list[tuple[int, float]] = []
        self.rejected_flushed = 0

    def record(self, hashes: list[int], values: np.ndarray) -> None:
        for h, v in zip(hashes, values.tolist(), strict=True):
            if math.isfinite(v):
                self.buffer.append((h, v))
            else:
                self.rejected_buffered += 1

    def flush(self) -> None:
        self.flushed += self.buffer
        self.rejected_flushed += self.rejected_buffered
        self.buffer, self.rejected_buffered = [], 0

    def commit(self) -> dict:
        updated = dict(self.flushed)  # last write wins
        figures = {"updated": len(updated), "duplicates": len(self.flushed) - len(updated),
                   "rejected_nonfinite": self.rejected_flushed,
                   "new_keys": len(set(updated) - set(self.scores))}
        self.scores.update(updated)
        self.buffer, self.flushed, self.rejected_buffered, self.rejected_flushed = [], [], 0, 0
        return figures


valid_key = st.one_of(valid_text, st.binary(max_size=12), st.integers(-(1 << 63), U64 - 1))
bad_key = st.one_of(surrogate_text, st.integers(U64, 1 << 70), st.integers(-(1 << 70), -(1 << 63) - 1),
                    st.none(), st.floats(), st.booleans(), st.just([1]))
rarely = st.sampled_from([False] * 7 + [True])
operation = st.tuples(  # (kind, and for a record: key picks, scores, dtype, mismatch, bad key)
    st.sampled_from(["record"] * 3 + ["flush", "commit", "flush, commit"]),
    st.lists(st.integers(0, 7), min_size=1, max_size=6),
    st.lists(score_value, max_size=6), st.sampled_from(DTYPES[:-1] * 3 + DTYPES[-1:]),
    rarely, st.tuples(st.integers(0, 5), bad_key).map(lambda p: p[1] if p[0] == 0 else None))


@PROPERTY
@given(st.lists(valid_key, min_size=1, max_size=8), st.lists(operation, min_size=3, max_size=20))
def test_any_sequence_of_record_flush_commit_persists_exactly_the_model(pool, ops) -> None:
    """Keys are drawn from a small pool, so duplicates within a batch and across flushes
    are common; a record with a bad key, a bad dtype or a length mismatch must raise and
    change nothing."""
    root = tempfile.mkdtemp(prefix="ibs-prop-")
    try:
        store = ScoreStore(f"{root}/store", cache_dir=f"{root}/cache")
        model, epoch = Model(), 0
        writer = store.writer(epoch)
        for op in ops:
            if op[0] == "record":
                _, picks, values, dtype, mismatch, bad = op
                keys = [pool[i % len(pool)] for i in picks]
                if bad is not None:
                    keys.insert(len(picks) // 2, bad)
                n = len(keys) + (1 if mismatch else 0)
                values = (values * (n // max(len(values), 1) + 1))[:n] if values else [1.0] * n
                scores, as_f32 = as_given(values, dtype)
                hashes = [reference_hash(k) for k in keys]
                refused = (None in hashes or as_f32 is None or mismatch)
                if refused:
                    with pytest.raises((TypeError, ValueError)):
                        writer.record(keys, scores)
                else:
                    writer.record(keys, scores)
                    model.record(hashes, as_f32)
            elif op[0] == "flush":
                writer.flush()
                model.flush()
            else:
                if op[0] == "flush, commit":
                    writer.flush()
                    model.flush()
                manifest = store.commit(epoch)
                figures = model.commit()
                check_snapshot(store, epoch, model, manifest, figures)
                event(f"committed a snapshot of {min(len(model.scores), 1)}+ keys")
                epoch += 1
                writer = store.writer(epoch)  # the old writer's unflushed updates are lost
    finally:
        shutil.rmtree(root, ignore_errors=True)


def check_snapshot(store: ScoreStore, epoch: int, model: Model, manifest, figures) -> None:
    snap = ScoreStore(store.url, cache_dir=store.cache_dir).snapshot(epoch)
    assert np.isfinite(snap.scores).all()
    expected = sorted(model.scores.items())
    assert snap.hashes.tolist() == [h for h, _ in expected]
    assert snap.scores.tolist() == [v for _, v in expected]
    assert (snap.epochs <= epoch).all()
    if expected:
        assert snap.mean == pytest.approx(math.fsum(v for _, v in expected) / len(expected),
                                          rel=1e-9, abs=1e-300)
        assert math.isfinite(manifest.mean)
    else:
        assert snap.mean is None and manifest.mean is None
    for name, value in figures.items():
        assert getattr(manifest, name) == value, name


# -- settings ---------------------------------------------------------------------------------

any_value = st.one_of(
    st.integers(-(1 << 70), 1 << 70), st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(), st.none(), st.text(max_size=4), st.just(np.int64(3)), st.just([1]),
)


def is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


STORE_SETTINGS = {  # name -> (call with the value, the documented domain)
    "keep_snapshots": (lambda root, v: ScoreStore(root, keep_snapshots=v),
                       lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "retries": (lambda root, v: ScoreStore(root, retries=v),
                lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool)
                                         and 1 <= v <= 1000)),
    "epoch": (lambda root, v: ScoreStore(root).writer(v),
              lambda v: isinstance(v, int) and not isinstance(v, bool)
              and 0 <= v <= layout.MAX_EPOCH),
    "rank": (lambda root, v: ScoreStore(root).writer(0, rank=v),
             lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 99_999),
    "flush_rows": (lambda root, v: ScoreStore(root).writer(0, flush_rows=v),
                   lambda v: is_int(v) and v >= 1),
    "first_delay": (lambda root, v: RetryPolicy(first_delay=v),
                    lambda v: is_number(v) and 0 <= v <= 3600),
}


def infobatch(root, **kwargs):
    import infobatch_stream as ibs

    return ibs.InfoBatch(root, **{"num_epochs": 4, **kwargs})


INFOBATCH_SETTINGS = {
    "num_epochs": lambda v: is_int(v) and v >= 1,
    "prune_ratio": lambda v: is_number(v) and 0 <= v < 1,
    "delta": lambda v: is_number(v) and 0 <= v <= 1,
    "seed": lambda v: is_int(v) and 0 <= v < 1 << 64,
    "window": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "flush_rows": lambda v: is_int(v) and v >= 1,
}


@pytest.mark.parametrize("name", sorted(STORE_SETTINGS) + sorted(INFOBATCH_SETTINGS))
@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # nothing is written
@given(value=any_value)
def test_any_setting_is_accepted_in_its_domain_or_refused_naming_it(tmp_path, name, value) -> None:
    if (name in STORE_SETTINGS and name not in INFOBATCH_SETTINGS) or name == "epoch":
        call, valid = STORE_SETTINGS[name]
        make = lambda: call(str(tmp_path / "store"), value)  # noqa: E731
    else:
        valid = INFOBATCH_SETTINGS[name]
        make = lambda: infobatch(str(tmp_path / "store"), **{name: value})  # noqa: E731
    if valid(value):
        make()
    else:
        with pytest.raises((TypeError, ValueError)) as info:
            make()
        assert name.split("_")[0] in str(info.value) or "retries" in str(info.value)


def test_the_infobatch_flush_rows_setting_is_also_covered() -> None:
    assert "flush_rows" in STORE_SETTINGS and "flush_rows" in INFOBATCH_SETTINGS
