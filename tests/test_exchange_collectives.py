"""The matrix exchange between real processes (gloo on the CPU, no DeepSpeed): the overlapped
rounds equal the sequential ones bit for bit, and replicated layouts return updates with one
all-gather (or per-owner broadcasts) and no all-to-all.

Each case spawns W processes that build the same layout, run
:func:`disco_ds.distributed.exchange.distributed_lmo` and write what they saw to a file.

    python tests/test_exchange_collectives.py bench '{"world": 2, ...}'

runs the same harness as a benchmark (ATen ops per call, median wall time, overlap on and off).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from disco_ds.distributed import exchange
from disco_ds.distributed.layout import Fragment, FragmentViews, Layout, shape_numel
from disco_ds.distributed.timing import ExchangeStats
from disco_ds.optim.norms import Spectral
from disco_ds.trainer.cluster_plan import zero3_fragments

SHAPES = [(24, 20), (20, 20), (20, 12), (32, 24), (24, 24), (16, 40)]


def zero3_split(shapes: list[tuple[int, ...]], world: int) -> tuple[list[list[Fragment]], int]:
    """ZeRO-3's even split (:func:`disco_ds.trainer.cluster_plan.zero3_fragments`, what ``disco_ds
    plan`` and the live layout share) and the size of every rank's flat buffer."""
    return zero3_fragments(shapes, world), sum(-(-shape_numel(s) // world) for s in shapes)


def truth(shapes: list[tuple[int, ...]], seed: int = 0) -> list[torch.Tensor]:
    """The whole matrices every rank holds fragments of."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in shapes]


def local_buffer(fragments: list[Fragment], size: int, whole: list[torch.Tensor]) -> torch.Tensor:
    """One rank's flat buffer: its fragments of ``whole`` at their offsets, NaN in the padding (which
    must never be read)."""
    flat = torch.full((size,), float("nan"))
    for f in fragments:
        flat[f.offset : f.offset + f.numel] = whole[f.member].reshape(-1)[f.start : f.start + f.numel]
    return flat


# ---------------------------------------------------------------------------- the harness


def _worker(rank: int, world: int, init: str, case: Callable[[int, int], dict], out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        result = case(rank, world)
        torch.save(result, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(case: Callable[[int, int], dict], world: int) -> list[dict]:
    """Run ``case(rank, world)`` in ``world`` gloo processes; their results, by rank."""
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "result")
        mp.spawn(_worker, args=(world, f"file://{d}/store", case, out), nprocs=world)
        return [torch.load(f"{out}.{r}", weights_only=False) for r in range(world)]


class CollectiveCounter:
    """Calls of each ``torch.distributed`` collective the exchange can make, counted by wrapping them."""

    NAMES = ("all_to_all_single", "all_gather_into_tensor", "broadcast", "all_reduce")

    def __init__(self) -> None:
        self.calls = {name: 0 for name in self.NAMES}
        for name in self.NAMES:
            inner = getattr(dist, name)

            def counted(*args, _inner=inner, _name=name, **kwargs):
                self.calls[_name] += 1
                return _inner(*args, **kwargs)

            setattr(dist, name, counted)


def _zero3_run(rank: int, world: int, shapes: list[tuple[int, ...]], comm_dtype: torch.dtype, max_gather: int,
               overlap: bool, stats: ExchangeStats | None = None) -> tuple[Layout, dict[Fragment, torch.Tensor]]:
    fragments, size = zero3_split(shapes, world)
    layout = Layout(shapes=shapes, fragments=fragments, group=dist.group.WORLD, rank=rank)
    flat = local_buffer(layout.local(), size, truth(shapes))
    updates = exchange.distributed_lmo(layout, Spectral(ns_steps=5), FragmentViews(flat, layout.local()),
                                       comm_dtype=comm_dtype, max_numel_per_rank=max_gather, overlap=overlap,
                                       stats=stats)
    return layout, updates


def _overlap_case(rank: int, world: int) -> dict:
    out = {}
    for overlap in (False, True):
        stats = ExchangeStats()
        layout, updates = _zero3_run(rank, world, SHAPES, torch.bfloat16, 500, overlap, stats)
        out[overlap] = {(f.member, f.start): u.clone() for f, u in updates.items()}
        out[f"rounds_{overlap}"] = stats.rounds
    return out


def _replicated_case(shapes: list[tuple[int, ...]], rank: int, world: int) -> dict:
    layout = Layout(shapes=shapes, fragments=[[Fragment(i, 0, shape_numel(s), 0) for i, s in enumerate(shapes)]
                                              for _ in range(world)],
                    group=dist.group.WORLD, rank=rank, replicated=True)
    whole = truth(shapes)
    counter = CollectiveCounter()
    stats = ExchangeStats()
    updates = exchange.distributed_lmo(layout, Spectral(), {f: whole[f.member].reshape(-1) for f in layout.local()},
                                       comm_dtype=torch.bfloat16, stats=stats)
    plan = exchange.matrix_plan(layout, Spectral(), 1 << 27, comm_bytes=2, work_bytes=4)
    return {"updates": [updates[f].clone() for f in layout.local()], "calls": counter.calls,
            "all_to_all_calls": stats.all_to_all_calls, "reverse": [r.reverse for r in plan.rounds],
            "all_gather_calls": stats.all_gather_calls, "broadcast_calls": stats.broadcast_calls,
            "orthogonalized": stats.matrices_orthogonalized}


# ---------------------------------------------------------------------------- the tests


def test_overlapped_rounds_equal_sequential_rounds_bit_for_bit() -> None:
    for rank in spawn(_overlap_case, 2):
        assert rank["rounds_True"] == rank["rounds_False"] >= 3
        assert rank[True].keys() == rank[False].keys()
        for key, u in rank[False].items():
            assert torch.equal(rank[True][key], u), key


@pytest.mark.parametrize("world,shapes,reverse", [
    (2, [(8, 8), (12, 8), (8, 8), (16, 8)], "all_gather"),
    # One owner gets the big matrix, the others small ones: padding every share to the largest
    # would move more than one broadcast per owner.
    (3, [(64, 64), (4, 4), (4, 4)], "broadcast"),
])
def test_replicated_layout_returns_updates_without_all_to_all(world: int, shapes: list, reverse: str) -> None:
    """Stage 0 / DDP: nothing travels forward; each owner's updates reach every rank once, and every
    replica, the owner included, applies the same comm-rounded values."""
    ranks = spawn(partial(_replicated_case, shapes), world)
    expected = [Spectral().lmo(t) for t in truth(shapes)]
    for rank in ranks:
        assert rank["reverse"] == [reverse]
        assert rank["calls"]["all_to_all_single"] == 0 and rank["all_to_all_calls"] == 0
        if reverse == "all_gather":
            assert rank["calls"]["all_gather_into_tensor"] == 1 and rank["calls"]["broadcast"] == 0
        else:
            assert rank["calls"]["all_gather_into_tensor"] == 0 and rank["calls"]["broadcast"] == world
        assert (rank["all_gather_calls"], rank["broadcast_calls"]) == (rank["calls"]["all_gather_into_tensor"],
                                                                         rank["calls"]["broadcast"])
        for u, ref in zip(rank["updates"], expected):
            assert torch.equal(u, u.bfloat16().float())  # every update went through bf16
            torch.testing.assert_close(u.view(ref.shape), ref, atol=2e-2, rtol=0)
    assert sum(rank["orthogonalized"] for rank in ranks) == len(shapes)
    for rank in ranks[1:]:
        assert all(torch.equal(a, b) for a, b in zip(rank["updates"], ranks[0]["updates"]))


# ---------------------------------------------------------------------------- the benchmark


def _bench_case(cfg: dict, rank: int, world: int) -> dict:
    """ATen ops and median wall time of one call, with overlap off and on (rank 0 reports)."""
    shapes = [tuple(s) for s in cfg["shapes"]]
    fragments, size = zero3_split(shapes, world)
    layout = Layout(shapes=shapes, fragments=fragments, group=dist.group.WORLD, rank=rank)
    flat = local_buffer(layout.local(), size, truth(shapes))
    directions = FragmentViews(flat, layout.local())
    result: dict[str, Any] = {}
    for overlap in (False, True):
        def call() -> None:
            exchange.distributed_lmo(layout, Spectral(), directions, max_numel_per_rank=cfg["max_gather"],
                                     overlap=overlap)
        call()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            call()
        times = []
        for _ in range(cfg.get("reps", 7)):
            dist.barrier()
            start = time.perf_counter()
            call()
            dist.barrier()
            times.append(time.perf_counter() - start)
        result[f"overlap={overlap}"] = {"aten_ops": sum(e.name.startswith("aten::") for e in prof.events()),
                                        "median_s": sorted(times)[len(times) // 2]}
    result["rounds"] = len(exchange.matrix_plan(layout, Spectral(), cfg["max_gather"]).rounds)
    return result


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "bench":
        sys.exit(__doc__)
    config = json.loads(sys.argv[2])
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    print(json.dumps(spawn(partial(_bench_case, config), config.get("world", 2))[0], indent=1))
