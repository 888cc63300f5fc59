"""TimestepNormalizer: scores that divide out the timestep, identical on every rank."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import infobatch_stream as ibs

RANKS_SCRIPT = str(Path(__file__).with_name("timestep_ranks.py"))


def reference_tables(batches: list[list[tuple[float, int]]], num_timesteps: int, buckets: int,
                     momentum: float) -> list[list[float]]:
    """The table after each sync, in plain Python: one list of (loss, t) pairs per sync."""
    table = [math.nan] * buckets
    tables = []
    for pairs in batches:
        sums, counts = [0.0] * buckets, [0] * buckets
        for loss, t in pairs:
            b = t * buckets // num_timesteps
            sums[b] += loss
            counts[b] += 1
        for b in range(buckets):
            if counts[b]:
                mean = sums[b] / counts[b]
                table[b] = mean if math.isnan(table[b]) else momentum * table[b] + (1 - momentum) * mean
        tables.append(list(table))
    return tables


def same(a: list[float], b: list[float]) -> bool:
    return all((math.isnan(x) and math.isnan(y)) or x == pytest.approx(y, rel=1e-6)
               for x, y in zip(a, b, strict=True))


def test_scores_divide_each_loss_by_its_buckets_running_mean():
    norm = ibs.TimestepNormalizer(num_timesteps=100, buckets=4, momentum=0.25, warmup_steps=0)
    first = [(0.8, 3), (0.4, 10), (0.1, 60), (0.3, 70)]     # buckets 0, 0, 2, 2; 1 and 3 unseen
    scores = norm(torch.tensor([p[0] for p in first]), torch.tensor([p[1] for p in first]))
    assert torch.isnan(scores).all()                          # no table before the first sync
    norm.sync()
    second = [(0.3, 0), (0.05, 99), (0.2, 55)]
    scores = norm(torch.tensor([p[0] for p in second]), torch.tensor([p[1] for p in second]))
    expected = reference_tables([first], 100, 4, 0.25)[0]
    assert scores[0].item() == pytest.approx(0.3 / expected[0])       # 0.3 / 0.6
    assert math.isnan(scores[1].item())                               # bucket 3: never synced
    assert scores[2].item() == pytest.approx(0.2 / expected[2])       # 0.2 / 0.2
    norm.sync()
    assert same(norm.table.tolist(), reference_tables([first, second], 100, 4, 0.25)[1])
    assert norm.table[0].item() == pytest.approx(0.25 * 0.6 + 0.75 * 0.3)


def test_the_first_sync_comes_by_itself_after_the_warmup_steps():
    norm = ibs.TimestepNormalizer(num_timesteps=10, buckets=2, warmup_steps=2)
    t = torch.tensor([1, 8])
    assert torch.isnan(norm(torch.tensor([1.0, 0.1]), t)).all()
    assert norm.syncs == 0
    assert torch.isnan(norm(torch.tensor([3.0, 0.3]), t)).all()     # scored, then synced
    assert norm.syncs == 1
    assert norm(torch.tensor([4.0, 0.4]), t).tolist() == pytest.approx([2.0, 2.0])
    assert norm.syncs == 1                                           # only once by itself


def test_smoothing_blends_the_previous_score_where_there_is_one():
    norm = ibs.TimestepNormalizer(num_timesteps=10, buckets=1, smoothing=0.75, warmup_steps=1)
    norm(torch.tensor([2.0]), torch.tensor([0]))                    # table: 2.0
    out = norm(torch.tensor([4.0, 4.0]), torch.tensor([3, 3]), previous=torch.tensor([1.0, math.nan]))
    assert out.tolist() == pytest.approx([0.75 * 1.0 + 0.25 * 2.0, 2.0])


def test_state_round_trips_through_strict_json():
    norm = ibs.TimestepNormalizer(num_timesteps=100, buckets=5, momentum=0.5, warmup_steps=1)
    norm(torch.tensor([0.9, 0.2, 0.05]), torch.tensor([1, 45, 99]))
    norm(torch.tensor([0.7, 0.3]), torch.tensor([2, 50]))
    norm.sync()
    state = json.loads(json.dumps(norm.state_dict(), allow_nan=False))
    again = ibs.TimestepNormalizer(num_timesteps=100, buckets=5, momentum=0.5, warmup_steps=1)
    again.load_state_dict(state)
    assert same(again.table.tolist(), norm.table.tolist()) and again.syncs == norm.syncs == 2
    probe = (torch.tensor([0.5, 0.5, 0.5]), torch.tensor([0, 40, 90]))
    assert same(again(*probe).tolist(), norm(*probe).tolist())
    assert again.syncs == 2                       # a restored normalizer does not warm up again
    with pytest.raises(ValueError, match="buckets=5"):
        ibs.TimestepNormalizer(num_timesteps=100, buckets=4).load_state_dict(state)


def test_the_step_path_never_reads_a_value_back_to_the_host():
    """On the meta device any .item(), .tolist() or float() raises: the call must not need them."""
    norm = ibs.TimestepNormalizer(num_timesteps=1000, buckets=8, smoothing=0.5, warmup_steps=2)
    loss = torch.empty(16, device="meta")
    t = torch.empty(16, dtype=torch.long, device="meta")
    for _ in range(3):                             # includes the automatic sync
        scores = norm(loss, t, previous=torch.empty(16, device="meta"))
    assert scores.device.type == "meta" and scores.shape == (16,) and norm.syncs == 1


def test_bad_settings_and_shapes_are_refused_naming_them():
    for kwargs, name in [({"buckets": 0}, "buckets"), ({"momentum": 1.0}, "momentum"),
                         ({"smoothing": -0.1}, "smoothing"), ({"num_timesteps": 4, "buckets": 8}, "buckets"),
                         ({"warmup_steps": -1}, "warmup_steps")]:
        with pytest.raises(ValueError, match=name):
            ibs.TimestepNormalizer(**kwargs)
    with pytest.raises(ValueError, match="one loss and one timestep"):
        ibs.TimestepNormalizer()(torch.ones(4), torch.ones(3))


def test_infobatch_records_the_normalized_scores(tmp_path):
    ib = ibs.InfoBatch(tmp_path / "store", num_epochs=4)
    norm = ibs.TimestepNormalizer(num_timesteps=10, buckets=2, warmup_steps=1)
    norm(torch.tensor([1.0, 0.1]), torch.tensor([0, 9]))            # table: 1.0 and 0.1
    loss = torch.tensor([0.5, 0.2, 2.0])
    scores = norm(loss, torch.tensor([1, 7, 2]))
    ib.update(loss, ["a", "b", "c"], scores=scores)
    ib.end_epoch()
    assert ib.store.snapshot(0).lookup(["a", "b", "c"]).tolist() == pytest.approx([0.5, 2.0, 2.0])


def test_two_gloo_ranks_hold_the_same_table_and_give_the_same_scores(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         RANKS_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["state"] == ranks[1]["state"]
    assert ranks[0]["probe"] == ranks[1]["probe"]
    # the table is the reference over BOTH ranks' losses: steps 0-1 (the warmup sync), then 2
    periods = [[(loss, t) for r in ranks for f in r["fed"] if f["step"] in steps
                for loss, t in zip(f["loss"], f["t"], strict=True)] for steps in ((0, 1), (2,))]
    expected = reference_tables(periods, 100, 4, 0.5)[-1]
    table = [math.nan if v is None else v for v in ranks[0]["state"]["table"]]
    assert same(table, expected)
    assert same(ranks[0]["probe"], [0.5 / expected[b] for b in (0, 1, 2, 3)])
    # and each rank's losses alone give another table: the test can tell the difference
    rank1 = {(loss, t) for f in ranks[1]["fed"] for loss, t in zip(f["loss"], f["t"], strict=True)}
    alone = reference_tables([[p for p in period if p in rank1] for period in periods],
                             100, 4, 0.5)[-1]
    assert not same(table, alone)
