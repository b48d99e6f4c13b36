"""Unit tests of the distributed plumbing that need no processes: fragment geometry, the
separable-norm completion from partial sums, owner assignment and exchange rounds."""

from __future__ import annotations

import pytest
import torch

import disco_ds.distributed as D
from disco_ds.distributed import ExchangeStats, Fragment, Layout, assign_owners, plan_rounds
from disco_ds.norms import ColNorm, RowNorm, TokenRMS, VectorRMS


@pytest.mark.parametrize("start,numel,cols", [(0, 35, 5), (3, 14, 5), (7, 3, 5), (5, 10, 5), (0, 4, 5), (12, 23, 5)])
def test_row_pieces_tile_the_fragment(start: int, numel: int, cols: int) -> None:
    covered = []
    for offset, row, rows, col, width in D._row_pieces(Fragment(0, start, numel, 0), cols):
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
        monkeypatch.setattr(D.dist, "all_reduce", fake_all_reduce)
        layout = Layout(shapes=[shape], fragments=fragments, group=None, rank=rank)
        directions = {f: flat[f.start : f.start + f.numel] for f in layout.local()}
        return D._separable_lmo(layout, norm, [0], directions, ExchangeStats())

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
