"""A job's processes, found through /proc (Linux), so that a crash kills all of them at once.

torchrun starts each rank in a session of its own, so a process group does not hold a job:
its processes are the job's root and everything descended from it.
"""

from __future__ import annotations

import os
import signal


def parents() -> dict[int, int]:
    """{pid: parent pid} of every process now running."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:  # it ended meanwhile
            continue
        # The command name may hold spaces and parentheses: the parent pid follows the last ')'.
        table[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    return table


def family(root: int) -> list[int]:
    """``root`` and all its descendants."""
    table = parents()
    found, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in table.items() if parent in frontier]
        found += frontier
    return found


def job_root(outside: int) -> int:
    """The ancestor of this process whose parent is ``outside`` (the test that started the job)."""
    table = parents()
    pid = os.getpid()
    while table.get(pid, outside) != outside:
        pid = table[pid]
    return pid


def kill_all(pids: list[int]) -> None:
    """SIGKILL ``pids``, this process last. All are stopped first, so none reacts to another's
    death (torchrun would stop the other ranks gracefully)."""
    others = [pid for pid in pids if pid != os.getpid()]
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for pid in others:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
    if os.getpid() in pids:
        os.kill(os.getpid(), signal.SIGKILL)
