"""Scion as the optimizer of the Hugging Face ``Trainer`` and of ``accelerate``, with or without DeepSpeed.

Three ways hand Scion to a ``transformers.Trainer``; all of them work with and without
``TrainingArguments(deepspeed=...)`` at ZeRO 1/2/3:

1. ``Trainer(optimizer_cls_and_kwargs=scion_optimizer_cls_and_kwargs(model, lr))``, i.e.
   ``(disco_ds.Scion, {"params": disco_ds.scion_param_groups(model, lr), ...})``. The Trainer
   *pops* ``"params"`` from that dict when it builds the optimizer, so build a fresh dict for every
   Trainer (a second ``create_optimizer`` on the same dict would hand Scion the Trainer's default
   groups, which Scion refuses).
2. ``Trainer(optimizer_cls_and_kwargs=(ScionFactory, {"lr": lr, ...}))``: the transformers 5.x
   optimizer-factory protocol; the factory groups the model itself at every call, so the dict can
   be reused.
3. :class:`ScionTrainer`: a ``Trainer`` whose ``create_optimizer`` builds the groups from the model,
   with the per-role lr ratios taken from :class:`ScionTrainingArguments` fields or from keyword
   arguments.

``Trainer(optimizers=(Scion(...), None))`` works without DeepSpeed only: under DeepSpeed the
Trainer drops that object and builds its default optimizer (AdamW) from ``args.optim``. Every Scion
watches for this (:func:`watch_for_replacement`): at the first backward pass it checks that
DeepSpeed is stepping it, and raises :class:`OptimizerReplacedError`, naming the supported routes,
if a ZeRO engine steps another optimizer for its parameters. :class:`ScionTrainer` refuses the
combination already when it is constructed.

Gradient clipping is off by default (:class:`ScionTrainingArguments` sets ``max_grad_norm=0`` and
the shipped DeepSpeed configs ``gradient_clipping: 0.0``): Scion's step length is ``lr·ρ`` whatever
the gradient's size, because every LMO is scale-invariant, so clipping buys no protection against
large steps; it only re-weights the momentum average towards small-gradient batches, which the
paper's recipe does not do, and costs a global norm all-reduce per step.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainingArguments
from transformers.utils import logging

from disco_ds.integrations.deepspeed_config import check_deepspeed_config
from disco_ds.optim import Scion, scion_param_groups
from disco_ds.optim.replacement import SUPPORTED_ROUTES, OptimizerReplacedError, watch_for_replacement

__all__ = [
    "OptimizerReplacedError",
    "ScionFactory",
    "ScionTrainer",
    "ScionTrainingArguments",
    "SUPPORTED_ROUTES",
    "build_scion",
    "scion_optimizer_cls_and_kwargs",
    "split_scion_kwargs",
    "watch_for_replacement",
]

logger = logging.get_logger(__name__)

# ---------------------------------------------------------------------------- building Scion

_GROUP_KEYS = frozenset(inspect.signature(scion_param_groups).parameters) - {"model", "lr"}
_OPTIMIZER_KEYS = frozenset(inspect.signature(Scion.__init__).parameters) - {"self", "params", "lr"} - _GROUP_KEYS
_RATIO_KEYS = ("embedding_lr_ratio", "hidden_lr_ratio", "output_lr_ratio")
_DEFAULT_RATIOS = tuple(inspect.signature(scion_param_groups).parameters["lr_ratios"].default)


def split_scion_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split keyword arguments into those of :func:`disco_ds.scion_param_groups` and those of the
    :class:`disco_ds.Scion` constructor.

    Besides the keys of those two functions it accepts ``embedding_lr_ratio``, ``hidden_lr_ratio``
    and ``output_lr_ratio``, each replacing one entry of ``lr_ratios``; ``comm_dtype`` may be a
    name such as ``"float32"``.

    Raises:
        TypeError: for a key neither function accepts, listing the accepted ones.
    """
    group_kwargs: dict[str, Any] = {}
    optimizer_kwargs: dict[str, Any] = {}
    ratios = list(kwargs.get("lr_ratios", _DEFAULT_RATIOS))
    for key, value in kwargs.items():
        if key in _RATIO_KEYS:
            ratios[_RATIO_KEYS.index(key)] = float(value)
        elif key == "lr_ratios":
            continue
        elif key in _GROUP_KEYS:
            group_kwargs[key] = value
        elif key in _OPTIMIZER_KEYS:
            optimizer_kwargs[key] = getattr(torch, value) if key == "comm_dtype" and isinstance(value, str) else value
        else:
            accepted = sorted(_GROUP_KEYS | _OPTIMIZER_KEYS | set(_RATIO_KEYS))
            raise TypeError(f"unknown Scion argument {key!r}; accepted: {accepted}")
    if len(ratios) != 3:
        raise ValueError(f"lr_ratios must be (embedding, hidden, output), got {tuple(ratios)}")
    group_kwargs["lr_ratios"] = tuple(float(r) for r in ratios)
    return group_kwargs, optimizer_kwargs


def build_scion(model: nn.Module, lr: float, **kwargs: Any) -> Scion:
    """``Scion(scion_param_groups(model, lr, ...), ...)`` from one set of keyword arguments
    (split by :func:`split_scion_kwargs`); ``lr`` is the base learning rate η."""
    group_kwargs, optimizer_kwargs = split_scion_kwargs(kwargs)
    return Scion(scion_param_groups(model, lr, **group_kwargs), **optimizer_kwargs)


def scion_optimizer_cls_and_kwargs(model: nn.Module, lr: float, **kwargs: Any) -> tuple[type[Scion], dict[str, Any]]:
    """Route 1: a fresh ``(Scion, {"params": groups, ...})`` for ``Trainer(optimizer_cls_and_kwargs=...)``.

    The Trainer pops ``"params"`` from the dict when it builds the optimizer, so call this once per
    Trainer. Under ZeRO-3 with ``zero.Init`` (model built after ``TrainingArguments(deepspeed=...)``)
    the groups are classified by ``ds_shape``, so call it after building the model.
    """
    group_kwargs, optimizer_kwargs = split_scion_kwargs(kwargs)
    return Scion, {"params": scion_param_groups(model, lr, **group_kwargs), **optimizer_kwargs}


class ScionFactory:
    """Route 2: the transformers 5.x optimizer factory.

    ``Trainer(optimizer_cls_and_kwargs=(ScionFactory, {"lr": 0.02, "lr_ratios": (1, 1/8, 1)}))``:
    the Trainer calls ``ScionFactory()(model, **kwargs)``, which groups the model by role
    (:func:`disco_ds.scion_param_groups`) and returns a :class:`disco_ds.Scion`. ``lr`` is required
    (the Trainer does not pass ``TrainingArguments.learning_rate`` to factories; give the same
    number); every other key goes to :func:`split_scion_kwargs`. The dict is not modified, so one
    dict serves any number of Trainers. transformers 4.x has no factory protocol: use route 1 or
    :class:`ScionTrainer` there.
    """

    def __call__(self, model: nn.Module, **kwargs: Any) -> Scion:
        if "lr" not in kwargs:
            raise TypeError(
                "ScionFactory needs 'lr' in the kwargs of optimizer_cls_and_kwargs (the Trainer does not pass "
                "TrainingArguments.learning_rate to optimizer factories): (ScionFactory, {'lr': ..., ...})"
            )
        return build_scion(model, **kwargs)


# ---------------------------------------------------------------------------- ScionTrainer


@dataclass
class ScionTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with Scion's defaults: clipping off, and the per-role lr ratios.

    ``learning_rate`` is the base η (the embedding and output groups' rate with the default
    ratios); ``weight_decay`` is Scion's ``(1 − lr·wd)`` decay (0 unconstrained, 1 constrained).
    """

    max_grad_norm: float = field(
        default=0.0,
        metadata={"help": "Gradient clipping threshold; 0 (off) for Scion, whose step length is lr·ρ whatever the "
                          "gradient's size (every LMO is scale-invariant)."},
    )
    embedding_lr_ratio: float = field(default=_DEFAULT_RATIOS[0], metadata={"help": "lr multiplier of the token embedding."})
    hidden_lr_ratio: float = field(default=_DEFAULT_RATIOS[1], metadata={"help": "lr multiplier of the hidden matrices."})
    output_lr_ratio: float = field(default=_DEFAULT_RATIOS[2], metadata={"help": "lr multiplier of the output head."})
    vector_lr_ratio: float | None = field(
        default=None, metadata={"help": "lr multiplier of gains and biases; default: hidden_lr_ratio."})
    scion_momentum: float = field(
        default=0.1, metadata={"help": "Scion momentum m = 1 - beta (0.1 ~ beta 0.9; 1 = no momentum)."})

    def scion_kwargs(self) -> dict[str, Any]:
        """The Scion keyword arguments these fields describe."""
        out: dict[str, Any] = {
            "lr_ratios": (self.embedding_lr_ratio, self.hidden_lr_ratio, self.output_lr_ratio),
            "momentum": self.scion_momentum,
        }
        if self.vector_lr_ratio is not None:
            out["vector_lr_ratio"] = self.vector_lr_ratio
        return out


class ScionTrainer(Trainer):
    """Route 3: a ``Trainer`` whose ``create_optimizer`` builds :class:`disco_ds.Scion` from the model.

    The groups come from :func:`disco_ds.scion_param_groups` with ``lr = args.learning_rate`` and
    ``weight_decay = args.weight_decay`` (Scion's decoupled ``(1 − lr·wd)`` decay, on every group). Scion's other settings, lowest precedence first: the
    fields of :class:`ScionTrainingArguments` (when ``args`` is one), then ``scion_kwargs``, then
    ``lr_ratios`` / ``vector_lr_ratio`` given here.

    Args:
        lr_ratios: ``(embedding, hidden, output)`` multipliers of the learning rate.
        vector_lr_ratio: multiplier for gains and biases (default: the hidden ratio).
        scion_kwargs: any other key of :func:`disco_ds.scion_param_groups` or :class:`disco_ds.Scion`
            (``momentum``, ``ns_method``, ``norms``, ``roles``, ``comm_dtype``, ...).
        *args, **kwargs: those of ``transformers.Trainer``.

    Raises:
        ValueError: with ``optimizer_cls_and_kwargs`` (the Trainer would use that instead), or with a
            DeepSpeed config under which DeepSpeed would not step Scion (see
            :func:`disco_ds.integrations.deepspeed_config.check_deepspeed_config`).
        OptimizerReplacedError: with ``optimizers=(optimizer, ...)`` under DeepSpeed, which the
            Trainer would silently discard.
    """

    def __init__(
        self,
        *args: Any,
        lr_ratios: Sequence[float] | None = None,
        vector_lr_ratio: float | None = None,
        scion_kwargs: Mapping[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        if kwargs.get("optimizer_cls_and_kwargs") is not None:
            raise ValueError(
                "ScionTrainer builds Scion itself; do not pass optimizer_cls_and_kwargs (use a plain Trainer for that "
                "route, or give Scion settings through scion_kwargs=...)"
            )
        super().__init__(*args, **kwargs)
        merged: dict[str, Any] = {}
        if isinstance(self.args, ScionTrainingArguments):
            merged.update(self.args.scion_kwargs())
        merged.update(scion_kwargs or {})
        if lr_ratios is not None:
            merged["lr_ratios"] = tuple(lr_ratios)
        if vector_lr_ratio is not None:
            merged["vector_lr_ratio"] = vector_lr_ratio
        for key in ("lr", "params"):
            if key in merged:
                raise TypeError(f"ScionTrainer takes {key!r} from TrainingArguments/the model, not from scion_kwargs")
        split_scion_kwargs(merged)  # unknown keys fail now, not at train()
        self.scion_kwargs = merged
        self._check_scion_setup()

    def _check_scion_setup(self) -> None:
        if self.is_deepspeed_enabled:
            if self.optimizer is not None:
                raise OptimizerReplacedError(
                    f"ScionTrainer got optimizers=({type(self.optimizer).__name__}(...), ...) together with DeepSpeed: "
                    "the Trainer discards that object under DeepSpeed and builds its own optimizer. Drop the "
                    "optimizers argument: ScionTrainer builds Scion from the model itself.\n" + SUPPORTED_ROUTES
                )
            config = dict(self.accelerator.state.deepspeed_plugin.deepspeed_config)
            # The Trainer sets zero_allow_untested_optimizer itself before DeepSpeed starts.
            config["zero_allow_untested_optimizer"] = True
            check_deepspeed_config(config)
        if self.args.max_grad_norm and self.args.max_grad_norm > 0:
            logger.warning(
                "ScionTrainer: max_grad_norm=%s clips gradients before Scion's LMO. Scion's step length is lr·ρ "
                "whatever the gradient's size, so clipping only re-weights the momentum average; the paper's recipe "
                "runs without it. Set max_grad_norm=0 (ScionTrainingArguments does) unless you mean it.",
                self.args.max_grad_norm,
            )

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """Build Scion from ``model`` (default ``self.model``) unless an optimizer is already set."""
        if self.optimizer is None:
            opt_model = self.model if model is None else model
            kwargs = {"weight_decay": self.args.weight_decay, **self.scion_kwargs}
            self.optimizer = build_scion(opt_model, lr=self.args.learning_rate, **kwargs)
        return self.optimizer
