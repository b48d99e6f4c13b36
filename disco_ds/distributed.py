"""Distributed plumbing for Scion: who holds which slice of which parameter, who orthogonalises
each matrix, and the collectives that move fragments there and back.

No formula of Scion lives here: the mathematics is :mod:`disco_ds.norms`. This module only needs
to know the three families of geometry:

* matrix norms: every fragment of a matrix goes to one *owner* rank (one ``all_to_all_single``
  per round), the owner runs the batched LMO once, and a reverse ``all_to_all_single`` returns
  each holder its slice of the update;
* separable norms: sums of squares per row / column / tensor are added up over fragments with one
  ``all_reduce``;
* elementwise norms: purely local.

A :class:`Layout` describes one closed set of whole parameters ("members") spread over a process
group: DeepSpeed ZeRO-1/2 and the bf16 optimizer (``_hp_mapping``), ZeRO-3 (``ds_tensor``
partitions), and replicated data-parallel copies (ZeRO stage 0, DDP), where every rank holds every
member and updates travel from owners to everybody (an all-gather).

Two rules keep this correct on GPUs (NCCL), not only on CPUs (gloo):

* every tensor that enters a collective is built on the communication device, which callers pass
  down explicitly (a rank holding no fragment still enters the collective); never on the host by
  default (``tests/test_collective_device.py`` enforces it over the source);
* a check that can fail on one rank only is agreed over the group first
  (:func:`raise_if_any_failed`), so every rank raises the same error instead of the others waiting
  forever in the next collective.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from disco_ds.newton_schulz import ns_flops
from disco_ds.norms import ElementwiseNorm, MatrixNorm, Norm, SeparableNorm, lmo_many

__all__ = [
    "Fragment",
    "Layout",
    "zero12_layout",
    "zero3_layout",
    "replicated_layout",
    "assign_owners",
    "plan_rounds",
    "distributed_lmo",
    "ExchangeStats",
    "Stopwatch",
    "matrix_products",
    "RankCheckError",
    "raise_if_any_failed",
    "injected_fault",
    "FAULT_ENV",
    "zero3_sub_group",
    "shutdown_and_exit",
    "logical_shape",
    "accelerator_device",
]


@dataclass(frozen=True)
class Fragment:
    """``numel`` entries of member ``member`` (flattened) from ``start``, at ``offset`` in the holder's buffer."""

    member: int
    start: int
    numel: int
    offset: int


@dataclass
class Layout:
    """Which rank holds which fragments of which whole parameters, over one process group."""

    shapes: list[tuple[int, ...]]
    fragments: list[list[Fragment]]  # per rank of ``group``, sorted by (member, start)
    group: Any
    rank: int
    replicated: bool = False  # every rank holds every member whole (stage 0 / DDP)
    blocks: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Members stored column block by column block (a matrix split along dim 1 over tensor-parallel
    ranks): member -> block widths. Such a member's flat index space is the concatenation of its
    ``[rows, width]`` blocks, each row-major; every other member is plain row-major."""
    sources: list[list[Fragment]] | None = None
    """Per rank, the fragments it contributes to gathers and sums, when several ranks hold copies of
    the same entries (tensor-parallel replicas): each entry then counts once. None: all fragments."""
    _whole: dict[int, list[int]] = field(init=False, repr=False)
    _copied: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        held: dict[tuple[int, int], int] = {}
        for r, frags in enumerate(self.fragments):
            for f in frags:
                held[(f.member, r)] = held.get((f.member, r), 0) + f.numel
        self._whole = {m: [r for r in range(len(self.fragments)) if held.get((m, r), 0) == self.numel(m)]
                       for m in range(len(self.shapes))}
        copied: set[int] = set()
        if self.sources is not None:
            for frags, srcs in zip(self.fragments, self.sources):
                own = set(srcs)
                copied.update(f.member for f in frags if f not in own)
        self._copied = frozenset(copied)

    @property
    def world_size(self) -> int:
        return len(self.fragments)

    def numel(self, member: int) -> int:
        return _numel(self.shapes[member])

    def local(self) -> list[Fragment]:
        return self.fragments[self.rank]

    def whole_holders(self, member: int) -> list[int]:
        """Ranks that hold all of ``member`` locally."""
        return self._whole[member]

    def contributes(self, rank: int) -> list[Fragment]:
        """The fragments ``rank`` sends to owners and adds to sums (each entry once in the group)."""
        return self.fragments[rank] if self.sources is None else self.sources[rank]

    def has_copies(self, member: int) -> bool:
        """Whether several ranks hold copies of some entries of ``member`` (replicas must then
        receive bit-identical updates)."""
        return len(self._whole[member]) > 1 or member in self._copied

    def pieces(self, frag: Fragment) -> list[tuple[int, int, int, int, int]]:
        """Rectangles ``(offset in fragment, first row, rows, first column, columns)`` of the member's
        ``[rows, cols]`` view (:func:`matrix_view_shape`) that ``frag`` covers."""
        cols = matrix_view_shape(self.shapes[frag.member])[1]
        widths = self.blocks.get(frag.member)
        if widths is None:
            return _row_pieces(frag, cols)
        rows = matrix_view_shape(self.shapes[frag.member])[0]
        base = col0 = 0
        for width in widths:
            size = rows * width
            if frag.start < base + size:
                if frag.start + frag.numel > base + size:
                    raise ValueError(f"fragment {frag} crosses a column block of member {frag.member}")
                inner = Fragment(frag.member, frag.start - base, frag.numel, frag.offset)
                return [(o, r, n, c + col0, w) for o, r, n, c, w in _row_pieces(inner, width)]
            base += size
            col0 += width
        raise ValueError(f"fragment {frag} lies outside member {frag.member}")

    def to_matrix(self, member: int, flat: torch.Tensor) -> torch.Tensor:
        """The whole member in its logical shape from its flat index space (a view when row-major)."""
        widths = self.blocks.get(member)
        if widths is None:
            return flat.view(self.shapes[member])
        rows = matrix_view_shape(self.shapes[member])[0]
        parts = flat.split([rows * w for w in widths])
        return torch.cat([part.view(rows, w) for part, w in zip(parts, widths)], dim=1).view(self.shapes[member])

    def from_matrix(self, member: int, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`: the member's flat index space."""
        widths = self.blocks.get(member)
        if widths is None:
            return matrix.reshape(-1)
        rows = matrix_view_shape(self.shapes[member])[0]
        return torch.cat([b.reshape(-1) for b in matrix.reshape(rows, -1).split(list(widths), dim=1)])


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape: under ZeRO-3 (``zero.Init``) ``p.shape`` is a flat placeholder and
    DeepSpeed keeps the real one in ``ds_shape``."""
    return tuple(int(s) for s in getattr(p, "ds_shape", p.shape))


def _group_rank_and_size(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def accelerator_device() -> torch.device:
    """DeepSpeed's accelerator device of this rank, where its collectives expect tensors (the
    CPU under DeepSpeed's CPU accelerator)."""
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def zero12_layout(members: list[torch.Tensor]) -> Layout:
    """Layout of a ZeRO-1/2 (or bf16 optimizer) flat partition from DeepSpeed's ``_hp_mapping``.

    ``members`` are the original parameters of one param group, in group order (the same on every
    rank). Each rank knows only its own fragment addresses; one ``all_gather_object`` shares them.
    """
    group = next((p._dp_group for p in members if getattr(p, "_dp_group", None) is not None), None)
    rank, world = _group_rank_and_size(group)
    local = []
    for i, p in enumerate(members):
        hp = getattr(p, "_hp_mapping", None)
        if hp is not None and hp.lp_fragment_address.numel > 0:
            local.append((i, int(hp.lp_fragment_address.start), int(hp.lp_fragment_address.numel), int(hp.hp_fragment_address.start)))
    tables: list[Any] = [None] * world
    if world > 1:
        dist.all_gather_object(tables, local, group=group)
    else:
        tables = [local]
    shapes = [logical_shape(p) for p in members]
    fragments = [sorted((Fragment(*t) for t in table), key=lambda f: (f.member, f.start)) for table in tables]
    return Layout(shapes=shapes, fragments=fragments, group=group, rank=rank)


def zero3_sub_group(flat: torch.Tensor, members: list[torch.Tensor]) -> int:
    """Index of the ZeRO-3 sub-group whose flat fp32 partition is ``flat`` (the same on every rank:
    sub-group membership depends only on partition sizes)."""
    z3 = members[0]._z3_optimizer
    sub_group = next((i for i, t in enumerate(z3.fp32_partitioned_groups_flat) if t is flat), None)
    if sub_group is None:
        raise RuntimeError("Scion: the ZeRO-3 flat partition passed to step() is not one of the optimizer's sub-groups")
    return sub_group


def zero3_layout(flat: torch.Tensor, members: list[torch.Tensor]) -> tuple[Layout, list[torch.Tensor]]:
    """Layout of a ZeRO-3 sub-group's flat fp32 partition, derived without communication.

    ZeRO-3 splits every parameter evenly: rank r holds entries ``[r·pn, min((r+1)·pn, numel))``
    with ``pn = partition_numel()``, and a sub-group's flat buffer concatenates its members'
    partitions. Returns the layout and the sub-group's members (in flat order).
    """
    sg_members = list(members[0]._z3_optimizer.fp16_groups[zero3_sub_group(flat, members)])
    group = sg_members[0].ds_process_group
    rank, world = _group_rank_and_size(group)
    fragments: list[list[Fragment]] = [[] for _ in range(world)]
    offset = 0
    for i, p in enumerate(sg_members):
        pn, numel = int(p.partition_numel()), int(p.ds_numel)
        for r in range(world):
            n = max(0, min(pn, numel - r * pn))
            if n > 0:
                fragments[r].append(Fragment(i, r * pn, n, offset))
        offset += pn
    shapes = [logical_shape(p) for p in sg_members]
    return Layout(shapes=shapes, fragments=fragments, group=group, rank=rank), sg_members


def replicated_layout(members: list[torch.Tensor], group: Any = None) -> Layout:
    """Every rank holds every member whole (data-parallel replicas: ZeRO stage 0, DDP, one process)."""
    rank, world = _group_rank_and_size(group)
    shapes = [tuple(p.shape) for p in members]
    local = [Fragment(i, 0, p.numel(), 0) for i, p in enumerate(members)]
    return Layout(shapes=shapes, fragments=[list(local) for _ in range(world)], group=group, rank=rank, replicated=True)


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
    """Split the matrices into rounds so no owner holds more than ``max_numel_per_rank`` gathered
    entries at once (every owner gets at least one matrix per round it appears in)."""
    rounds: list[list[int]] = []
    current: list[int] = []
    held = [0] * layout.world_size
    for m in sorted(owners, key=lambda m: (-layout.numel(m), m)):
        o, n = owners[m], layout.numel(m)
        if current and held[o] > 0 and held[o] + n > max_numel_per_rank:
            rounds.append(current)
            current, held = [], [0] * layout.world_size
        current.append(m)
        held[o] += n
    if current:
        rounds.append(current)
    return rounds


class Stopwatch:
    """Accumulated duration of timed regions, read at logging time.

    On a CUDA device a region is bracketed by two CUDA events on the device's current stream: the
    host only enqueues work there, so its own clock would measure the launch, not the work, and
    waiting for the work would stall the step. The events are read by :meth:`seconds` (the logging
    step calls it), which waits for them. Elsewhere (the CPU, where work runs synchronously) the
    host clock measures the region.
    """

    _MAX_PENDING = 256
    """Unread event pairs kept before the completed ones are folded in without waiting (bounds
    memory when nobody reads the timer)."""

    def __init__(self) -> None:
        self._seconds = 0.0
        self._pending: list[tuple[Any, Any]] = []

    @contextmanager
    def region(self, device: torch.device) -> Iterator[None]:
        """Time the enclosed code's work on ``device``."""
        if device.type != "cuda":
            start = time.perf_counter()
            try:
                yield
            finally:
                self._seconds += time.perf_counter() - start
            return
        stream = torch.cuda.current_stream(device)
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record(stream)
        try:
            yield
        finally:
            end.record(stream)
            self._pending.append((begin, end))
            if len(self._pending) > self._MAX_PENDING:
                self._collect(wait=False)

    def _collect(self, wait: bool) -> None:
        unread = []
        for begin, end in self._pending:
            if wait:
                end.synchronize()
            elif not end.query():
                unread.append((begin, end))
                continue
            self._seconds += begin.elapsed_time(end) / 1000.0  # milliseconds
        self._pending = unread

    def seconds(self) -> float:
        """Total seconds so far (waits for the device work of pending regions)."""
        self._collect(wait=True)
        return self._seconds


@dataclass
class ExchangeStats:
    """Counters of one rank, cumulative over steps (read by tests and the instrumentation)."""

    matrices_orthogonalized: int = 0
    rounds: int = 0
    elements_sent: int = 0
    bytes_sent: int = 0
    all_to_all_calls: int = 0
    all_reduce_calls: int = 0
    comm: Stopwatch = field(default_factory=Stopwatch)
    """Time inside the optimizer's collectives (includes waiting for the slowest rank)."""
    ns: Stopwatch = field(default_factory=Stopwatch)
    """Time of the matrix LMOs (Newton–Schulz) this rank ran."""
    step: Stopwatch = field(default_factory=Stopwatch)
    """Time of the optimizer's ``step()`` calls (communication and Newton–Schulz included)."""
    per_member: dict[Any, int] = field(default_factory=dict)

    @property
    def comm_seconds(self) -> float:
        return self.comm.seconds()

    @property
    def ns_seconds(self) -> float:
        return self.ns.seconds()

    @property
    def step_seconds(self) -> float:
        return self.step.seconds()


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
    route: Callable[[int, int], list[Fragment]],
    payload: Callable[[Fragment], torch.Tensor],
    comm_dtype: torch.dtype,
    device: torch.device,
    stats: ExchangeStats,
) -> list[tuple[Fragment, torch.Tensor]]:
    """One ``all_to_all_single``: rank s sends ``payload(f)`` for each ``f in route(s, d)`` to rank
    d ≠ s. Every rank derives both its send and receive lists from ``route``, so no sizes travel.
    Returns the received ``(fragment, values)`` pairs."""
    me, world = layout.rank, layout.world_size
    sends = [route(me, r) if r != me else [] for r in range(world)]
    receives = [route(r, me) if r != me else [] for r in range(world)]
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
    costs = {m: matrix_cost(norm, layout.shapes[m]) for m in members}
    owners = assign_owners(layout, members, costs)
    me = layout.rank
    updates: dict[Fragment, torch.Tensor] = {}
    # A rank holding no fragment may still own matrices (ZeRO-1/2 routing); it then gathers in
    # fp32, the dtype of every ZeRO master partition.
    work_dtype = next((d.dtype for d in directions.values()), torch.float32)
    whole_local = {f.member: f for f in layout.local() if f.start == 0 and f.numel == layout.numel(f.member)}

    for round_members in plan_rounds(layout, owners, max_numel_per_rank):
        stats.rounds += 1
        in_round = set(round_members)
        mine = [m for m in round_members if owners[m] == me]
        # Full matrices this rank owns, in the working dtype: local fragments keep full precision,
        # only what crosses the network goes through comm_dtype. A matrix held whole in one local
        # fragment (one process, replicas, ZeRO-1/2 locality) is used in place, without a copy.
        full = {m: directions[whole_local[m]] if m in whole_local else torch.empty(layout.numel(m), dtype=work_dtype, device=device)
                for m in mine}

        # Forward: each rank sends its fragments of matrices owned elsewhere (and not held whole there).
        def to_owner(src: int, dst: int) -> list[Fragment]:
            return [f for f in layout.contributes(src) if f.member in in_round and owners[f.member] == dst
                    and dst not in layout.whole_holders(f.member)]

        for f, values in _exchange(layout, to_owner, directions.__getitem__, comm_dtype, device, stats):
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
        def to_holder(owner: int, holder: int) -> list[Fragment]:
            return [f for f in layout.fragments[holder] if f.member in in_round and owners[f.member] == owner]

        def update_slice(f: Fragment) -> torch.Tensor:
            return result[f.member][f.start : f.start + f.numel]

        for f, values in _exchange(layout, to_holder, update_slice, comm_dtype, device, stats):
            updates[f] = values.to(work_dtype)
        for f in to_holder(me, me):
            updates[f] = update_slice(f)
    return updates


def _row_pieces(frag: Fragment, cols: int) -> list[tuple[int, int, int, int]]:
    """Split a fragment of a row-major ``[rows, cols]`` matrix into rectangular pieces
    ``(offset in fragment, first row, number of rows, first column, number of columns)``: a partial
    first row, the whole rows in the middle, a partial last row."""
    pieces, pos, end = [], frag.start, frag.start + frag.numel
    while pos < end:
        row, col = divmod(pos, cols)
        if col == 0 and end - pos >= cols:
            nrows = (end - pos) // cols
            pieces.append((pos - frag.start, row, nrows, 0, cols))
            pos += nrows * cols
        else:
            width = min(cols - col, end - pos)
            pieces.append((pos - frag.start, row, 1, col, width))
            pos += width
    return pieces


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
    sizes = {m: max(1, _numel(_stat_shape(norm, layout.shapes[m]))) for m in members}
    offsets, total = {}, 0
    for m in members:
        offsets[m] = total
        total += sizes[m]
    sums = torch.zeros(total, dtype=torch.float32, device=device)
    local = [f for f in layout.local() if f.member in offsets]
    contributing = set(layout.contributes(layout.rank))
    # Rectangles (offset, row, rows, col, cols); a whole-tensor norm sees one 1-row rectangle.
    rects = {f: [(0, 0, 1, 0, f.numel)] if norm.axis == "all"
             else layout.pieces(f) if f.member in layout.blocks else _row_pieces(f, layout.shapes[f.member][-1])
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


def matrix_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[rows, cols]`` of a member seen as a matrix: first dimension by the rest; a vector is one row."""
    rows = int(shape[0]) if len(shape) >= 2 else 1
    return rows, max(1, _numel(shape)) // rows


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


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


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


def shutdown_and_exit(code: int = 0) -> NoReturn:
    """End a launched rank cleanly: barrier, destroy the process group, exit with ``code``.

    gloo on CPU sometimes aborts in its destructors after all work is done, which would turn a
    finished run into a failed one; the process therefore leaves without running them, after
    flushing its output. Call it last, once results are written.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ---------------------------------------------------------------------------- failing together

FAULT_ENV = "DISCO_DS_FAULT"
"""Test hook shared with :mod:`disco_ds.checkpoint`: ``<check>@<rank>`` makes the named check of
:func:`injected_fault` fail on that global rank only (tests/test_fault_agreement.py)."""


def injected_fault(check: str) -> bool:
    """Whether the test hook :data:`FAULT_ENV` asks ``check`` to fail on this rank."""
    name, _, rank = os.environ.get(FAULT_ENV, "").partition("@")
    if name != check or not rank.isdigit():
        return False
    return int(rank) == (dist.get_rank() if dist.is_available() and dist.is_initialized() else 0)


class RankCheckError(RuntimeError):
    """A check failed on some ranks of a process group; every rank of the group raises this, with
    the same message."""


def raise_if_any_failed(error: str | None, group: Any, device: torch.device, what: str) -> None:
    """Turn a check that can fail on some ranks only into the same error on every rank.

    A rank that raised alone would leave the others waiting in the step's next collective until
    the process group's timeout (30 minutes by default). Instead every rank reports its verdict
    (``error``: None when its check passed) in one all-reduce of one flag per rank, on ``device``
    (the communication device). If any rank failed, the failing ranks' messages are shared (one
    ``all_gather_object``) and every rank raises :class:`RankCheckError` naming them.

    Reading the verdict waits for the device: call it for first-step and new-layout checks, not
    on every step.
    """
    rank, world = _group_rank_and_size(group)
    if world == 1:
        if error is not None:
            raise RankCheckError(f"{what} failed: {error}")
        return
    flags = torch.zeros(world, dtype=torch.int32, device=device)
    if error is not None:
        flags[rank] = 1
    dist.all_reduce(flags, group=group)
    failed = [r for r, flag in enumerate(flags.tolist()) if flag]
    if not failed:
        return
    messages: list[Any] = [None] * world
    dist.all_gather_object(messages, error, group=group)
    details = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
    raise RankCheckError(f"{what} failed on {len(failed)} of {world} ranks ({details})")
