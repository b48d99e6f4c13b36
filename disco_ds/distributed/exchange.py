"""The distributed LMO: who orthogonalises each matrix, and the collectives that move fragments
there and back.

No formula of Scion lives here: the mathematics is :mod:`disco_ds.optim.norms`. This module only needs
to know the three families of geometry:

* matrix norms: every fragment of a matrix goes to one *owner* rank (one ``all_to_all_single``
  per round), the owner runs the batched LMO once, and a reverse ``all_to_all_single`` returns
  each holder its slice of the update;
* separable norms: sums of squares per row / column / tensor are added up over fragments with one
  ``all_reduce``;
* elementwise norms: purely local.

Layouts (:mod:`disco_ds.distributed.layout`) say who holds what; the providers
(:mod:`disco_ds.distributed.providers`) build them from how DeepSpeed holds the parameters. A
replicated layout (ZeRO stage 0, DDP, one process) has every rank hold every member, and updates
travel from owners to everybody (an all-gather).

Two rules keep this correct on GPUs (NCCL), not only on CPUs (gloo):

* every tensor that enters a collective is built on the communication device, which callers pass
  down explicitly (a rank holding no fragment still enters the collective); never on the host by
  default (``tests/test_collective_device.py`` enforces it over the source);
* a check that can fail on one rank only is agreed over the group first
  (:func:`disco_ds.distributed.agreement.raise_if_any_failed`), so every rank raises the same error instead of the others waiting
  forever in the next collective.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from disco_ds.distributed.layout import Fragment, Layout, matrix_view_shape, row_pieces, shape_numel
from disco_ds.distributed.timing import ExchangeStats
from disco_ds.optim.newton_schulz import ns_flops
from disco_ds.optim.norms import ElementwiseNorm, MatrixNorm, Norm, SeparableNorm, lmo_many

__all__ = ["matrix_cost", "assign_owners", "plan_rounds", "MatrixPlan", "RoundPlan", "matrix_plan", "distributed_lmo",
           "matrix_products"]


def matrix_cost(norm: MatrixNorm, shape: tuple[int, ...]) -> int:
    """Newton–Schulz FLOPs of one matrix: the load-balancing weight of an owner."""
    rows, cols = norm.to_matrix(torch.empty(shape, device="meta")).shape[-2:]
    return ns_flops(rows, cols, norm.ns_steps)


def assign_owners(layout: Layout, members: list[int], costs: dict[int, int]) -> dict[int, int]:
    """One owner rank per matrix: locality first, then greedy longest-processing-time.

    A matrix held whole by exactly one rank (ZeRO-1/2: inside one partition) is owned there and
    moves nowhere. The others go, largest cost first, to the least-loaded rank (ties: lowest
    rank, then member index) among those holding it whole, if any, else among all ranks; every
    rank computes the same table without communication.
    """
    load = [0] * layout.world_size
    owners: dict[int, int] = {}
    routed = []
    for m in members:
        holders = layout.whole_holders(m)
        if len(holders) == 1:
            owners[m] = holders[0]
            load[holders[0]] += costs[m]
        else:
            routed.append(m)
    for m in sorted(routed, key=lambda m: (-costs[m], m)):
        owner = min(layout.whole_holders(m) or range(layout.world_size), key=lambda r: (load[r], r))
        owners[m] = owner
        load[owner] += costs[m]
    return owners


def plan_rounds(layout: Layout, owners: dict[int, int], max_numel_per_rank: int) -> list[list[int]]:
    """Split the matrices into rounds so no owner gathers more than ``max_numel_per_rank`` entries
    at once (every owner gets at least one matrix per round it appears in). Only routed matrices
    count: one its owner holds whole is used in place and costs no gather buffer."""
    rounds: list[list[int]] = []
    current: list[int] = []
    held = [0] * layout.world_size
    for m in sorted(owners, key=lambda m: (-layout.numel(m), m)):
        o = owners[m]
        n = 0 if o in layout.whole_holders(m) else layout.numel(m)
        if current and held[o] > 0 and held[o] + n > max_numel_per_rank:
            rounds.append(current)
            current, held = [], [0] * layout.world_size
        current.append(m)
        held[o] += n
    if current:
        rounds.append(current)
    return rounds


@dataclass(frozen=True)
class RoundPlan:
    """One round of the matrix exchange, as this rank sees it: which matrices it owns, and per peer
    the fragments it sends and receives each way (in the order they travel)."""

    members: list[int]
    """The round's matrices (the same on every rank)."""
    mine: list[int]
    """Those this rank owns."""
    to_owners: list[list[Fragment]]
    """Per destination rank, this rank's fragments of matrices that rank owns (forward)."""
    from_holders: list[list[Fragment]]
    """Per source rank, the fragments of this rank's matrices it receives (forward)."""
    to_holders: list[list[Fragment]]
    """Per destination rank, the fragments of this rank's updates that rank holds (reverse)."""
    from_owners: list[list[Fragment]]
    """Per source rank, this rank's fragments whose updates that owner sends (reverse)."""
    kept: list[Fragment]
    """This rank's fragments of matrices it owns: their updates stay here."""


@dataclass(frozen=True)
class MatrixPlan:
    """Owners and rounds of a layout's matrices for one geometry, computed once per layout,
    identically on every rank (no communication)."""

    owners: dict[int, int]
    rounds: list[RoundPlan]


def matrix_plan(layout: Layout, norm: MatrixNorm, max_numel_per_rank: int) -> MatrixPlan:
    """The (cached) exchange plan of ``layout``'s matrices: owners by locality then NS cost
    (:func:`assign_owners`), rounds bounded by ``max_numel_per_rank`` (:func:`plan_rounds`), and
    every round's routes. Planning is pure Python over all fragments of all ranks, so it is done
    once per layout and kept in ``layout.plans``."""
    key = (type(norm), norm.ns_steps, max_numel_per_rank)
    if key in layout.plans:
        return layout.plans[key]
    members = list(range(len(layout.shapes)))
    owners = assign_owners(layout, members, {m: matrix_cost(norm, layout.shapes[m]) for m in members})
    me, world = layout.rank, layout.world_size

    def to_owner(src: int, dst: int, in_round: set[int]) -> list[Fragment]:
        # Fragments of matrices owned elsewhere and not already held whole there.
        return [f for f in layout.contributes(src) if f.member in in_round and owners[f.member] == dst
                and dst not in layout.whole_holders(f.member)]

    def to_holder(owner: int, holder: int, in_round: set[int]) -> list[Fragment]:
        return [f for f in layout.fragments[holder] if f.member in in_round and owners[f.member] == owner]

    rounds = []
    for round_members in plan_rounds(layout, owners, max_numel_per_rank):
        in_round = set(round_members)
        peers = range(world)
        rounds.append(RoundPlan(
            members=round_members,
            mine=[m for m in round_members if owners[m] == me],
            to_owners=[to_owner(me, r, in_round) if r != me else [] for r in peers],
            from_holders=[to_owner(r, me, in_round) if r != me else [] for r in peers],
            to_holders=[to_holder(me, r, in_round) if r != me else [] for r in peers],
            from_owners=[to_holder(r, me, in_round) if r != me else [] for r in peers],
            kept=to_holder(me, me, in_round),
        ))
    plan = MatrixPlan(owners=owners, rounds=rounds)
    layout.plans[key] = plan
    return plan


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], layout: Layout, stats: ExchangeStats) -> None:
    # Called unconditionally on every rank of the group (empty splits allowed) so that no rank can
    # skip a collective the others wait in.
    if layout.world_size == 1:
        return
    stats.all_to_all_calls += 1
    stats.elements_sent += sum(in_splits) - in_splits[layout.rank]
    stats.bytes_sent += (sum(in_splits) - in_splits[layout.rank]) * inp.element_size()
    with stats.comm.region(out.device):
        dist.all_to_all_single(out, inp, out_splits, in_splits, group=layout.group)


def _exchange(
    layout: Layout,
    sends: list[list[Fragment]],
    receives: list[list[Fragment]],
    payload: Callable[[Fragment], torch.Tensor],
    comm_dtype: torch.dtype,
    device: torch.device,
    stats: ExchangeStats,
) -> list[tuple[Fragment, torch.Tensor]]:
    """One ``all_to_all_single``: this rank sends ``payload(f)`` for each fragment of ``sends[d]`` to
    rank d and receives ``receives[s]`` from rank s (both lists from a plan every rank computed
    alike, so no sizes travel). Returns the received ``(fragment, values)`` pairs (views of one
    buffer)."""
    in_splits = [sum(f.numel for f in frags) for frags in sends]
    out_splits = [sum(f.numel for f in frags) for frags in receives]
    parts = [payload(f).to(comm_dtype) for frags in sends for f in frags]
    send = torch.cat(parts) if parts else torch.empty(0, dtype=comm_dtype, device=device)
    recv = torch.empty(sum(out_splits), dtype=comm_dtype, device=device)
    _all_to_all(recv, send, out_splits, in_splits, layout, stats)
    received, pos = [], 0
    for frags in receives:
        for f in frags:
            received.append((f, recv[pos : pos + f.numel]))
            pos += f.numel
    return received


def _matrix_lmo(
    layout: Layout,
    norm: MatrixNorm,
    members: list[int],
    directions: dict[Fragment, torch.Tensor],
    comm_dtype: torch.dtype,
    max_numel_per_rank: int,
    stats: ExchangeStats,
    member_keys: list[Any],
    on_gathered: Callable[[Any, torch.Tensor], None] | None,
    device: torch.device,
) -> dict[Fragment, torch.Tensor]:
    """Route matrix fragments to owners, orthogonalise there once, route update fragments back."""
    plan = matrix_plan(layout, norm, max_numel_per_rank)
    updates: dict[Fragment, torch.Tensor] = {}
    # A rank holding no fragment may still own matrices (ZeRO-1/2 routing); it then gathers in
    # fp32, the dtype of every ZeRO master partition.
    work_dtype = next((d.dtype for d in directions.values()), torch.float32)
    whole_local = {f.member: f for f in layout.local() if f.start == 0 and f.numel == layout.numel(f.member)}

    for step in plan.rounds:
        stats.rounds += 1
        mine = step.mine
        # Full matrices this rank owns, in the working dtype: local fragments keep full precision,
        # only what crosses the network goes through comm_dtype. A matrix held whole in one local
        # fragment (one process, replicas, ZeRO-1/2 locality) is used in place, without a copy.
        full = {m: directions[whole_local[m]] if m in whole_local else torch.empty(layout.numel(m), dtype=work_dtype, device=device)
                for m in mine}

        # Forward: each rank sends its fragments of matrices owned elsewhere (and not held whole there).
        for f, values in _exchange(layout, step.to_owners, step.from_holders, directions.__getitem__, comm_dtype,
                                   device, stats):
            full[f.member][f.start : f.start + f.numel] = values.to(work_dtype)
        for f in layout.local():
            if f.member in full and f.member not in whole_local:
                full[f.member][f.start : f.start + f.numel] = directions[f]

        if on_gathered is not None:
            for m in mine:
                on_gathered(member_keys[m], layout.to_matrix(m, full[m]))
        # The LMO (Newton–Schulz), once per owned matrix, batched by shape.
        with stats.ns.region(device):
            owned = lmo_many(norm, [layout.to_matrix(m, full[m]) for m in mine])
        for m in mine:
            stats.per_member[member_keys[m]] = stats.per_member.get(member_keys[m], 0) + 1
        stats.matrices_orthogonalized += len(mine)
        result = {m: layout.from_matrix(m, u) for m, u in zip(mine, owned)}
        for m in mine:
            if layout.has_copies(m):
                # Replicas (DDP, stage 0) must stay bit-identical: the owner applies the same
                # comm_dtype-rounded update that every other replica receives.
                result[m] = result[m].to(comm_dtype).to(work_dtype)

        # Reverse: every holder of a fragment of a matrix gets its slice of the update.
        def update_slice(f: Fragment) -> torch.Tensor:
            return result[f.member][f.start : f.start + f.numel]

        for f, values in _exchange(layout, step.to_holders, step.from_owners, update_slice, comm_dtype, device, stats):
            updates[f] = values.to(work_dtype)
        for f in step.kept:
            updates[f] = update_slice(f)
    return updates


def _stat_shape(norm: SeparableNorm, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the completed sums of squares, as ``SeparableNorm.sum_squares`` returns them."""
    if norm.axis == "row":
        return (*shape[:-1], 1)
    if norm.axis == "col":
        return (1, shape[-1])
    return ()


def _separable_lmo(
    layout: Layout, norm: SeparableNorm, members: list[int], directions: dict[Fragment, torch.Tensor], stats: ExchangeStats,
    device: torch.device,
) -> dict[Fragment, torch.Tensor]:
    """Sum squares per slice over local fragments, complete them with one all_reduce, rescale.

    A fragment of a flattened ``[rows, cols]`` matrix is cut into rectangles (partial first row,
    whole rows, partial last row), so sums and rescaling are plain reductions over 2-D views."""
    sizes = {m: max(1, shape_numel(_stat_shape(norm, layout.shapes[m]))) for m in members}
    offsets, total = {}, 0
    for m in members:
        offsets[m] = total
        total += sizes[m]
    sums = torch.zeros(total, dtype=torch.float32, device=device)
    local = [f for f in layout.local() if f.member in offsets]
    contributing = set(layout.contributes(layout.rank))
    # Rectangles (offset, row, rows, col, cols); a whole-tensor norm sees one 1-row rectangle.
    rects = {f: [(0, 0, 1, 0, f.numel)] if norm.axis == "all"
             else layout.pieces(f) if f.member in layout.blocks else row_pieces(f, layout.shapes[f.member][-1])
             for f in local}

    def slot(f: Fragment, row: int, rows: int, col: int, cols: int) -> slice:
        """Where a rectangle's statistics live in the member's stretch of ``sums``."""
        base = offsets[f.member]
        if norm.axis == "row":
            return slice(base + row, base + row + rows)
        if norm.axis == "col":
            return slice(base + col, base + col + cols)
        return slice(base, base + 1)

    reduce_dim = {"row": 1, "col": 0, "all": None}[norm.axis]
    for f in local:
        if f not in contributing:
            continue  # a copy of entries another rank adds
        for o, row, rows, col, cols in rects[f]:
            sq = directions[f][o : o + rows * cols].view(rows, cols).float().square()
            sums[slot(f, row, rows, col, cols)] += sq.sum() if reduce_dim is None else sq.sum(dim=reduce_dim)
    _sum_over_ranks(sums, layout, stats)
    factors = torch.empty_like(sums)
    for m in {f.member for f in local}:
        stretch = slice(offsets[m], offsets[m] + sizes[m])
        completed = sums[stretch].view(_stat_shape(norm, layout.shapes[m]))
        factors[stretch] = norm.factor(completed, layout.shapes[m]).reshape(-1)
    updates = {}
    for f in local:
        d = directions[f]
        out = torch.empty_like(d)
        for o, row, rows, col, cols in rects[f]:
            scale = factors[slot(f, row, rows, col, cols)]
            scale = scale.unsqueeze(1) if norm.axis == "row" else scale
            out[o : o + rows * cols].view(rows, cols).copy_(d[o : o + rows * cols].view(rows, cols).float() * scale)
        updates[f] = out
    return updates


def _sum_over_ranks(buf: torch.Tensor, layout: Layout, stats: ExchangeStats) -> None:
    """Complete per-rank partial sums (skipped where every rank already holds every member whole)."""
    if layout.world_size > 1 and not layout.replicated:
        stats.all_reduce_calls += 1
        stats.bytes_sent += buf.numel() * buf.element_size()
        with stats.comm.region(buf.device):
            dist.all_reduce(buf, group=layout.group)


def matrix_products(
    layout: Layout,
    tensors: list[dict[Fragment, torch.Tensor]],
    vectors: list[dict[int, torch.Tensor]],
    *,
    transpose: bool,
    stats: ExchangeStats,
    device: torch.device | None = None,
) -> list[dict[int, torch.Tensor]]:
    """Products of whole sharded matrices with vectors, from fragments and one ``all_reduce``.

    Every member is seen as ``[rows, cols]`` (:func:`matrix_view_shape`). For each tensor set ``k``
    (fragments of e.g. the weights and of the update) and each member ``m`` with a vector in
    ``vectors[k]``: ``A @ v`` (``transpose=False``: ``v`` has ``cols`` entries; the row sums of
    squares of ``A`` come along as a second row of the result, shape ``[2, rows]``) or ``Aᵀ @ v``
    (``transpose=True``: ``v`` has ``rows`` entries, result ``[cols]``). Every rank of the group
    must call this with the same members in ``vectors``. ``device``: where the sums are completed
    (the communication device); required when this rank holds no vector.
    """
    slots: list[tuple[int, int, int]] = []  # (set, member, offset in the buffer)
    total = 0
    for k, per_member in enumerate(vectors):
        for m in sorted(per_member):
            rows, cols = matrix_view_shape(layout.shapes[m])
            slots.append((k, m, total))
            total += cols if transpose else 2 * rows
    device = _device_of([v for per_member in vectors for v in per_member.values()], device)
    buf = torch.zeros(total, dtype=torch.float32, device=device)
    offsets = {(k, m): o for k, m, o in slots}
    contributing = set(layout.contributes(layout.rank))
    for k, per_member in enumerate(tensors):
        for f, values in per_member.items():
            if (k, f.member) not in offsets or f not in contributing:
                continue
            base = offsets[(k, f.member)]
            rows, cols = matrix_view_shape(layout.shapes[f.member])
            v = vectors[k][f.member].float()
            for o, row, nrows, col, ncols in layout.pieces(f):
                piece = values[o : o + nrows * ncols].view(nrows, ncols).float()
                if transpose:
                    buf[base + col : base + col + ncols] += v[row : row + nrows] @ piece
                else:
                    buf[base + row : base + row + nrows] += piece @ v[col : col + ncols]
                    buf[base + rows + row : base + rows + row + nrows] += piece.square().sum(dim=1)
    _sum_over_ranks(buf, layout, stats)
    results: list[dict[int, torch.Tensor]] = [{} for _ in vectors]
    for k, m, o in slots:
        rows, cols = matrix_view_shape(layout.shapes[m])
        results[k][m] = buf[o : o + cols] if transpose else buf[o : o + 2 * rows].view(2, rows)
    return results


def _device_of(tensors: list[torch.Tensor], device: torch.device | None) -> torch.device:
    """The communication device: the one given, else that of the tensors this rank contributes.
    Never a guess: a rank with nothing to contribute still enters the collective, and under NCCL
    its buffer must be on the accelerator like everybody else's."""
    if device is not None:
        return torch.device(device)
    if not tensors:
        raise ValueError("Scion: this rank holds no fragment here, so the communication device is unknown: pass device=")
    return tensors[0].device


def distributed_lmo(
    layout: Layout,
    norm: Norm,
    directions: dict[Fragment, torch.Tensor],
    *,
    comm_dtype: torch.dtype = torch.bfloat16,
    max_numel_per_rank: int = 1 << 27,
    stats: ExchangeStats | None = None,
    member_keys: list[Any] | None = None,
    on_gathered: Callable[[Any, torch.Tensor], None] | None = None,
    device: torch.device | None = None,
) -> dict[Fragment, torch.Tensor]:
    """The group's LMO applied to whole parameters, returned as this rank's fragments.

    Args:
        layout: who holds what; ``directions`` has one entry per fragment of ``layout.local()``.
        norm: the group's geometry.
        directions: this rank's fragments of the LMO input (momentum), 1-D.
        comm_dtype: dtype of matrix fragments on the wire (bf16 halves traffic; Newton–Schulz runs
            its iterations in bf16 anyway).
        max_numel_per_rank: bound on the entries an owner gathers per round.
        stats: counters to update.
        member_keys: a stable key per member for the per-matrix orthogonalisation counter.
        on_gathered: called at the owner with ``(key, full matrix)`` before its LMO (self-tests).
        device: the communication device, where buffers are built, collectives run and owners
            orthogonalise (``directions`` must live there); required when this rank holds no
            fragment, otherwise that of ``directions``.

    Every rank of ``layout.group`` must call this with the same layout and norm.
    """
    stats = stats if stats is not None else ExchangeStats()
    members = list(range(len(layout.shapes)))
    if isinstance(norm, ElementwiseNorm):
        return {f: norm.lmo_elements(d, layout.shapes[f.member]) for f, d in directions.items()}
    device = _device_of(list(directions.values()), device)
    if isinstance(norm, MatrixNorm):
        keys = member_keys if member_keys is not None else members
        return _matrix_lmo(layout, norm, members, directions, comm_dtype, max_numel_per_rank, stats, keys, on_gathered, device)
    if isinstance(norm, SeparableNorm):
        return _separable_lmo(layout, norm, members, directions, stats, device)
    raise TypeError(f"Scion: norm {type(norm).__name__} is not a MatrixNorm, SeparableNorm or ElementwiseNorm; "
                    "the distributed optimizer cannot apply it to sharded parameters")
