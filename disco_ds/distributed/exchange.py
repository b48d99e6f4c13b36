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

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.distributed as dist

from disco_ds.distributed.layout import Fragment, FragmentViews, Layout, matrix_view_shape, row_pieces, shape_numel
from disco_ds.distributed.timing import ExchangeStats
from disco_ds.optim.newton_schulz import ns_flops, ns_transient_bytes
from disco_ds.optim.norms import ElementwiseNorm, MatrixNorm, Norm, SeparableNorm, lmo_many, sum_of_squares

__all__ = ["matrix_cost", "assign_owners", "plan_rounds", "MatrixPlan", "RoundPlan", "RoundIndex", "matrix_plan",
           "distributed_lmo", "matrix_products", "separable_sums_span_ranks"]


def matrix_cost(norm: MatrixNorm, shape: tuple[int, ...]) -> int:
    """Newton–Schulz FLOPs of one matrix: the load-balancing weight of an owner."""
    rows, cols = norm.to_matrix(torch.empty(shape, device="meta")).shape[-2:]
    return ns_flops(rows, cols, norm.ns_steps, norm.ns_gram)


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
    the fragments it sends and receives each way (in the order they travel).

    The per-peer lists never name this rank itself; what travels through the collectives' own
    chunk (an owner's fragments of matrices it gathers, and of updates other ranks also hold) is in
    :attr:`gathered_here` and :attr:`returned_here`, so that every entry of a gathered matrix, and
    every copy of an update, is rounded to the wire dtype alike, whoever owns it.
    """

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
    """This rank's fragments of owned matrices nobody else holds: their updates are views of the
    owner's result (no copy, no rounding)."""
    inplace: dict[int, Fragment]
    """Owned matrices this rank holds whole in one fragment: Newton–Schulz reads that fragment."""
    gathered: list[tuple[int, int]]
    """Owned matrices rebuilt in the gather buffer (comm dtype): ``(member, position)``."""
    gather_numel: int
    """Entries of the gather buffer."""
    shared: list[tuple[int, int]]
    """Owned matrices other ranks hold entries of: ``(member, position)`` in the buffer of
    updates that leaves this rank (comm dtype)."""
    shared_numel: int
    """Entries of that buffer."""
    gathered_here: list[Fragment]
    """This rank's fragments of matrices it gathers (forward, through its own chunk)."""
    returned_here: list[Fragment]
    """This rank's fragments of its shared matrices (reverse, through its own chunk)."""
    received_at: list[tuple[Fragment, int]]
    """Where each of this rank's fragments of the round's matrices that another rank also holds
    finds its update in the round's received buffer (reverse; replicated layouts: in the
    gathered buffer)."""
    forward: bool
    """Whether any rank sends anything to an owner (the same on every rank: no collective otherwise)."""
    reverse: str
    """How updates travel back, the same on every rank: ``"none"`` (no shared matrix),
    ``"all_to_all"``, or for replicated layouts ``"all_gather"`` / ``"broadcast"``."""
    owner_numel: list[int]
    """Replicated layouts: per owner rank, the entries of its matrices in this round (their order is
    the round's); the reverse buffer holds them owner after owner."""
    owner_peak_bytes: int
    """Peak bytes this rank's exchange and owner work allocate during this round: its transient
    buffers plus the updates earlier rounds returned (formula in :func:`matrix_plan`)."""


@dataclass(frozen=True)
class RoundIndex:
    """Index tensors of one round on one device (:meth:`MatrixPlan.indices`): every pack and unpack
    of the round is one ``index_select``. int32 where the buffers allow it (half the memory)."""

    send: torch.Tensor
    """Forward pack: for each entry sent, its position in this rank's source buffer."""
    gather: torch.Tensor
    """Forward unpack: for each entry of the gather buffer, its position in the received buffer."""
    back: torch.Tensor
    """Reverse pack: for each entry sent back, its position in the buffer of updates."""


@dataclass(frozen=True)
class MatrixPlan:
    """Owners and rounds of a layout's matrices for one geometry, computed once per layout,
    identically on every rank (no communication). Index tensors are built on first use per device
    (:meth:`indices`) and kept here."""

    owners: dict[int, int]
    rounds: list[RoundPlan]
    rank: int
    """The rank this plan is for (the layout's)."""
    _indices: dict[Any, list[RoundIndex]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def owner_peak_bytes(self) -> int:
        """The largest :attr:`RoundPlan.owner_peak_bytes` of any round."""
        return max((r.owner_peak_bytes for r in self.rounds), default=0)

    @property
    def index_bytes(self) -> int:
        """Bytes of the index tensors :meth:`indices` keeps per device: one int32 per entry packed or
        unpacked (int64 past 2³¹ entries, not counted here), persistent: the price of packing each
        round with one op."""
        return sum(4 * (sum(f.numel for f in _sends(r, self.rank)) + r.gather_numel
                        + sum(f.numel for f in _returns(r, self.rank)))
                   for r in self.rounds)

    def indices(self, layout: Layout, device: torch.device, packed: bool) -> list[RoundIndex]:
        """Per round, the index tensors on ``device`` (built once, on the host, then copied).

        ``packed``: positions in the source buffer are those of ``layout.local()`` concatenated
        (a caller without one flat buffer); otherwise each fragment's ``offset``."""
        key = (str(device), packed)
        if key not in self._indices:
            self._indices[key] = [_round_index(layout, r, self.rank, packed, device) for r in self.rounds]
        return self._indices[key]


def _sends(step: RoundPlan, me: int) -> list[Fragment]:
    """The forward send order: per destination rank, what it receives (this rank's own chunk included)."""
    return [f for r, frags in enumerate(step.to_owners) for f in (step.gathered_here if r == me else frags)]


def _returns(step: RoundPlan, me: int) -> list[Fragment]:
    """The reverse send order: per destination rank, the fragments it holds of this rank's updates."""
    return [f for r, frags in enumerate(step.to_holders) for f in (step.returned_here if r == me else frags)]


def _receives(step: RoundPlan, me: int) -> list[list[Fragment]]:
    """Per source rank, the fragments of this rank's gathered matrices it sends (forward)."""
    return [step.gathered_here if r == me else frags for r, frags in enumerate(step.from_holders)]


def _runs(starts: list[int], lengths: list[int]) -> torch.Tensor:
    """``cat(arange(s, s + n) for s, n in zip(starts, lengths))`` on the host, without a Python loop
    over entries."""
    if not starts:
        return torch.zeros(0, dtype=torch.int64)
    first = torch.tensor(starts, dtype=torch.int64)
    n = torch.tensor(lengths, dtype=torch.int64)
    begins = n.cumsum(0) - n
    return torch.repeat_interleave(first - begins, n) + torch.arange(int(n.sum()))


def _round_index(layout: Layout, step: RoundPlan, me: int, packed: bool, device: torch.device) -> RoundIndex:
    """The index tensors of one round, built on the host from the plan's fragment lists (planning
    itself needs no tensors), then moved to ``device`` once."""
    if packed:
        where, pos = {}, 0
        for f in layout.local():
            where[f] = pos
            pos += f.numel
    else:
        where = {f: f.offset for f in layout.local()}
    sends = _sends(step, me)
    send = _runs([where[f] for f in sends], [f.numel for f in sends])
    gpos = dict(step.gathered)
    gather = torch.zeros(step.gather_numel, dtype=torch.int64)
    # Copies of the same entries (tensor-parallel replicas) may arrive twice: this rank's own
    # fragments are written last and win (the plan checked that every entry arrives at least once).
    writes, cursor = [], 0
    for r, frags in enumerate(_receives(step, me)):
        for f in frags:
            writes.append((r == me, gpos[f.member] + f.start, cursor, f.numel))
            cursor += f.numel
    for _, dst, src, n in sorted(writes, key=lambda w: w[0]):
        gather[dst : dst + n] = torch.arange(src, src + n)
    upos = dict(step.shared)
    returns = _returns(step, me)
    back = _runs([upos[f.member] + f.start for f in returns], [f.numel for f in returns])

    def to_device(t: torch.Tensor) -> torch.Tensor:
        small = t.numel() == 0 or int(t.max()) < 2**31 - 1
        return t.to(device=device, dtype=torch.int32 if small else torch.int64)

    return RoundIndex(send=to_device(send), gather=to_device(gather), back=to_device(back))


def _replicated_reverse(owner_numel: list[int]) -> str:
    """How a replicated layout's updates travel, from what every owner contributes.

    ``all_gather_into_tensor`` needs one length per rank, so each owner's updates are padded to the
    largest share ``L``: every rank moves ``(W − 1)·L`` entries (ring). One broadcast per owner moves
    exactly the others' shares, ``Σ_{o ≠ r} n_o`` at rank ``r``, at most ``Σ n − min n`` at the slowest
    rank, but costs ``W`` collective launches instead of one. The one moving less data at the slowest
    rank wins; on a tie (balanced owners, and always at ``W = 2``) the single all-gather.
    """
    world = len(owner_numel)
    padded = (world - 1) * max(owner_numel)
    exact = sum(owner_numel) - min(owner_numel)
    return "all_gather" if padded <= exact else "broadcast"


def _ns_batches(layout: Layout, norm: MatrixNorm, inputs: list[tuple[int, int]]) -> list[tuple[int, int, int, int, list[int]]]:
    """``(rows, cols, batch, element bytes, members)`` of the Newton–Schulz batches :func:`lmo_many`
    forms from ``(member, element bytes)`` inputs: one per shape, in order of first appearance,
    with the element bytes of its first input (the dtype ``"svd"`` returns)."""
    groups: dict[tuple[int, ...], tuple[int, list[int]]] = {}
    for m, item in inputs:
        groups.setdefault(tuple(layout.shapes[m]), (item, []))[1].append(m)
    out = []
    for shape, (item, ms) in groups.items():
        matrix = norm.to_matrix(torch.empty(shape, device="meta")).shape
        out.append((int(matrix[-2]), int(matrix[-1]), len(ms) * shape_numel(tuple(matrix[:-2])), item, ms))
    return out


def _owner_peaks(layout: Layout, norm: MatrixNorm, rounds: list[RoundPlan], me: int, comm_bytes: int,
                 work_bytes: int, overlap: bool) -> list[int]:
    """Per round, the transient bytes of :func:`_matrix_lmo` on rank ``me``, following its code step
    by step (see :func:`matrix_plan` for the formula)."""
    c, w = comm_bytes, work_bytes
    convert = c != w  # a dtype conversion makes a second buffer

    def forward(step: RoundPlan) -> tuple[int, int]:
        """(peak while packing, bytes in flight) of a round's forward."""
        sent = sum(f.numel for f in _sends(step, me))
        received = sum(f.numel for frags in _receives(step, me) for f in frags) if step.forward else 0
        pack = sent * w + (sent * c if convert else 0)
        return max(pack, (sent + received) * c), (sent + received) * c

    peaks, carried = [], 0  # carried: updates of earlier rounds, kept until step() applies them
    for k, step in enumerate(rounds):
        pack_peak, in_flight = forward(step)
        nxt = rounds[k + 1] if overlap and k + 1 < len(rounds) else None
        next_pack, next_flight = forward(nxt) if nxt is not None else (0, 0)
        received = (sum(f.numel for frags in _receives(step, me) for f in frags) if step.forward
                    else sum(f.numel for f in step.gathered_here))
        gathered = step.gather_numel
        at = dict(step.gathered)
        local_only = {f.member for f in step.kept}
        out_all, out_kept = 0, 0

        def blocked(members: list[int]) -> int:
            """Bytes of the copies that column-blocked members' inputs (or outputs) need."""
            return sum(layout.numel(m) * (c if m in at else w) for m in members if m in layout.blocks)

        def newton_schulz(members: list[int]) -> tuple[int, int]:
            """(peak above the outputs of earlier batches, input copies) of one ``lmo_many`` call;
            adds its outputs to ``out_all`` / ``out_kept``."""
            nonlocal out_all, out_kept
            peak = 0
            for rows, cols, batch, item, ms in _ns_batches(layout, norm, [(m, c if m in at else w) for m in members]):
                peak = max(peak, out_all + ns_transient_bytes(rows, cols, batch, norm.ns_steps, norm.ns_gram))
                out = batch * rows * cols * (norm.update_dtype.itemsize if norm.update_dtype else item)
                out_all += out
                if local_only & set(ms):  # a batch's storage lives while any of its updates is kept
                    out_kept += out
            return peak, blocked(members)

        early, late, last = _ns_phases(step, overlap)
        early_peak, early_blocked = newton_schulz(early)  # while the round's forward travels
        early_out = out_all
        late_peak, late_blocked = newton_schulz(late)
        blocked_out = blocked(early + late)
        if step.reverse == "all_gather":  # own padded share, then it and the gathered buffer
            length = max(step.owner_numel)
            total = len(step.owner_numel) * length
            back = [out_all + blocked_out + length * c, (length + total) * c]
            returned = total * c
        elif step.reverse == "broadcast":  # the whole buffer, own share written in place
            total = sum(step.owner_numel)
            back = [out_all + blocked_out + total * c]
            returned = total * c
        else:
            shared = step.shared_numel
            sent_back = sum(f.numel for f in _returns(step, me))
            got_back = sum(f.numel for f, _ in step.received_at)
            back = [out_all + blocked_out + shared * c,
                    out_kept + (shared + sent_back) * c,
                    out_kept + (sent_back + got_back) * c]
            if last:  # while the reverse travels: the kept outputs so far, then this call's
                out_all = out_kept
                last_peak, last_blocked = newton_schulz(last)
                back += [(sent_back + got_back) * c + last_peak + last_blocked,
                         out_kept + (sent_back + got_back) * c + blocked(last)]
            returned = out_kept + (got_back * c if step.reverse == "all_to_all" else 0)
        start = pack_peak if (k == 0 or not overlap) else in_flight
        during_forward = (in_flight + early_peak + early_blocked) if early else 0
        peaks.append(carried + max([start, during_forward, early_out + received * c + next_pack,
                                    early_out + received * c + gathered * c + next_flight,
                                    gathered * c + next_flight + late_peak + late_blocked]
                                   + [b + next_flight for b in back]))
        carried += returned
    return peaks


def _check_coverage(layout: Layout, owners: dict[int, int]) -> None:
    """Every entry of every matrix reaches its owner: the senders' fragments and the owner's own
    cover it. Depends only on the layout, so every rank reaches the same verdict."""
    spans: dict[int, list[tuple[int, int]]] = {m: [] for m in owners}
    for r in range(layout.world_size):
        for f in layout.contributes(r):
            spans[f.member].append((f.start, f.start + f.numel))
    for m, o in owners.items():
        spans[m] += [(f.start, f.start + f.numel) for f in layout.fragments[o] if f.member == m]
        reach = 0
        for a, b in sorted(spans[m]):
            if a > reach:
                break
            reach = max(reach, b)
        if reach < layout.numel(m):
            raise ValueError(f"layout: entries {reach}.. of member {m} are held by no rank; its matrix cannot be rebuilt")


def matrix_plan(layout: Layout, norm: MatrixNorm, max_numel_per_rank: int, *, comm_bytes: int = 2,
                work_bytes: int = 4, overlap: bool = True) -> MatrixPlan:
    """The (cached) exchange plan of ``layout``'s matrices for ``layout.rank``.

    Owners by locality then NS cost (:func:`assign_owners`), rounds bounded by
    ``max_numel_per_rank`` (:func:`plan_rounds`), and every round's routes. Planning is pure
    Python over all fragments of all ranks, with no tensor and no communication: a layout built from
    shapes alone (``group=None``, any ``rank``) plans that rank's share of a hypothetical cluster.
    Done once per layout and kept in ``layout.plans``.

    ``comm_bytes`` / ``work_bytes``: element sizes of the wire dtype (default bf16) and of the
    directions (default fp32); ``overlap``: whether round k+1's forward is in flight during round k
    (:func:`distributed_lmo`). They only enter :attr:`RoundPlan.owner_peak_bytes`, which follows the
    code of :func:`_matrix_lmo` with ``c = comm_bytes``, ``w = work_bytes``:

    * forward pack: the sent entries ``S`` (this rank's own chunk included) selected in the work
      dtype, then converted: ``S·(w + c)`` (``S·w`` when ``c = w``); then send and receive buffers
      ``(S + R)·c`` in flight (with overlap, round k+1's stay alive through all of round k:
      ``N``, and are packed while round k's received buffer ``R·c`` lives);
    * gather: the received buffer and the gather buffer ``G·c`` of the owned matrices not held
      whole, then ``G·c`` alone;
    * Newton–Schulz (:func:`lmo_many`, batches by shape in order): with ``G·c`` and the
      finished batches' outputs (bf16, :attr:`~disco_ds.optim.norms.MatrixNorm.update_dtype`), each
      batch's :func:`~disco_ds.optim.newton_schulz.ns_transient_bytes` (bf16 working set, output
      included); inputs are the gather buffer (comm dtype) or a whole local fragment (work dtype,
      no copy); column-blocked members add a copy of input and output. With overlap (order in
      :func:`_ns_phases`) the owned matrices held whole here whose updates others hold come first,
      in their own call, beside the round's forward buffers in flight; their outputs then live
      through the gather and the second call; those nobody else holds come in a third call,
      beside the reverse's send and receive buffers and the kept outputs;
    * reverse: all outputs plus the buffer of shared updates ``U·c``; then the outputs nobody else
      holds (kept), ``U·c`` and the send buffer; send and receive buffers; then the received buffer
      alone (its views are the updates, in the wire dtype). Replicated layouts instead: the outputs
      and the padded share ``L·c`` (all-gather) or the whole buffer ``Σn·c`` (broadcasts); send and
      gathered ``W·L·c``.

    The round's peak is the largest of these sums, plus the updates earlier rounds returned (kept
    until ``step()`` applies them, in bf16 or the wire dtype: ``Scion`` adds them into its weights
    without a copy).
    Not counted: the inputs, the cached index tensors (:attr:`MatrixPlan.index_bytes`), the one
    copy into a flat buffer that a caller without :class:`FragmentViews` pays, the allocator's
    rounding, BLAS workspaces, and the ``"svd"`` oracle (the formula models the iterative methods).
    ``tests/test_distributed_units.py`` checks it against the profiler's peak to within 2 %.
    """
    key = (type(norm), norm.ns_steps, norm.ns_gram, max_numel_per_rank, comm_bytes, work_bytes, overlap)
    if key in layout.plans:
        return layout.plans[key]
    members = list(range(len(layout.shapes)))
    owners = assign_owners(layout, members, {m: matrix_cost(norm, layout.shapes[m]) for m in members})
    _check_coverage(layout, owners)
    me, world = layout.rank, layout.world_size
    holders = {m: {r for r in range(world) for f in layout.fragments[r] if f.member == m} for m in members}
    local = layout.local()
    whole_local = {f.member: f for f in local if f.start == 0 and f.numel == layout.numel(f.member)}
    replicated = layout.replicated and world > 1

    def to_owner(src: int, dst: int, in_round: set[int]) -> list[Fragment]:
        # Fragments of matrices owned elsewhere and not already held whole there.
        return [f for f in layout.contributes(src) if f.member in in_round and owners[f.member] == dst
                and dst not in layout.whole_holders(f.member)]

    def to_holder(owner: int, holder: int, in_round: set[int]) -> list[Fragment]:
        return [f for f in layout.fragments[holder] if f.member in in_round and owners[f.member] == owner]

    def positions(ms: list[int]) -> list[tuple[int, int]]:
        out, pos = [], 0
        for m in ms:
            out.append((m, pos))
            pos += layout.numel(m)
        return out

    rounds = []
    for round_members in plan_rounds(layout, owners, max_numel_per_rank):
        in_round = set(round_members)
        peers = range(world)
        mine = [m for m in round_members if owners[m] == me]
        inplace = {m: whole_local[m] for m in mine if m in whole_local}
        gathered = positions([m for m in mine if m not in inplace])
        shared = positions([m for m in mine if holders[m] != {me}])
        gathered_set, shared_set = {m for m, _ in gathered}, {m for m, _ in shared}
        to_holders = [to_holder(me, r, in_round) if r != me else [] for r in peers]
        from_owners = [to_holder(r, me, in_round) if r != me else [] for r in peers]
        returned_here = [f for f in local if f.member in shared_set]
        owner_numel = [sum(layout.numel(m) for m in round_members if owners[m] == r) for r in peers]
        if replicated:
            reverse = _replicated_reverse(owner_numel)
            chunk = ([r * max(owner_numel) for r in peers] if reverse == "all_gather"
                     else [sum(owner_numel[:r]) for r in peers])
            at: dict[int, int] = {}
            for r in peers:
                pos = chunk[r]
                for m in round_members:
                    if owners[m] == r:
                        at[m] = pos
                        pos += layout.numel(m)
            received_at = [(f, at[f.member] + f.start) for f in local if f.member in in_round]
        else:
            reverse = "all_to_all" if any(holders[m] != {owners[m]} for m in round_members) else "none"
            received_at, pos = [], 0
            for r in peers:
                for f in (returned_here if r == me else from_owners[r]):
                    received_at.append((f, pos))
                    pos += f.numel
        rounds.append(RoundPlan(
            members=round_members,
            mine=mine,
            to_owners=[to_owner(me, r, in_round) if r != me else [] for r in peers],
            from_holders=[to_owner(r, me, in_round) if r != me else [] for r in peers],
            to_holders=to_holders,
            from_owners=from_owners,
            kept=[f for f in local if f.member in mine and f.member not in shared_set],
            inplace=inplace,
            gathered=gathered,
            gather_numel=sum(layout.numel(m) for m, _ in gathered),
            shared=shared,
            shared_numel=sum(layout.numel(m) for m, _ in shared),
            gathered_here=[f for f in local if f.member in gathered_set],
            returned_here=[] if replicated else returned_here,
            received_at=received_at,
            forward=any(owners[m] not in layout.whole_holders(m) for m in round_members),
            reverse=reverse,
            owner_numel=owner_numel if replicated else [],
            owner_peak_bytes=0,
        ))
    peaks = _owner_peaks(layout, norm, rounds, me, comm_bytes, work_bytes, overlap)
    rounds = [replace(r, owner_peak_bytes=p) for r, p in zip(rounds, peaks)]
    plan = MatrixPlan(owners=owners, rounds=rounds, rank=me)
    layout.plans[key] = plan
    return plan


def _all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: list[int], in_splits: list[int], layout: Layout,
                stats: ExchangeStats, async_op: bool = False) -> Any:
    """One ``all_to_all_single``, entered by every rank of the group whenever the plan says the round
    has traffic (empty splits allowed), so that no rank can skip a collective the others wait in.
    With ``async_op`` returns the work handle to wait on before ``out`` is read."""
    stats.all_to_all_calls += 1
    stats.elements_sent += sum(in_splits) - in_splits[layout.rank]
    stats.bytes_sent += (sum(in_splits) - in_splits[layout.rank]) * inp.element_size()
    with stats.comm.region(out.device):
        return dist.all_to_all_single(out, inp, out_splits, in_splits, group=layout.group, async_op=async_op)


class _InFlight:
    """An all-to-all of a round in flight (its forward, or with overlap its reverse): the packed
    send buffer, the receive buffer, and the collective's handle (None when it ran synchronously
    or there was nothing to move)."""

    def __init__(self, send: torch.Tensor, recv: torch.Tensor, work: Any) -> None:
        self.send, self.recv, self.work = send, recv, work

    def wait(self, stats: ExchangeStats) -> torch.Tensor:
        """The received buffer, once it is complete; the send buffer is released here."""
        if self.work is not None:
            with stats.comm.region(self.recv.device):
                self.work.wait()
        recv, self.send, self.recv, self.work = self.recv, None, None, None
        return recv


def _start_forward(layout: Layout, step: RoundPlan, index: RoundIndex | None, source: torch.Tensor | None,
                   comm_dtype: torch.dtype, device: torch.device, stats: ExchangeStats, async_op: bool) -> _InFlight:
    """Pack this rank's fragments of routed matrices (its own chunk included) with one
    ``index_select`` and start their ``all_to_all_single``."""
    me = layout.rank
    if index is None or source is None:
        send = torch.empty(0, dtype=comm_dtype, device=device)
    else:
        send = source.index_select(0, index.send).to(comm_dtype)  # a no-op conversion when the dtypes agree
    if not step.forward:
        # Nothing crosses the network in this round: this rank's own chunk is everything it receives.
        return _InFlight(send, send, None)
    in_splits = [sum(f.numel for f in (step.gathered_here if r == me else frags)) for r, frags in enumerate(step.to_owners)]
    out_splits = [sum(f.numel for f in frags) for frags in _receives(step, me)]
    recv = torch.empty(sum(out_splits), dtype=comm_dtype, device=device)
    work = _all_to_all(recv, send, out_splits, in_splits, layout, stats, async_op=async_op)
    return _InFlight(send, recv, work)


def _orthogonalise(layout: Layout, norm: MatrixNorm, step: RoundPlan, members: list[int], gather: torch.Tensor | None,
                   directions: Mapping[Fragment, torch.Tensor], stats: ExchangeStats, member_keys: list[Any],
                   on_gathered: Callable[[Any, torch.Tensor], None] | None, device: torch.device) -> dict[int, torch.Tensor]:
    """The LMO of ``members`` (owned matrices of the round), batched by shape: matrices held whole
    in one local fragment are read in place, the others from the gather buffer."""
    if not members:
        return {}
    at = dict(step.gathered)
    inputs = [layout.to_matrix(m, gather.narrow(0, at[m], layout.numel(m)) if m in at else directions[step.inplace[m]])
              for m in members]
    if on_gathered is not None:
        for m, full in zip(members, inputs):
            on_gathered(member_keys[m], full)
    with stats.ns.region(device):
        owned = lmo_many(norm, inputs)
    for m in members:
        stats.per_member[member_keys[m]] = stats.per_member.get(member_keys[m], 0) + 1
    stats.matrices_orthogonalized += len(members)
    return dict(zip(members, owned))


def _ns_phases(step: RoundPlan, overlap: bool) -> tuple[list[int], list[int], list[int]]:
    """The owned matrices of a round in the order they are orthogonalised: while its forward
    travels, after it arrives, and while the updates travel back.

    With ``overlap``: the matrices held whole here need nothing from the forward. Those whose
    updates other ranks wait for go first, while the forward travels; the gathered ones follow,
    and their updates leave at once; the ones nobody else holds come last, while the reverse
    all-to-all travels (with no such reverse, right at the start). A peer that straggles, or waits
    for an update, then costs nothing until it must. Without ``overlap``: all in one batch after
    the forward."""
    if not overlap:
        return [], list(step.mine), []
    shared = {m for m, _ in step.shared}
    whole = [m for m in step.mine if m in step.inplace]
    gathered = [m for m in step.mine if m not in step.inplace]
    if step.reverse != "all_to_all":
        return whole, gathered, []
    return [m for m in whole if m in shared], gathered, [m for m in whole if m not in shared]


def _pack_updates(layout: Layout, step: RoundPlan, owned: dict[int, torch.Tensor], total: int,
                  comm_dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The shared updates, concatenated in ``step.shared`` order and rounded to ``comm_dtype`` on the
    way (``torch.cat`` into a buffer of that dtype: one copy)."""
    out = torch.empty(total, dtype=comm_dtype, device=device)
    if step.shared:
        torch.cat([layout.from_matrix(m, owned[m]) for m, _ in step.shared], out=out)
    return out


def _reverse_replicated(layout: Layout, step: RoundPlan, owned: dict[int, torch.Tensor], comm_dtype: torch.dtype,
                        device: torch.device, stats: ExchangeStats) -> torch.Tensor:
    """Every rank holds every matrix whole: each owner's updates reach every rank once, rounded to
    ``comm_dtype`` before they leave, and every rank (the owner included) reads them from the same
    buffer, so replicas stay bit-identical. Returns the buffer of all the round's updates."""
    me, world = layout.rank, layout.world_size
    if step.reverse == "all_gather":
        length = max(step.owner_numel)
        send = torch.empty(length, dtype=comm_dtype, device=device)
        if step.mine:  # the padding tail travels too, never read
            torch.cat([layout.from_matrix(m, owned[m]) for m in step.mine], out=send[: step.owner_numel[me]])
        owned.clear()
        out = torch.empty(world * length, dtype=comm_dtype, device=device)
        stats.elements_sent += (world - 1) * length
        stats.bytes_sent += (world - 1) * length * out.element_size()
        stats.all_gather_calls += 1
        with stats.comm.region(device):
            dist.all_gather_into_tensor(out, send, group=layout.group)
        del send
    else:
        starts = [sum(step.owner_numel[:r]) for r in range(world)]
        out = torch.empty(sum(step.owner_numel), dtype=comm_dtype, device=device)
        if step.mine:
            torch.cat([layout.from_matrix(m, owned[m]) for m in step.mine],
                      out=out.narrow(0, starts[me], step.owner_numel[me]))
        owned.clear()
        stats.elements_sent += (world - 1) * step.owner_numel[me]
        stats.bytes_sent += (world - 1) * step.owner_numel[me] * out.element_size()
        with stats.comm.region(device):
            for r in range(world):
                if step.owner_numel[r]:  # the plan knows every share, so every rank skips the same ones
                    src = r if layout.group is None else dist.get_global_rank(layout.group, r)
                    stats.broadcast_calls += 1
                    dist.broadcast(out.narrow(0, starts[r], step.owner_numel[r]), src=src, group=layout.group)
    return out


def _matrix_lmo(
    layout: Layout,
    norm: MatrixNorm,
    directions: Mapping[Fragment, torch.Tensor],
    comm_dtype: torch.dtype,
    max_numel_per_rank: int,
    stats: ExchangeStats,
    member_keys: list[Any],
    on_gathered: Callable[[Any, torch.Tensor], None] | None,
    device: torch.device,
    overlap: bool = True,
) -> dict[Fragment, torch.Tensor]:
    """Route matrix fragments to owners, orthogonalise there once, route update fragments back.

    Per round: one ``index_select`` packs the forward send buffer from this rank's directions, one
    ``all_to_all_single`` moves it (with ``overlap``: asynchronously, while owned matrices held
    whole here are orthogonalised, and round k+1's is started before round k's gathered matrices
    are), one ``index_select`` rebuilds the owned
    matrices in a gather buffer of ``comm_dtype``, Newton–Schulz runs batched, one ``torch.cat``
    and one ``index_select`` pack the shared updates, and one ``all_to_all_single`` (with
    ``overlap``, in flight while the matrices nobody else holds are orthogonalised; replicated
    layouts: an all-gather or per-owner broadcasts) returns them; received updates are views of
    one buffer in ``comm_dtype``.
    """
    buffer = directions.buffer if isinstance(directions, FragmentViews) else None
    work_dtype = buffer.dtype if buffer is not None else next((d.dtype for d in directions.values()), torch.float32)
    # A rank holding no fragment may still own matrices (ZeRO-1/2 routing); it then works in fp32,
    # the dtype of every ZeRO master partition.
    plan = matrix_plan(layout, norm, max_numel_per_rank, comm_bytes=comm_dtype.itemsize, work_bytes=work_dtype.itemsize,
                       overlap=overlap)
    rounds = plan.rounds
    updates: dict[Fragment, torch.Tensor] = {}
    moves = any(step.gathered_here or step.forward for step in rounds)
    routed = moves or any(step.reverse == "all_to_all" for step in rounds)
    index = plan.indices(layout, device, packed=buffer is None) if routed else None
    source = buffer
    if moves and source is None:
        # No single flat buffer (several parameters, or a caller's dict): one copy makes one.
        local = [directions[f] for f in layout.local()]
        source = torch.cat(local) if local else torch.empty(0, dtype=work_dtype, device=device)

    def start(k: int, async_op: bool) -> _InFlight:
        return _start_forward(layout, rounds[k], index[k] if index is not None else None, source, comm_dtype, device,
                              stats, async_op)

    pending = None
    for k, step in enumerate(rounds):
        stats.rounds += 1
        early, late, last = _ns_phases(step, overlap)
        if pending is None:
            pending = start(k, async_op=overlap)
        owned = _orthogonalise(layout, norm, step, early, None, directions, stats, member_keys, on_gathered, device)
        received = pending.wait(stats)
        # Round k+1's forward travels while round k's gathered matrices are orthogonalised (it
        # only reads the directions).
        pending = start(k + 1, async_op=True) if overlap and k + 1 < len(rounds) else None
        gather = (received.index_select(0, index[k].gather) if index is not None and step.gather_numel
                  else torch.empty(0, dtype=comm_dtype, device=device))
        del received
        owned.update(_orthogonalise(layout, norm, step, late, gather, directions, stats, member_keys, on_gathered,
                                    device))
        del gather
        if step.reverse in ("all_gather", "broadcast"):
            back = _reverse_replicated(layout, step, owned, comm_dtype, device, stats)
            for f, pos in step.received_at:
                updates[f] = back.narrow(0, pos, f.numel)
            continue
        if step.reverse == "none":
            _keep(layout, step, owned, updates)
            continue
        shared = _pack_updates(layout, step, owned, step.shared_numel, comm_dtype, device)
        for m, _ in step.shared:
            del owned[m]
        send = shared.index_select(0, index[k].back) if index is not None else shared
        del shared
        me = layout.rank
        in_splits = [sum(f.numel for f in (step.returned_here if r == me else frags)) for r, frags in enumerate(step.to_holders)]
        out_splits = [sum(f.numel for f in (step.returned_here if r == me else frags)) for r, frags in enumerate(step.from_owners)]
        recv = torch.empty(sum(out_splits), dtype=comm_dtype, device=device)
        returning = _InFlight(send, recv, _all_to_all(recv, send, out_splits, in_splits, layout, stats, async_op=overlap))
        del send, recv
        # The matrices nobody else holds are orthogonalised while the shared updates travel.
        owned.update(_orthogonalise(layout, norm, step, last, None, directions, stats, member_keys, on_gathered,
                                    device))
        _keep(layout, step, owned, updates)
        back = returning.wait(stats)  # the updates stay in the wire dtype: the caller adds them into its weights
        for f, pos in step.received_at:
            updates[f] = back.narrow(0, pos, f.numel)
    return updates


def _keep(layout: Layout, step: RoundPlan, owned: dict[int, torch.Tensor], updates: dict[Fragment, torch.Tensor]) -> None:
    """The updates of this rank's fragments nobody else holds: views of the owner's results, in
    their full precision."""
    for f in step.kept:
        updates[f] = layout.from_matrix(f.member, owned[f.member]).narrow(0, f.start, f.numel)


def _stat_shape(norm: SeparableNorm, shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of the completed sums of squares, as ``SeparableNorm.sum_squares`` returns them."""
    if norm.axis == "row":
        return (*shape[:-1], 1)
    if norm.axis == "col":
        return (1, shape[-1])
    return ()


def _rectangles(layout: Layout, norm: SeparableNorm, f: Fragment) -> list[tuple[int, int, int, int, int]]:
    """A fragment of a separable member as rectangles ``(offset, row, rows, col, cols)`` of its
    ``[rows, last dim]`` view; a whole-tensor norm sees one 1-row rectangle."""
    if norm.axis == "all":
        return [(0, 0, 1, 0, f.numel)]
    return layout.pieces(f) if f.member in layout.blocks else row_pieces(f, layout.shapes[f.member][-1])


def separable_sums_span_ranks(layout: Layout, norm: SeparableNorm) -> bool:
    """Whether some slice a separable norm sums over (a row, a column, a whole tensor) has entries
    on more than one rank, i.e. whether the sums need an ``all_reduce``. Under ZeRO-1/2 an
    embedding or head partitioned on row boundaries needs none. From the layout alone, so every
    rank reaches the same verdict; cached with the layout."""
    if norm.axis not in layout.sums_span_ranks:
        spans: dict[int, list[tuple[int, int, int]]] = {}
        for r, frags in enumerate(layout.fragments):
            for f in frags:
                for _, row, rows, col, cols in _rectangles(layout, norm, f):
                    lo, hi = (col, col + cols) if norm.axis == "col" else (row, row + rows)
                    spans.setdefault(f.member, []).append((lo, hi, r))
        layout.sums_span_ranks[norm.axis] = any(_overlap_across_ranks(intervals) for intervals in spans.values())
    return layout.sums_span_ranks[norm.axis]


def _overlap_across_ranks(intervals: list[tuple[int, int, int]]) -> bool:
    """Whether two half-open intervals ``(lo, hi, rank)`` of different ranks overlap: a sweep in
    order of ``lo`` that keeps the interval reaching furthest so far (if two earlier intervals of
    different ranks both covered a point, the later of them would already have been caught)."""
    reach, reached_by = -1, -1
    for lo, hi, r in sorted(intervals):
        if lo < reach and r != reached_by:
            return True
        if hi > reach:
            reach, reached_by = hi, r
    return False


def _separable_lmo(
    layout: Layout, norm: SeparableNorm, members: list[int], directions: Mapping[Fragment, torch.Tensor], stats: ExchangeStats,
    device: torch.device,
) -> dict[Fragment, torch.Tensor]:
    """Sum squares per slice over local fragments, complete them with one all_reduce (none when no
    slice spans ranks), rescale.

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
    rects = {f: _rectangles(layout, norm, f) for f in local}

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
            piece = directions[f][o : o + rows * cols].view(rows, cols)
            sums[slot(f, row, rows, col, cols)] += sum_of_squares(piece, reduce_dim)
    if separable_sums_span_ranks(layout, norm):
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
            # One pass: the product is formed in fp32 (the scale's dtype) and rounded on the store.
            torch.mul(d[o : o + rows * cols].view(rows, cols), scale, out=out[o : o + rows * cols].view(rows, cols))
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
                    buf[base + rows + row : base + rows + row + nrows] += sum_of_squares(piece, 1)
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
    directions: Mapping[Fragment, torch.Tensor],
    *,
    comm_dtype: torch.dtype = torch.bfloat16,
    max_numel_per_rank: int = 1 << 27,
    stats: ExchangeStats | None = None,
    member_keys: list[Any] | None = None,
    on_gathered: Callable[[Any, torch.Tensor], None] | None = None,
    device: torch.device | None = None,
    overlap: bool = True,
) -> dict[Fragment, torch.Tensor]:
    """The group's LMO applied to whole parameters, returned as this rank's fragments.

    Args:
        layout: who holds what; ``directions`` has one entry per fragment of ``layout.local()``.
        norm: the group's geometry.
        directions: this rank's fragments of the LMO input (momentum), 1-D; a
            :class:`~disco_ds.distributed.layout.FragmentViews` of one flat buffer is packed with
            one op per round, anything else is first copied into one buffer when it must travel.
        comm_dtype: dtype of matrix fragments on the wire and of the owners' gather buffers
            (bf16 halves traffic and memory; Newton–Schulz runs its iterations in bf16 anyway).
            Every entry of a routed matrix, the owner's own included, is rounded to it once, and
            every update that more than one rank holds returns in it.
        max_numel_per_rank: bound on the entries an owner gathers per round.
        stats: counters to update.
        member_keys: a stable key per member for the per-matrix orthogonalisation counter.
        on_gathered: called at the owner with ``(key, full matrix)`` before its LMO (self-tests).
        device: the communication device, where buffers are built, collectives run and owners
            orthogonalise (``directions`` must live there); required when this rank holds no
            fragment, otherwise that of ``directions``.
        overlap: run each round's collectives asynchronously (:func:`_ns_phases`): the owned
            matrices held whole here are orthogonalised while the forward travels or, where
            nobody else holds them, while the gathered matrices' updates travel back; round k+1's
            forward travels while round k's gathered matrices are orthogonalised (the same
            arithmetic per matrix, in up to three batches instead of one; more buffers live at once).

    Returns views, never converted (the caller adds them into its weights in their dtype): updates
    of matrices nobody else holds are the owner's results (bf16 from Newton–Schulz; the input's
    dtype from ``"svd"`` and the other norms); the others come from one received buffer per round
    in ``comm_dtype``.

    Every rank of ``layout.group`` must call this with the same layout and norm.
    """
    stats = stats if stats is not None else ExchangeStats()
    members = list(range(len(layout.shapes)))
    if isinstance(norm, ElementwiseNorm):
        return {f: norm.lmo_elements(d, layout.shapes[f.member]) for f, d in directions.items()}
    held = [directions.buffer] if isinstance(directions, FragmentViews) else list(directions.values())
    device = _device_of(held, device)
    if isinstance(norm, MatrixNorm):
        keys = member_keys if member_keys is not None else members
        return _matrix_lmo(layout, norm, directions, comm_dtype, max_numel_per_rank, stats, keys, on_gathered, device,
                           overlap)
    if isinstance(norm, SeparableNorm):
        return _separable_lmo(layout, norm, members, directions, stats, device)
    raise TypeError(f"Scion: norm {type(norm).__name__} is not a MatrixNorm, SeparableNorm or ElementwiseNorm; "
                    "the distributed optimizer cannot apply it to sharded parameters")
