"""The ``infobatch-stream`` command: look into a score store, never write to it.

    infobatch-stream inspect s3://bucket/runs/ffhq/scores --storage-option endpoint_url=http://minio:9000
    infobatch-stream inspect ./scores --epoch 4 --prune-ratio 0.3 --json
    infobatch-stream export ./scores s3://bucket/reports/epoch4.parquet --epoch 4
    infobatch-stream export ./scores scores.parquet --shards 'train-{000000..000099}.tar'
    infobatch-stream plot ./scores scores.png --bins 80 --log

A bad URL, a URL that holds no store, or a damaged store prints one line naming the file or
URL at fault to stderr and exits with status 2 (as a usage error does).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from . import __version__
from .stages.plan import plan_epoch
from .stages.policy import POLICIES, InfoBatchPolicy, check_prune_ratio
from .storage import Manifest, ScoreSnapshot, ScoreStore, StoreError, fsio, hash_keys, layout
from .storage.options import add_storage_option_argument

QUANTILES = (("min", 0.0), ("p1", 0.01), ("p10", 0.10), ("p25", 0.25), ("p50", 0.50),
             ("p75", 0.75), ("p90", 0.90), ("p99", 0.99), ("max", 1.0))
# On a linear axis from 0 to max, scores under max/50 share the first of 50 bins: past this
# max/median, half the keys would sit in one bar and the shape of the bulk be invisible.
SKEW_RATIO = 50.0
# A log axis spans at most this many decades below the top score; lower scores (zeros,
# negatives, denormals) are counted in the first bin, at the floor.
LOG_DECADES = 6
_MEDIAN_SAMPLE = 1_000_000  # scores looked at to choose the axis (every k-th, k >= 1)
EPOCH_FIELDS = ("epoch", "keys", "updated", "new_keys", "duplicates", "rejected_nonfinite",
                "mean", "created_at", "run_id")  # of each retained epoch's manifest


class CliError(Exception):
    """A problem the user can fix (no store at the URL, nothing to export, ...): one line, exit 2."""


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 2 bad usage or unreadable store).

    >>> main(["inspect", "/tmp/scores", "--json"])  # doctest: +SKIP
    0
    """
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (StoreError, CliError) as exc:
        return _fail(str(exc))
    except BrokenPipeError:
        # `inspect ... | head`: the reader left; don't let the final flush raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as exc:
        # From fsspec/s3fs while reading the store; their messages do not always name it.
        return _fail(f"{args.url}: {exc}")


def _fail(message: str) -> int:
    print(f"infobatch-stream: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``infobatch-stream`` (subcommands inspect, export, plot).

    >>> build_parser().parse_args(["export", "./scores", "out.parquet"]).epoch is None
    True
    """
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("url", help="a local directory or an fsspec URL (s3://bucket/scores)")
    add_storage_option_argument(store, "; they apply to the store and to the output URL")
    store.add_argument("--cache-dir", help="where remote snapshots are downloaded (default "
                       "$INFOBATCH_STREAM_CACHE or ~/.cache/infobatch-stream)")
    parser = argparse.ArgumentParser(prog="infobatch-stream", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    inspect = commands.add_parser("inspect", parents=[store], help="retained epochs, score "
                                  "distribution and next epoch's pruning")
    inspect.add_argument("--epoch", type=_non_negative, help="snapshot to describe (default: latest)")
    inspect.add_argument("--prune-ratio", "--ratio", type=_ratio, dest="prune_ratio",
                         help="prune ratio r, as InfoBatch(prune_ratio=...) (default: the "
                              "store's recorded setting, else 0.5)")
    inspect.add_argument("--seed", type=_non_negative,
                         help="the run's seed (default: the store's recorded setting, else 0)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object")
    inspect.set_defaults(run=_inspect)

    export = commands.add_parser("export", parents=[store], help="a snapshot as Parquet")
    export.add_argument("out", help="the .parquet file to write: a path or an fsspec URL "
                        "(written whole or not at all)")
    export.add_argument("--epoch", type=_non_negative, help="default: the latest committed epoch")
    export.add_argument("--shards", action="append", default=[], metavar="PATTERN",
                        help="shards to read the key strings from (a path, URL or brace pattern; "
                        "repeatable): adds a 'key' column, null for keys not in these shards")
    export.add_argument("--key", choices=["key", "shard"], default="key",
                        help="the run's key: 'key' (__key__, the default) or 'shard' (shard file "
                        "name + '/' + __key__, as InfoBatch(key='shard'))")
    export.set_defaults(run=_export)

    plot = commands.add_parser("plot", parents=[store], help="score histogram per retained epoch")
    plot.add_argument("out", help="the .png file to write: a path or an fsspec URL")
    plot.add_argument("--bins", type=_positive, default=50, help="histogram bins (default 50)")
    axis = plot.add_mutually_exclusive_group()
    axis.add_argument("--log", action="store_const", const=True, dest="log", default=None,
                      help="log-spaced bins on a log x axis (default: when the scores are "
                      f"strongly right-skewed, max/median > {SKEW_RATIO:g})")
    axis.add_argument("--linear", action="store_const", const=False, dest="log",
                      help="a linear x axis whatever the scores")
    plot.set_defaults(run=_plot)
    return parser


def _ratio(text: str) -> float:
    try:
        return check_prune_ratio(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _bounded_int(low: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        if not text.strip().isdigit() or int(text) < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}")
        return int(text)
    return parse


_non_negative, _positive = _bounded_int(0), _bounded_int(1)


def _open_store(args: argparse.Namespace) -> ScoreStore:
    try:
        store = ScoreStore(args.url, dict(args.storage_options), args.cache_dir)
        _ = store.epochs  # the first request; NotAStoreError when the URL holds something else
    except StoreError:
        raise
    except Exception as exc:
        # (unknown protocol, backend not installed, unknown storage option, endpoint unreachable)
        raise CliError(f"{args.url}: cannot open the store: {type(exc).__name__}: {exc}") from None
    # A store reads a missing location as a new, empty store (writers create it); here it is a typo.
    if not store.fs.exists(fsio.join(store.root, layout.MARKER)):
        raise CliError(f"{args.url}: no score store here (no {layout.MARKER}); check the URL")
    return store


# -- inspect ---------------------------------------------------------------------------------

def _retained_manifests(store: ScoreStore) -> list[Manifest]:
    manifests = []
    for epoch in store.epochs:
        try:
            manifests.append(store.manifest(epoch))
        except StoreError:
            if epoch in store.epochs:  # else a live run's commit retired it after the listing
                raise
    return manifests


def _open_snapshot_and_manifests(store: ScoreStore, epoch: int | None
                                 ) -> tuple[ScoreSnapshot, list[Manifest]]:
    """The snapshot to describe and the retained manifests, coherent with each other.

    Without ``epoch``: the newest snapshot first (a live run's commit that retires the epoch
    being opened makes the store open the newer one), then the manifests up to its epoch.
    """
    if epoch is not None:
        snap = store.snapshot(epoch)
        return snap, _retained_manifests(store)
    snap = store.snapshot()
    last = -1 if snap.epoch is None else snap.epoch
    return snap, [m for m in _retained_manifests(store) if m.epoch <= last]


def _inspect(args: argparse.Namespace) -> int:
    store = _open_store(args)
    snap, manifests = _open_snapshot_and_manifests(store, args.epoch)
    latest = manifests[-1].epoch if manifests else None
    next_epoch = 0 if latest is None else latest + 1
    record = store.run_record()
    report: dict[str, Any] = {
        "store": args.url, "latest_epoch": latest,
        "epochs": [{name: getattr(m, name) for name in EPOCH_FIELDS} for m in manifests],
        "run": None if record is None else {k: v for k, v in record.to_dict().items()
                                            if k != "inherited"},
        "snapshot": None, "next_epoch": None,
        "pending_deltas": {"epoch": next_epoch, "files": store.pending_deltas(next_epoch)},
        # deltas of committed epochs: never merged (flushed late) or not yet cleaned up
        "leftover_deltas": {str(e): files for e, files in store.leftover_deltas().items()},
    }
    if manifests or args.epoch is not None:
        report["snapshot"] = snapshot_stats(snap)
        settings = counting_settings(record.settings if record is not None else None, args)
        try:
            report["next_epoch"] = next_epoch_pruning(snap, **settings)
        except (TypeError, ValueError) as exc:  # a recorded setting this version cannot use
            raise CliError(f"{args.url}: cannot count the next epoch with the store's recorded "
                           f"settings {settings} ({exc}); pass --prune-ratio and --seed") from None
    _warn(report, manifests)
    print(json.dumps(report, indent=1, allow_nan=False) if args.json else _format(report))
    return 0


def counting_settings(recorded: dict[str, Any] | None, args: argparse.Namespace) -> dict[str, Any]:
    """What the next epoch is counted with: the flags, else the store's recorded run
    settings, else the defaults (r=0.5, seed 0, counted as a pruning epoch).

    >>> counting_settings({"prune_ratio": 0.3, "seed": 7}, build_parser().parse_args(
    ...     ["inspect", "x", "--seed", "1"]))["seed"]
    1
    """
    recorded = recorded or {}
    out = {"prune_ratio": recorded.get("prune_ratio", 0.5), "seed": recorded.get("seed", 0),
           "num_epochs": recorded.get("num_epochs"), "delta": recorded.get("delta"),
           "policy": recorded.get("policy", "InfoBatchPolicy")}
    if args.prune_ratio is not None:
        out["prune_ratio"] = args.prune_ratio
    if args.seed is not None:
        out["seed"] = args.seed
    return out


def _warn(report: dict[str, Any], manifests: list[Manifest]) -> None:
    for m in manifests:
        if m.duplicates:
            print(f"WARNING: epoch {m.epoch}: {m.duplicates:,} updates hit a key already updated "
                  f"in that epoch: keys collide across shards (use a shard-qualified key), a "
                  f"crashed attempt's deltas were merged, or the stream is resampled",
                  file=sys.stderr)
    for epoch, files in report["leftover_deltas"].items():
        print(f"WARNING: epoch {epoch} is committed but {len(files)} of its delta file(s) are "
              f"still in the store (flushed after its commit, by another run, or an interrupted "
              f"clean-up); they are not in any snapshot, and the next commit removes them",
              file=sys.stderr)


def snapshot_stats(snap: ScoreSnapshot) -> dict[str, Any]:
    """Keys, mean, quantiles and the share below the mean of one snapshot.

    >>> snapshot_stats(store.snapshot())["quantiles"]["p50"]  # doctest: +SKIP
    1.83
    """
    stats = {"epoch": snap.epoch, "keys": len(snap), "mean": snap.mean, "quantiles": None,
             "below_mean": 0, "fraction_below_mean": None}
    if len(snap):
        values = np.quantile(snap.scores, [q for _, q in QUANTILES])
        stats["quantiles"] = {name: float(v) for (name, _), v in zip(QUANTILES, values, strict=True)}
        # float64 threshold, exactly as the policy compares
        stats["below_mean"] = int(np.count_nonzero(snap.scores < np.float64(snap.mean)))
        stats["fraction_below_mean"] = stats["below_mean"] / len(snap)
    return stats


# The built-in policies by the class name the store records.
POLICY_CLASSES = {policy.__name__: policy for policy in POLICIES.values()}


def next_epoch_pruning(snap: ScoreSnapshot, prune_ratio: float = 0.5, seed: int = 0, *,
                       num_epochs: int | None = None, delta: float | None = None,
                       policy: str = "InfoBatchPolicy") -> dict[str, Any]:
    """How many of the snapshot's keys the run prunes in the following epoch: exact and expected.

    Counted by ``plan_epoch``, as ``InfoBatch.plan()`` counts. With the run's ``num_epochs``
    and ``delta`` (recorded in the store by ``begin_run``) an annealing epoch prunes
    nothing; without them the epoch is counted as a pruning one. A policy other than the
    built-in two is counted as InfoBatch's.

    >>> next_epoch_pruning(store.snapshot(), 0.5)["pruned"]  # doctest: +SKIP
    3110
    """
    epoch = 0 if snap.epoch is None else snap.epoch + 1
    scheduled = num_epochs is not None and delta is not None
    counted = POLICY_CLASSES.get(policy, InfoBatchPolicy)(
        num_epochs=num_epochs if scheduled else epoch + 1, prune_ratio=prune_ratio,
        delta=delta if scheduled else 1.0, seed=seed)
    plan = plan_epoch(counted, epoch, snap)
    n = len(snap)
    below = int(np.count_nonzero(snap.scores < np.float64(snap.mean))) if n else 0
    expected = 0.0 if plan.annealing else prune_ratio * below
    return {"epoch": epoch, "prune_ratio": prune_ratio, "seed": seed, "policy": policy,
            "num_epochs": num_epochs, "delta": delta, "annealing": plan.annealing,
            "threshold": plan.rule.threshold, "pruned": plan.pruned, "kept": plan.kept_known,
            "pruned_expected": expected, "saved_fraction_expected": expected / n if n else 0.0}


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.6g}"


def _format(report: dict[str, Any]) -> str:
    rows = report["epochs"]
    lines = [(f"store {report['store']}: {len(rows)} retained epoch(s), latest "
              f"{_g(report['latest_epoch'])}")]
    run = report["run"]
    if run is not None:
        settings = ", ".join(f"{k}={v!r}" for k, v in sorted(run["settings"].items())) or "none"
        lines.append(f"run {run['run_id'] or '(no run id)'}, incarnation {run['incarnation']} "
                     f"(started {run['created_at']} on {run['host']}, pid {run['pid']}, at epoch "
                     f"{run['started_epoch']}); settings: {settings}")
    if rows:
        lines.append(f"{'epoch':>6} {'keys':>12} {'updated':>12} {'new keys':>12} "
                     f"{'duplicates':>10} {'rejected':>9} {'mean':>11}  {'created_at':<25} run_id")
        lines += [f"{r['epoch']:>6} {r['keys']:>12,} {r['updated']:>12,} {r['new_keys']:>12,} "
                  f"{r['duplicates']:>10,} {r['rejected_nonfinite']:>9,} {_g(r['mean']):>11}  "
                  f"{r['created_at']:<25} {r['run_id'] or '-'}" for r in rows]
    snap, nxt = report["snapshot"], report["next_epoch"]
    if snap is not None:
        lines.append(f"\nsnapshot of epoch {snap['epoch']}: {snap['keys']:,} keys, "
                     f"mean {_g(snap['mean'])}")
        if snap["quantiles"]:
            names = ["min", "1%", "10%", "25%", "50%", "75%", "90%", "99%", "max"]
            lines.append("  " + " ".join(f"{n:>11}" for n in names))
            lines.append("  " + " ".join(f"{_g(v):>11}" for v in snap["quantiles"].values()))
            lines.append(f"  below the mean: {snap['below_mean']:,} keys "
                         f"({snap['fraction_below_mean']:.2%})")
        n = max(snap["keys"], 1)
        annealing = " (annealing: nothing is pruned)" if nxt["annealing"] else ""
        lines.append(f"epoch {nxt['epoch']} at prune ratio {nxt['prune_ratio']:g} (seed "
                     f"{nxt['seed']}){annealing}: {nxt['pruned']:,} keys pruned exactly "
                     f"({nxt['pruned'] / n:.2%}); expected r*P(score<mean) = "
                     f"{nxt['pruned_expected']:,.1f} ({nxt['saved_fraction_expected']:.2%})")
    pending = report["pending_deltas"]
    lines.append(f"pending for epoch {pending['epoch']}: {len(pending['files'])} delta file(s) "
                 f"not yet committed")
    for epoch, files in report["leftover_deltas"].items():
        lines.append(f"left over in committed epoch {epoch}: {len(files)} delta file(s), in no "
                     f"snapshot (the next commit removes them)")
    return "\n".join(lines)


# -- export and plot -------------------------------------------------------------------------

def _write_output(out: str, args: argparse.Namespace, write: Callable[[str], None]) -> None:
    """``write(local file)``, then put it at ``out`` (a path or any fsspec URL, with the
    ``--storage-option``s) whole: renamed into place on a disk, one PUT on an object store."""
    with tempfile.TemporaryDirectory(prefix="infobatch-stream-") as work:
        local = os.path.join(work, "out")
        write(local)
        try:
            fs, path = fsio.open_fs(out, dict(args.storage_options))
            target = fsio.local_path(fs, path)
            if target is not None and not os.path.isdir(os.path.dirname(target) or "."):
                raise FileNotFoundError(f"no directory {os.path.dirname(target)}")
            fsio.put_file(fs, local, path)
        except (OSError, ValueError) as exc:
            raise CliError(f"{out}: cannot write ({type(exc).__name__}: {exc})") from None


def _export(args: argparse.Namespace) -> int:
    import pyarrow.parquet as pq

    store = _open_store(args)
    if args.epoch is None and store.latest_epoch is None:
        raise CliError(f"{args.url}: no epoch is committed yet; there is no snapshot to export")
    snap = store.snapshot(args.epoch)
    meta = {"store": args.url, "epoch": snap.epoch, "mean": snap.mean}
    table, note = snap.to_arrow(), ""
    if args.shards:
        column, note = _key_column(snap, _read_shard_keys(args))
        table = table.add_column(0, "key", column)
        meta["key"] = args.key
    table = table.replace_schema_metadata({"infobatch_stream": json.dumps(meta)})
    _write_output(args.out, args, lambda tmp: pq.write_table(table, tmp))
    print(f"wrote {len(snap):,} keys of epoch {snap.epoch} to {args.out}{note}")
    return 0


def _read_shard_keys(args: argparse.Namespace) -> list[str]:
    from .stages.shardkeys import shard_key_strings  # loads webdataset: only when asked

    try:
        return shard_key_strings(args.shards, args.key, dict(args.storage_options))
    except (OSError, ValueError) as exc:  # tarfile.ReadError is an OSError too
        raise CliError(f"reading the keys of --shards {' '.join(args.shards)}: "
                       f"{type(exc).__name__}: {exc}") from None


def _key_column(snap: ScoreSnapshot, keys: list[str]) -> tuple[Any, str]:
    """The key string of each snapshot row (null where no shard holds it), and a report line.

    Rows and keys are joined on the store's hash: the snapshot is sorted by it.
    """
    import pyarrow as pa

    hashes, first = np.unique(hash_keys(keys), return_index=True)
    pos, found = snap.positions(hashes)
    strings = np.full(len(snap), None, object)
    strings[pos[found]] = np.asarray(keys, object)[first[found]]
    rows = int(found.sum())
    note = (f"; key strings from {len(keys):,} samples of the shards: {rows:,} of {len(snap):,} "
            f"rows have one ({len(snap) - rows:,} null: not in these shards), "
            f"{len(hashes) - rows:,} distinct shard keys have no score")
    return pa.array(strings, pa.string()), note


def skew_ratio(scores: Sequence[np.ndarray]) -> float:
    """max/median of the scores (inf when the median is 0 and the max is not; 0 if none).

    >>> skew_ratio([np.float32([0.1, 0.2, 30.0])])
    150.0
    """
    scores = [s for s in scores if len(s)]
    if not scores:
        return 0.0
    sample = np.concatenate([s[::max(1, len(s) // _MEDIAN_SAMPLE)] for s in scores])
    top, median = float(max(map(np.max, scores))), float(np.median(sample))
    if top <= 0:
        return 0.0
    return float("inf") if median <= 0 else top / median


def wants_log_axis(scores: Sequence[np.ndarray]) -> bool:
    """Whether a histogram of these scores needs a log x axis: non-negative, strongly skewed.

    >>> wants_log_axis([np.float32([0.01] * 9 + [5.0])]), wants_log_axis([np.float32([1, 2, 3])])
    (True, False)
    """
    return log_axis_skew(scores) > SKEW_RATIO


def log_axis_skew(scores: Sequence[np.ndarray]) -> float:
    """``skew_ratio`` of the scores, or 0 where a log axis cannot show them (none, or negative)."""
    known = [s for s in scores if len(s)]
    if not known or min(map(np.min, known)) < 0:
        return 0.0
    return skew_ratio(known)


def log_bins(scores: Sequence[np.ndarray], bins: int) -> tuple[np.ndarray, float]:
    """Log-spaced bin edges over all the scores, and the floor below which scores are counted
    in the first bin (the smallest positive score, at most ``LOG_DECADES`` below the top).

    >>> edges, floor = log_bins([np.float32([0.0, 0.1, 10.0])], 2)
    >>> edges.tolist(), floor
    ([0.1, 1.0, 10.0], 0.1)
    """
    positive = [s[s > 0] for s in scores if len(s)]
    positive = [p for p in positive if len(p)]
    if not positive:
        return np.geomspace(1.0, 10.0, bins + 1), 1.0
    top = float(max(map(np.max, positive)))
    # a float32 value, so that float32 scores raised to the floor land on the first edge
    floor = float(np.float32(max(float(min(map(np.min, positive))), top * 10.0 ** -LOG_DECADES)))
    if top <= floor:
        top = floor * 10.0
    return np.geomspace(floor, top, bins + 1), floor


def _plot(args: argparse.Namespace) -> int:
    store = _open_store(args)
    epochs = store.epochs
    if not epochs:
        raise CliError(f"{args.url}: no epoch is committed yet; nothing to plot")
    try:
        # The object API with an explicit Agg canvas: no pyplot, no global backend switch.
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise CliError("plot needs matplotlib: pip install 'infobatch-stream[plot]'") from None
    snaps = [store.snapshot(e) for e in epochs]  # memory-mapped: holding them is cheap
    known = [s.scores for s in snaps if len(s)]
    skew = log_axis_skew(known) if args.log is None else None
    log = skew > SKEW_RATIO if skew is not None else args.log
    if log:
        edges, floor = log_bins(known, args.bins)
        why = "as asked" if skew is None else f"max/median = {skew:.4g} > {SKEW_RATIO:g}"
    else:
        span = (min(map(np.min, known)), max(map(np.max, known))) if known else (0.0, 1.0)
        edges, floor = np.linspace(float(span[0]), float(span[1]), args.bins + 1), None
    fig = Figure(figsize=(7, 0.6 + 2.0 * len(snaps)), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(snaps), 1, sharex=True, squeeze=False)[:, 0]
    for ax, snap in zip(axes, snaps, strict=True):
        _histogram(ax, snap, edges, floor)
    if log:
        axes[-1].set_xscale("log")
        axes[-1].set_xlabel(f"score (last loss), log scale; the first bin counts all scores "
                            f"<= {floor:.3g}, zeros too")
    else:
        axes[-1].set_xlabel("score (last loss)")
    _write_output(args.out, args, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    print(f"wrote histograms of epochs {', '.join(map(str, epochs))} to {args.out}"
          + (f" (log x axis: {why})" if log else ""))
    return 0


def _histogram(ax: Any, snap: ScoreSnapshot, edges: np.ndarray, floor: float | None) -> None:
    """One epoch's panel; with a log axis (``floor`` set) lower scores count at the floor."""
    ax.set_ylabel("keys")
    if not len(snap):
        ax.set_title(f"epoch {snap.epoch}: no scores", fontsize=10)
        return
    scores = snap.scores if floor is None else np.maximum(snap.scores, np.float32(floor))
    counts, _ = np.histogram(scores, bins=edges)
    ax.stairs(counts, edges, fill=True, alpha=0.75)
    mean = snap.mean if floor is None else max(snap.mean, floor)
    ax.axvline(mean, color="C3", linestyle="--")
    ax.text(mean, 0.95, f" mean {snap.mean:.4g}", color="C3", va="top",
            transform=ax.get_xaxis_transform())
    below = np.count_nonzero(snap.scores < np.float64(snap.mean)) / len(snap)
    ax.set_title(f"epoch {snap.epoch}: {len(snap):,} keys, {below:.1%} below the mean",
                 fontsize=10)
