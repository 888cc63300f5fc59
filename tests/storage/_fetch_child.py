"""Run by test_cache.py in two fresh interpreters that share one cache directory.

argv[1]: a JSON file {url, storage_options, cache_dir, role, sync_dir, expected (an .npz with
hashes and scores), out}. The roles make the race certain rather than likely:

- "first" downloads, and holds the cache lock (its download complete, not yet renamed into
  place) until "second" has looked at the cache directory and is about to ask for the file;
- "second" waits for that, records what the directory holds (no final file may be visible
  yet), then asks for the snapshot, which must wait for "first" and then use its file.

Each counts its own downloads (``fsio.get_file`` calls) and checks every lookup.
"""

import json
import os
import sys
import time

import numpy as np

from tests.storage._storage_only import assert_storage_only, import_storage

storage = import_storage()
from infobatch_stream.storage import fsio  # noqa: E402


def wait_for(path: str) -> None:
    deadline = time.monotonic() + 60
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise TimeoutError(path)
        time.sleep(0.002)


def touch(path: str) -> None:
    with open(path, "w"):
        pass


def main() -> None:
    with open(sys.argv[1]) as f:
        args = json.load(f)
    sync = args["sync_dir"]
    downloads = []
    real_get_file = fsio.get_file

    def counting_get_file(fs, path, local, **kwargs):
        real_get_file(fs, path, local, **kwargs)  # the real download, to the temporary file
        downloads.append(local)
        if args["role"] == "first":
            touch(os.path.join(sync, "downloaded"))
            wait_for(os.path.join(sync, "second-asking"))
            time.sleep(0.3)  # let "second" reach the lock; correctness does not depend on it

    fsio.get_file = counting_get_file
    store = storage.ScoreStore(args["url"], storage_options=args["storage_options"],
                               cache_dir=args["cache_dir"])
    manifest = store.manifest()
    seen_before = None
    if args["role"] == "second":
        wait_for(os.path.join(sync, "downloaded"))
        directory = os.path.join(args["cache_dir"], os.listdir(args["cache_dir"])[0])
        seen_before = sorted(os.listdir(directory))
        touch(os.path.join(sync, "second-asking"))
    snap = store.snapshot()
    expected = np.load(args["expected"])
    got = snap.lookup(expected["hashes"])
    result = {
        "role": args["role"], "downloads": len(downloads), "seen_before": seen_before,
        "path": snap.path, "inode": os.stat(snap.path).st_ino,
        "exact": bool(np.array_equal(got, expected["scores"])),
        "snapshot": manifest.snapshot,
    }
    assert_storage_only()
    with open(args["out"], "w") as out:
        json.dump(result, out)


if __name__ == "__main__":
    main()
