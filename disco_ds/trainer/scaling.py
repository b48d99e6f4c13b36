"""Learning rate and batch size from the token budget: the η*/B* rules measured for Scion (SPEC 3).

    B*(D)    = B_ref · (D / D_ref)^0.45
    η*(B, D) = η_ref · (B / B_ref)^0.62 · (D / D_ref)^−0.56

``(η_ref, B_ref, D_ref)`` is the recipe's anchor (:class:`disco_ds.trainer.config.ScalingConfig`). The
batch is rounded to whole micro-batches on every rank, and η is evaluated at the batch actually
used, so a forced batch size still gets its matching learning rate. Per-group rates are
η · (input, hidden, output) ratios (1 : 1/8 : 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from disco_ds.trainer.config import ConfigError, RunConfig

__all__ = ["Plan", "plan_run", "data_parallel_size", "optimal_batch_tokens", "optimal_lr", "format_plan", "batch_warning"]

BATCH_TOLERANCE = 2.0
"""A batch within [B*/2, 2·B*] is close enough to B* not to be flagged."""


def optimal_batch_tokens(tokens: float, cfg: RunConfig) -> float:
    """B*(D) in tokens per optimizer step."""
    s = cfg.scaling
    return s.anchor_batch_tokens * (tokens / s.anchor_tokens) ** s.batch_exponent


def optimal_lr(batch_tokens: float, tokens: float, cfg: RunConfig) -> float:
    """η*(B, D) of the input/output layers."""
    s = cfg.scaling
    return s.anchor_lr * (batch_tokens / s.anchor_batch_tokens) ** s.lr_batch_exponent * (tokens / s.anchor_tokens) ** s.lr_tokens_exponent


@dataclass(frozen=True)
class Plan:
    """Everything the run derives from the recipe and the number of data-parallel ranks."""

    world_size: int
    seq_len: int
    micro_batch: int
    accumulation: int
    batch_tokens: int
    """B actually used: world · micro_batch · accumulation · seq_len."""
    batch_tokens_optimal: float
    """B*(D) before rounding (equals the recipe's forced B when it sets one)."""
    lr: float
    """η of the input and output layers."""
    group_lrs: dict[str, float]
    steps: int
    """Optimizer steps of the whole schedule: ceil(D / B)."""
    run_steps: int
    """Steps this run executes (``train.max_steps`` can stop earlier)."""
    tokens: float


def data_parallel_size(cfg: RunConfig, world_size: int) -> int:
    """Model replicas among ``world_size`` launched ranks: ``world_size / (train.tp_size ·
    train.pp_size)`` (every tensor-parallel group reads the same micro-batches; a replica's pipeline
    stages read one stream). The one rule ``train`` and ``recipe`` share.

    Raises:
        ConfigError: ``train.tp_size · train.pp_size`` does not divide ``world_size``.
    """
    tp, pp = cfg.train.tp_size, cfg.train.pp_size
    per_replica = tp * pp
    if world_size < 1 or world_size % per_replica:
        keys = " · ".join(k for k, v in (("train.tp_size", tp), ("train.pp_size", pp)) if v > 1) or "train.tp_size"
        raise ConfigError(f"{keys}={per_replica} does not divide the {world_size} launched ranks; "
                          f"accepted: a divisor of {world_size}, or launch a multiple of {per_replica} ranks")
    return world_size // per_replica


def plan_run(cfg: RunConfig, world_size: int) -> Plan:
    """Batch, accumulation, learning rates and steps for ``world_size`` data-parallel ranks."""
    t, seq = cfg.train, cfg.data.seq_len
    target = float(t.global_batch_tokens) if t.global_batch_tokens else optimal_batch_tokens(t.tokens, cfg)
    per_micro_step = world_size * t.micro_batch * seq
    accumulation = max(1, round(target / per_micro_step))
    batch = accumulation * per_micro_step
    lr = cfg.optimizer.lr if cfg.optimizer.lr is not None else optimal_lr(batch, t.tokens, cfg)
    r_in, r_hidden, r_out = cfg.optimizer.lr_ratios
    r_vec = cfg.optimizer.vector_lr_ratio if cfg.optimizer.vector_lr_ratio is not None else r_hidden
    group_lrs = {"embedding": lr * r_in, "hidden": lr * r_hidden, "output": lr * r_out, "vector": lr * r_vec}
    steps = max(1, math.ceil(t.tokens / batch))
    run_steps = min(steps, t.max_steps) if t.max_steps else steps
    return Plan(world_size, seq, t.micro_batch, accumulation, batch, target, lr, group_lrs, steps, run_steps, t.tokens)


def format_plan(cfg: RunConfig, plan: Plan) -> str:
    """The derivation as a person reads it (``disco_ds recipe``)."""
    s = cfg.scaling
    forced_batch = cfg.train.global_batch_tokens is not None
    forced_lr = cfg.optimizer.lr is not None
    lines = [
        f"anchor      η_ref = {s.anchor_lr:g} at B_ref = {s.anchor_batch_tokens:,} tokens, D_ref = {s.anchor_tokens:,.0f} tokens",
        f"            ({s.anchor_source or 'no source given'})",
        f"rules       B*(D) = B_ref·(D/D_ref)^{s.batch_exponent:g};  η*(B,D) = η_ref·(B/B_ref)^{s.lr_batch_exponent:g}·(D/D_ref)^{s.lr_tokens_exponent:g}",
        f"budget      D = {plan.tokens:,.0f} tokens",
        f"batch       B{' (forced)' if forced_batch else '*'} = {plan.batch_tokens_optimal:,.0f} tokens → "
        f"{plan.batch_tokens:,} = {plan.world_size} ranks × {plan.micro_batch} seq × {plan.accumulation} accumulation × {plan.seq_len} tokens",
        f"lr          η{' (forced)' if forced_lr else '*'} = {plan.lr:.4g}  (input {plan.group_lrs['embedding']:.4g}, "
        f"hidden {plan.group_lrs['hidden']:.4g}, output {plan.group_lrs['output']:.4g}, vectors {plan.group_lrs['vector']:.4g})",
        f"steps       {plan.steps:,} optimizer steps ({plan.steps * plan.batch_tokens:,} tokens)"
        + (f", this run stops after {plan.run_steps:,}" if plan.run_steps < plan.steps else ""),
        f"schedule    WSD: warmup {cfg.schedule.warmup:.0%}, decay {cfg.schedule.decay:.0%} ({cfg.schedule.decay_shape}) to "
        f"{cfg.schedule.min_lr_ratio:g}·η; optimizer {cfg.optimizer.name}, momentum {cfg.optimizer.momentum:g}",
    ]
    tp, pp = cfg.train.tp_size, cfg.train.pp_size
    if tp > 1 or pp > 1:
        kind = f"tensor parallel {tp}" if tp > 1 else f"{pp} pipeline stages"
        lines.insert(4, f"parallel    {plan.world_size * tp * pp} ranks = {plan.world_size} data-parallel replicas × {kind}")
    warning = batch_warning(cfg, plan)
    if warning:
        lines.append(f"warning     {warning}")
    return "\n".join(lines)


def batch_warning(cfg: RunConfig, plan: Plan) -> str | None:
    """Why the batch actually used is far from B*(D) (outside ½–2×) and what that does to η; None
    when it is close, or when the recipe forces the batch (then the distance is deliberate)."""
    if cfg.train.global_batch_tokens is not None:
        return None
    ratio = plan.batch_tokens / plan.batch_tokens_optimal
    if 1 / BATCH_TOLERANCE <= ratio <= BATCH_TOLERANCE:
        return None
    lr_at_optimum = optimal_lr(plan.batch_tokens_optimal, plan.tokens, cfg)
    if ratio > 1:
        cause = (f"the smallest step on {plan.world_size} data-parallel ranks is {plan.world_size} × {plan.micro_batch} seq × "
                 f"{plan.seq_len} tokens = {plan.world_size * plan.micro_batch * plan.seq_len:,}")
        fix = "fewer ranks or a smaller train.micro_batch bring it closer"
    else:
        cause = f"{plan.accumulation} accumulation steps round it down"
        fix = "a larger train.micro_batch or more ranks bring it closer"
    lr_note = ("η follows the batch used" if cfg.optimizer.lr is None
               else "η is forced by optimizer.lr and does not follow the batch")
    return (f"B = {plan.batch_tokens:,} tokens is {ratio:.3g}× B* = {plan.batch_tokens_optimal:,.0f}: {cause}. "
            f"{lr_note} (η = {plan.lr:.4g}, {plan.lr / lr_at_optimum:.3g}× η* at B* = {lr_at_optimum:.4g}) and "
            f"only {plan.steps:,} steps fit the budget; the rules were measured near B*, so expect a worse loss; {fix}")
