"""A small, deterministic training script for the pipeline tests (run by python or torchrun).

It is the user's three lines around a tiny classifier on tar shards of (x.npy, y.cls), plus
what the tests look at: after each committed epoch every rank writes
``<out>/rank<r>-epoch<e>.json`` (the keys it trained, their losses, the steps it took, the
epoch's ``ib.metrics()``).
``--kill-at E:S`` SIGKILLs the process after step S of epoch E (a real crash).
``--overlap`` ends each epoch with ``end_epoch(wait=False)`` and evaluates meanwhile;
``--kill-in-commit E:before-manifest|after-manifest`` SIGKILLs the process during that
evaluation, while the overlapped commit of epoch E is at that point.
``--accumulate K`` steps the optimizer every K micro-batches (``bound(..., K)``).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import threading

import torch
import torch.distributed as dist
import webdataset as wds

import infobatch_stream as ibs


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--shards", required=True, help="comma-separated shard URLs")
    p.add_argument("--store", required=True)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--delta", type=float, default=0.875)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--dataset-size", type=int, default=0)
    p.add_argument("--out", required=True)
    p.add_argument("--ckpt", default="")
    p.add_argument("--kill-at", default="")
    p.add_argument("--flush-rows", type=int, default=1 << 20)
    p.add_argument("--onecycle", action="store_true")
    p.add_argument("--storage-options", default="{}", help="JSON")
    p.add_argument("--overlap", action="store_true")
    p.add_argument("--kill-in-commit", default="")
    p.add_argument("--accumulate", type=int, default=1)
    return p.parse_args()


def hold_commit(epoch: int, where: str) -> threading.Event:
    """Make the commit of ``epoch`` stop for good at ``where``; the event says it got there."""
    from infobatch_stream.storage import commit, retention

    reached = threading.Event()
    module, name = (commit, "_publish") if where == "before-manifest" else (retention, "retain")
    original = getattr(module, name)

    def held(store, manifest, *args):
        if manifest.epoch == epoch:
            reached.set()
            threading.Event().wait()  # until the SIGKILL
        return original(store, manifest, *args)

    setattr(module, name, held)
    return reached


def evaluate(model: torch.nn.Module) -> float:
    """A stand-in for evaluation: forward passes on fixed inputs, no gradients."""
    inputs = torch.randn(256, 8, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return float(model(inputs).square().mean())


def main() -> None:
    args = parse()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    os.makedirs(args.out, exist_ok=True)

    ib = ibs.InfoBatch(args.store, num_epochs=args.epochs, prune_ratio=args.ratio,
                       delta=args.delta, storage_options=json.loads(args.storage_options),
                       flush_rows=args.flush_rows)
    urls = args.shards.split(",")
    dataset = (
        wds.WebDataset(urls, nodesplitter=wds.split_by_node, shardshuffle=False, empty_check=False)
        .compose(ib.stage())
        .decode()
        .to_tuple("x.npy", "y.cls", "__key__", "__weight__")
        .batched(args.batch)
    )
    loader = wds.WebLoader(dataset, batch_size=None, num_workers=args.workers)

    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    if dist.is_initialized():
        model = torch.nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = None
    if args.onecycle:
        plan = ib.plan_steps(args.dataset_size, args.batch,
                             gradient_accumulation_steps=args.accumulate)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=plan.total_steps)
        if rank == 0:
            with open(os.path.join(args.out, "plan.json"), "w") as f:
                json.dump(plan.to_dict(), f)

    if args.ckpt and os.path.exists(args.ckpt):
        state = torch.load(args.ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        if sched is not None:
            sched.load_state_dict(state["sched"])
        ib.load_state_dict(state["ib"])
    kill_epoch, kill_step = (int(v) for v in args.kill_at.split(":")) if args.kill_at else (-1, -1)
    held_epoch, reached = -1, None
    if args.kill_in_commit:
        held, where = args.kill_in_commit.split(":")
        held_epoch, reached = int(held), hold_commit(int(held), where)

    for epoch in ib.epochs():
        keys_seen, losses_seen, steps = [], [], 0
        planned_pruned = ib.plan().pruned
        for x, y, keys, weights in ib.bound(loader, gradient_accumulation_steps=args.accumulate):
            per_sample = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
            loss = ib.update(per_sample, keys, weights) / args.accumulate
            loss.backward()
            if (steps + 1) % args.accumulate == 0:
                opt.step()
                opt.zero_grad()
                if sched is not None:
                    sched.step()
            keys_seen += list(keys)
            losses_seen += per_sample.detach().tolist()
            steps += 1
            if (epoch, steps) == (kill_epoch, kill_step):
                # Full buffers are written on a background thread: let the ones already
                # handed to it land, so the kill leaves flushed deltas (and a buffered rest)
                # however loaded the machine is.
                ib._recorder.wait()
                os.kill(os.getpid(), signal.SIGKILL)
        log = {"keys": keys_seen, "losses": losses_seen, "steps": steps, "world": world,
               "planned_pruned": planned_pruned}
        if args.overlap:
            with open(os.path.join(args.out, f"rank{rank}-trained{epoch}.json"), "w") as f:
                json.dump(log, f)  # what a kill during the overlapped commit must not lose
            ib.end_epoch(wait=False)
            log["eval"] = evaluate(model)  # overlaps the commit
            if epoch == held_epoch:
                reached.wait(timeout=120)
                os.kill(os.getpid(), signal.SIGKILL)
        else:
            ib.end_epoch()
        log["metrics"] = ib.metrics()
        with open(os.path.join(args.out, f"rank{rank}-epoch{epoch}.json"), "w") as f:
            json.dump(log, f)
        if args.ckpt and rank == 0:
            state = {"model": model.state_dict(), "opt": opt.state_dict(), "ib": ib.state_dict(),
                     "sched": sched.state_dict() if sched is not None else None}
            torch.save(state, args.ckpt + ".tmp")
            os.replace(args.ckpt + ".tmp", args.ckpt)
        if dist.is_initialized():
            dist.barrier()
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
