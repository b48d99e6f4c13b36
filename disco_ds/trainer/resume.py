"""Resume that never silently changes the run.

Every checkpoint records the run it belongs to (:func:`run_record`: the plan, the schedule and the
optimizer's hyperparameters) in ``trainer_state.json``. Resuming compares that record with the
run being started (:func:`plan_resume`): any difference is refused, listing the old and the new
values, unless ``checkpoint.allow_change=true``, and then every change is logged.

The plan keeps the checkpoint's batch: a recipe that leaves ``train.global_batch_tokens`` as it
was gets the checkpoint's batch in tokens, so at another world size only the accumulation changes,
and with it nothing else (the same B and D give the same η and the same number of steps). A
different world size, ZeRO stage, tensor- or pipeline-parallel size cannot read DeepSpeed's sharded
files; it loads the checkpoint's portable file (:mod:`disco_ds.integrations.reshard`) instead (not
across tensor parallelism).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disco_ds.trainer.checkpoint import PORTABLE, CheckpointError
from disco_ds.trainer.config import RunConfig
from disco_ds.trainer.scaling import Plan, plan_run

__all__ = ["run_record", "plan_resume", "Resume", "LAYOUT_KEYS"]

LAYOUT_KEYS = ("plan.world_size", "train.tp_size", "train.pp_size", "train.zero_stage")
"""Record keys whose change makes DeepSpeed's sharded files unreadable (the portable file is loaded)."""


def run_record(cfg: RunConfig, plan: Plan) -> dict[str, Any]:
    """What defines the run, flat: ``plan.*`` derived values, the other keys as in the recipe.

    Left out, because they may change between a run's sessions without changing its trajectory:
    ``train.max_steps``, paths and names, logging, evaluation, checkpointing, the scaling anchor
    (it acts only through ``plan.lr`` and ``plan.batch_tokens``, which are here), ``optimizer.lr``
    (likewise) and the initialisation seed (``train.seed``, used before step 0 only).
    """
    o, s, t = cfg.optimizer, cfg.schedule, cfg.train
    return {
        "plan.world_size": plan.world_size,
        "plan.micro_batch": plan.micro_batch,
        "plan.accumulation": plan.accumulation,
        "plan.seq_len": plan.seq_len,
        "plan.batch_tokens": plan.batch_tokens,
        "plan.tokens": plan.tokens,
        "plan.steps": plan.steps,
        "plan.lr": plan.lr,
        **{f"plan.lr.{role}": lr for role, lr in sorted(plan.group_lrs.items())},
        "train.global_batch_tokens": t.global_batch_tokens,
        "train.tp_size": t.tp_size,
        "train.pp_size": t.pp_size,
        "train.zero_stage": t.zero_stage,
        "train.bf16": t.bf16,
        "train.grad_dtype": t.grad_dtype,
        "schedule.warmup": s.warmup,
        "schedule.decay": s.decay,
        "schedule.decay_shape": s.decay_shape,
        "schedule.min_lr_ratio": s.min_lr_ratio,
        "optimizer.name": o.name,
        "optimizer.momentum": o.momentum,
        "optimizer.lr_ratios": list(o.lr_ratios),
        "optimizer.vector_lr_ratio": o.vector_lr_ratio,
        "optimizer.weight_decay": o.weight_decay,
        "optimizer.ns_steps": o.ns_steps,
        "optimizer.ns_method": o.ns_method,
        "optimizer.ns_gram": o.ns_gram,
        "optimizer.comm_dtype": o.comm_dtype,
        "optimizer.adamw_betas": list(o.adamw_betas),
        "optimizer.adamw_eps": o.adamw_eps,
        "model.preset": cfg.model.preset,
        "model.overrides": dict(cfg.model.overrides),
        "data.seed": cfg.data.seed,
        "data.document_mask": cfg.data.document_mask,
    }


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10000:
        return f"{value:,}"
    return "(absent)" if value is _ABSENT else repr(value)


_ABSENT = object()


@dataclass
class Resume:
    """How a run resumes from one checkpoint."""

    path: Path
    state: dict[str, Any]
    """The checkpoint's ``trainer_state.json``."""
    plan: Plan
    """The plan the resumed run follows."""
    changes: list[str]
    """``key: old → new`` for every difference from the checkpoint's run (allowed ones only)."""
    relayout: bool
    """World size, ZeRO stage or tensor parallelism differ: load the portable file."""


def plan_resume(cfg: RunConfig, dp_world: int, path: Path, state: dict[str, Any]) -> Resume:
    """The resumed run's plan and its differences from the run that saved ``path``.

    Raises:
        CheckpointError: something differs and ``checkpoint.allow_change`` is false (listing every
            difference), or the layout differs and the checkpoint has no portable file.
    """
    old = state.get("run")
    if old is None:  # saved before run records: only the world size and batch were kept
        old = {"plan.world_size": state.get("world_size"), "plan.batch_tokens": state.get("batch_tokens")}
    plan = plan_run(cfg, dp_world)
    saved_batch = old.get("plan.batch_tokens")
    if (saved_batch and plan.batch_tokens != saved_batch
            and old.get("train.global_batch_tokens", cfg.train.global_batch_tokens) == cfg.train.global_batch_tokens):
        pinned = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_tokens=int(saved_batch)))
        plan = plan_run(pinned, dp_world)
    new = run_record(cfg, plan)
    changed = [key for key in old if old[key] != new.get(key, _ABSENT)]
    changes = [f"{key}: {_show(old[key])} → {_show(new.get(key, _ABSENT))}" for key in changed]
    if changes and not cfg.checkpoint.allow_change:
        raise CheckpointError(
            f"resuming {path} would change the run: {'; '.join(changes)}. Resume with the checkpoint's values, "
            "or set checkpoint.allow_change=true to continue with the new ones (each change is logged)")
    relayout = any(key in LAYOUT_KEYS for key in changed)
    if relayout:
        if cfg.train.tp_size > 1 or old.get("train.tp_size", 1) > 1 or cfg.optimizer.name != "scion":
            raise CheckpointError(f"resuming {path} at another world size, ZeRO stage, tensor- or pipeline-parallel size needs "
                                  "its portable file, which exists for Scion without tensor parallelism only; "
                                  f"resume with {', '.join(f'{k}={old.get(k)}' for k in LAYOUT_KEYS if k in old)}")
        if not (path / PORTABLE).is_file():
            raise CheckpointError(f"resuming {path} at another world size, ZeRO stage or pipeline-parallel size needs {path / PORTABLE}, "
                                  "which this checkpoint does not have (checkpoint.portable was false); resume "
                                  f"with {', '.join(f'{k}={old.get(k)}' for k in LAYOUT_KEYS if k in old)}")
    return Resume(path, state, plan, changes, relayout)
