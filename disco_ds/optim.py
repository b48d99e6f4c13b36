"""Scion and ScionLight (Pethick et al. 2025), single-process form.

Per parameter group (SPEC 1.1), with ``m`` the group's ``momentum`` in Scion's convention
(``m = 1 − β``; ``m = 1`` means no momentum):

    d ← (1 − m)·d + m·g                       (state ``exp_avg``, starts at 0, no bias correction)
    u = lmo(d)            or lmo((1 − m)·d + m·g) with Nesterov
    p ← (1 − lr·wd)·p − lr·ρ·u                (ρ = ``scale``; wd = 1 is Scion's constrained form)

The LMO is the group's ``norm`` (see :mod:`disco_ds.norms`). Same-shape matrices of a group are
orthogonalised in one batched call. The step runs once per ``optimizer.step()``, i.e. after
gradient accumulation.

The same object runs distributed. Under DeepSpeed ZeRO 1/2/3 the engine hands ``step()`` one flat
fp32 partition per group; under data parallelism (DDP, ZeRO stage 0) every rank holds every
parameter. Either way the momentum stays where the gradient is (flat and sharded under ZeRO), and
:mod:`disco_ds.distributed` orthogonalises every matrix exactly once in the whole job. Under
ZeRO-Offload (``offload_optimizer``) the partition, its gradient and ``exp_avg`` stay in host memory;
only the LMO's input travels to the accelerator (through a page-locked buffer) for the collectives
and Newton–Schulz, and the update comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from disco_ds.distributed import (
    ExchangeStats,
    Fragment,
    Layout,
    RankCheckError,
    accelerator_device,
    distributed_lmo,
    injected_fault,
    logical_shape,
    raise_if_any_failed,
    replicated_layout,
    zero3_layout,
    zero3_sub_group,
    zero12_layout,
)
from disco_ds.monitor import NormMonitor, norm_kind
from disco_ds.norms import NORMS, Norm, make_norm
from disco_ds.tensor_parallel import data_parallel_group, is_tensor_parallel, lift_layout

__all__ = ["Scion", "ScionLight", "SCION_GROUP_DEFAULTS"]

SCION_GROUP_DEFAULTS: dict[str, Any] = {
    "norm": "spectral",
    "scale": 1.0,
    "momentum": 0.1,
    "nesterov": False,
    "weight_decay": 0.0,
    "ns_steps": 5,
    "ns_method": "quintic",
}
"""Defaults for a group's keys (``lr`` has none: every group must get one)."""


def _group_label(index: int, group: dict[str, Any]) -> str:
    label = f"param group {index}"
    for key in ("name", "role"):
        if key in group:
            return f"{label} ({key}={group[key]!r})"
    return label


def _is_zero_partitioned(members: list[torch.Tensor]) -> bool:
    """DeepSpeed ZeRO-1/2 (and its bf16 optimizer) link ``_hp_mapping``; ZeRO-3 sets ``ds_id``."""
    return any(hasattr(p, "_hp_mapping") or hasattr(p, "ds_id") for p in members)


def _offloaded(members: list[torch.Tensor]) -> bool:
    """Whether DeepSpeed keeps this group's fp32 partition, gradient and state in host memory
    (ZeRO-Offload, ``offload_optimizer``): ZeRO-3 records it on its optimizer; ZeRO-1/2 link
    ``_zero_optimizer`` on their parameters only when offloading."""
    z3 = getattr(members[0], "_z3_optimizer", None)
    if z3 is not None:
        return bool(getattr(z3, "offload_optimizer", False))
    return any(bool(getattr(getattr(p, "_zero_optimizer", None), "cpu_offload", False)) for p in members)


class _Staging:
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


class Scion(torch.optim.Optimizer):
    """Scion: momentum followed by a per-group linear minimisation oracle.

    Args:
        params: parameters or param groups (e.g. the output of
            :func:`disco_ds.scion_param_groups`). Group keys: ``lr``, ``norm``, ``scale`` (ρ),
            ``momentum`` (m ∈ (0, 1]), ``nesterov``, ``weight_decay`` (0 unconstrained, 1
            constrained), ``ns_steps``, ``ns_method``; any other key (``role``, ``param_names``)
            is carried along untouched.
        lr: default learning rate; may be omitted when every group carries its own.
        norm, scale, momentum, nesterov, weight_decay, ns_steps, ns_method: defaults for groups
            that do not set them (see ``SCION_GROUP_DEFAULTS``).

    Raises:
        ValueError: on a bad group value, naming the group and the accepted values.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float | None = None,
        *,
        norm: str = SCION_GROUP_DEFAULTS["norm"],
        scale: float = SCION_GROUP_DEFAULTS["scale"],
        momentum: float = SCION_GROUP_DEFAULTS["momentum"],
        nesterov: bool = SCION_GROUP_DEFAULTS["nesterov"],
        weight_decay: float = SCION_GROUP_DEFAULTS["weight_decay"],
        ns_steps: int = SCION_GROUP_DEFAULTS["ns_steps"],
        ns_method: str = SCION_GROUP_DEFAULTS["ns_method"],
        process_group: Any = None,
        comm_dtype: torch.dtype = torch.bfloat16,
        max_gather_numel: int = 1 << 27,
        tensor_parallel_group: Any = None,
    ) -> None:
        defaults: dict[str, Any] = dict(
            norm=norm,
            scale=scale,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            ns_steps=ns_steps,
            ns_method=ns_method,
        )
        if lr is not None:
            defaults["lr"] = lr
        self._norm_cache: dict[tuple[str, int, str], Norm] = {}
        # The parameters of each group as given, before DeepSpeed swaps in flat partitions.
        self._members: list[list[torch.Tensor]] = []
        self._names: dict[int, str] = {}
        self._layouts: dict[Any, Any] = {}
        self._staging: dict[Any, _Staging] = {}
        self.process_group = process_group
        self.tensor_parallel_group = tensor_parallel_group
        """TP group of AutoTP-sharded weights (default: DeepSpeed's); used only when some are sharded."""
        self._tensor_parallel: bool | None = None  # known once the groups exist (_uses_tensor_parallel)
        self.comm_dtype = comm_dtype
        self.max_gather_numel = max_gather_numel
        self.stats = ExchangeStats()
        """Cumulative counters of this rank: matrices orthogonalised, bytes sent, collectives."""
        self.steps = 0
        """Number of ``step()`` calls that updated parameters (DeepSpeed may call once per group)."""
        self.on_gathered: Callable[[str, torch.Tensor], None] | None = None
        """If set, called at the owner with ``(parameter name, full momentum matrix)`` before its LMO."""
        self.track_norms = False
        """While true, every step measures the SPEC 4 norms of weights and updates per group (a few
        small all-reduces); :meth:`pop_metrics` returns them. The training loop switches it on."""
        self.monitor = NormMonitor()
        self._mark = (0.0, 0.0, 0.0, 0)
        super().__init__(params, defaults)
        # Refuse to be silently discarded (the Hugging Face Trainer under DeepSpeed drops
        # Trainer(optimizers=(Scion(...), ...))): at the first backward, check that DeepSpeed steps
        # this optimizer. Late import: disco_ds.hf imports this module.
        from disco_ds.hf import watch_for_replacement

        watch_for_replacement(self)

    # ---------------------------------------------------------------- validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group after checking every Scion key (see the class docstring)."""
        super().add_param_group(param_group)
        index = len(self.param_groups) - 1
        group = self.param_groups[index]
        self._validate_group(index, group)
        group["scion_gid"] = index
        self._members.append(list(group["params"]))
        for p, name in zip(group["params"], group.get("param_names", ())):
            self._names[id(p)] = name

    def _validate_group(self, index: int, group: dict[str, Any]) -> None:
        label = _group_label(index, group)
        if "lr" not in group:
            raise ValueError(f"{label} has no 'lr' and Scion got no default lr: pass lr=... or set it per group")
        if not isinstance(group["lr"], (int, float, torch.Tensor)) or float(group["lr"]) < 0:
            raise ValueError(f"{label}: lr must be a number ≥ 0, got {group['lr']!r}")
        if group["norm"] not in NORMS:
            raise ValueError(f"{label}: unknown norm {group['norm']!r}; accepted values: {sorted(NORMS)}")
        m = group["momentum"]
        if not isinstance(m, (int, float)) or not 0.0 < float(m) <= 1.0:
            raise ValueError(
                f"{label}: momentum must be in (0, 1] (Scion's convention m = 1 − β: 0.1 ≈ β 0.9, "
                f"1 = no momentum), got {m!r}"
            )
        if float(group["weight_decay"]) < 0:
            raise ValueError(f"{label}: weight_decay must be ≥ 0 (0 unconstrained, 1 constrained), got {group['weight_decay']!r}")
        if float(group["scale"]) <= 0:
            raise ValueError(f"{label}: scale (radius ρ) must be > 0, got {group['scale']!r}")
        norm = self.norm_of(group)
        for p in group["params"]:
            shape = logical_shape(p)
            if len(shape) < norm.min_ndim:
                raise ValueError(
                    f"{label}: norm {group['norm']!r} needs parameters with ≥ {norm.min_ndim} dims, got shape "
                    f"{shape}; accepted values for {len(shape)}-D parameters: "
                    f"{sorted(n for n, c in NORMS.items() if c.min_ndim <= len(shape))}"
                )

    def norm_of(self, group: dict[str, Any]) -> Norm:
        """The geometry object of a group (cached; rebuilt if the group's norm keys change)."""
        key = (group["norm"], int(group["ns_steps"]), group["ns_method"])
        if key not in self._norm_cache:
            self._norm_cache[key] = make_norm(key[0], ns_steps=key[1], ns_method=key[2])
        return self._norm_cache[key]

    # ---------------------------------------------------------------- the update

    def _direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Momentum update of SPEC 1.1; returns what the LMO is applied to."""
        g = p.grad
        m = float(group["momentum"])
        if m == 1.0:
            return g
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        d = state["exp_avg"]
        d.mul_(1.0 - m).add_(g, alpha=m)
        if group["nesterov"]:
            return d.mul(1.0 - m).add_(g, alpha=m)
        return d

    def _after_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        """Hook for subclasses, called once per parameter after its update."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Scion step over every group; parameters without a gradient are skipped."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        stepped = False
        groups = [(g, self._members[g["scion_gid"]]) for g in self.param_groups if g["params"]]  # ZeRO-3 empties the others
        if not groups:
            return loss
        first, first_members = groups[0]
        with self.stats.step.region(self._work_device(first["params"][0], first_members)):
            for group, members in groups:
                params = group["params"]
                if _is_zero_partitioned(members) and not any(p is m for p in params[:1] for m in members):
                    stepped |= self._step_flat_partition(group, params, members)
                elif [tuple(p.shape) for p in params] == [tuple(m.shape) for m in members]:
                    # The parameters themselves, or per-parameter master copies (DeepSpeed stage 0 bf16).
                    stepped |= self._step_parameters(group, params, members)
                else:
                    raise RuntimeError(
                        f"Scion: param group {group['scion_gid']} was given {len(params)} tensors that are neither its "
                        f"{len(members)} parameters (or same-shape master copies) nor a DeepSpeed ZeRO flat partition; "
                        "the optimizer wrapper around Scion is not supported. With DeepSpeed AutoTP, build Scion after "
                        "the model is sharded: pass deepspeed.initialize(optimizer=<callable>) "
                        "(disco_ds.tensor_parallel's docs), not an optimizer made from the unsharded parameters"
                    )
        self.steps += int(stepped)
        return loss

    @staticmethod
    def _work_device(t: torch.Tensor, members: list[torch.Tensor]) -> torch.device:
        """Where a group's collectives and Newton–Schulz run: with its tensors, except that a
        ZeRO-Offload partition (host memory) is staged onto the accelerator."""
        return accelerator_device() if _is_zero_partitioned(members) and _offloaded(members) else t.device

    def pop_metrics(self) -> dict[str, float]:
        """What happened since the previous call (one optimizer step, when called once per step):

        * ``optimizer/step_s``, ``optimizer/comm_s``, ``optimizer/newton_schulz_s``: time of
          ``step()`` and the parts of it spent in collectives and in Newton–Schulz on this rank
          (measured with CUDA events on a GPU, read here, which waits for the step's GPU work;
          the host clock on the CPU); ``optimizer/bytes_sent``;
        * while :attr:`track_norms` is on: ``norm/<group>/weight`` and ``norm/<group>/update``
          (SPEC 4 norm per role: RMS→RMS hidden, ℓ1→RMS embedding, RMS→∞ output, RMS vectors; the
          largest over the group's matrices) and ``effective_lr/<group>`` = ‖ΔW‖_F / ‖W‖_F.

        Every rank gets the same norms; log them on rank 0.
        """
        s = self.stats
        now = (s.step_seconds, s.comm_seconds, s.ns_seconds, float(s.bytes_sent))
        names = ("optimizer/step_s", "optimizer/comm_s", "optimizer/newton_schulz_s", "optimizer/bytes_sent")
        metrics = {name: value - before for name, value, before in zip(names, now, self._mark)}
        self._mark = now
        metrics.update(self.monitor.pop())
        return metrics

    @staticmethod
    def _decay_and_step(group: dict[str, Any]) -> tuple[float, float]:
        """``(1 − lr·wd, lr·ρ)`` of SPEC 1.1's ``p ← (1 − lr·wd)·p − lr·ρ·u``."""
        lr = float(group["lr"])
        return 1.0 - lr * float(group["weight_decay"]), lr * float(group["scale"])

    def _apply(self, group: dict[str, Any], p: torch.Tensor, u: torch.Tensor) -> None:
        """``p ← (1 − lr·wd)·p − lr·ρ·u``."""
        decay, step_size = self._decay_and_step(group)
        if decay != 1.0:
            p.mul_(decay)
        p.add_(u.to(p.dtype), alpha=-step_size)
        self._after_update(p, group)

    def _planned_deltas(self, group: dict[str, Any], weights: dict[Any, torch.Tensor], updates: dict[Any, torch.Tensor]) -> dict[Any, torch.Tensor] | None:
        """ΔW = −lr·wd·W − lr·ρ·u of each fragment, before it is applied (only while tracking norms)."""
        if not self.track_norms:
            return None
        decay, step_size = self._decay_and_step(group)
        return {f: updates[f].float() * -step_size + w.float() * (decay - 1.0) for f, w in weights.items()}

    def _measure(self, group: dict[str, Any], layout: Layout, keys: list[str], weights: dict[Any, torch.Tensor],
                 deltas: dict[Any, torch.Tensor] | None, device: torch.device) -> None:
        if deltas is None:
            return
        label = str(group.get("role", group.get("name", f"group{group['scion_gid']}")))
        norm = self.norm_of(group)
        self.monitor.measure(label, norm_kind(group.get("role"), norm), norm, layout, keys, weights, deltas, self.stats,
                             device=device)

    def _uses_tensor_parallel(self) -> bool:
        """Whether any parameter of any group is an AutoTP shard: then every group's replicas are
        the data-parallel group, and every layout is lifted to the TP×DP grid."""
        if self._tensor_parallel is None:
            self._tensor_parallel = any(is_tensor_parallel(members) for members in self._members)
        return self._tensor_parallel

    def _data_parallel_group(self) -> Any:
        if self.process_group is not None:
            return self.process_group
        if self._uses_tensor_parallel():
            return data_parallel_group()  # replicas of the same TP shards, not the whole world
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return dist.group.WORLD
        return None

    def _step_parameters(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor]) -> bool:
        """Whole parameters: one process, or data-parallel replicas (DDP, ZeRO stage 0)."""
        dp_group = self._data_parallel_group()
        with_grad = [i for i, p in enumerate(params) if p.grad is not None]
        keys = [self._key(members[i]) for i in with_grad]
        params = [params[i] for i in with_grad]
        if not params:
            return False
        device = params[0].device
        if self.steps == 0 and self._skip_first_call(params, dp_group, device):
            return False
        directions = [self._direction(p, group) for p in params]
        # One process is the world-size-1 case of the replicated layout: the same owner engine
        # (and the same exactly-once counters) serves one process, DDP and ZeRO stage 0. The key
        # holds nothing rank-specific, so every rank builds (collectively, under TP) at the same step.
        layout_key = ("replicated", group["scion_gid"], tuple(with_grad))
        if layout_key not in self._layouts:
            layout = replicated_layout(params, dp_group)
            if self._uses_tensor_parallel():
                layout = lift_layout(layout, [members[i] for i in with_grad], self.tensor_parallel_group)
            self._layouts[layout_key] = layout
        layout = self._layouts[layout_key]
        fragments = layout.local()
        out = distributed_lmo(layout, self.norm_of(group), {f: d.reshape(-1) for f, d in zip(fragments, directions)},
                              comm_dtype=self.comm_dtype, max_numel_per_rank=self.max_gather_numel,
                              stats=self.stats, member_keys=keys, on_gathered=self.on_gathered, device=device)
        deltas = self._planned_deltas(group, {f: p.reshape(-1) for f, p in zip(fragments, params)}, out)
        for f, p in zip(fragments, params):
            self._apply(group, p, out[f].view(p.shape))
        self._measure(group, layout, keys, {f: p.reshape(-1) for f, p in zip(fragments, params)}, deltas, device)
        return True

    def _skip_first_call(self, params: list[torch.Tensor], dp_group: Any, device: torch.device) -> bool:
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
        if dp_group is None:
            return bool(local[2])
        both = torch.cat([local, -local])
        dist.all_reduce(both, op=dist.ReduceOp.MAX, group=dp_group)
        high, low = both[:3], -both[3:]
        if not torch.equal(low, high):
            raise RankCheckError(
                "Scion: gradients differ across data-parallel ranks (their sums, counts or all-zero flags before the "
                "first step). Scion orthogonalises each matrix on one owner rank and shares the update, which assumes "
                "replicas with averaged gradients (DDP, DeepSpeed). Wrap the model in DistributedDataParallel, or pass "
                "process_group= for the group whose ranks hold the same parameters."
            )
        return bool(high[2])

    def _step_flat_partition(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor]) -> bool:
        """A DeepSpeed ZeRO flat partition: momentum on the local slice, LMO through the owners.

        Under ZeRO-Offload the partition, its gradient and ``exp_avg`` stay in host memory (the
        momentum is elementwise, so it is updated there); the direction is staged onto the
        accelerator for the collectives and Newton–Schulz, and the update comes back to be applied.
        """
        if len(params) != 1 or params[0].dim() != 1:
            raise RuntimeError(
                f"Scion: param group {group['scion_gid']} holds {len(params)} tensors instead of one flat ZeRO "
                "partition; this DeepSpeed wrapper is not supported"
            )
        flat = params[0]
        offloaded = _offloaded(members)
        device = accelerator_device() if offloaded else flat.device
        layout, sg_members, key = self._flat_layout(flat, members, group, device)
        if flat.grad is None:
            # After the first call (where the ranks agreed that every partition has its gradient),
            # DeepSpeed assigns each partition's gradient before every call, on every rank alike.
            raise RuntimeError(f"Scion: DeepSpeed called step() for param group {group['scion_gid']} without a gradient")
        staging = None
        if offloaded:
            if key not in self._staging:
                self._staging[key] = _Staging(flat, device)
            staging = self._staging[key]
        d = self._direction(flat, group)
        d = staging.direction_to_device(d) if staging is not None else d
        directions = {f: d.narrow(0, f.offset, f.numel) for f in layout.local()}
        keys = [self._key(p) for p in sg_members]
        out = distributed_lmo(layout, self.norm_of(group), directions, comm_dtype=self.comm_dtype,
                              max_numel_per_rank=self.max_gather_numel, stats=self.stats,
                              member_keys=keys, on_gathered=self.on_gathered, device=device)
        deltas = self._planned_deltas(group, self._fragments(layout, flat, device), out) if self.track_norms else None
        decay, step_size = self._decay_and_step(group)
        if decay != 1.0:
            flat.mul_(decay)
        if staging is not None:
            flat.add_(staging.update_to_host(out, flat), alpha=-step_size)
        else:
            for f, u in out.items():  # padding entries of the partition get no update
                flat.narrow(0, f.offset, f.numel).add_(u.to(flat.dtype), alpha=-step_size)
        if deltas is not None:
            self._measure(group, layout, keys, self._fragments(layout, flat, device), deltas, device)
        return True

    @staticmethod
    def _fragments(layout: Layout, flat: torch.Tensor, device: torch.device) -> dict[Fragment, torch.Tensor]:
        """This rank's fragments of ``flat`` on the communication device: views, or under ZeRO-Offload
        views of one copy (only while norms are tracked)."""
        on_device = flat if flat.device == device else flat.to(device, copy=True)
        return {f: on_device.narrow(0, f.offset, f.numel) for f in layout.local()}

    def _flat_layout(self, flat: torch.Tensor, members: list[torch.Tensor], group: dict[str, Any],
                     device: torch.device) -> tuple[Layout, list[torch.Tensor], Any]:
        """The (cached) layout of a flat partition, and its cache key.

        The key holds nothing rank-specific (param group, ZeRO-3 sub-group), so every rank builds
        and self-tests a layout at the same call: building is collective. The first call for a
        layout is also where the checks that could fail on one rank only (the self-test, a
        partition without a gradient) are agreed over every rank taking part in the step's
        collectives (:func:`disco_ds.distributed.raise_if_any_failed`).
        """
        z3 = getattr(members[0], "_z3_optimizer", None) is not None
        key = ("zero3", group["scion_gid"], zero3_sub_group(flat, members)) if z3 else ("flat", group["scion_gid"])
        if key not in self._layouts:
            if z3:
                layout, sg_members = zero3_layout(flat, members)
            else:
                layout, sg_members = zero12_layout(members), members
            error = self._layout_error(layout, flat, sg_members)
            if flat.grad is None or injected_fault("missing-gradient"):
                error = f"DeepSpeed called step() for param group {group['scion_gid']} without a gradient"
            tensor_parallel = self._uses_tensor_parallel()
            # Under TP the lifted layout is built over the whole grid (the world), so all of it agrees.
            raise_if_any_failed(error, None if tensor_parallel else layout.group, device,
                                "Scion: the first-step check of a ZeRO flat partition")
            if tensor_parallel:
                # One owner per logical matrix in the whole TP×DP grid (never a lone TP shard).
                layout = lift_layout(layout, sg_members, self.tensor_parallel_group)
            self._layouts[key] = (layout, sg_members)
        layout, sg_members = self._layouts[key]
        return layout, sg_members, key

    def _layout_error(self, layout: Layout, flat: torch.Tensor, members: list[torch.Tensor]) -> str | None:
        """Self-test of a new layout: each local fragment of the fp32 master partition must equal
        the same entries of the model's own (bf16 or fp32) weights, which DeepSpeed keeps in step.
        Compared like with like: the master fragment is rounded to the weights' dtype and brought
        to their device (under ZeRO-Offload the master is in host memory, the weights are not).

        A mismatch means DeepSpeed's bookkeeping does not describe the flat buffer, and every
        matrix would be rebuilt from the wrong entries: an error, never a fallback.
        """
        mismatched = [self._key(members[f.member]) for f in layout.local() if not self._fragment_matches(f, flat, members)]
        if injected_fault("layout-self-test"):
            mismatched.append("(injected by the test hook)")
        if not mismatched:
            return None
        return (f"DeepSpeed's fragment addresses for {', '.join(mismatched)} do not match the flat fp32 partition, so "
                "matrices cannot be rebuilt from it. The known cause is zero_optimization.round_robin_gradients=true, "
                "which is not supported with Scion: set it to false.")

    @staticmethod
    def _fragment_matches(f: Fragment, flat: torch.Tensor, members: list[torch.Tensor]) -> bool:
        p = members[f.member]
        own = p.ds_tensor.view(-1)[: f.numel] if hasattr(p, "ds_tensor") else p.data.view(-1)[f.start : f.start + f.numel]
        master = flat.detach().narrow(0, f.offset, f.numel).to(device=own.device, dtype=own.dtype)
        return torch.equal(master, own)

    def _key(self, p: torch.Tensor) -> str:
        return self._names.get(id(p), f"param@{id(p):x}")

    # ---------------------------------------------------------------- initialisation

    @staticmethod
    @torch.no_grad()
    def init_(model_or_groups: nn.Module | Iterable[dict[str, Any]] | "Scion") -> None:
        """Initialise every parameter on its group's norm ball, times the group's ``scale``.

        Accepts a model (classified with :func:`disco_ds.scion_param_groups`), a list of param
        groups, or a Scion optimizer (its own groups).
        """
        if isinstance(model_or_groups, nn.Module):
            from disco_ds.param_groups import scion_param_groups

            groups: Iterable[dict[str, Any]] = scion_param_groups(model_or_groups, lr=0.0)
        elif isinstance(model_or_groups, torch.optim.Optimizer):
            groups = model_or_groups.param_groups
        else:
            groups = model_or_groups
        for group in groups:
            norm = make_norm(group.get("norm", SCION_GROUP_DEFAULTS["norm"]))
            scale = float(group.get("scale", SCION_GROUP_DEFAULTS["scale"]))
            for p in group["params"]:
                norm.init_(p)
                if scale != 1.0:
                    p.mul_(scale)


class ScionLight(Scion):
    """Scion without a momentum buffer: the momentum lives in ``p.grad``.

    After each update it sets ``p.grad ← (1 − m)·p.grad``, so the next backward adds the new
    gradient on top: ``p.grad = Σ_k (1 − m)^k g_{t−k} = d_t / m``, the same direction as Scion's
    ``exp_avg`` because every LMO is scale-invariant. It saves one parameter-sized buffer.

    Rules for the training loop:

    * Never zero the gradients: :meth:`zero_grad` is a no-op here, so a loop (or the Hugging Face
      Trainer) that calls it keeps working.
    * Gradient accumulation: the buffer must hold ``(1 − m)·G_prev + mean of the micro-batch
      gradients``. Loops that divide each micro-batch loss by the number of accumulation steps
      (DeepSpeed, the Hugging Face Trainer, ``loss / accum``) already do this. A loop that sums
      unscaled micro-batch losses must multiply ``p.grad`` by ``accum`` before the first
      micro-batch and divide by ``accum`` after the last.
    * Checkpoints: ``state_dict()`` stores each ``p.grad`` as state ``grad_state`` and
      ``load_state_dict()`` puts it back into ``p.grad``, so a resumed run keeps its momentum.
    * Not for DeepSpeed ZeRO: the engine owns and zeroes the gradient buffers; use :class:`Scion`.
    """

    def __init__(self, params: Iterable[torch.Tensor] | Iterable[dict[str, Any]], lr: float | None = None, **kwargs: Any) -> None:
        super().__init__(params, lr, **kwargs)
        self.register_state_dict_post_hook(ScionLight._save_grads)
        self.register_load_state_dict_post_hook(ScionLight._restore_grads)

    def _direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        return p.grad

    def _step_flat_partition(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor]) -> bool:
        raise RuntimeError(
            "ScionLight cannot run under DeepSpeed ZeRO: the engine owns and zeroes the gradient partitions that "
            "would hold its momentum. Use disco_ds.Scion (momentum in the sharded 'exp_avg' state)."
        )

    def _after_update(self, p: torch.Tensor, group: dict[str, Any]) -> None:
        p.grad.mul_(1.0 - float(group["momentum"]))

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Does nothing: the gradient buffer is ScionLight's momentum (see the class docstring)."""

    @staticmethod
    def _save_grads(optimizer: "ScionLight", state_dict: dict[str, Any]) -> dict[str, Any]:
        index = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    state_dict["state"].setdefault(index, {})["grad_state"] = p.grad.detach().clone()
                index += 1
        return state_dict

    @staticmethod
    def _restore_grads(optimizer: "ScionLight") -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                state = optimizer.state.get(p)
                if state and "grad_state" in state:
                    p.grad = state.pop("grad_state").to(device=p.device, dtype=p.dtype)
