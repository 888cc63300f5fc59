"""Run in a fresh interpreter by test_store.py: open a committed store, write out what it holds.

argv[1]: a JSON file {url, storage_options, cache_dir, key_prefix, n_keys, hashes, n_unknown,
out}. Every key is looked up by its hash (``hashes``: an .npy the test computed with xxhash);
every 20th also by its key string, regenerated here and hashed by the store.
"""

import json
import sys

import numpy as np

from tests.storage._storage_only import assert_storage_only, import_storage

storage = import_storage()


def main() -> None:
    with open(sys.argv[1]) as f:
        args = json.load(f)
    store = storage.ScoreStore(args["url"], storage_options=args["storage_options"],
                               cache_dir=args["cache_dir"])
    hashes = np.load(args["hashes"])
    keys = [f"{args['key_prefix']}{i:07d}" for i in range(0, args["n_keys"], 20)]
    unknown = [f"never-recorded-{i}" for i in range(args["n_unknown"])]
    out = {"epochs": np.array(store.epochs), "latest": np.array(store.latest_epoch)}
    for epoch in store.epochs:
        snap = store.snapshot(epoch)
        table = snap.to_arrow()
        lookup = snap.lookup(hashes)
        by_string = snap.lookup(keys)
        assert np.array_equal(by_string, lookup[::20], equal_nan=True)
        out.update({
            f"lookup_{epoch}": lookup,
            f"unknown_{epoch}": snap.lookup(unknown),
            f"len_{epoch}": np.array(len(snap)),
            f"mean_{epoch}": np.array(snap.mean, np.float64),
            f"hash_{epoch}": table.column("hash").to_numpy(),
            f"score_{epoch}": table.column("score").to_numpy(),
            f"epoch_{epoch}": table.column("epoch").to_numpy(),
            f"manifest_{epoch}": np.array(store.manifest(epoch).to_json().decode()),
        })
    assert_storage_only()
    np.savez(args["out"], **out)


if __name__ == "__main__":
    main()
