"""Run by test_runs.py, two at a time: wait for a shared start signal, then begin a run on
one store ``count`` times, and print what happened as one JSON line.

argv: url, storage options (JSON), run id ("" for none), count, start-signal file.
"""

import json
import os
import sys
import time

from tests.storage._storage_only import assert_storage_only, import_storage

storage = import_storage()


def main() -> None:
    url, options, run_id, count, go = sys.argv[1:6]
    store = storage.ScoreStore(url, storage_options=json.loads(options) or None)
    deadline = time.monotonic() + 60
    while not os.path.exists(go):  # both processes start racing at the same moment
        if time.monotonic() > deadline:
            raise TimeoutError(go)
        time.sleep(0.001)
    taken, refused = [], None
    for _ in range(int(count)):
        try:
            taken.append(store.begin_run(run_id or None).incarnation)
        except storage.OwnershipError as exc:
            refused = str(exc)
            break
    assert_storage_only()
    print(json.dumps({"taken": taken, "refused": refused}))


if __name__ == "__main__":
    main()
