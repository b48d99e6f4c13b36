"""Unit tests of the distributed plumbing that need no processes: fragment geometry, the
separable-norm completion from partial sums, owner assignment and exchange rounds, buffers on the
communication device, the agreement of failures over ranks, and the timers."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

import disco_ds.distributed as D
import disco_ds.distributed.exchange as exchange
from disco_ds.distributed import ExchangeStats, Fragment, Layout, assign_owners, plan_rounds
from disco_ds.optim.norms import ColNorm, RowNorm, TokenRMS, VectorRMS


@pytest.mark.parametrize("start,numel,cols", [(0, 35, 5), (3, 14, 5), (7, 3, 5), (5, 10, 5), (0, 4, 5), (12, 23, 5)])
def test_row_pieces_tile_the_fragment(start: int, numel: int, cols: int) -> None:
    covered = []
    for offset, row, rows, col, width in D.layout.row_pieces(Fragment(0, start, numel, 0), cols):
        assert 0 <= col and col + width <= cols and (rows == 1 or (col == 0 and width == cols))
        covered += [start + offset + r * width + c for r in range(rows) for c in range(width)]
        assert [row * cols + col + r * cols + c for r in range(rows) for c in range(width)] == covered[-rows * width:]
    assert covered == list(range(start, start + numel))


@pytest.mark.parametrize("norm,shape", [(TokenRMS(), (7, 5)), (RowNorm(), (7, 5)), (ColNorm(), (7, 5)), (VectorRMS(), (11,))])
def test_separable_lmo_from_three_ranks_equals_whole_lmo(monkeypatch, norm, shape) -> None:
    """Three ranks hold cuts of one matrix that split rows; the all_reduce is emulated by adding
    the ranks' partial sums. Every rank's fragment of the LMO equals the whole-matrix LMO."""
    t = torch.randn(shape)
    flat = t.reshape(-1)
    cuts = [0, 3, 8, flat.numel()]
    fragments = [[Fragment(0, a, b - a, 0)] for a, b in zip(cuts, cuts[1:])]

    def run(rank: int, fake_all_reduce) -> dict:
        monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
        layout = Layout(shapes=[shape], fragments=fragments, group=None, rank=rank)
        directions = {f: flat[f.start : f.start + f.numel] for f in layout.local()}
        return exchange._separable_lmo(layout, norm, [0], directions, ExchangeStats(), flat.device)

    partials = []
    for r in range(3):
        run(r, lambda s, group=None: partials.append(s.clone()))
    total = sum(partials)
    got = torch.empty_like(flat)
    for r in range(3):
        for f, u in run(r, lambda s, group=None: s.copy_(total)).items():
            got[f.start : f.start + f.numel] = u
    torch.testing.assert_close(got.view(shape), norm.lmo(t), atol=1e-6, rtol=1e-6)


def _layout(fragments: list[list[Fragment]], shapes: list[tuple[int, ...]], replicated: bool = False) -> Layout:
    return Layout(shapes=shapes, fragments=fragments, group=None, rank=0, replicated=replicated)


def test_owners_locality_first_then_lpt_deterministic() -> None:
    shapes = [(4, 4), (8, 8), (6, 6), (2, 2)]
    # member 0 wholly on rank 1; members 1-3 split between ranks 0 and 1.
    fragments = [
        [Fragment(1, 0, 30, 0), Fragment(2, 0, 10, 30), Fragment(3, 0, 2, 40)],
        [Fragment(0, 0, 16, 0), Fragment(1, 30, 34, 16), Fragment(2, 10, 26, 50), Fragment(3, 2, 2, 76)],
    ]
    layout = _layout(fragments, shapes)
    costs = {0: 100, 1: 1000, 2: 500, 3: 1}
    owners = assign_owners(layout, [0, 1, 2, 3], costs)
    assert owners[0] == 1  # locality: held whole by rank 1
    assert owners[1] == 0  # largest routed matrix to the least-loaded rank (rank 1 carries 100)
    assert owners[2] == 1 and owners[3] == 1  # LPT: rank 1 (600) < rank 0 (1000), then 601 < 1000
    assert assign_owners(layout, [3, 2, 1, 0], costs) == owners  # order of the input is irrelevant


def test_replicated_members_spread_by_cost() -> None:
    shapes = [(8, 8)] * 4
    local = [Fragment(i, 0, 64, 0) for i in range(4)]
    layout = _layout([list(local), list(local)], shapes, replicated=True)
    owners = assign_owners(layout, [0, 1, 2, 3], {i: 10 for i in range(4)})
    assert sorted(owners.values()) == [0, 0, 1, 1]


def test_rounds_bound_gathered_entries_per_owner() -> None:
    shapes = [(10, 10), (10, 10), (5, 5), (20, 20)]
    layout = _layout([[Fragment(i, 0, 1, 0) for i in range(4)]], shapes)
    owners = {0: 0, 1: 0, 2: 0, 3: 0}
    rounds = plan_rounds(layout, owners, max_numel_per_rank=150)
    assert sorted(m for r in rounds for m in r) == [0, 1, 2, 3]
    for r in rounds:
        assert len(r) == 1 or sum(layout.numel(m) for m in r) <= 150
    assert len(plan_rounds(layout, owners, max_numel_per_rank=10**6)) == 1


def test_a_rank_without_fragments_builds_its_buffers_on_the_given_device(monkeypatch) -> None:
    """Rank 1 holds nothing of the matrix, yet enters the all_reduce: its buffer must be on the
    communication device passed down (``meta`` here, to tell it from a host fallback)."""
    reduced: list[torch.Tensor] = []
    monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: reduced.append(t))
    layout = Layout(shapes=[(4, 3)], fragments=[[Fragment(0, 0, 12, 0)], []], group=None, rank=1)
    assert exchange._separable_lmo(layout, RowNorm(), [0], {}, ExchangeStats(), torch.device("meta")) == {}
    D.matrix_products(layout, [{}], [{}], transpose=False, stats=ExchangeStats(), device=torch.device("meta"))
    assert [t.device.type for t in reduced] == ["meta", "meta"]
    with pytest.raises(ValueError, match="pass device="):
        D.distributed_lmo(layout, RowNorm(), {})


@pytest.mark.parametrize("failing", [[], [1], [0, 2]])
def test_a_failure_on_some_ranks_is_raised_on_every_rank(monkeypatch, failing: list[int]) -> None:
    """Three ranks, emulated: the flags all-reduce adds every rank's flag, the object gather returns
    every rank's message. Every rank, failing or not, raises the same error, or none does."""
    world = 3
    errors = {r: (f"bad fragment on {r}" if r in failing else None) for r in range(world)}
    outcomes = []
    for rank in range(world):
        monkeypatch.setattr(D.agreement, "group_rank_and_size", lambda group, rank=rank: (rank, world))
        monkeypatch.setattr(dist, "all_reduce", lambda t, group=None: t.copy_(torch.tensor([int(errors[r] is not None)
                                                                                              for r in range(world)])))
        monkeypatch.setattr(dist, "all_gather_object", lambda out, obj, group=None: out.__setitem__(
            slice(None), [errors[r] for r in range(world)]))
        try:
            D.raise_if_any_failed(errors[rank], None, torch.device("cpu"), "the check")
            outcomes.append(None)
        except D.RankCheckError as e:
            outcomes.append(str(e))
    if not failing:
        assert outcomes == [None] * world
    else:
        assert len(set(outcomes)) == 1 and outcomes[0] is not None
        for r in failing:
            assert f"rank {r}: bad fragment on {r}" in outcomes[0]


def test_injected_fault_names_a_check_and_a_rank(monkeypatch) -> None:
    monkeypatch.setenv(D.FAULT_ENV, "layout-self-test@0")
    assert D.injected_fault("layout-self-test")  # one process is rank 0
    assert not D.injected_fault("missing-gradient")
    monkeypatch.setenv(D.FAULT_ENV, "layout-self-test@1")
    assert not D.injected_fault("layout-self-test")
    monkeypatch.setenv(D.FAULT_ENV, "kill-during-save@20")  # the checkpoint hook's, not a check
    assert not D.injected_fault("kill-during-save")


def test_stopwatch_on_the_host_adds_wall_time() -> None:
    watch = D.Stopwatch()
    with watch.region(torch.device("cpu")):
        time.sleep(0.02)
    with watch.region(torch.device("cpu")):
        pass
    assert 0.02 <= watch.seconds() < 1.0
    stats = ExchangeStats()
    with stats.ns.region(torch.device("cpu")):
        time.sleep(0.01)
    assert stats.ns_seconds >= 0.01 and stats.comm_seconds == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_stopwatch_on_cuda_times_the_device_work_without_waiting() -> None:
    """The region ends as soon as the work is enqueued; the events give its duration when read."""
    device = torch.device("cuda")
    a = torch.randn(4096, 4096, device=device)
    a = a @ a  # warm up the matmul library outside the timed region
    watch = D.Stopwatch()
    torch.cuda.synchronize()
    host = time.perf_counter()
    with watch.region(device):
        for _ in range(20):
            a = a @ a
            a = a / a.norm()
    host = time.perf_counter() - host
    assert len(watch._pending) == 1
    device_s = watch.seconds()
    assert not watch._pending and device_s > host
