"""``disco_ds plan``: layouts and exchange plans built from shapes equal the live ones.

``tests/cluster_plan_worker.py`` builds the tiny recipe's engine exactly as ``disco_ds train``
does, at world sizes 1–4 and ZeRO 0/1/2/3 (ZeRO-3 also cut into sub-groups, ZeRO-1 also through
DeepSpeed's ``BF16_Optimizer``, and tensor parallelism 2 at W=2), steps once, and dumps every
layout Scion built and the exchange plans cached in it. For every rank,
:func:`disco_ds.trainer.cluster_plan.cluster_layouts` must give the same fragments, shapes, blocks
and sources, and :func:`disco_ds.distributed.exchange.matrix_plan` on them the same owners and
rounds (every route of every round).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from launching import REPO, torchrun, worker_env

from disco_ds.distributed.exchange import matrix_plan
from disco_ds.optim.norms import MatrixNorm
from disco_ds.trainer.cluster_plan import Cluster, plan_cluster, representative_ranks

WORKER = Path(__file__).parent / "cluster_plan_worker.py"
SMALL = ["model.overrides={vocab_size: 320}", "data.seq_len=16", "train.micro_batch=2", "train.global_batch_tokens=32",
         "train.tokens=1e5", "optimizer.lr=0.05"]
STAGES = [{"name": f"zero{s}", "stage": s, "tp": 1, "overrides": SMALL} for s in (0, 1, 2, 3)]
# Three ZeRO-3 sub-groups of the hidden matrices (16k–49k entries each), DeepSpeed's BF16_Optimizer.
EXTRA = [
    {"name": "zero3_subgroups", "stage": 3, "tp": 1, "overrides": [*SMALL, "train.deepspeed=SUBGROUPS"]},
    {"name": "zero1_bf16", "stage": 1, "tp": 1, "overrides": [*SMALL, "train.bf16=true", "train.grad_dtype=float32"]},
]
LAUNCHES = {1: STAGES, 2: STAGES, 3: [*STAGES, *EXTRA], 4: STAGES,
            "tp": [{"name": "tp2_zero2", "stage": 2, "tp": 2, "overrides": SMALL}]}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple, dict]:
    """``(world, job name, rank)`` → what that rank's Scion built; one launch per world size."""
    out = tmp_path_factory.mktemp("cluster_plan")
    sub_groups = out / "subgroups.json"
    sub_groups.write_text(json.dumps({"zero_optimization": {"sub_group_size": 12000}}))
    records = {}
    for key, jobs in LAUNCHES.items():
        world = 2 if key == "tp" else key
        jobs = [{**job, "overrides": [o.replace("SUBGROUPS", str(sub_groups)) for o in job["overrides"]]} for job in jobs]
        proc = torchrun(WORKER, world, json.dumps(jobs), str(out), timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        for job in jobs:
            for rank in range(world):
                records[(world, job["name"], rank)] = torch.load(out / f"{job['name']}_rank{rank}.pt", weights_only=False)
    return {"records": records, "jobs": {job["name"]: job for jobs in LAUNCHES.values() for job in jobs},
            "sub_groups": sub_groups}


CASES = [(w, job["name"]) for key, jobs in LAUNCHES.items() for job in jobs for w in ([2] if key == "tp" else [key])]


@pytest.mark.parametrize("world,name", CASES, ids=[f"W{w}-{n}" for w, n in CASES])
def test_plan_from_shapes_equals_the_live_layouts_and_plans(live: dict, world: int, name: str) -> None:
    job = live["jobs"][name]
    overrides = [o.replace("SUBGROUPS", str(live["sub_groups"])) for o in job["overrides"]]
    plan = plan_cluster("tiny", Cluster(world, job["tp"]), zero_stage=job["stage"], overrides=overrides, ranks=[0])
    if name == "zero3_subgroups":
        assert len({p.key for p in plan.layouts if p.group.role == "hidden"}) > 1  # the hidden group really is cut
    if job["tp"] > 1:
        assert any(p.layout.blocks for p in plan.layouts)  # row-parallel matrices stored block by block
    if name == "zero1_bf16":
        assert live["records"][(world, name, 0)]["wrapper"] == "BF16_Optimizer"
    for rank in range(world):
        got = live["records"][(world, name, rank)]["layouts"]
        assert sorted(got) == sorted(p.key for p in plan.layouts)
        for planned in plan.layouts:
            layout, ref = planned.for_rank(rank), got[planned.key]
            assert [tuple(s) for s in layout.shapes] == ref["shapes"], planned.key
            assert layout.fragments == ref["fragments"], planned.key
            assert dict(layout.blocks) == ref["blocks"], planned.key
            assert layout.sources == ref["sources"], planned.key
            assert (layout.replicated, layout.rank) == (ref["replicated"], ref["rank"]), planned.key
            norm = planned.group.norm
            if not isinstance(norm, MatrixNorm):
                assert ref["plans"] == {}
                continue
            (kind, steps, gram, bound), (owners, rounds) = next(iter(ref["plans"].items()))
            assert (kind, steps, gram) == (type(norm).__name__, norm.ns_steps, norm.ns_gram)
            mine = matrix_plan(layout, norm, bound)
            assert mine.owners == owners, planned.key
            assert mine.rounds == rounds, planned.key


def test_loads_summed_over_ranks_balance() -> None:
    """Every matrix is orthogonalised exactly once, and every byte sent is received."""
    for stage in (0, 1, 2, 3):
        plan = plan_cluster("tiny", Cluster(4), zero_stage=stage, overrides=SMALL)
        loads = plan.loads.values()
        assert sum(x.matrices for x in loads) == 14
        assert sum(x.bytes_sent for x in loads) == sum(x.bytes_received for x in loads)
        assert plan.recommended is not None and plan.optimizer_s > 0


@pytest.mark.parametrize("world,reverse", [(3, "all_gather"), (4, "broadcast")])  # W=3: unequal shares
def test_stage0_traffic_is_the_exchanges_own_accounting(world: int, reverse: str) -> None:
    """At stage 0 the updates return by an all-gather of shares padded to the largest, or by one
    broadcast per owner; the plan's bytes are what ``ExchangeStats`` counts for them."""
    plan = plan_cluster("tiny", Cluster(world), zero_stage=0, overrides=SMALL)
    expected = {rank: 0 for rank in range(world)}
    for planned in plan.layouts:
        if not isinstance(planned.group.norm, MatrixNorm):
            continue
        for rank in range(world):
            for step in matrix_plan(planned.for_rank(rank), planned.group.norm, 1 << 27).rounds:
                assert step.reverse == reverse
                share = max(step.owner_numel) if reverse == "all_gather" else step.owner_numel[rank]
                expected[rank] += (world - 1) * share * 2  # bf16 on the wire
    assert {rank: load.bytes_sent for rank, load in plan.loads.items()} == expected


@pytest.mark.parametrize("stage", [0, 3])
def test_representative_ranks_include_the_busiest(stage: int) -> None:
    """Where planning every rank is too slow (ZeRO-0/3 at hundreds of ranks) only representative
    ranks are planned; at W = 8, planning all, they include the busiest by every measure."""
    plan = plan_cluster("tiny", Cluster(8), zero_stage=stage, overrides=SMALL)
    chosen = representative_ranks(plan.layouts, 1 << 27)
    loads = plan.loads.values()
    for measure in ("ns_flops", "bytes_sent", "bytes_received", "owner_peak_bytes"):
        busiest = max(getattr(x, measure) for x in loads)
        assert any(getattr(plan.loads[r], measure) == busiest for r in chosen), measure


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "disco_ds", "plan", *args], env=worker_env(), cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli_plans_tiny_on_eight_ranks() -> None:
    proc = run_cli("tiny", "--world-size", "8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "tiny: 8 ranks = 8 data-parallel" in out
    assert out.count("\n| ") >= 8 + 4  # a row per rank, then the ZeRO settings
    assert "recommend   ZeRO-" in out and "of the step" in out
    proc = run_cli("tiny", "--world-size", "8,64")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [line.split("|")[2].strip() for line in proc.stdout.splitlines() if line.startswith("| tiny")] == ["8", "64"]


def test_cli_names_the_accepted_values() -> None:
    proc = run_cli("no-such-recipe", "--world-size", "8")
    assert proc.returncode == 2
    assert "recipe 'no-such-recipe' does not exist" in proc.stderr and "gpt-1.3b" in proc.stderr
    proc = run_cli("tiny", "--world-size", "8", "--zero", "4")
    assert proc.returncode == 2 and "--zero: invalid choice: 4 (choose from 0, 1, 2, 3)" in proc.stderr
    proc = run_cli("tiny", "--world-size", "8", "--gpu", "a100")
    assert proc.returncode == 2 and "invalid choice: 'a100' (choose from 'h100', 'h200')" in proc.stderr
    proc = run_cli("tiny", "--world-size", "6", "--tp", "4")
    assert proc.returncode == 2 and "train.tp_size=4 does not divide the 6 launched ranks" in proc.stderr
