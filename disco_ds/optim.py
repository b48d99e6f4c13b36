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
:mod:`disco_ds.distributed` orthogonalises every matrix exactly once in the whole job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import time

import torch
import torch.distributed as dist
from torch import nn

from disco_ds.distributed import (
    ExchangeStats,
    Layout,
    distributed_lmo,
    logical_shape,
    replicated_layout,
    zero3_layout,
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
        self._layouts: dict[Any, Layout] = {}
        self._replicas_checked = False
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
        start = time.perf_counter()
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue  # ZeRO-3 empties the groups it is not stepping
            members = self._members[group["scion_gid"]]
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
        self.stats.step_seconds += time.perf_counter() - start
        return loss

    def pop_metrics(self) -> dict[str, float]:
        """What happened since the previous call (one optimizer step, when called once per step):

        * ``optimizer/step_s``, ``optimizer/comm_s``, ``optimizer/newton_schulz_s``: wall time of
          ``step()`` and the parts of it spent in collectives and in Newton–Schulz on this rank;
          ``optimizer/bytes_sent``;
        * while :attr:`track_norms` is on: ``norm/<group>/weight`` and ``norm/<group>/update``
          (SPEC 4 norm per role: RMS→RMS hidden, ℓ1→RMS embedding, RMS→∞ output, RMS vectors; the
          largest over the group's matrices) and ``effective_lr/<group>`` = ‖ΔW‖_F / ‖W‖_F.

        Every rank gets the same norms; log them on rank 0.
        """
        s = self.stats
        step_s, comm_s, ns_s, sent = self._mark
        metrics = {
            "optimizer/step_s": s.step_seconds - step_s,
            "optimizer/comm_s": s.comm_seconds - comm_s,
            "optimizer/newton_schulz_s": s.ns_seconds - ns_s,
            "optimizer/bytes_sent": float(s.bytes_sent - sent),
        }
        self._mark = (s.step_seconds, s.comm_seconds, s.ns_seconds, s.bytes_sent)
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
                 deltas: dict[Any, torch.Tensor] | None) -> None:
        if deltas is None:
            return
        label = str(group.get("role", group.get("name", f"group{group['scion_gid']}")))
        norm = self.norm_of(group)
        self.monitor.measure(label, norm_kind(group.get("role"), norm), norm, layout, keys, weights, deltas, self.stats)

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
        if dp_group is not None:
            self._check_replicas(dp_group)
        keys = [self._key(m) for p, m in zip(params, members) if p.grad is not None]
        params = [p for p in params if p.grad is not None]
        if self.steps == 0 and params and not any(bool(p.grad.any()) for p in params):
            # DeepSpeed's stage-0 fp16/bf16 wrapper calls step() once at initialisation with zeroed
            # gradients to create optimizer state; that is not an optimizer step.
            return False
        directions = [self._direction(p, group) for p in params]
        # One process is the world-size-1 case of the replicated layout: the same owner engine
        # (and the same exactly-once counters) serves one process, DDP and ZeRO stage 0.
        layout_key = ("replicated", id(dp_group), tuple(id(p) for p in params))
        if layout_key not in self._layouts:
            layout = replicated_layout(params, dp_group)
            if self._uses_tensor_parallel():
                layout = lift_layout(layout, [m for m, p in zip(members, group["params"]) if p.grad is not None],
                                     self.tensor_parallel_group)
            self._layouts[layout_key] = layout
        layout = self._layouts[layout_key]
        fragments = layout.local()
        out = distributed_lmo(layout, self.norm_of(group), {f: d.reshape(-1) for f, d in zip(fragments, directions)},
                              comm_dtype=self.comm_dtype, max_numel_per_rank=self.max_gather_numel,
                              stats=self.stats, member_keys=keys, on_gathered=self.on_gathered)
        deltas = self._planned_deltas(group, {f: p.reshape(-1) for f, p in zip(fragments, params)}, out)
        for f, p in zip(fragments, params):
            self._apply(group, p, out[f].view(p.shape))
        self._measure(group, layout, keys, {f: p.reshape(-1) for f, p in zip(fragments, params)}, deltas)
        return bool(params)

    def _step_flat_partition(self, group: dict[str, Any], params: list[torch.Tensor], members: list[torch.Tensor]) -> bool:
        """A DeepSpeed ZeRO flat partition: momentum on the local slice, LMO through the owners."""
        if len(params) != 1 or params[0].dim() != 1:
            raise RuntimeError(
                f"Scion: param group {group['scion_gid']} holds {len(params)} tensors instead of one flat ZeRO "
                "partition; this DeepSpeed wrapper is not supported"
            )
        flat = params[0]
        if flat.grad is None:
            raise RuntimeError(f"Scion: DeepSpeed called step() for param group {group['scion_gid']} without a gradient")
        layout, sg_members = self._flat_layout(flat, members)
        d = self._direction(flat, group)
        directions = {f: d.narrow(0, f.offset, f.numel) for f in layout.local()}
        out = distributed_lmo(layout, self.norm_of(group), directions, comm_dtype=self.comm_dtype,
                              max_numel_per_rank=self.max_gather_numel, stats=self.stats,
                              member_keys=[self._key(p) for p in sg_members], on_gathered=self.on_gathered)
        weights = {f: flat.narrow(0, f.offset, f.numel) for f in layout.local()}
        deltas = self._planned_deltas(group, weights, out)
        decay, step_size = self._decay_and_step(group)
        if decay != 1.0:
            flat.mul_(decay)
        for f, u in out.items():  # padding entries of the partition get no update
            weights[f].add_(u.to(flat.dtype), alpha=-step_size)
        self._measure(group, layout, [self._key(p) for p in sg_members], weights, deltas)
        return True

    def _flat_layout(self, flat: torch.Tensor, members: list[torch.Tensor]) -> tuple[Layout, list[torch.Tensor]]:
        """The (cached) layout of a flat partition; rebuilt when DeepSpeed hands a new tensor."""
        key = ("flat", id(flat), flat.data_ptr(), flat.numel())
        if key not in self._layouts:
            if getattr(members[0], "_z3_optimizer", None) is not None:
                layout, sg_members = zero3_layout(flat, members)
            else:
                layout, sg_members = zero12_layout(members), members
            self._verify_layout(layout, flat, sg_members)
            if self._uses_tensor_parallel():
                # One owner per logical matrix in the whole TP×DP grid (never a lone TP shard).
                layout = lift_layout(layout, sg_members, self.tensor_parallel_group)
            self._layouts[key] = (layout, sg_members)
        return self._layouts[key]

    def _verify_layout(self, layout: Layout, flat: torch.Tensor, members: list[torch.Tensor]) -> None:
        """Self-test of a new layout: each local fragment of the fp32 master partition must equal
        the same entries of the model's own (bf16 or fp32) weights, which DeepSpeed keeps in step.

        A mismatch means DeepSpeed's bookkeeping does not describe the flat buffer, and every
        matrix would be rebuilt from the wrong entries: an error, never a fallback.
        """
        for f in layout.local():
            p = members[f.member]
            own = p.ds_tensor.view(-1)[: f.numel] if hasattr(p, "ds_tensor") else p.data.view(-1)[f.start : f.start + f.numel]
            master = flat.detach().narrow(0, f.offset, f.numel).to(own.dtype)
            if not torch.equal(master, own):
                raise ValueError(
                    f"Scion: DeepSpeed's fragment address for {self._key(p)} does not match the flat fp32 partition, "
                    "so matrices cannot be rebuilt from it. The known cause is "
                    "zero_optimization.round_robin_gradients=true, which is not supported with Scion: set it to false."
                )

    def _check_replicas(self, group: Any) -> None:
        """First step: data-parallel replicas must hold identical gradients, or owners would be wrong."""
        if self._replicas_checked:
            return
        self._replicas_checked = True
        local = torch.zeros(2, dtype=torch.float64)
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is not None:
                    local[0] += p.grad.double().sum().item()
                    local[1] += 1
        low, high = local.clone(), local.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=group)
        if not torch.equal(low, high):
            raise RuntimeError(
                "Scion: gradients differ across data-parallel ranks. Scion orthogonalises each matrix on one "
                "owner rank and shares the update, which assumes replicas with averaged gradients (DDP, "
                "DeepSpeed). Wrap the model in DistributedDataParallel, or pass process_group= for the group "
                "whose ranks hold the same parameters."
            )

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
