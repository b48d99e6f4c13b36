"""Scion and ScionLight (Pethick et al. 2025).

Per parameter group (SPEC 1.1), with ``m`` the group's ``momentum`` in Scion's convention
(``m = 1 − β``; ``m = 1`` means no momentum):

    d ← (1 − m)·d + m·g                       (state ``exp_avg``, starts at 0, no bias correction)
    u = lmo(d)            or lmo((1 − m)·d + m·g) with Nesterov
    p ← (1 − lr·wd)·p − lr·ρ·u                (ρ = ``scale``; wd = 1 is Scion's constrained form)

The LMO is the group's ``norm`` (see :mod:`disco_ds.optim.norms`). Same-shape matrices of a group are
orthogonalised in one batched call. The step runs once per ``optimizer.step()``, i.e. after
gradient accumulation.

The same object runs distributed. Under DeepSpeed ZeRO 1/2/3 the engine hands ``step()`` one flat
fp32 partition per group; under data parallelism (DDP, ZeRO stage 0) every rank holds every
parameter. A layout provider (:mod:`disco_ds.distributed.providers`), chosen at the first step,
says which: the momentum stays where the gradient is (flat and sharded under ZeRO), and one call to
:func:`disco_ds.distributed.exchange.distributed_lmo` orthogonalises every matrix exactly once in
the whole job. ``step()`` is SPEC 1.1 around that call (:meth:`Scion._update`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from disco_ds.distributed.exchange import distributed_lmo
from disco_ds.distributed.layout import logical_shape
from disco_ds.distributed.providers import LayoutProvider, Placement, choose_provider
from disco_ds.distributed.timing import ExchangeStats
from disco_ds.optim.monitor import NormMonitor, norm_kind
from disco_ds.optim.norms import NORMS, Norm, make_norm
from disco_ds.optim.replacement import watch_for_replacement

__all__ = ["Scion", "ScionLight", "SCION_GROUP_DEFAULTS"]

SCION_GROUP_DEFAULTS: dict[str, Any] = {
    "norm": "spectral",
    "scale": 1.0,
    "momentum": 0.1,
    "nesterov": False,
    "weight_decay": 0.0,
    "ns_steps": 5,
    "ns_method": "quintic",
    "ns_gram": True,
}
"""Defaults for a group's keys (``lr`` has none: every group must get one)."""


def _group_label(index: int, group: dict[str, Any]) -> str:
    label = f"param group {index}"
    for key in ("name", "role"):
        if key in group:
            return f"{label} ({key}={group[key]!r})"
    return label


class Scion(torch.optim.Optimizer):
    """Scion: momentum followed by a per-group linear minimisation oracle.

    Args:
        params: parameters or param groups (e.g. the output of
            :func:`disco_ds.scion_param_groups`). Group keys: ``lr``, ``norm``, ``scale`` (ρ),
            ``momentum`` (m ∈ (0, 1]), ``nesterov``, ``weight_decay`` (0 unconstrained, 1
            constrained), ``ns_steps``, ``ns_method``, ``ns_gram``; any other key (``role``, ``param_names``)
            is carried along untouched.
        lr: default learning rate; may be omitted when every group carries its own.
        norm, scale, momentum, nesterov, weight_decay, ns_steps, ns_method, ns_gram: defaults for groups
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
        ns_gram: bool = SCION_GROUP_DEFAULTS["ns_gram"],
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
            ns_gram=ns_gram,
        )
        if lr is not None:
            defaults["lr"] = lr
        self._norm_cache: dict[tuple[str, int, str, bool], Norm] = {}
        # The parameters of each group as given, before DeepSpeed swaps in flat partitions.
        self._members: list[list[torch.Tensor]] = []
        self._names: dict[int, str] = {}
        self.process_group = process_group
        self.tensor_parallel_group = tensor_parallel_group
        """TP group of AutoTP-sharded weights (default: DeepSpeed's); used only when some are sharded."""
        self.provider: LayoutProvider | None = None
        """How the groups' parameters are held (:mod:`disco_ds.distributed.providers`), chosen at the
        first ``step()`` from what DeepSpeed (or nobody) hands over."""
        self.comm_dtype = comm_dtype
        self.max_gather_numel = max_gather_numel
        self.stats = ExchangeStats()
        """Cumulative counters of this rank: matrices orthogonalised, bytes sent, collectives."""
        self.steps = 0
        """Number of ``step()`` calls that updated parameters (DeepSpeed may call once per group)."""
        self.on_gathered: Callable[[str, torch.Tensor], None] | None = None
        """If set, called at the owner with ``(parameter name, full momentum matrix)`` before its LMO."""
        self.track_norms: bool | frozenset[str] = False
        """True: every step measures the SPEC 4 norms of weights and updates of every group (a few
        small all-reduces, no host sync); a set of group labels (``role``, else ``name``): only
        those groups (the trainer measures ``{"output"}``, the paper's instrument, on every step and
        every group each ``logging.norms_interval``). :meth:`pop_norms` / :meth:`pop_metrics`
        return them."""
        self.monitor = NormMonitor()
        self._mark = (0.0, 0.0, 0.0, 0)
        super().__init__(params, defaults)
        # Refuse to be silently discarded (the Hugging Face Trainer under DeepSpeed drops
        # Trainer(optimizers=(Scion(...), ...))): at the first backward, check that DeepSpeed steps
        # this optimizer.
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

    def __setstate__(self, state: dict[str, Any]) -> None:
        # load_state_dict ends here: a state saved before a group key existed (``ns_gram``) loads
        # with that key's default instead of failing at the next step.
        super().__setstate__(state)
        for group in self.param_groups:
            for key, value in SCION_GROUP_DEFAULTS.items():
                group.setdefault(key, value)

    def norm_of(self, group: dict[str, Any]) -> Norm:
        """The geometry object of a group (cached; rebuilt if the group's norm keys change)."""
        key = (group["norm"], int(group["ns_steps"]), group["ns_method"], bool(group["ns_gram"]))
        if key not in self._norm_cache:
            self._norm_cache[key] = make_norm(key[0], ns_steps=key[1], ns_method=key[2], ns_gram=key[3])
        return self._norm_cache[key]

    # ---------------------------------------------------------------- the update

    def _direction(self, p: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
        """Momentum update of SPEC 1.1; returns what the LMO is applied to. With Nesterov that is
        ``p.grad`` itself, overwritten by the blend: after ``step()`` a parameter's ``.grad`` holds
        the blend, not its gradient (every loop zeroes it before the next backward anyway)."""
        g = p.grad
        m = float(group["momentum"])
        if m == 1.0:
            return g
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        d = state["exp_avg"]
        # d ← (1 − m)·d + m·g as one lerp: one pass over the state instead of a mul and an add.
        d.lerp_(g, m)
        if group["nesterov"]:
            # The blend (1 − m)·d + m·g is written over the gradient, which the step consumes (as
            # DeepSpeed's Muon does): no parameter-sized temporary, one pass instead of an
            # allocation and a pass.
            return torch.lerp(d, g, m, out=g)
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
        groups = [(g, self._members[g["scion_gid"]]) for g in self.param_groups if g["params"]]  # ZeRO-3 empties the others
        if not groups:
            return loss
        first, first_members = groups[0]
        provider = self._provider_for(first, first_members)
        stepped = False
        with self.stats.step.region(provider.device(first["params"], first_members)):
            for group, members in groups:
                placement = provider.place(group, group["params"], members, first_step=self.steps == 0)
                if placement is not None:
                    self._update(group, placement)
                    stepped = True
        self.steps += int(stepped)
        return loss

    def _provider_for(self, group: dict[str, Any], members: list[torch.Tensor]) -> LayoutProvider:
        """The layout provider, chosen once from how the first group is handed over."""
        if self.provider is None:
            self.provider = choose_provider(group["scion_gid"], group["params"], members, self._members, self._key,
                                            process_group=self.process_group,
                                            tensor_parallel_group=self.tensor_parallel_group)
        return self.provider

    def _update(self, group: dict[str, Any], placement: Placement) -> None:
        """SPEC 1.1 on one group: momentum where the gradient is, the LMO of whole parameters
        through their owners, then ``p ← (1 − lr·wd)·p − lr·ρ·u``."""
        directions = placement.directions([self._direction(t, group) for t in placement.tensors])
        updates = distributed_lmo(placement.layout, self.norm_of(group), directions, comm_dtype=self.comm_dtype,
                                  max_numel_per_rank=self.max_gather_numel, stats=self.stats,
                                  member_keys=[self._key(p) for p in placement.members],
                                  on_gathered=self.on_gathered, device=placement.device)
        decay, step_size = self._decay_and_step(group)
        label = self._label(group)
        deltas = None
        if self.track_norms is True or (self.track_norms and label in self.track_norms):  # ΔW = −lr·wd·W − lr·ρ·u, from the weights before the update
            deltas = {f: updates[f].float() * -step_size + w.float() * (decay - 1.0)
                      for f, w in placement.weights().items()}
        for index, t in enumerate(placement.tensors):
            if decay != 1.0:
                t.mul_(decay)
            for target, u in placement.targets(index, updates):
                target.add_(u, alpha=-step_size)  # a bf16 update is added in the target's dtype, uncopied
            self._after_update(t, group)
        if deltas is not None:
            norm = self.norm_of(group)
            self.monitor.measure(label, norm_kind(group.get("role"), norm), norm, placement.layout,
                                 [self._key(p) for p in placement.members], placement.weights(), deltas, self.stats,
                                 device=placement.device)

    @staticmethod
    def _label(group: dict[str, Any]) -> str:
        """A group's name in metrics: its ``role``, else its ``name``, else its index."""
        return str(group.get("role", group.get("name", f"group{group['scion_gid']}")))

    def pop_norms(self) -> dict[str, torch.Tensor]:
        """The monitored norms since the previous call, unread: per group label a device tensor of
        :data:`disco_ds.optim.monitor.TOTALS`. Costs no host–device sync, so a training loop can
        collect them every step and read them together at its log points
        (:meth:`disco_ds.optim.monitor.NormMonitor.read`)."""
        return self.monitor.pop()

    def pop_metrics(self) -> dict[str, float]:
        """What happened since the previous call (one optimizer step, when called once per step):

        * ``optimizer/step_s``, ``optimizer/comm_s``, ``optimizer/newton_schulz_s``: time of
          ``step()`` and the parts of it spent in collectives and in Newton–Schulz on this rank
          (measured with CUDA events on a GPU, read here, which waits for the step's GPU work;
          the host clock on the CPU); ``optimizer/bytes_sent``;
        * while :attr:`track_norms` is on: ``norm/<group>/weight`` and ``norm/<group>/update``
          (SPEC 4 norm per role: RMS→RMS hidden, ℓ1→RMS embedding, RMS→∞ output, RMS vectors; the
          largest over the group's matrices) and ``effective_lr/<group>`` = ‖ΔW‖_F / ‖W‖_F.

        Every rank gets the same norms; log them on rank 0. Reading the norms is one device-to-host
        copy (a sync); a loop that logs every few steps uses :meth:`pop_norms` instead.
        """
        s = self.stats
        now = (s.step_seconds, s.comm_seconds, s.ns_seconds, float(s.bytes_sent))
        names = ("optimizer/step_s", "optimizer/comm_s", "optimizer/newton_schulz_s", "optimizer/bytes_sent")
        metrics = {name: value - before for name, value, before in zip(names, now, self._mark)}
        self._mark = now
        metrics.update(NormMonitor.read(self.monitor.pop()))
        return metrics

    @staticmethod
    def _decay_and_step(group: dict[str, Any]) -> tuple[float, float]:
        """``(1 − lr·wd, lr·ρ)`` of SPEC 1.1's ``p ← (1 − lr·wd)·p − lr·ρ·u``."""
        lr = float(group["lr"])
        return 1.0 - lr * float(group["weight_decay"]), lr * float(group["scale"])

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
            from disco_ds.optim.param_groups import scion_param_groups

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

    def _provider_for(self, group: dict[str, Any], members: list[torch.Tensor]) -> LayoutProvider:
        provider = super()._provider_for(group, members)
        if provider.partitioned:
            raise RuntimeError(
                "ScionLight cannot run under DeepSpeed ZeRO: the engine owns and zeroes the gradient partitions that "
                "would hold its momentum. Use disco_ds.Scion (momentum in the sharded 'exp_avg' state)."
            )
        return provider

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
