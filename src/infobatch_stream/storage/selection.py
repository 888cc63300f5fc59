"""Which deltas a commit merges: its own run's, of its own incarnation or the one it took over.

A commit merges the deltas of exactly one run: the run id in a delta's metadata must be the
committer's (no run id matches only no run id, so plain use and a named run never mix).
With a ``RunLease`` it also takes only its own incarnation's deltas and those it inherited
(present when it started: a crashed attempt's work); a superseded process's late deltas
are left out. Everything left out is reported, never merged, and retention removes it
after the commit. Every delta merged is opened and checked first (``merge.open_delta``), so
a bad one fails the commit, naming it, before anything is written.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from . import layout, runs
from .checks import first_names
from .errors import CorruptStoreError, StoreError
from .merge import open_delta
from .reader import StoreReader
from .runs import RunLease
from .tables import TableFile, read_table_meta

log = logging.getLogger(__name__)


@dataclass
class Selection:
    """The deltas a commit merges (opened, in merge order) and those it leaves out."""

    deltas: list[TableFile] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)
    other_runs: dict[str, str] = field(default_factory=dict)  # name -> the run that wrote it
    superseded: dict[str, int] = field(default_factory=dict)  # name -> its incarnation
    inherited_merged: int = 0  # merged deltas of an earlier incarnation (a crashed attempt's)


def select_deltas(store: StoreReader, epoch: int, names: list[str], work: str,
                  latest: int | None, lease: RunLease | None, run_id: str | None) -> Selection:
    """Open and check the deltas of ``epoch`` that this commit merges; sort out the rest.

    ``names`` are in merge order (``DeltaName.merge_order``: incarnation, sequence, rank).
    """
    chosen = Selection()
    writers: dict[int, str | bool | None] = {}  # incarnation -> its run, read once
    for name in names:
        parsed = layout.parse_delta_name(name)
        if lease is not None and parsed.incarnation != lease.incarnation \
                and name not in lease.inherited:
            _left_out_by_incarnation(store, chosen, name, parsed.incarnation, run_id, work,
                                     writers)
            continue
        delta = _open_delta(store, name, parsed, epoch, work, latest)
        writer_run = delta.meta.get("run_id")
        if writer_run != run_id:
            chosen.other_runs[name] = runs.describe_run(writer_run)
            continue
        chosen.deltas.append(delta)
        chosen.merged.append(name)
        if lease is not None and parsed.incarnation != lease.incarnation:
            chosen.inherited_merged += 1
    return chosen


def _left_out_by_incarnation(store: StoreReader, chosen: Selection, name: str, incarnation: int,
                             run_id: str | None, work: str,
                             writers: dict[int, str | bool | None]) -> None:
    """A delta of another incarnation, not inherited: a superseded process's of this run, or
    another run's. Told apart by the incarnation's record (when retention kept it; read once
    per incarnation into ``writers``), else by the run id in the file's metadata; never
    merged either way."""
    if incarnation > 0 and incarnation in writers:
        writer_run = writers[incarnation]
    else:
        writer_run = _writer_run(store, name, incarnation, work)
        if incarnation > 0:
            writers[incarnation] = writer_run
    if writer_run is False or writer_run == run_id:
        chosen.superseded[name] = incarnation
    else:
        chosen.other_runs[name] = runs.describe_run(writer_run)


def _writer_run(store: StoreReader, name: str, incarnation: int, work: str) -> str | bool | None:
    """The run that wrote delta ``name`` of ``incarnation``; False when it cannot be told."""
    try:
        if incarnation > 0:
            return runs.read_record(store.files, incarnation).run_id
        return read_table_meta(store.files.local_copy(name, work)).get("run_id")
    except (StoreError, OSError, ValueError):
        return False


def _open_delta(store: StoreReader, name: str, parsed: layout.DeltaName, epoch: int, work: str,
                latest: int | None) -> TableFile:
    local = None
    try:
        local = store.files.local_copy(name, work)
        return open_delta(local, epoch, parsed)
    except ValueError as exc:
        if local is not None and not os.path.lexists(local):  # removed while being opened
            raise FileNotFoundError(store.files.path(name)) from None
        raise CorruptStoreError(store.files.path(name), f"delta {exc}", latest) from None


def report(store: StoreReader, epoch: int, chosen: Selection, lease: RunLease | None,
           run_id: str | None) -> None:
    """Warn about what was left out: two runs mixing, or a superseded process's writes."""
    committer = lease.describe() if lease is not None else runs.describe_run(run_id)
    if chosen.other_runs:
        writers = sorted(set(chosen.other_runs.values()))
        log.warning(
            "%s: epoch %d: two runs are writing this store: %d delta file(s) written by %s are "
            "left out of the commit of %s (only the owner's scores are merged; retention removes "
            "them). Stop the other job, or give it a store URL of its own: %s", store.url, epoch,
            len(chosen.other_runs), ", ".join(writers), committer, first_names(list(chosen.other_runs)))
    if chosen.superseded:
        log.warning(
            "%s: epoch %d: %d delta file(s) of superseded incarnation(s) %s, written after %s "
            "took over, are left out (a paused or left-behind process; retention removes them): "
            "%s", store.url, epoch, len(chosen.superseded),
            ", ".join(map(str, sorted(set(chosen.superseded.values())))), committer,
            first_names(list(chosen.superseded)))


def warn_duplicates(epoch: int, duplicates: int, chosen: Selection, expected: bool,
                    leased: bool) -> None:
    """Two updates of one key in an epoch: keys collide, unless a re-run or resampling explains it."""
    if not duplicates or expected:
        return
    if not leased:  # no incarnations to tell a re-run's deltas from the crashed attempt's
        log.warning(
            "epoch %d: %d updates hit a key already updated in this epoch: keys collide (use a "
            "shard-qualified key), or a crashed attempt's deltas were merged. Resampled shards "
            "repeat keys by design: give InfoBatch's stage its epoch length, "
            "ib.stage(epoch_samples=n) (or commit with duplicates_expected=True)", epoch, duplicates)
        return
    if chosen.inherited_merged:
        log.warning(
            "epoch %d: %d updates hit a key already updated in this epoch; the epoch merged %d "
            "delta file(s) of the crashed attempt it resumed, whose keys the re-run updates "
            "again (later writes win). Without such a restart this would mean keys collide "
            "(use a shard-qualified key)", epoch, duplicates, chosen.inherited_merged)
        return
    log.warning(
        "epoch %d: %d updates hit a key already updated in this epoch: keys collide "
        "(use a shard-qualified key). Resampled shards repeat keys by design: give InfoBatch's "
        "stage its epoch length, ib.stage(epoch_samples=n), which also makes pruning save "
        "compute (or commit with duplicates_expected=True)", epoch, duplicates)
