"""A training run on a store: its identity, its settings, and the lease its processes hold.

A run's identity is what the user gives (``run_id=``) or what a checkpoint restores; with
neither, the run has no id, and it resumes a store that a run with no id owns. The
launcher's id (torchrun's ``TORCHELASTIC_RUN_ID``) is not the run's: torchrun gives every
launch a new one, so a job relaunched before its first checkpoint would be refused.

Rank 0 takes the store's next incarnation (``ScoreStore.begin_run``): the store refuses
another run, or other settings, unless taken over; every older process of the run is
fenced from then on. The lease travels to the other ranks as plain JSON.
"""

from __future__ import annotations

from typing import Any

from ..stages.keyfn import KeyFunction, sample_key, shard_key
from ..stages.policy import PruningPolicy
from ..storage import ScoreStore
from ..storage.runs import RunLease
from . import distributed


def key_name(key: KeyFunction) -> str:
    """How the store records a key function: "key", "shard", or the callable's name."""
    if key is sample_key:
        return "key"
    if key is shard_key:
        return "shard"
    return f"{getattr(key, '__module__', '?')}.{getattr(key, '__qualname__', repr(key))}"


def run_settings(num_epochs: int, policy: PruningPolicy, key: KeyFunction) -> dict[str, Any]:
    """What determines every decision of the run, as the store records it.

    >>> run_settings(10, InfoBatchPolicy(num_epochs=10), sample_key)["key"]   # doctest: +SKIP
    'key'
    """
    return {"num_epochs": num_epochs, **policy.settings(), "key": key_name(key)}


def begin_run(store: ScoreStore, run_id: str | None, settings: dict[str, Any],
              takeover: bool) -> RunLease:
    """Collective: rank 0 begins the run on ``store``; every rank returns the same lease."""
    data = distributed.on_rank_zero(
        lambda: store.begin_run(run_id, settings, takeover=takeover).to_dict(),
        f"beginning run {run_id!r} on {store.url}", distributed.control_group())
    return RunLease.from_dict(data)
