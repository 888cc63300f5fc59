"""Key hashing: the persisted function (xxh3_64 of UTF-8, seed 0) and the accepted key types."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import xxhash
from hypothesis import given, settings
from hypothesis import strategies as st

from infobatch_stream.storage import KEY_HASH_NAME, hash_key, hash_keys

UINT64 = st.integers(min_value=0, max_value=2**64 - 1)
# Lone surrogates have no UTF-8 encoding; they are tested on their own below.
KEY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40)


def test_hash_is_pinned_xxh3_64_of_utf8() -> None:
    # The hash is persisted in every snapshot: these values may never change.
    # 0x2D06800538D394C2 is XXH3_64bits("") in xxHash's reference test vectors.
    assert hash_key("") == 0x2D06800538D394C2
    assert hash_key("00042") == 10047271425370583166
    assert KEY_HASH_NAME == "xxh3_64(utf-8 key), seed 0"


@settings(max_examples=200, deadline=None)
@given(st.lists(KEY_TEXT, max_size=50))
def test_str_keys_hash_to_xxh3_of_their_utf8_bytes(keys: list[str]) -> None:
    expected = [xxhash.xxh3_64_intdigest(k.encode("utf-8")) for k in keys]
    got = hash_keys(keys)
    assert got.dtype == np.uint64 and got.shape == (len(keys),)
    assert got.tolist() == expected
    # the same keys as bytes, as a numpy string array and one by one agree
    assert hash_keys([k.encode("utf-8") for k in keys]).tolist() == expected
    assert [hash_key(k) for k in keys] == expected


def test_non_ascii_keys_use_utf8() -> None:
    keys = ["é", "日本/0001", "emoji-🙂"]
    assert hash_keys(keys).tolist() == [xxhash.xxh3_64_intdigest(k.encode("utf-8")) for k in keys]
    assert hash_key("é") != xxhash.xxh3_64_intdigest("é".encode("latin-1"))


def test_bytes_like_keys() -> None:
    raw = b"shard-0003/000017"
    expected = xxhash.xxh3_64_intdigest(raw)
    assert hash_keys([raw, bytearray(raw), memoryview(raw)]).tolist() == [expected] * 3
    assert hash_keys(np.array(["shard-0003/000017"])).tolist() == [expected]  # numpy 'U' dtype
    assert hash_keys(np.array([raw])).tolist() == [expected]  # numpy 'S' dtype


def test_mixed_sequence() -> None:
    got = hash_keys(["a", b"a", 7, np.uint64(2**64 - 1), -1])
    a = xxhash.xxh3_64_intdigest(b"a")
    assert got.tolist() == [a, a, 7, 2**64 - 1, 2**64 - 1]


@settings(max_examples=200, deadline=None)
@given(st.lists(UINT64, max_size=50))
def test_precomputed_hashes_survive_an_int64_round_trip(values: list[int]) -> None:
    hashes = np.array(values, np.uint64)
    assert hash_keys(hashes).tolist() == values
    as_int64 = hashes.view(np.int64)
    assert hash_keys(as_int64).tolist() == values
    tensor = torch.from_numpy(as_int64.copy())  # how a hash travels in a collated batch
    assert tensor.dtype == torch.int64
    assert hash_keys(tensor).tolist() == values
    assert hash_keys(as_int64.tolist()).tolist() == values  # python ints, negative ones included
    assert hash_keys(values).tolist() == values


def test_uint64_array_is_taken_as_is() -> None:
    hashes = np.array([0, 1, 2**63, 2**64 - 1], np.uint64)
    got = hash_keys(hashes)
    assert got.dtype == np.uint64 and got.tolist() == hashes.tolist()


def test_narrow_integer_arrays_are_widened() -> None:
    assert hash_keys(np.array([1, 255], np.uint8)).tolist() == [1, 255]
    assert hash_keys(np.array([2**32 - 1], np.uint32)).tolist() == [2**32 - 1]
    assert hash_keys(torch.tensor([5, -1], dtype=torch.int32)).tolist() == [5, 2**64 - 1]


def test_empty() -> None:
    for empty in ([], np.array([], np.uint64), torch.empty(0, dtype=torch.int64)):
        got = hash_keys(empty)
        assert got.dtype == np.uint64 and got.shape == (0,)


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1])
def test_integers_beyond_64_bits_are_refused(value: int) -> None:
    with pytest.raises(ValueError, match="64 bits"):
        hash_keys([1, value])


@pytest.mark.parametrize(("keys", "type_name"), [
    ([1.5], "float"),
    (["a", None], "NoneType"),
    ([object()], "object"),
    ([True], "bool"),
    ([np.bool_(True)], "bool"),
    ([["nested"]], "list"),
    (np.array([1.0, 2.0]), "float64"),
    (np.array([True]), "bool"),
    (torch.tensor([1.0, 2.0]), "float32"),
    (torch.tensor([0.5], dtype=torch.bfloat16), "float32"),  # widened first, still refused
    (5, "int"),
    (None, "NoneType"),
])
def test_wrong_key_types_raise_type_error_naming_the_type(keys, type_name: str) -> None:
    with pytest.raises(TypeError, match=type_name):
        hash_keys(keys)


@pytest.mark.parametrize("single", ["sample-0001", b"sample-0001", bytearray(b"x")])
def test_a_single_key_is_refused(single) -> None:
    # A single string is iterable: hashing its characters would be a silent disaster.
    with pytest.raises(TypeError, match=f"single {type(single).__name__}"):
        hash_keys(single)


def test_two_dimensional_keys_are_refused() -> None:
    with pytest.raises(ValueError, match="one-dimensional"):
        hash_keys(np.zeros((2, 2), np.uint64))


def test_a_lone_surrogate_is_an_error_not_a_hash() -> None:
    with pytest.raises(ValueError, match="not valid unicode"):
        hash_keys(["ok", "bad\ud800"])
