"""Run records: which run owns a store, with which settings, and which process may write.

A store belongs to one training run at a time. Each process that starts or resumes the run
takes a new *incarnation* with ``begin_run``: the next number, claimed by the exclusive
create of an immutable strict-JSON record ``runs/incarnation-<n>.json`` (the run id, the
settings, the host, pid and start time, the epoch it starts at and the delta files of that
epoch it found: a crashed attempt's work, which it takes over). Nothing is ever rewritten:
two processes racing for number n both try to create it; one wins, the other reads what
now stands and tries n + 1, checking ownership again against it.

The newest record owns the store. A process holding an older one has been superseded (a
restart took over while it was paused or left behind): it is *fenced*, its next delta write
and its commit refused with ``FencedError``, and its late deltas are never merged. Order
comes from these counters, never from a clock. A store with no record (written before
records existed, or only through the low-level API) is owned by the run id of its latest
manifest.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from . import layout
from .checks import check_int
from .errors import CorruptStoreError, FencedError, OwnershipError, SettingsMismatchError, StoreError
from .files import StoreFiles, now
from .layout import Manifest

if TYPE_CHECKING:
    from .reader import StoreReader

KEEP_RECORDS = 8  # run records retention keeps; the newest (the current owner) always
_RACE_TRIES = 100  # numbers a begin_run tries before giving up on a store that churns


@dataclass(frozen=True)
class RunLease:
    """One incarnation of a run: what ``ScoreStore.begin_run`` hands the process that owns the
    store now. Pass it to ``store.writer(..., lease=)`` and ``store.commit(..., lease=)``;
    it is JSON-able, so rank 0 can take it and broadcast it to the other ranks.

    ``started_epoch`` is the epoch the incarnation starts in (latest committed + 1);
    ``inherited`` the delta files of that epoch already in the store when it started (a
    crashed attempt's work): its commit merges them, before its own.

    >>> lease = store.begin_run("job-7", {"prune_ratio": 0.5})      # doctest: +SKIP
    >>> RunLease.from_dict(json.loads(json.dumps(lease.to_dict()))) == lease   # doctest: +SKIP
    True
    """

    run_id: str | None
    incarnation: int
    settings: dict[str, Any]
    created_at: str
    host: str
    pid: int
    started_epoch: int
    inherited: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the record's content)."""
        data = asdict(self)
        data["inherited"] = list(self.inherited)
        return data

    @classmethod
    def from_dict(cls, data: Any) -> RunLease:
        """A lease from ``to_dict()``'s output; ValueError says which field is wrong."""
        if not isinstance(data, dict):
            raise ValueError(f"a run lease is a JSON object, got {type(data).__name__}")
        missing = sorted(set(cls.__dataclass_fields__) - set(data))
        if missing:
            raise ValueError(f"field {missing[0]!r} is missing")
        run_id = data["run_id"]
        if run_id is not None and (not isinstance(run_id, str) or not run_id):
            raise ValueError(f"field 'run_id' must be a non-empty string or null, got {run_id!r}")
        for name, high in (("incarnation", layout.MAX_INCARNATION), ("pid", 2**31),
                           ("started_epoch", layout.MAX_EPOCH)):
            if isinstance(data[name], bool) or not isinstance(data[name], int):
                raise ValueError(f"field {name!r} must be an integer, got {data[name]!r}")
            check_int(data[name], f"field {name!r}", 1 if name == "incarnation" else 0, high)
        for name in ("created_at", "host"):
            if not isinstance(data[name], str):
                raise ValueError(f"field {name!r} must be a string")
        settings = normalized_settings(data["settings"], "field 'settings'")
        inherited = data["inherited"]
        if not isinstance(inherited, list) or not all(
                isinstance(n, str) and layout.is_delta_name(n, data["started_epoch"]) for n in inherited):
            raise ValueError(f"field 'inherited' must list delta files of epoch {data['started_epoch']}")
        return cls(run_id, data["incarnation"], settings, data["created_at"], data["host"],
                   data["pid"], data["started_epoch"], tuple(inherited))

    def describe(self) -> str:
        """``run 'job-7' (incarnation 3, started <time> on host <host>, pid <pid>)``."""
        return (f"{describe_run(self.run_id)} (incarnation {self.incarnation}, started "
                f"{self.created_at} on host {self.host}, pid {self.pid})")


def lease_run_id(lease: RunLease | None, run_id: str | None) -> str | None:
    """The run id of a writer or committer: a lease brings its own; ``run_id`` alone is
    low-level use. Refuses a lease that is not one, or a ``run_id`` other than the lease's."""
    if lease is None:
        return run_id
    if not isinstance(lease, RunLease):
        raise TypeError(f"lease must be a RunLease from ScoreStore.begin_run, got {lease!r}")
    if run_id is not None and run_id != lease.run_id:
        raise ValueError(f"run_id={run_id!r} is not the lease's run ({lease.run_id!r}); pass one")
    return lease.run_id


def describe_run(run_id: str | None) -> str:
    return "a run with no run id" if run_id is None else f"run {run_id!r}"


def normalized_settings(settings: Any, what: str = "settings") -> dict[str, Any]:
    """``settings`` as the store records them: a JSON object of finite values (a tuple reads
    back as a list, so it is compared as one); ValueError or TypeError naming the problem."""
    if not isinstance(settings, dict) or not all(isinstance(k, str) for k in settings):
        raise TypeError(f"{what} must be a dict with str keys, got {settings!r}")
    try:
        return json.loads(json.dumps(settings, allow_nan=False, sort_keys=True))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} must hold JSON values (numbers, strings, lists, dicts): "
                         f"{exc}") from None


# -- reading the records ------------------------------------------------------------------------

def incarnations(files: StoreFiles) -> list[int]:
    """The incarnation numbers recorded in the store, oldest first."""
    return sorted(n for n in map(layout.incarnation_of, files.list(layout.RUNS)) if n is not None)


def read_record(files: StoreFiles, incarnation: int,
                last_good: Callable[[], int | None] = lambda: None) -> RunLease:
    """The record of ``incarnation``; CorruptStoreError names a damaged one (``last_good()``
    gives the last good epoch, asked only then)."""
    relpath = layout.incarnation_name(incarnation)
    try:
        lease = RunLease.from_dict(layout.strict_json(files.read(relpath)))
        if lease.incarnation != incarnation:
            raise ValueError(f"holds incarnation {lease.incarnation}")
    except (ValueError, TypeError, IsADirectoryError) as exc:
        raise CorruptStoreError(files.path(relpath), f"run record {exc}", last_good()) from None
    return lease


def run_record(store: StoreReader) -> RunLease | None:
    """The newest run record: the store's current owner and its settings (None: no record)."""
    numbers = incarnations(store.files)
    if not numbers:
        return None
    return read_record(store.files, numbers[-1], store.last_good_epoch)


@dataclass(frozen=True)
class Owner:
    """Who owns a store: a run record's run, or the latest manifest's (older stores)."""

    run_id: str | None
    described: str
    settings: dict[str, Any] | None


def owner_of(store: StoreReader, numbers: list[int] | None = None) -> Owner | None:
    """The store's owner; None for a store nothing was ever recorded or committed in.

    ``numbers``: the incarnations just listed (listed here when not given).
    """
    numbers = incarnations(store.files) if numbers is None else numbers
    if numbers:
        record = read_record(store.files, numbers[-1], store.last_good_epoch)
        return Owner(record.run_id, record.describe(), record.settings)
    manifest = store.manifest()
    return None if manifest is None else manifest_owner(manifest)


def manifest_owner(manifest: Manifest) -> Owner:
    """The run that committed ``manifest``, as an owner."""
    return Owner(manifest.run_id, f"{describe_run(manifest.run_id)} (it committed epoch "
                 f"{manifest.epoch} at {manifest.created_at})", None)


def refuse_other_run(url: str, owner: Owner | None, run_id: str | None) -> None:
    """OwnershipError unless ``run_id`` is the owner's (no run id matches only no run id)."""
    if owner is None or owner.run_id == run_id:
        return
    this = "this run has no run id" if run_id is None else f"this run is {run_id!r}"
    resume = ("continue that run with no run id" if owner.run_id is None
              else f"continue that run with run_id={owner.run_id!r} (it travels in "
                   f"InfoBatch.state_dict())")
    raise OwnershipError(
        f"{url} belongs to {owner.described}; {this}. Two jobs must not share a store: use "
        f"another store URL, or {resume}, or take the store over deliberately with takeover=True")


def refuse_other_settings(url: str, owner: Owner | None, settings: dict[str, Any]) -> None:
    """SettingsMismatchError, showing both values of every setting that differs."""
    if owner is None or owner.settings is None:
        return
    recorded = owner.settings
    differences = {name: (recorded.get(name, _UNSET), settings.get(name, _UNSET))
                   for name in sorted(set(recorded) | set(settings))
                   if recorded.get(name, _UNSET) != settings.get(name, _UNSET)}
    if not differences:
        return
    shown = "; ".join(f"the store was written with {_show(name, old)}, this run has "
                      f"{_show(name, new)}" for name, (old, new) in differences.items())
    raise SettingsMismatchError(
        f"{url}: {shown} ({owner.described}). Its pruning decisions would differ: resume with "
        f"the store's settings (infobatch-stream inspect shows them), use another store URL, "
        f"or take the store over deliberately with takeover=True", differences)


class _Unset:
    def __repr__(self) -> str:
        return "(not set)"


_UNSET = _Unset()


def _show(name: str, value: Any) -> str:
    return f"no {name}" if value is _UNSET else f"{name}={value!r}"


# -- taking an incarnation -----------------------------------------------------------------------

def begin_run(store: StoreReader, run_id: str | None, settings: dict[str, Any] | None,
              takeover: bool) -> RunLease:
    """``ScoreStore.begin_run``: see there."""
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise ValueError(f"run_id must be a non-empty str or None, got {run_id!r}")
    wanted = None if settings is None else normalized_settings(settings)
    store.files.ensure_marker(creating=True)
    store.files.check_layout()
    for _ in range(_RACE_TRIES):
        numbers = incarnations(store.files)
        newest = numbers[-1] if numbers else None
        owner = owner_of(store, numbers)
        if not takeover:
            refuse_other_run(store.url, owner, run_id)
            if wanted is not None:
                refuse_other_settings(store.url, owner, wanted)
        lease = _new_lease(store, run_id, (newest or 0) + 1, wanted, owner)
        try:
            store.files.write_new(layout.incarnation_name(lease.incarnation),
                                  json.dumps(lease.to_dict(), indent=1, sort_keys=True).encode(),
                                  exclusive=True)
        except FileExistsError:
            continue  # another process took this number: decide again against its record
        return lease
    raise StoreError(f"{store.url}: {_RACE_TRIES} processes started runs on this store while this "
                     f"one tried to; start one run per store")


def _new_lease(store: StoreReader, run_id: str | None, incarnation: int,
               settings: dict[str, Any] | None, owner: Owner | None) -> RunLease:
    """The record to claim: settings default to the owner's when this run gives none."""
    if settings is None:
        settings = (owner.settings if owner is not None and owner.run_id == run_id else None) or {}
    latest = store.latest_epoch
    started = 0 if latest is None else latest + 1
    # Listed before the record exists: a delta that lands after it is a superseded
    # process's, which the commit leaves out.
    inherited = tuple(store.pending_deltas(started))
    return RunLease(run_id, incarnation, settings, now(), socket.gethostname(), os.getpid(),
                    started, inherited)


# -- fencing ------------------------------------------------------------------------------------

def check_fence(files: StoreFiles, lease: RunLease, doing: str) -> None:
    """FencedError if a newer incarnation than ``lease``'s exists (one LIST of ``runs/``)."""
    numbers = incarnations(files)
    newest = numbers[-1] if numbers else None
    if newest == lease.incarnation:
        return
    if newest is None or newest < lease.incarnation:
        raise StoreError(f"{files.path(layout.incarnation_name(lease.incarnation))}: this "
                         f"process's run record is gone (the store at {files.url} was reset or "
                         f"replaced); stop this process and start the run again")
    try:
        newer = read_record(files, newest).describe()
    except (CorruptStoreError, OSError, StoreError):
        newer = f"incarnation {newest} (its record is unreadable)"
    raise FencedError(
        f"{files.url}: cannot {doing}: this process ({lease.describe()}) was superseded by "
        f"{newer}, which restarted or took over the run. This process must stop: its writes and "
        f"commits are refused so that two processes never train one run", lease.incarnation, newest)


def prune_records(files: StoreFiles, keep: int = KEEP_RECORDS) -> None:
    """Remove all but the newest ``keep`` run records (the newest, the owner, always stays)."""
    numbers = incarnations(files)
    for number in numbers[:-max(1, keep)]:
        files.remove(layout.incarnation_name(number))
