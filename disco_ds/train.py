"""The pretraining loop: NormGPT on token shards, in the DeepSpeed engine, with Scion (or AdamW).

``python -m disco_ds train RECIPE [key=value ...]`` runs :func:`train` in one process; under the
launcher (``deepspeed --num_gpus N --module disco_ds train RECIPE``) every rank runs it. One
optimizer step is ``accumulation`` micro-batches per rank; the learning rate of every group
follows the WSD schedule times its role's peak; the SPEC 4 norms come from inside Scion's step.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from disco_ds.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from disco_ds.config import RunConfig, to_dict
from disco_ds.data import TokenStream, eval_batches, list_shards
from disco_ds.deepspeed_config import check_deepspeed_config
from disco_ds.metrics import MetricsLogger, flops_per_token, memory_gib
from disco_ds.optim import Scion
from disco_ds.param_groups import classify_parameters, scion_param_groups
from disco_ds.tensor_parallel import autotp_config
from disco_ds.scaling import Plan, format_plan, plan_run
from disco_ds.schedule import wsd_factor
from models.norm_gpt.configuration_norm_gpt import NormGPTConfig
from models.norm_gpt.modeling_norm_gpt import NormGPTForCausalLM

__all__ = ["train", "NonFiniteLoss", "deepspeed_config", "build_model_config"]

# Keys of the DeepSpeed config that the recipe owns: a user JSON may not contradict the plan.
PLAN_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; the run stopped before saving anything from that step."""


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    """The engine's config, generated from the recipe: no optimizer section (the optimizer is our
    object), clipping off (SPEC 3: Scion's LMO is scale-invariant and the paper trains without
    clipping), then the keys of ``train.deepspeed`` (a JSON file) on top."""
    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.accumulation,
        "train_batch_size": plan.micro_batch * plan.accumulation * plan.world_size,
        "gradient_clipping": 0.0,
        "zero_optimization": {"stage": cfg.train.zero_stage},
        "bf16": {"enabled": cfg.train.bf16},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if cfg.train.deepspeed:
        path = Path(cfg.train.deepspeed)
        if not path.is_file():
            raise FileNotFoundError(f"train.deepspeed: {path} does not exist")
        user = json.loads(path.read_text())
        for key in PLAN_KEYS:
            if key in user and user[key] != config[key]:
                raise ValueError(f"{path}: {key}={user[key]!r} contradicts the recipe's plan ({config[key]!r}); "
                                 "set train.micro_batch / train.global_batch_tokens in the recipe instead")
        if user.get("zero_optimization", {}).get("stage", cfg.train.zero_stage) != cfg.train.zero_stage:
            raise ValueError(f"{path}: zero_optimization.stage contradicts train.zero_stage={cfg.train.zero_stage}")
        config = _merge(config, user)
    if cfg.optimizer.name == "scion":
        check_deepspeed_config(config)
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


def _build_optimizer(cfg: RunConfig, model: torch.nn.Module, plan: Plan) -> torch.optim.Optimizer:
    o = cfg.optimizer
    if o.name == "scion":
        groups = scion_param_groups(model, lr=plan.lr, lr_ratios=tuple(o.lr_ratios), vector_lr_ratio=o.vector_lr_ratio,
                                    momentum=o.momentum, weight_decay=o.weight_decay, ns_steps=o.ns_steps, ns_method=o.ns_method)
        return Scion(groups, comm_dtype=getattr(torch, o.comm_dtype))
    # AdamW, the paper's baseline: the same roles and per-role peak rates, the same schedule.
    by_role: dict[str, list[torch.nn.Parameter]] = {}
    for _, (role, p) in classify_parameters(model).items():
        by_role.setdefault(role, []).append(p)
    groups = [{"params": ps, "role": role, "lr": plan.group_lrs[role]} for role, ps in by_role.items()]
    return torch.optim.AdamW(groups, betas=tuple(o.adamw_betas), eps=o.adamw_eps, weight_decay=o.weight_decay)


def _mean_over_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().reshape(1).cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return float(value)


def _loss(engine: Any, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = engine(input_ids=inputs).logits
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def _evaluate(engine: Any, files: list[Path], cfg: RunConfig, device: torch.device) -> float:
    engine.eval()
    total = torch.zeros(2, dtype=torch.float64)
    rank, world = _data_parallel_rank_and_size(cfg)
    for inputs, targets in eval_batches(files, cfg.data.seq_len, cfg.train.micro_batch, rank, world, cfg.eval.tokens):
        total[0] += float(_loss(engine, inputs.to(device), targets.to(device))) * targets.numel()
        total[1] += targets.numel()
    engine.train()
    if dist.get_world_size() > 1:
        dist.all_reduce(total)  # every TP rank adds the same numbers: the ratio is unchanged
    return float(total[0] / total[1])


def _data_parallel_rank_and_size(cfg: RunConfig) -> tuple[int, int]:
    """This rank's data-parallel rank and size: all ranks of one tensor-parallel group must read the
    same tokens (their row-parallel all-reduces add up partial results of the same inputs)."""
    if cfg.train.tp_size > 1:
        from deepspeed.utils import groups

        return groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
    return dist.get_rank(), dist.get_world_size()


def _single_process_defaults() -> None:
    """Without a launcher, run as a world of one (DeepSpeed would otherwise look for MPI)."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) the configured pretraining; returns the final step, losses and checkpoint.

    Raises:
        NonFiniteLoss: the loss became NaN/Inf; the newest checkpoint is the last good one.
        FileNotFoundError / ShardError: missing data, naming the file.
    """
    if not dist.is_initialized():
        _single_process_defaults()
        deepspeed.init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    tp = cfg.train.tp_size
    if world % tp:
        raise ValueError(f"train.tp_size={tp} does not divide the {world} launched ranks")
    # Data parallelism runs over model replicas: every TP group reads the same micro-batches.
    dp_world = world // tp
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.train.seed)

    data_dir = Path(cfg.data.path)
    if not (data_dir / "meta.json").is_file():
        raise FileNotFoundError(f"data.path: {data_dir / 'meta.json'} does not exist; write shards with "
                                f"`python -m disco_ds prepare --input ... --out {data_dir}`")
    meta = json.loads((data_dir / "meta.json").read_text())
    train_files = list_shards(str(data_dir / "train_*.bin"))
    val_files = list_shards(str(data_dir / "val_*.bin"))
    model_config = build_model_config(cfg, meta)
    plan = plan_run(cfg, dp_world)
    ds_config = deepspeed_config(cfg, plan)
    if tp > 1:
        ds_config["tensor_parallel"] = autotp_config(model_config, tp)
        # DeepSpeed 0.19.8 checks train_batch_size against micro × accumulation × *all* ranks before
        # AutoTP forms its groups; left out, it is derived. The plan above counts replicas only.
        ds_config.pop("train_batch_size", None)
    run_dir = cfg.run_path
    resolved = to_dict(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        print(yaml.safe_dump(resolved, sort_keys=False).rstrip(), flush=True)
        print(format_plan(cfg, plan), flush=True)
        print(f"model       {model_config.describe()}", flush=True)

    if cfg.train.zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = NormGPTForCausalLM(model_config)
    else:
        model = NormGPTForCausalLM(model_config)
    if cfg.model.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    # DeepSpeed gets a factory it calls once the model is final: AutoTP replaces the weights by
    # their shards inside deepspeed.initialize, and the optimizer must hold what is stepped.
    engine, _, _, _ = deepspeed.initialize(model=model, config=ds_config,
                                           optimizer=lambda _params: _build_optimizer(cfg, model, plan))
    optimizer = engine.basic_optimizer  # ours (Scion or AdamW), not DeepSpeed's ZeRO wrapper
    peaks = [float(g["lr"]) for g in optimizer.param_groups]

    dp_rank, _ = _data_parallel_rank_and_size(cfg)
    stream = TokenStream(train_files, cfg.data.seq_len, cfg.train.micro_batch, dp_rank, dp_world, seed=cfg.data.seed)
    step, tokens = 0, 0
    resume_from = None
    if cfg.checkpoint.resume == "auto":
        resume_from = latest_checkpoint(run_dir)
    elif cfg.checkpoint.resume != "none":
        resume_from = Path(cfg.checkpoint.resume)
    if resume_from is not None:
        state = load_checkpoint(engine, resume_from)
        step, tokens = int(state["step"]), int(state["tokens"])
        stream.load_state_dict(state["data"])
        if rank == 0:
            print(f"resumed     {resume_from} (step {step}, {tokens:,} tokens)", flush=True)

    counts = model_config.parameter_counts()
    flops = flops_per_token(counts["non_embedding"] + counts["head"], model_config.n_layer, model_config.d_model, cfg.data.seq_len)
    peak_flops = cfg.logging.peak_tflops * 1e12 * world
    wandb = None
    if cfg.logging.wandb:
        wandb = {"project": cfg.logging.wandb_project, "name": cfg.train.name, "mode": cfg.logging.wandb_mode,
                 "dir": str(run_dir), "config": resolved}
    logger = MetricsLogger(run_dir, plan.run_steps, log_interval=cfg.logging.interval, enabled=rank == 0,
                           wandb=wandb, resume_step=step)
    tokenizer_dir = data_dir / "tokenizer"
    scion = isinstance(optimizer, Scion)
    last_checkpoint = resume_from
    loss_value = val_loss = float("nan")

    def checkpoint() -> Path:
        trainer_state = {"step": step, "tokens": tokens, "data": stream.state_dict(), "world_size": world,
                         "batch_tokens": plan.batch_tokens, "loss": loss_value}
        return save_checkpoint(engine, run_dir, step, trainer_state, resolved, model_config,
                               tokenizer_dir if tokenizer_dir.is_dir() else None, cfg.checkpoint.keep)

    while step < plan.run_steps:
        factor = wsd_factor(step, plan.steps, cfg.schedule.warmup, cfg.schedule.decay, cfg.schedule.decay_shape,
                            cfg.schedule.min_lr_ratio)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * factor
        if scion:
            optimizer.track_norms = step % cfg.logging.norms_interval == 0
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        for _ in range(plan.accumulation):
            inputs, targets = stream.next_batch()
            loss = _loss(engine, inputs.to(device), targets.to(device))
            engine.backward(loss)
            engine.step()
            loss_sum += loss.detach()
        loss_value = _mean_over_ranks(loss_sum / plan.accumulation)
        step += 1
        tokens += plan.batch_tokens
        if not math.isfinite(loss_value):
            message = (f"loss is {loss_value} at step {step}: stopping. The newest checkpoint "
                       f"({last_checkpoint or 'none yet'}) is the last good one and was not touched.")
            if rank == 0:
                print(message, flush=True)
            raise NonFiniteLoss(message)
        elapsed = time.perf_counter() - start
        metrics: dict[str, float] = {"loss": loss_value, "tokens": float(tokens),
                                     "tokens_per_s": plan.batch_tokens / elapsed,
                                     "memory_gib": memory_gib()}
        metrics["mfu"] = flops * metrics["tokens_per_s"] / peak_flops if peak_flops > 0 else 0.0
        for group in optimizer.param_groups:
            metrics[f"lr/{group['role']}"] = float(group["lr"])
        if scion:
            metrics.update(optimizer.pop_metrics())
        logger.log(step, metrics)

        last = step == plan.run_steps
        if (cfg.eval.interval and step % cfg.eval.interval == 0) or last:
            val_loss = _evaluate(engine, val_files, cfg, device)
            logger.log_eval(step, {"loss": val_loss})
        if (cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or last:
            last_checkpoint = checkpoint()
    logger.close()
    return {"step": step, "tokens": tokens, "loss": loss_value, "val_loss": val_loss,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None, "run_dir": str(run_dir)}
