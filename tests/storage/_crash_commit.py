"""A store operation that dies by SIGKILL at a chosen write step; run by test_crash.py.

It runs as a small fork server so that each attempt costs a fork, not an interpreter start:
the test writes one JSON request per line to stdin; for each, this process forks a child that
opens the store, counts every step that changes what is persisted (the store's write/delete
primitives in ``fsio``, the download into the snapshot cache, the OS renames/links/unlinks/
rmdirs behind them, and the snapshot cache's renames and deletes) and SIGKILLs itself just
before step ``kill_at``. A step past the last one is "end", after the operation returned.
The reply, one JSON line on stdout, says whether the child was killed and the steps it went
through (the last one named is where it died).

Request: {"op", "url", "storage_options", "cache_dir", "epoch", "keep_snapshots", "kill_at",
"log"}, and for ``op`` "flush" also "rank" and "updates" (an .npz of hashes and scores).
``op``: "commit" commits ``epoch`` (its retention deletes included); "flush" records the
updates in a writer of ``epoch`` and flushes them as one delta; "fetch" opens the snapshot
of ``epoch`` through the cache (a remote store's download).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import types

from tests.storage._storage_only import assert_storage_only, import_storage

storage = import_storage()
from infobatch_stream.storage import cache, fsio, retention  # noqa: E402
from infobatch_stream.storage import commit as commit_module  # noqa: E402


def child(request: dict) -> None:
    steps = 0
    log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def step(name: str) -> None:
        nonlocal steps
        os.write(log, (name + "\n").encode())  # reaches the page cache before the kill
        if steps == request["kill_at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        steps += 1

    def counted(name, func):
        @functools.wraps(func)
        def wrapper(*args, **kwargs):
            shown = [a for a in args if isinstance(a, str)]
            step(f"{name} {' '.join(shown)}")
            return func(*args, **kwargs)
        return wrapper

    for name in ("write_bytes", "put_file", "remove", "get_file"):
        setattr(fsio, name, counted(f"fsio.{name}", getattr(fsio, name)))
    real_get_file = fsio.get_file

    def get_file_then_step(fs, path, local, **kwargs):
        real_get_file(fs, path, local, **kwargs)
        step(f"downloaded {path}")  # complete, not yet renamed into place

    fsio.get_file = get_file_then_step
    # The OS steps behind them, seen only by the modules that persist things.
    for module, names in ((fsio, ("link", "replace", "unlink", "rename", "rmdir")),
                          (commit_module, ("replace", "rmdir", "unlink")),
                          (retention, ("rmdir", "unlink")),
                          (cache, ("replace", "unlink"))):
        proxy = types.SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
        for name in names:
            setattr(proxy, name, counted(f"{module.__name__.rsplit('.', 1)[-1]}:os.{name}",
                                         getattr(os, name)))
        module.os = proxy

    store = storage.ScoreStore(request["url"], storage_options=request["storage_options"],
                               cache_dir=request["cache_dir"],
                               keep_snapshots=request["keep_snapshots"])
    op = request.get("op", "commit")
    if op == "commit":
        store.commit(request["epoch"])
    elif op == "flush":
        import numpy as np

        updates = np.load(request["updates"])
        writer = store.writer(request["epoch"], rank=request["rank"])
        writer.record(updates["hashes"], updates["scores"])
        writer.flush()
    elif op == "fetch":
        store.snapshot(request["epoch"])
    else:
        raise ValueError(f"unknown op {op!r}")
    step("end")
    assert_storage_only()


def warm_s3_session():
    """An aiobotocore session whose service models are already loaded (a tenth of a second
    per child otherwise). Its one client is closed and its event loop gone before any fork."""
    try:
        import asyncio

        from aiobotocore.session import get_session
    except ImportError:
        return None
    session = get_session()

    async def load_models() -> None:
        async with session.create_client("s3", region_name="us-east-1",
                                         endpoint_url="http://127.0.0.1:9",
                                         aws_access_key_id="x", aws_secret_access_key="x"):
            pass

    asyncio.run(load_models())
    return session


def main() -> None:
    session = warm_s3_session()
    for line in sys.stdin:
        request = json.loads(line)
        if request["url"].startswith("s3://") and session is not None:
            request["storage_options"] = dict(request["storage_options"], session=session)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                child(request)
            except BaseException as exc:  # reported, not raised: the server must answer
                import traceback

                traceback.print_exc()
                print(f"child failed: {exc!r}", file=sys.stderr, flush=True)
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        try:
            with open(request["log"]) as f:
                steps = f.read().splitlines()
        except FileNotFoundError:
            steps = []
        reply = {"killed": killed, "exit": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "steps": steps}
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
