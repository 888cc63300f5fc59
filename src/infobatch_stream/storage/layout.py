"""The store's files: their names, the manifest's fields, and the checks on both.

A store is a directory (or a prefix of a bucket)::

    <root>/infobatch-store.json                      marker: format and key hash, written once
    <root>/manifests/epoch-00000005.json             one per committed epoch, written last
    <root>/snapshots/epoch-00000005-<32 hex>.arrow   all known scores after epoch 5
    <root>/deltas/epoch-00000006/i<incarnation>-r<rank>-s<seq>-<12 hex>.arrow   flushed, not yet merged
    <root>/runs/incarnation-00000007.json            one per start of a run (``runs``), written once

Every file is written once and never rewritten. A delta's name holds its incarnation, rank
and sequence number, counters the store hands out: they order a commit's merge
(``DeltaName.merge_order``), never a clock. Older stores named deltas
``<20-digit ns>-r<rank>-s<seq>-<12 hex>.arrow``; those names still parse (as incarnation 0,
merged first). Names read back from a manifest must
match these patterns exactly (ASCII digits, the whole name), so a manifest can never point
outside the store's root.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from .checks import check_int

FORMAT = "infobatch-stream/1"
MARKER = "infobatch-store.json"
MANIFESTS = "manifests"
SNAPSHOTS = "snapshots"
DELTAS = "deltas"
RUNS = "runs"
FOLDERS = (MANIFESTS, SNAPSHOTS, DELTAS, RUNS)
MAX_EPOCH = 99_999_999  # eight digits in every name; far beyond any training run
MAX_INCARNATION = 99_999_999
MAX_SEQ = 999_999

# ``fullmatch`` and ASCII digits only: ``$`` would let a trailing newline through, and ``\d``
# Arabic-Indic digits, which ``int()`` then reads as an epoch.
_MANIFEST_RE = re.compile(r"epoch-([0-9]{8})\.json", re.ASCII)
_LOOSE_MANIFEST_RE = re.compile(r"\s*epoch-\d+\.json\s*")  # what a careless eye takes for one
_SNAPSHOT_RE = re.compile(r"snapshots/epoch-([0-9]{8})-[0-9a-f]{32}\.arrow", re.ASCII)
_DELTA_DIR_RE = re.compile(r"epoch-([0-9]{8})", re.ASCII)
_DELTA_RE = re.compile(
    r"deltas/epoch-([0-9]{8})/(?:([0-9]{20})|i([0-9]{8}))-r([0-9]{5})-s([0-9]{6})-[0-9a-f]{12}\.arrow",
    re.ASCII)
_INCARNATION_RE = re.compile(r"incarnation-([0-9]{8})\.json", re.ASCII)


def manifest_name(epoch: int) -> str:
    return f"{MANIFESTS}/epoch-{epoch:08d}.json"


def manifest_epoch(basename: str) -> int | None:
    """The epoch of a file in ``manifests/``, or None for a name that is not a manifest."""
    match = _MANIFEST_RE.fullmatch(basename)
    return int(match.group(1)) if match else None


def looks_like_a_manifest(basename: str) -> bool:
    """A name that is not a manifest's but reads like one (Arabic-Indic digits, a trailing
    newline): a file no store writes, which must not be mistaken for, or hide behind, an epoch."""
    return manifest_epoch(basename) is None and bool(_LOOSE_MANIFEST_RE.fullmatch(basename))


def snapshot_name(epoch: int, unique: str) -> str:
    return f"{SNAPSHOTS}/epoch-{epoch:08d}-{unique}.arrow"


def snapshot_epoch(relpath: str) -> int | None:
    match = _SNAPSHOT_RE.fullmatch(relpath)
    return int(match.group(1)) if match else None


def delta_dir(epoch: int) -> str:
    return f"{DELTAS}/epoch-{epoch:08d}"


def delta_dir_epoch(basename: str) -> int | None:
    """The epoch of a directory in ``deltas/`` (``epoch-00000006``), or None for another name."""
    match = _DELTA_DIR_RE.fullmatch(basename)
    return int(match.group(1)) if match else None


def delta_name(epoch: int, incarnation: int, rank: int, seq: int, unique: str) -> str:
    """``deltas/epoch-<e>/i<incarnation>-r<rank>-s<seq>-<unique>.arrow``: names sort in merge order.

    >>> delta_name(6, 7, 3, 12, "0123456789ab")
    'deltas/epoch-00000006/i00000007-r00003-s000012-0123456789ab.arrow'
    """
    if not 0 <= seq <= MAX_SEQ:
        raise ValueError(f"a writer of epoch {epoch}, rank {rank} wrote more than {MAX_SEQ} "
                         f"deltas; raise flush_rows")
    return f"{delta_dir(epoch)}/i{incarnation:08d}-r{rank:05d}-s{seq:06d}-{unique}.arrow"


@dataclass(frozen=True)
class DeltaName:
    """What a delta's name says. Older stores' names (flush time first, ``time_ns``) read as
    incarnation 0."""

    incarnation: int
    rank: int
    seq: int
    epoch: int
    time_ns: int | None = None

    @property
    def merge_order(self) -> tuple[int, ...]:
        """A commit merges in this order, later wins: (incarnation, sequence, rank), counters
        only. Ranks flush at about the same pace, so sequence before rank stays close to the
        order of writing; an older store's deltas (incarnation 0) keep their time order,
        before any newer name's."""
        if self.time_ns is not None:
            return (self.incarnation, 0, self.time_ns, self.seq, self.rank)
        return (self.incarnation, 1, self.seq, self.rank)


def parse_delta_name(relpath: str) -> DeltaName | None:
    """The fields of a delta's path relative to the root, or None for any other name.

    >>> parse_delta_name("deltas/epoch-00000006/i00000007-r00003-s000012-0123456789ab.arrow")
    DeltaName(incarnation=7, rank=3, seq=12, epoch=6, time_ns=None)
    """
    match = _DELTA_RE.fullmatch(relpath)
    if not match:
        return None
    epoch, time_ns, incarnation, rank, seq = match.groups()
    return DeltaName(int(incarnation or 0), int(rank), int(seq), int(epoch),
                     None if time_ns is None else int(time_ns))


def in_merge_order(relpaths: list[str]) -> list[str]:
    """Delta paths sorted as a commit merges them (``DeltaName.merge_order``; the name last)."""
    return sorted(relpaths, key=lambda p: (parse_delta_name(p).merge_order, p))


def is_delta_name(relpath: str, epoch: int) -> bool:
    name = parse_delta_name(relpath)
    return name is not None and name.epoch == epoch


def incarnation_name(incarnation: int) -> str:
    return f"{RUNS}/incarnation-{incarnation:08d}.json"


def incarnation_of(basename: str) -> int | None:
    """The number of a run record in ``runs/`` (``incarnation-00000007.json``), else None."""
    match = _INCARNATION_RE.fullmatch(basename)
    return int(match.group(1)) if match else None


def check_epoch(epoch: Any, what: str = "epoch") -> int:
    if isinstance(epoch, bool) or not isinstance(epoch, int):  # an epoch is looked up by number
        raise TypeError(f"{what} must be an int, got {type(epoch).__name__}")
    return check_int(epoch, what, 0, MAX_EPOCH)


def check_rank(rank: Any) -> int:
    return check_int(rank, "rank", 0, 99_999, numpy=False)


@dataclass(frozen=True)
class Manifest:
    """What one commit made: the snapshot of ``epoch`` and the figures of that epoch.

    ``mean`` is the mean of every known score (None for an empty snapshot); ``updated`` the
    keys written in this epoch; ``duplicates`` the updates that hit a key already updated in
    this epoch (keys collide, or a crashed attempt's deltas were merged too);
    ``rejected_nonfinite`` the NaN/inf scores that were dropped at record time;
    ``incarnation`` the run incarnation that committed (None for a commit made without a
    ``RunLease``, and in stores written before incarnations existed).
    """

    epoch: int
    snapshot: str
    snapshot_bytes: int
    snapshot_xxh3: str
    keys: int
    mean: float | None
    score_sum: float
    updated: int
    new_keys: int
    duplicates: int
    rejected_nonfinite: int
    deltas: tuple[str, ...] = ()
    run_id: str | None = None
    created_at: str = ""
    format: str = field(default=FORMAT)
    incarnation: int | None = None

    def to_json(self) -> bytes:
        data = asdict(self)
        data["deltas"] = list(self.deltas)
        return json.dumps(data, indent=1, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        """Parse and check a manifest; ValueError says what is wrong with it."""
        data = strict_json(raw)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        if data.get("format") != FORMAT:
            raise ValueError(f"format is {data.get('format')!r}, expected {FORMAT!r}")
        ints = ("epoch", "snapshot_bytes", "keys", "updated", "new_keys", "duplicates",
                "rejected_nonfinite")
        for name in ints:
            value = data.get(name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"field {name!r} must be a non-negative integer, got {value!r}")
        for name in ("score_sum",):
            if not isinstance(data.get(name), (int, float)) or isinstance(data.get(name), bool):
                raise ValueError(f"field {name!r} must be a number")
            if not math.isfinite(data[name]):  # a 1e999 literal parses as inf
                raise ValueError(f"field {name!r} must be finite, got {data[name]!r}")
        mean = data.get("mean")
        if mean is not None and (not isinstance(mean, (int, float)) or isinstance(mean, bool)
                                 or not math.isfinite(mean)):
            raise ValueError(f"field 'mean' must be a finite number or null, got {mean!r}")
        if (mean is None) != (data["keys"] == 0):
            raise ValueError("field 'mean' must be null exactly when 'keys' is 0")
        if snapshot_epoch(str(data.get("snapshot"))) != data["epoch"]:
            raise ValueError(
                f"field 'snapshot' ({data.get('snapshot')!r}) is not a snapshot of epoch "
                f"{data['epoch']} inside the store"
            )
        if not re.fullmatch(r"[0-9a-f]{16}", str(data.get("snapshot_xxh3"))):
            raise ValueError("field 'snapshot_xxh3' must be 16 hex digits")
        deltas = data.get("deltas")
        if not isinstance(deltas, list) or not all(
            isinstance(d, str) and is_delta_name(d, data["epoch"]) for d in deltas
        ):
            raise ValueError(f"field 'deltas' must list delta files of epoch {data['epoch']}")
        run_id = data.get("run_id")
        if run_id is not None and not isinstance(run_id, str):
            raise ValueError("field 'run_id' must be a string or null")
        incarnation = data.get("incarnation")
        if incarnation is not None and (isinstance(incarnation, bool) or not isinstance(
                incarnation, int) or not 0 <= incarnation <= MAX_INCARNATION):
            raise ValueError(f"field 'incarnation' must be a non-negative integer or null, got "
                             f"{incarnation!r}")
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known} | {"deltas": tuple(deltas),
                   "mean": None if mean is None else float(mean),
                   "score_sum": float(data["score_sum"])})


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON number (the store writes only finite numbers)")


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data = dict(pairs)
    if len(data) != len(pairs):
        seen: set[str] = set()
        twice = sorted({k for k, _ in pairs if k in seen or seen.add(k)})
        raise ValueError(f"field {twice[0]!r} appears twice")
    return data


def strict_json(raw: bytes) -> Any:
    """Parse JSON as the store writes it; ValueError for anything else.

    Python's ``json`` also accepts ``NaN``, ``Infinity`` and repeated fields (the last one
    wins): a manifest holding them was not written by the store, and a NaN mean would be a
    pruning threshold that drops nothing, so they are refused.
    """
    try:
        return json.loads(raw.decode("utf-8"), parse_constant=_refuse_constant,
                          object_pairs_hook=_refuse_duplicates)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors too
        raise ValueError(f"not valid JSON ({exc})") from None
    except RecursionError:  # ``[[[[...]]]]`` deeper than the parser's stack
        raise ValueError("not valid JSON (nested too deeply)") from None


def marker_json(created_at: str) -> bytes:
    from .keys import KEY_HASH_NAME

    data = {"format": FORMAT, "key_hash": KEY_HASH_NAME, "created_at": created_at}
    return json.dumps(data, indent=1, sort_keys=True).encode()


def check_marker(raw: bytes) -> None:
    """ValueError unless ``raw`` is a marker this version can read."""
    from .keys import KEY_HASH_NAME

    data = strict_json(raw)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"format is not {FORMAT!r}")
    if data.get("key_hash") != KEY_HASH_NAME:
        raise ValueError(f"key hash {data.get('key_hash')!r} is not {KEY_HASH_NAME!r}")
