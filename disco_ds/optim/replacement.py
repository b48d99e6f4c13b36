"""The discarded-optimizer watch: a Scion refuses to be silently replaced.

The Hugging Face ``Trainer`` under DeepSpeed drops ``Trainer(optimizers=(Scion(...), ...))`` and
builds its default optimizer (AdamW); accelerate swaps a client optimizer for DeepSpeedCPUAdam when
the DeepSpeed config offloads the optimizer without ``zero_force_ds_cpu_optimizer: false``. Either
way training would run without Scion. Every :class:`~disco_ds.Scion` arms this watch when it is
constructed, so the check works for a plain ``Trainer`` too; it reads only what DeepSpeed attaches
to parameters and imports neither DeepSpeed nor transformers.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from disco_ds.optim.scion import Scion

__all__ = ["OptimizerReplacedError", "SUPPORTED_ROUTES", "watch_for_replacement"]

SUPPORTED_ROUTES = (
    "Hand Scion to the Hugging Face Trainer in one of the supported ways (all work with DeepSpeed ZeRO 1/2/3):\n"
    "  1. Trainer(..., optimizer_cls_and_kwargs=disco_ds.hf.scion_optimizer_cls_and_kwargs(model, lr)), i.e.\n"
    "     (disco_ds.Scion, {'params': disco_ds.scion_param_groups(model, lr), ...}) with a fresh dict per Trainer;\n"
    "  2. Trainer(..., optimizer_cls_and_kwargs=(disco_ds.hf.ScionFactory, {'lr': lr, ...}));\n"
    "  3. disco_ds.hf.ScionTrainer(...) (Scion groups built from the model; lr ratios from\n"
    "     disco_ds.hf.ScionTrainingArguments or keyword arguments).\n"
    "With accelerate, pass the Scion object to accelerator.prepare(...) and keep\n"
    "'zero_force_ds_cpu_optimizer': false in the DeepSpeed config when offloading the optimizer."
)
"""The text every refusal of a discarded Scion ends with (the routes live in :mod:`disco_ds.hf`)."""


class OptimizerReplacedError(RuntimeError):
    """A Scion was built for parameters that DeepSpeed trains with another optimizer."""


_ARMED: "weakref.WeakSet[Scion]" = weakref.WeakSet()
"""Every Scion ever constructed (and still alive): each arms its watch in ``__init__``."""


class _Watch:
    """Post-accumulate-grad hooks on a Scion's parameters; the first one to fire checks once and
    removes them all, so the steady state costs nothing."""

    def __init__(self, optimizer: Scion) -> None:
        self.optimizer: Scion | None = optimizer
        self.members = [list(group["params"]) for group in optimizer.param_groups]
        self.handles: list[Any] = []
        self.checked = False

    def arm(self) -> None:
        seen: set[int] = set()
        for params in self.members:
            for p in params:
                if p.requires_grad and p.is_leaf and id(p) not in seen:
                    seen.add(id(p))
                    self.handles.append(p.register_post_accumulate_grad_hook(self._on_gradient))

    def _on_gradient(self, param: torch.Tensor) -> None:
        if self.checked:
            return
        self.checked = True
        for handle in self.handles:
            handle.remove()
        self.handles = []
        try:
            _check_not_replaced(self.optimizer, self.members)
        finally:
            # Drop the references the hooks held (parameters -> hook -> optimizer -> parameters).
            self.optimizer, self.members = None, []


def _adopted(optimizer: Scion, members: list[list[torch.Tensor]]) -> bool:
    """Whether DeepSpeed took over ``optimizer``: its ZeRO optimizers (and its bf16/fp16 wrappers)
    replace the tensors of the optimizer they step (flat partitions at ZeRO 1/2, empty lists
    between steps at ZeRO 3)."""
    return any([id(p) for p in group["params"]] != [id(p) for p in params]
               for group, params in zip(optimizer.param_groups, members))


def _zero_managed(p: torch.Tensor) -> bool:
    """ZeRO 1/2 (and the bf16 optimizer) set ``_hp_mapping`` on every parameter they manage;
    the ZeRO-3 optimizer sets ``_z3_optimizer``."""
    return hasattr(p, "_hp_mapping") or getattr(p, "_z3_optimizer", None) is not None


def _engine_optimizer(params: list[torch.Tensor]) -> Any:
    """The optimizer the ZeRO engine steps for these parameters, where DeepSpeed records it: ZeRO 3
    always (``_z3_optimizer``), ZeRO 1/2 only with optimizer offload (``_zero_optimizer``)."""
    for p in params:
        zero = getattr(p, "_z3_optimizer", None) or getattr(p, "_zero_optimizer", None)
        if zero is not None and getattr(zero, "optimizer", None) is not None:
            return zero.optimizer
    return None


def _check_not_replaced(optimizer: Scion | None, members: list[list[torch.Tensor]]) -> None:
    if optimizer is None or _adopted(optimizer, members):
        return
    managed = [p for params in members for p in params if _zero_managed(p)]
    if not managed:
        return  # one process, DDP, or DeepSpeed stage 0: nothing of DeepSpeed's to compare with
    engine_optimizer = _engine_optimizer(managed)
    if engine_optimizer is optimizer or engine_optimizer in _ARMED:
        return  # another Scion over these parameters is the one being stepped; this one is a spare
    if engine_optimizer is None:
        # No back-link: accept if another Scion over these parameters was taken over by DeepSpeed.
        ids = {id(p) for p in managed}
        for other in list(_ARMED):
            if other is not optimizer and any(id(p) in ids for params in other._members for p in params) \
                    and _adopted(other, other._members):
                return
    stepped = type(engine_optimizer).__name__ if engine_optimizer is not None else "another optimizer"
    raise OptimizerReplacedError(
        f"disco_ds.Scion was built for these parameters, but DeepSpeed steps {stepped} for them instead, so "
        "training would silently run without Scion. Known causes: the Hugging Face Trainer discards "
        "Trainer(optimizers=(Scion(...), ...)) when TrainingArguments(deepspeed=...) is set and builds its default "
        "optimizer from args.optim; accelerate swaps a client optimizer for DeepSpeedCPUAdam when the DeepSpeed "
        "config offloads the optimizer without 'zero_force_ds_cpu_optimizer': false.\n" + SUPPORTED_ROUTES
    )


def watch_for_replacement(optimizer: Scion) -> None:
    """Arm the check that DeepSpeed steps ``optimizer`` (idempotent; :class:`disco_ds.Scion` arms it
    when constructed).

    A post-accumulate-grad hook on each parameter fires at the first backward pass, that is before
    the first optimizer step. If the parameters are then managed by a DeepSpeed ZeRO optimizer
    (stage 1/2/3, or the bf16 optimizer) that does not step this Scion (and no other Scion over the
    same parameters), it raises :class:`OptimizerReplacedError`, naming the supported routes. It
    removes all hooks after that first check. Not detectable: DeepSpeed stage 0 without bf16/fp16,
    where the engine leaves no trace on the parameters.
    """
    if getattr(optimizer, "_replacement_watch", None) is not None:
        return
    watch = _Watch(optimizer)
    optimizer._replacement_watch = watch
    _ARMED.add(optimizer)
    watch.arm()
