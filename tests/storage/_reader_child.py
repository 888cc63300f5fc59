"""Run by test_crash.py: a reader that loops over lookups while another process commits.

argv[1]: a JSON file {url, storage_options, cache_dir, stop, hashes (an .npy of every key's
hash), out}. Until the ``stop`` file appears it opens the latest snapshot (a fresh listing
each time) and looks up every key; each result must be exactly one epoch's scores (see
``expected_scores``) with that epoch's mean. Writes {"lookups", "epochs"} to ``out``; any
mismatch or error fails the process.
"""

import json
import os
import sys
import time

import numpy as np


def expected_scores(epoch: int, n_keys: int) -> np.ndarray:
    """Epoch e writes score e * 10000 + i to key i of parity e % 2; the rest carry over."""
    i = np.arange(n_keys)
    last = np.where(i % 2 == epoch % 2, epoch, epoch - 1)
    return np.where(last >= 0, last * 10000.0 + i, np.nan).astype(np.float32)


def main() -> None:
    from tests.storage._storage_only import assert_storage_only, import_storage

    storage = import_storage()
    from infobatch_stream.storage import fsio
    from infobatch_stream.storage.snapshot import ScoreSnapshot

    # A slow reader: pauses between listing the manifests, reading one and opening its
    # snapshot, so that commits (and their retention) land in between.
    rng = np.random.default_rng(os.getpid())

    def slow(func):
        def wrapper(*a, **k):
            time.sleep(rng.random() * 0.01)
            return func(*a, **k)
        return wrapper

    fsio.read_bytes = slow(fsio.read_bytes)
    fsio.get_file = slow(fsio.get_file)
    ScoreSnapshot.open = staticmethod(slow(ScoreSnapshot.open))
    with open(sys.argv[1]) as f:
        args = json.load(f)
    store = storage.ScoreStore(args["url"], storage_options=args["storage_options"],
                               cache_dir=args["cache_dir"], keep_snapshots=1)
    hashes = np.load(args["hashes"])
    open(args["out"] + ".ready", "w").close()
    lookups, epochs = 0, set()
    while not os.path.exists(args["stop"]):
        snap = store.snapshot()
        if snap.epoch is None:
            continue
        got = snap.lookup(hashes)
        want = expected_scores(snap.epoch, len(hashes))
        assert np.array_equal(got, want, equal_nan=True), f"epoch {snap.epoch}: a mixed or torn read"
        known = want[~np.isnan(want)].astype(np.float64)
        assert abs(snap.mean - known.mean()) <= 1e-9 * abs(known.mean()), (snap.mean, known.mean())
        lookups += 1
        epochs.add(snap.epoch)
    assert_storage_only()
    with open(args["out"], "w") as out:
        json.dump({"lookups": lookups, "epochs": sorted(epochs)}, out)


if __name__ == "__main__":
    main()
