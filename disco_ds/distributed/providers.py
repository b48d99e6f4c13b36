"""Layout providers: one small object per way a param group's parameters can be held.

Scion's update rule does not care where its tensors live; the distributed LMO needs a
:class:`~disco_ds.distributed.layout.Layout` of whole parameters. A provider turns what DeepSpeed
(or nobody) hands ``step()`` for one group into a :class:`Placement`: the layout, the tensors that
carry the gradient and Scion's state this step, which fragments of the layout each of them stores,
and the communication device. Each provider also runs its layout's self-test, agreed over every
rank before anything could hang (SPEC 5 rule 7).

* :class:`ReplicatedProvider`: every rank holds every parameter whole (one process, DDP, DeepSpeed
  ZeRO stage 0, also with its per-parameter bf16 master copies).
* :class:`Zero12Provider`: DeepSpeed ZeRO-1/2 (and the bf16 optimizer) hand one flat fp32
  partition per group, described by each parameter's ``_hp_mapping``.
* :class:`Zero3Provider`: DeepSpeed ZeRO-3 hands one flat partition per sub-group, derived from
  ``ds_tensor``/``partition_numel()``.
* :class:`TensorParallelProvider`: wraps any of them when AutoTP shards weights, lifting each
  layout to the TP×DP grid of logical matrices (:func:`disco_ds.distributed.tensor_parallel.lift_layout`).

:func:`choose_provider` picks one once, from the first group DeepSpeed hands over. Under
ZeRO-Offload the flat partition stays in host memory and a :class:`Staging` buffer carries the LMO's
input to the accelerator and the update back.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from disco_ds.distributed.agreement import RankCheckError, accelerator_device, injected_fault, raise_if_any_failed
from disco_ds.distributed.layout import Fragment, FragmentViews, Layout, group_rank_and_size, logical_shape
from disco_ds.distributed.tensor_parallel import data_parallel_group, is_tensor_parallel, lift_layout

__all__ = [
    "Placement",
    "Staging",
    "LayoutProvider",
    "ReplicatedProvider",
    "Zero12Provider",
    "Zero3Provider",
    "TensorParallelProvider",
    "choose_provider",
    "zero12_layout",
    "zero3_layout",
    "zero3_sub_group",
    "replicated_layout",
]

NameOf = Callable[[torch.Tensor], str]
"""A parameter's name for messages and per-matrix counters."""


# ---------------------------------------------------------------------------- layouts


def zero12_layout(members: list[torch.Tensor]) -> Layout:
    """Layout of a ZeRO-1/2 (or bf16 optimizer) flat partition from DeepSpeed's ``_hp_mapping``.

    ``members`` are the original parameters of one param group, in group order (the same on every
    rank). Each rank knows only its own fragment addresses; one ``all_gather_object`` shares them.
    """
    group = next((p._dp_group for p in members if getattr(p, "_dp_group", None) is not None), None)
    rank, world = group_rank_and_size(group)
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
    rank, world = group_rank_and_size(group)
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
    rank, world = group_rank_and_size(group)
    shapes = [tuple(p.shape) for p in members]
    local = [Fragment(i, 0, p.numel(), 0) for i, p in enumerate(members)]
    return Layout(shapes=shapes, fragments=[list(local) for _ in range(world)], group=group, rank=rank, replicated=True)


# ---------------------------------------------------------------------------- placements


class Staging:
    """ZeRO-Offload: the flat partition, its gradient and ``exp_avg`` live in host memory, while
    Newton–Schulz and the collectives belong on the accelerator. Per partition, one host buffer
    (page-locked when there is an accelerator, so the copies are asynchronous DMA) carries the
    direction out and the update back."""

    def __init__(self, flat: torch.Tensor, device: torch.device) -> None:
        self.device = device
        self.host = torch.empty_like(flat, pin_memory=device.type != "cpu")

    def direction_to_device(self, d: torch.Tensor) -> torch.Tensor:
        """A copy of the host direction ``d`` on the accelerator (enqueued, not waited for). The
        host buffer is free again once :meth:`update_to_host` has returned."""
        if self.host.is_pinned() and not d.is_pinned():
            # Pageable memory cannot be copied asynchronously: go through the page-locked buffer.
            self.host.copy_(d)
            d = self.host
        return d.to(self.device, non_blocking=True, copy=True)

    def update_to_host(self, updates: dict[Fragment, torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """The update fragments at their partition offsets in the host buffer, zero elsewhere (the
        padding of a partition gets no update). One device-to-host copy, waited for: the host
        applies the update next."""
        packed = torch.zeros(like.numel(), dtype=like.dtype, device=self.device)
        for f, u in updates.items():
            packed[f.offset : f.offset + f.numel] = u
        self.host.copy_(packed)
        return self.host


@dataclass
class Placement:
    """One param group as this rank holds it for one ``step()`` call.

    ``tensors`` carry the gradient (``.grad``) and Scion's state: the parameters themselves (or
    DeepSpeed's same-shape master copies), or one flat ZeRO partition. ``fragments[i]`` are the
    fragments of ``layout.local()`` stored in ``tensors[i]`` (``Fragment.offset`` indexes its
    flattened entries). ``members`` are the layout's members as the model holds them (for names).
    """

    layout: Layout
    members: list[torch.Tensor]
    tensors: list[torch.Tensor]
    fragments: list[list[Fragment]]
    device: torch.device
    """The communication device: collectives and Newton–Schulz run there."""
    staging: Staging | None = None

    def directions(self, per_tensor: list[torch.Tensor]) -> Mapping[Fragment, torch.Tensor]:
        """This rank's fragments of the LMO input on the communication device, from one direction
        tensor per entry of ``tensors`` (views; under ZeRO-Offload views of the staged copy).

        One flat tensor (a ZeRO partition, also lifted under tensor parallelism) is handed over
        whole, as :class:`FragmentViews`, so that the exchange packs it with one op per round;
        several tensors (whole parameters) as a dict of views."""
        flats = [(self.staging.direction_to_device(d) if self.staging is not None else d).reshape(-1) for d in per_tensor]
        if len(flats) == 1:
            return FragmentViews(flats[0], self.fragments[0])
        return {f: flat.narrow(0, f.offset, f.numel) for flat, frags in zip(flats, self.fragments) for f in frags}

    def weights(self) -> dict[Fragment, torch.Tensor]:
        """This rank's fragments of the weights on the communication device: views, or under
        ZeRO-Offload views of one copy (for the norm monitor)."""
        out: dict[Fragment, torch.Tensor] = {}
        for t, frags in zip(self.tensors, self.fragments):
            flat = (t if t.device == self.device else t.to(self.device, copy=True)).reshape(-1)
            for f in frags:
                out[f] = flat.narrow(0, f.offset, f.numel)
        return out

    def targets(self, index: int, updates: dict[Fragment, torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(destination, update)`` pairs that add ``updates`` into ``tensors[index]``: the whole
        parameter, each fragment's stretch of a flat partition (its padding gets nothing), or under
        ZeRO-Offload the whole partition and one host copy of the packed update."""
        t, frags = self.tensors[index], self.fragments[index]
        if self.staging is not None:
            return [(t, self.staging.update_to_host({f: updates[f] for f in frags}, t))]
        if len(frags) == 1 and frags[0].numel == t.numel():
            return [(t, updates[frags[0]].view(t.shape))]
        flat = t.view(-1)
        return [(flat.narrow(0, f.offset, f.numel), updates[f]) for f in frags]


# ---------------------------------------------------------------------------- providers


class LayoutProvider:
    """How the parameters of every group are held; builds (and caches) each group's layout.

    Subclasses implement :meth:`place`. Layout cache keys hold nothing rank-specific (param group,
    ZeRO-3 sub-group), so every rank builds and self-tests a layout at the same call: building is
    collective, and so is the agreement on its self-test.
    """

    partitioned = False
    """Whether DeepSpeed owns the gradient buffers (flat ZeRO partitions)."""

    def __init__(self, name_of: NameOf) -> None:
        self.name_of = name_of
        self.layouts: dict[Any, Any] = {}

    def device(self, params: list[torch.Tensor], members: list[torch.Tensor]) -> torch.device:
        """The communication device of a group handed over as ``params``."""
        return params[0].device

    def place(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor],
              first_step: bool) -> Placement | None:
        """The group's :class:`Placement` for this call, or None when it has nothing to update.

        ``params`` is what DeepSpeed handed over in ``group["params"]``; ``members`` the group's
        parameters as given to Scion; ``first_step`` is true until Scion first updated something.
        """
        raise NotImplementedError


class ReplicatedProvider(LayoutProvider):
    """Every rank holds every parameter whole: one process, DDP, DeepSpeed ZeRO stage 0.

    One process is the world-size-1 case: the same owner engine (and the same exactly-once
    counters) serves all three. Before the first update the replicas agree that they hold the same
    gradients (:meth:`_skip_first_call`).
    """

    def __init__(self, name_of: NameOf, group: Any) -> None:
        super().__init__(name_of)
        self.group = group
        """The data-parallel group whose ranks hold the same parameters (None: one process)."""

    def place(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor],
              first_step: bool) -> Placement | None:
        if len(params) != len(members):
            raise RuntimeError(
                f"Scion: param group {group['scion_gid']} was handed {len(params)} tensors for its {len(members)} "
                "parameters; the optimizer wrapper around Scion changed how it holds them between steps"
            )
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        if not with_grad:
            return None
        tensors = [params[i] for i in with_grad]
        device = tensors[0].device
        if first_step and self._skip_first_call(tensors, device):
            return None
        key = (group["scion_gid"], tuple(with_grad))
        if key not in self.layouts:
            self.layouts[key] = replicated_layout(tensors, self.group)
        layout = self.layouts[key]
        return Placement(layout, [members[i] for i in with_grad], tensors,
                         [[f] for f in layout.local()], device)

    def _skip_first_call(self, params: list[torch.Tensor], device: torch.device) -> bool:
        """Checks before the first update of whole parameters, agreed by all replicas at once.

        * Replicas must hold identical gradients, or every owner would orthogonalise something
          different from what the others assume.
        * DeepSpeed's stage-0 fp16/bf16 wrapper calls ``step()`` once at initialisation with
          zeroed gradients to create optimizer state; that call is not a step and is skipped.

        Each replica contributes (sum of its gradients, their count, whether all are zero); one
        all-reduce of those numbers and their negatives (MAX) yields the largest and smallest of
        each over the group, so every rank reaches the same verdict and either all skip, all
        step, or all raise. Runs only until the first update (it waits for the device).
        """
        local = torch.zeros(3, dtype=torch.float64, device=device)
        for p in params:
            local[0] += p.grad.double().sum()
        local[1] = len(params)
        local[2] = (~torch.stack([p.grad.any() for p in params]).any()).double()
        if injected_fault("zero-gradient-skip"):
            local[2] = 1.0 - local[2]
        if self.group is None:
            return bool(local[2])
        both = torch.cat([local, -local])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=self.group)
        high, low = both[:3], -both[3:]
        if not torch.equal(low, high):
            raise RankCheckError(
                "Scion: gradients differ across data-parallel ranks (their sums, counts or all-zero flags before the "
                "first step). Scion orthogonalises each matrix on one owner rank and shares the update, which assumes "
                "replicas with averaged gradients (DDP, DeepSpeed). Wrap the model in DistributedDataParallel, or pass "
                "process_group= for the group whose ranks hold the same parameters."
            )
        return bool(high[2])


def _offloaded(members: list[torch.Tensor]) -> bool:
    """Whether DeepSpeed keeps this group's fp32 partition, gradient and state in host memory
    (ZeRO-Offload, ``offload_optimizer``): ZeRO-3 records it on its optimizer; ZeRO-1/2 link
    ``_zero_optimizer`` on their parameters only when offloading."""
    z3 = getattr(members[0], "_z3_optimizer", None)
    if z3 is not None:
        return bool(getattr(z3, "offload_optimizer", False))
    return any(bool(getattr(getattr(p, "_zero_optimizer", None), "cpu_offload", False)) for p in members)


class _FlatPartitionProvider(LayoutProvider):
    """A DeepSpeed ZeRO flat partition per group: momentum on the local slice, LMO through the
    owners. Under ZeRO-Offload the partition, its gradient and ``exp_avg`` stay in host memory (the
    momentum is elementwise, so it is updated there); the direction is staged onto the accelerator
    for the collectives and Newton–Schulz, and the update comes back to be applied."""

    partitioned = True

    def __init__(self, name_of: NameOf, offloaded: bool = False, agree_over_world: bool = False) -> None:
        super().__init__(name_of)
        self.offload_device = accelerator_device() if offloaded else None
        """Under ZeRO-Offload (a setting of the whole engine), where the host partitions are staged to."""
        self.agree_over_world = agree_over_world
        """Agree on the self-test over the whole world instead of the layout's group (under tensor
        parallelism the lifted layout spans the TP×DP grid)."""
        self.staging: dict[Any, Staging] = {}

    def device(self, params: list[torch.Tensor], members: list[torch.Tensor]) -> torch.device:
        return self.offload_device if self.offload_device is not None else params[0].device

    def _key_and_build(self, group: dict[str, Any], flat: torch.Tensor,
                       members: list[torch.Tensor]) -> tuple[Any, Callable[[], tuple[Layout, list[torch.Tensor]]]]:
        """The layout's cache key and how to build the layout and its members (in layout order)."""
        raise NotImplementedError

    def place(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor],
              first_step: bool) -> Placement | None:
        if len(params) != 1 or params[0].dim() != 1:
            raise RuntimeError(
                f"Scion: param group {group['scion_gid']} holds {len(params)} tensors instead of one flat ZeRO "
                "partition; this DeepSpeed wrapper is not supported"
            )
        flat = params[0]
        device = self.device(params, members)
        key, build = self._key_and_build(group, flat, members)
        if key not in self.layouts:
            layout, layout_members = build()
            error = self._layout_error(layout, flat, layout_members)
            if flat.grad is None or injected_fault("missing-gradient"):
                error = f"DeepSpeed called step() for param group {group['scion_gid']} without a gradient"
            raise_if_any_failed(error, None if self.agree_over_world else layout.group, device,
                                "Scion: the first-step check of a ZeRO flat partition")
            self.layouts[key] = (layout, layout_members)
            if self.offload_device is not None:
                self.staging[key] = Staging(flat, self.offload_device)
        layout, layout_members = self.layouts[key]
        if flat.grad is None:
            # After the first call (where the ranks agreed that every partition has its gradient),
            # DeepSpeed assigns each partition's gradient before every call, on every rank alike.
            raise RuntimeError(f"Scion: DeepSpeed called step() for param group {group['scion_gid']} without a gradient")
        return Placement(layout, layout_members, [flat], [layout.local()], device, self.staging.get(key))

    def _layout_error(self, layout: Layout, flat: torch.Tensor, members: list[torch.Tensor]) -> str | None:
        """Self-test of a new layout: each local fragment of the fp32 master partition must equal
        the same entries of the model's own (bf16 or fp32) weights, which DeepSpeed keeps in step.
        Compared like with like: the master fragment is rounded to the weights' dtype and brought
        to their device (under ZeRO-Offload the master is in host memory, the weights are not).

        A mismatch means DeepSpeed's bookkeeping does not describe the flat buffer, and every
        matrix would be rebuilt from the wrong entries: an error, never a fallback.
        """
        mismatched = [self.name_of(members[f.member]) for f in layout.local()
                      if not _fragment_matches(f, flat, members)]
        if injected_fault("layout-self-test"):
            mismatched.append("(injected by the test hook)")
        if not mismatched:
            return None
        return (f"DeepSpeed's fragment addresses for {', '.join(mismatched)} do not match the flat fp32 partition, so "
                "matrices cannot be rebuilt from it. The known cause is zero_optimization.round_robin_gradients=true, "
                "which is not supported with Scion: set it to false.")


def _fragment_matches(f: Fragment, flat: torch.Tensor, members: list[torch.Tensor]) -> bool:
    p = members[f.member]
    own = p.ds_tensor.view(-1)[: f.numel] if hasattr(p, "ds_tensor") else p.data.view(-1)[f.start : f.start + f.numel]
    master = flat.detach().narrow(0, f.offset, f.numel).to(device=own.device, dtype=own.dtype)
    return torch.equal(master, own)


class Zero12Provider(_FlatPartitionProvider):
    """DeepSpeed ZeRO-1/2 and the bf16 optimizer: one flat partition per param group."""

    def _key_and_build(self, group, flat, members):
        return ("flat", group["scion_gid"]), lambda: (zero12_layout(members), members)


class Zero3Provider(_FlatPartitionProvider):
    """DeepSpeed ZeRO-3: one flat partition per sub-group of a param group."""

    def _key_and_build(self, group, flat, members):
        key = ("zero3", group["scion_gid"], zero3_sub_group(flat, members))
        return key, lambda: zero3_layout(flat, members)


class TensorParallelProvider(LayoutProvider):
    """AutoTP shards some weights: the inner provider's layouts of a rank's shards are lifted to one
    layout of the logical (unsharded) matrices over the whole TP×DP grid, so every matrix gets one
    owner in the grid (never a lone TP shard: DeepSpeed issue #8437)."""

    def __init__(self, inner: LayoutProvider, tp_group: Any) -> None:
        super().__init__(inner.name_of)
        self.inner = inner
        self.tp_group = tp_group
        self.partitioned = inner.partitioned

    def device(self, params: list[torch.Tensor], members: list[torch.Tensor]) -> torch.device:
        return self.inner.device(params, members)

    def place(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor],
              first_step: bool) -> Placement | None:
        placement = self.inner.place(group, params, members, first_step)
        if placement is None:
            return None
        inner = placement.layout
        key = id(inner)  # inner layouts are cached, so each is lifted once (collectively, over the grid)
        if key not in self.layouts:
            lifted = lift_layout(inner, placement.members, self.tp_group)
            # Lifting keeps each local fragment's member, size and buffer offset and only moves its
            # start into the logical matrix, so the sorted local lists correspond one to one.
            self.layouts[key] = (lifted, dict(zip(inner.local(), lifted.local())))
        lifted, renamed = self.layouts[key]
        placement.layout = lifted
        placement.fragments = [[renamed[f] for f in frags] for frags in placement.fragments]
        return placement


def choose_provider(group_index: int, params: list[torch.Tensor], members: list[torch.Tensor],
                    all_members: list[list[torch.Tensor]], name_of: NameOf, *, process_group: Any = None, tensor_parallel_group: Any = None) -> LayoutProvider:
    """The provider for how DeepSpeed (or nobody) hands Scion its groups, from the first group.

    Args:
        group_index: that group's index (for messages).
        params: what ``step()`` found in the first non-empty group's ``params``.
        members: that group's parameters as given to Scion.
        all_members: every group's parameters (to detect AutoTP shards anywhere).
        name_of: a parameter's name for messages.
        process_group: the data-parallel group of replicated parameters (default: DeepSpeed's
            data-parallel group under tensor parallelism, else the world).
        tensor_parallel_group: the TP group of AutoTP shards (default: DeepSpeed's).

    Raises:
        RuntimeError: when the tensors are neither the parameters (or same-shape master copies)
            nor a ZeRO flat partition: an optimizer wrapper Scion cannot see through.
    """
    tensor_parallel = any(is_tensor_parallel(m) for m in all_members)
    zero = any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in members)
    provider: LayoutProvider
    if zero and not any(p is m for p in params[:1] for m in members):
        z3 = getattr(members[0], "_z3_optimizer", None) is not None
        provider = (Zero3Provider if z3 else Zero12Provider)(name_of, offloaded=_offloaded(members),
                                                             agree_over_world=tensor_parallel)
    elif [tuple(p.shape) for p in params] == [tuple(m.shape) for m in members]:
        group = process_group
        if group is None and tensor_parallel:
            group = data_parallel_group()  # replicas of the same TP shards, not the whole world
        elif group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            group = dist.group.WORLD
        provider = ReplicatedProvider(name_of, group)
    else:
        raise RuntimeError(
            f"Scion: param group {group_index} was given {len(params)} tensors that are neither its {len(members)} parameters "
            "(or same-shape master copies) nor a DeepSpeed ZeRO flat partition; the optimizer wrapper around Scion is "
            "not supported. With DeepSpeed AutoTP, build Scion after the model is sharded: pass "
            "deepspeed.initialize(optimizer=<callable>) (disco_ds.distributed.tensor_parallel's docs), not an "
            "optimizer made from the unsharded parameters"
        )
    return TensorParallelProvider(provider, tensor_parallel_group) if tensor_parallel else provider
