"""What a run trains, built from the recipe: the DeepSpeed engine's config, the NormGPT config and
model (the same initial weights at every ZeRO stage), the optimizer (Scion or AdamW) and the engine
around them.

:func:`~disco_ds.trainer.loop.train` builds them once at startup and checks :func:`engine_config`
before the process group starts; ``disco_ds recipe``'s memory estimate
(:mod:`disco_ds.trainer.memory`) and the engine tests build the same objects without the loop.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from collections.abc import Callable
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from disco_ds.trainer.config import RunConfig
from disco_ds.integrations.deepspeed_config import check_deepspeed_config, gradient_dtype_keys, lookup, resolve_auto
from disco_ds.optim import Scion
from disco_ds.optim.newton_schulz import compile_iteration
from disco_ds.optim.param_groups import classify_parameters, scion_param_groups
from disco_ds.distributed.tensor_parallel import autotp_config
from disco_ds.integrations.pipeline import NormGPTPipeline, build_pipeline
from disco_ds.trainer.scaling import Plan
from disco_ds.models.norm_gpt.configuration_norm_gpt import NormGPTConfig
from disco_ds.models.norm_gpt.modeling_norm_gpt import NormGPTForCausalLM

__all__ = ["OWNED_KEYS", "deepspeed_config", "engine_config", "build_model_config", "communication_device", "model_roles", "build_model",
           "build_engine"]

# Keys of the DeepSpeed config that the recipe owns, with the recipe keys that set them: a user JSON
# may leave them out, set them to "auto" or repeat the recipe's value, never contradict it.
OWNED_KEYS = {
    "train_batch_size": "train.micro_batch / train.global_batch_tokens",
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.micro_batch / train.global_batch_tokens",
    "zero_optimization.stage": "train.zero_stage",
    "bf16.enabled": "train.bf16",
    "fp16.enabled": "train.bf16 (the trainer runs bf16 or fp32)",
    "data_types.grad_accum_dtype": "train.grad_dtype",
    "communication_data_type": "train.grad_dtype",
}
_MISSING = object()


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    """The engine's config, generated from the recipe: no optimizer section (the optimizer is our
    object), clipping off (SPEC 3: Scion's LMO is scale-invariant and the paper trains without
    clipping), gradients accumulated and reduced in ``train.grad_dtype``, then the keys of
    ``train.deepspeed`` (a JSON file) on top.

    The JSON may be one of the Hugging Face templates in ``recipes/deepspeed/``: its ``"auto"``
    values take the recipe's (batch sizes, precision) or DeepSpeed's defaults (bucket sizes), see
    :func:`~disco_ds.integrations.deepspeed_config.resolve_auto`.

    Raises:
        FileNotFoundError: ``train.deepspeed`` does not exist.
        ValueError: the JSON contradicts a key the recipe owns (naming both), or the config would
            not run Scion (:func:`~disco_ds.integrations.deepspeed_config.check_deepspeed_config`).
    """
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.micro_batch * plan.accumulation * plan.world_size,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.bf16},
        "fp16": {"enabled": False},
        **gradient_dtype_keys(cfg.train.grad_dtype),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.train.deepspeed:
        path = Path(cfg.train.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed: {path} does not exist")
        user = resolve_auto(json.loads(path.read_text()), config)
        for key, owner in OWNED_KEYS.items():
            theirs, ours = lookup(user, key, _MISSING), lookup(config, key, _MISSING)
            if theirs is not _MISSING and theirs != ours:
                raise ValueError(f"{path}: {key}={theirs!r} contradicts the recipe's plan ({ours!r}); "
                                 f"set {owner} in the recipe instead (or \"auto\" in the JSON)")
        config = _merge(config, user)
    if cfg.optimizer.name == "scion":
        check_deepspeed_config(config)
        if _skips_gradient_norm(config):
            config["zero_optimization"].setdefault("compute_grad_norm", False)
    return config


def _skips_gradient_norm(config: dict[str, Any]) -> bool:
    """Whether DeepSpeed's gradient-norm pass can be switched off: without clipping nothing reads
    it (Scion's LMO is scale-invariant), yet ZeRO-1/2 spend a pass over the gradient partition
    and an all-reduce on it every step. DeepSpeed 0.19.8 accepts ``compute_grad_norm: false`` only
    at ZeRO-1/2 without optimizer offload, and not where stage 1 with a bf16 model and float32
    gradient accumulation runs its ``BF16_Optimizer``."""
    stage = lookup(config, "zero_optimization.stage", 0)
    offload = lookup(config, "zero_optimization.offload_optimizer.device", "none")
    bf16_optimizer = (stage == 1 and lookup(config, "bf16.enabled", False)
                      and lookup(config, "data_types.grad_accum_dtype", None) == "fp32")
    return stage in (1, 2) and not config.get("gradient_clipping") and offload in (None, "none") and not bf16_optimizer


def engine_config(cfg: RunConfig, plan: Plan, model_config: NormGPTConfig) -> dict[str, Any]:
    """:func:`deepspeed_config` plus what tensor parallelism adds: the config the trainer's engine gets."""
    config = deepspeed_config(cfg, plan)
    if cfg.train.tp_size > 1:
        config["tensor_parallel"] = autotp_config(model_config, cfg.train.tp_size)
        # DeepSpeed 0.19.8 checks train_batch_size against micro × accumulation × *all* ranks before
        # AutoTP forms its groups; left out, it is derived. The plan counts replicas only.
        config.pop("train_batch_size", None)
    return config


def build_model_config(cfg: RunConfig, meta: dict[str, Any]) -> NormGPTConfig:
    """The NormGPT config: the preset, the recipe's overrides, and a vocabulary that covers the
    data's tokenizer (rounded up to a multiple of 64 unless the recipe fixes ``vocab_size``)."""
    overrides = dict(cfg.model.overrides)
    data_vocab = int(meta["vocab_size"])
    overrides.setdefault("vocab_size", 64 * math.ceil(data_vocab / 64))
    if overrides["vocab_size"] < data_vocab:
        raise ValueError(f"model.overrides.vocab_size={overrides['vocab_size']} is smaller than the data's vocabulary ({data_vocab})")
    return NormGPTConfig.from_preset(cfg.model.preset, **overrides)


def model_roles(model_config: NormGPTConfig) -> list[str]:
    """The optimizer roles (:func:`~disco_ds.optim.param_groups.classify_parameters`) of the
    model's parameters, in order of first appearance: what the trainer logs a learning rate for
    (under a pipeline a stage's optimizer holds only some of them)."""
    with torch.device("meta"):
        model = NormGPTForCausalLM(model_config)
    return list(dict.fromkeys(role for role, _ in classify_parameters(model).values()))


def _build_optimizer(cfg: RunConfig, model: torch.nn.Module, plan: Plan) -> torch.optim.Optimizer:
    """Scion (or AdamW) over ``model``'s parameters: under a pipeline, this stage's only, and the
    replicas Scion agrees with are the stage's data-parallel ranks, not the world."""
    o = cfg.optimizer
    if o.name == "scion":
        groups = scion_param_groups(model, lr=plan.lr, lr_ratios=tuple(o.lr_ratios), vector_lr_ratio=o.vector_lr_ratio,
                                    momentum=o.momentum, weight_decay=o.weight_decay, ns_steps=o.ns_steps, ns_method=o.ns_method,
                                    ns_gram=o.ns_gram)
        stage_group = None
        if isinstance(model, NormGPTPipeline):
            # Hugging Face names, as in a one-stage run: the monitor seeds its power iteration from
            # them, per-matrix counters and messages use them.
            for group in groups:
                group["param_names"] = [model.hf_name(name) for name in group["param_names"]]
            stage_group = model._grid.get_data_parallel_group()
        return Scion(groups, comm_dtype=getattr(torch, o.comm_dtype), process_group=stage_group)
    # AdamW, the paper's baseline: the same roles and per-role peak rates, the same schedule.
    by_role: dict[str, list[torch.nn.Parameter]] = {}
    for _, (role, p) in classify_parameters(model).items():
        by_role.setdefault(role, []).append(p)
    groups = [{"params": ps, "role": role, "lr": plan.group_lrs[role]} for role, ps in by_role.items()]
    return torch.optim.AdamW(groups, betas=tuple(o.adamw_betas), eps=o.adamw_eps, weight_decay=o.weight_decay)


def communication_device() -> torch.device:
    """This rank's accelerator (the CPU on a CPU-only machine), made current: the device of the
    engine, of every tensor the trainer hands to a collective and of the model's initialisation."""
    accelerator = get_accelerator()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    accelerator.set_device(local_rank)
    return torch.device(accelerator.device_name(local_rank))


def _initialise_weights(model: NormGPTForCausalLM, seed: int, device: torch.device) -> None:
    """NormGPT's own init (``_init_weights``: the Scion geometry), module by module, from the
    generators reseeded with ``seed``. A ZeRO-3 weight is gathered whole around its init and rank
    0's values are partitioned back; a weight this rank does not hold (still on the meta device:
    another pipeline stage's) is allocated on ``device``, drawn and dropped, one at a time. Every
    rank draws the same numbers, so the generators stay in step across ranks and stages."""
    torch.manual_seed(seed)
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.nn.Parameter):
            continue
        if weight.is_meta:
            module.to_empty(device=device)
            model._init_weights(module)
            module.to(device="meta")
            continue
        gathered = (deepspeed.zero.GatheredParameters([weight], modifier_rank=0) if hasattr(weight, "ds_id")
                    else contextlib.nullcontext())
        with gathered:
            model._init_weights(module)


def build_model(cfg: RunConfig, model_config: NormGPTConfig, ds_config: dict[str, Any],
                device: torch.device) -> NormGPTForCausalLM:
    """The NormGPT the engine trains, with the same initial weights bit for bit at every ZeRO stage.

    ZeRO-3 builds the model inside ``deepspeed.zero.Init``, where each parameter is already an
    empty partition when the model's ``post_init`` runs: Hugging Face's init sees nothing to
    initialise. Stages 0–2 build it on the meta device (no init at all, nothing allocated twice)
    and allocate it on ``device``. Either way the init then runs here on whole weights on
    ``device``, from generators reseeded with ``train.seed``, so the weights depend on the seed
    and the device type only, not on what construction drew from the global generator.
    """
    if cfg.train.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = NormGPTForCausalLM(model_config)
    else:
        with torch.device("meta"):
            model = NormGPTForCausalLM(model_config)
        model.to_empty(device=device)
    _initialise_weights(model, cfg.train.seed, device)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    return model


def build_engine(cfg: RunConfig, model_config: NormGPTConfig, plan: Plan, ds_config: dict[str, Any],
                 device: torch.device, phase_done: Callable[[str], None] | None = None) -> tuple[Any, torch.optim.Optimizer]:
    """``(engine, optimizer)``: the DeepSpeed engine around :func:`build_model`'s model (with
    ``train.pp_size > 1``: DeepSpeed's pipeline engine around this rank's stage,
    :func:`~disco_ds.integrations.pipeline.build_pipeline`) and our optimizer (Scion or AdamW, not DeepSpeed's ZeRO wrapper around it). With ``train.compile`` the
    model and Newton–Schulz are ``torch.compile``-d (compiled at their first call). ``phase_done``
    is called with the name of each finished phase (model built, engine ready)."""
    phase_done = phase_done or (lambda _phase: None)
    model: torch.nn.Module
    if cfg.train.pp_size > 1:
        # The whole model on the meta device; the pipeline allocates this rank's stage of it, and
        # the init draws every stage's weights in the one-stage order.
        with torch.device("meta"):
            whole = NormGPTForCausalLM(model_config)
        model = build_pipeline(whole, pp_size=cfg.train.pp_size, world_size=dist.get_world_size(), device=device,
                               document_mask=cfg.data.document_mask, partition_method=cfg.pipeline.partition_method,
                               activation_checkpoint_interval=cfg.pipeline.activation_checkpoint_interval)
        _initialise_weights(whole, cfg.train.seed, device)
    else:
        model = build_model(cfg, model_config, ds_config, device)
    phase_done("model built")
    # DeepSpeed gets a factory it calls once the model is final: AutoTP replaces the weights by
    # their shards inside deepspeed.initialize, and the optimizer must hold what is stepped.
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           optimizer=lambda _params: _build_optimizer(cfg, model, plan))
    if cfg.train.compile:
        # The engine compiles its module in place (nn.Module.compile): parameter names, hence
        # checkpoints and exports, stay the eager model's, and ZeRO's hooks stay on the module.
        engine.compile()
        compile_iteration()
    phase_done("engine ready")
    return engine, engine.basic_optimizer
