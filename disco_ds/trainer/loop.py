"""The pretraining loop: NormGPT on token shards, in the DeepSpeed engine, with Scion (or AdamW).

``python -m disco_ds train RECIPE [key=value ...]`` runs :func:`train` in one process; under the
launcher (``deepspeed --num_gpus N --module disco_ds train RECIPE``) every rank runs it. One
optimizer step is ``accumulation`` micro-batches per data-parallel rank (with ``train.pp_size > 1``
through DeepSpeed's pipeline schedule, :mod:`disco_ds.integrations.pipeline`); the learning rate of
every group follows the WSD schedule times its role's peak; the SPEC 4 norms come from inside
Scion's step (under a pipeline, each stage's, combined at the log points).
"""

from __future__ import annotations

import collections
import json
import math
import os
import socket
import time
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import Any

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
import yaml
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.pipe.engine import PipelineEngine

from disco_ds.trainer.checkpoint import PORTABLE, load_checkpoint, save_checkpoint, select_checkpoint
from disco_ds.trainer.build import build_engine, build_model_config, communication_device, engine_config, model_roles
from disco_ds.trainer.config import ConfigError, RunConfig, to_dict
from disco_ds.data import TokenStream, document_positions, eval_batches
from disco_ds.data.prefetch import DevicePrefetcher, to_device
from disco_ds.trainer.evaluation import eval_sample, readable_metrics
from disco_ds.trainer.guidance import NormGuide, reachable_norm
from disco_ds.trainer.metrics import OUTPUT_NORM, RUN_LOG, MetricsLogger, RunLog, flops_per_token, memory_gib
from disco_ds.optim import Scion
from disco_ds.optim.monitor import TOTALS, NormMonitor
from disco_ds.integrations.reshard import load_portable, save_portable
from disco_ds.trainer.resume import plan_resume, run_record
from disco_ds.trainer.preflight import DataCheck, check_data, check_resume, check_sampling, check_vocabulary, check_windows
from disco_ds.trainer.scaling import Plan, data_parallel_size, format_plan, plan_run
from disco_ds.trainer.schedule import wsd_factor
from disco_ds.models.norm_gpt.configuration_norm_gpt import NormGPTConfig

__all__ = ["train", "Diverged", "NonFiniteLoss", "default_max_loss"]


class Diverged(RuntimeError):
    """The loss exceeded ``train.max_loss``, rose by more than ``train.max_rise`` over
    ``train.rise_window`` steps, or became NaN/Inf (:class:`NonFiniteLoss`); the run stopped before
    saving anything from that step."""


class NonFiniteLoss(Diverged):
    """The loss became NaN or infinite; the run stopped before saving anything from that step."""


def default_max_loss(vocab_size: int) -> float:
    """``train.max_loss`` when the recipe leaves it null: 1.5·ln(V) + 1 (see :class:`~disco_ds.trainer.config.TrainConfig`)."""
    return 1.5 * math.log(vocab_size) + 1.0


def _rank0_print(rank: int) -> Callable[[str], None]:
    """``print`` on rank 0 (flushed: the launcher interleaves the ranks' output), nothing elsewhere."""
    return (lambda message: print(message, flush=True)) if rank == 0 else (lambda _message: None)


def _loss(engine: Any, inputs: torch.Tensor, targets: torch.Tensor, eot_id: int | None) -> torch.Tensor:
    """Mean next-token loss of a window; with ``eot_id`` (``data.document_mask``) every document in
    it attends only to itself. No KV cache: a forward in eval mode would otherwise keep one.

    The model computes the loss itself from its final hidden states, a chunk of tokens at a time
    (``return_logits=False``; ``shift_labels``: the targets are already the next tokens), so the
    float32 logits of the whole micro-batch never exist. It runs inside the engine's forward, so
    ZeRO-3 gathers the output layer's weight for it as for any other layer."""
    position_ids = document_positions(inputs, eot_id) if eot_id is not None else None
    return engine(input_ids=inputs, position_ids=position_ids, use_cache=False, labels=targets, shift_labels=targets,
                  return_logits=False).loss


@torch.no_grad()
def _evaluate(engine: Any, files: list[Path], cfg: RunConfig, device: torch.device, eot_id: int | None) -> float:
    """Mean validation loss over every rank's share of the validation windows. The sums stay on
    ``device`` (the communication device) until one all-reduce and one read at the end."""
    total = torch.zeros(2, dtype=torch.float64, device=device)  # loss·tokens, tokens
    rank, world = _data_parallel_rank_and_size(cfg, engine)
    windows = eval_batches(files, cfg.data.seq_len, cfg.train.micro_batch, rank, world, cfg.eval.tokens)
    if isinstance(engine, PipelineEngine):
        _evaluate_pipeline(engine, list(windows), device, eot_id, total)
    else:
        engine.eval()
        for inputs, targets in windows:
            total[0] += _loss(engine, to_device(inputs, device), to_device(targets, device), eot_id).double() * targets.numel()
            total[1] += targets.numel()
        engine.train()
    if dist.get_world_size() > 1:
        dist.all_reduce(total)  # TP ranks add the same numbers, pipeline stages other than the last zeros
    loss_tokens, count = total.tolist()
    return loss_tokens / count


def _evaluate_pipeline(engine: PipelineEngine, windows: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                       eot_id: int | None, total: torch.Tensor) -> None:
    """Add the validation windows of this pipeline's data-parallel rank to ``total`` (on the last
    stage; the other stages add nothing): all of them through the pipeline in one schedule."""
    batches = _pipeline_batches(((to_device(i, device), to_device(t, device)) for i, t in windows), eot_id)
    losses = engine.eval_batch(batches, reduce_output=None, bcast_loss=False, num_micro_batches=len(windows))
    engine.train()
    if engine.is_last_stage():
        for loss, (_, targets) in zip(losses, windows):
            total[0] += loss.double() * targets.numel()
            total[1] += targets.numel()


def _pipeline_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
                      eot_id: int | None) -> Iterator[tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """``((input_ids, position_ids), targets)`` micro-batches, what the pipeline engine feeds its
    first stage (the inputs) and its last (the targets): positions restart after every
    end-of-text with ``eot_id`` (``data.document_mask``), else count the window."""
    for inputs, targets in batches:
        if eot_id is not None:
            positions = document_positions(inputs, eot_id)
        else:
            positions = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
        yield (inputs, positions), targets


def _data_parallel_rank_and_size(cfg: RunConfig, engine: Any = None) -> tuple[int, int]:
    """This rank's data-parallel rank and size: all ranks of one tensor-parallel group, and all
    stages of one pipeline, must read the same tokens (a row-parallel all-reduce adds up partial
    results of the same inputs; the last stage's targets belong to the first stage's inputs)."""
    if isinstance(engine, PipelineEngine):
        return engine.grid.get_data_parallel_id(), engine.grid.get_data_parallel_world_size()
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


def _norm_guide(cfg: RunConfig, plan: Plan, model_config: NormGPTConfig, rank: int) -> tuple[NormGuide | None, Any]:
    """The run's norm guidance (``scaling.target_output_norm``; None when 0), and the output layer's
    learning rates summed from each step to the end. Warns at start when the schedule cannot lift
    ‖W_out‖_RMS→∞ from its init to the target: with radius 1 each update moves it by at most η."""
    target = cfg.scaling.target_output_norm
    if not target:
        return None, None
    s = cfg.schedule
    lrs = np.array([plan.group_lrs["output"] * wsd_factor(k, plan.steps, s.warmup, s.decay, s.decay_shape, s.min_lr_ratio)
                    for k in range(plan.steps)])
    left = np.append(np.cumsum(lrs[::-1])[::-1], 0.0)  # left[k]: Σ η over steps k..end
    reach = reachable_norm(model_config.init_head_rms_inf, lrs)
    if rank == 0 and reach < target:
        print(f"norm guide  warning: the output layer's learning rates sum to {lrs.sum():.3g} over {plan.steps:,} "
              f"steps, so ‖W_out‖_RMS→∞ can reach at most {reach:.3g}, below the target {target:g}: "
              "the learning rate or the budget is likely too small", flush=True)
    return NormGuide(target, plan.steps), left


class _DivergenceWatch:
    """Whether a training loss says the run diverged: NaN/Inf, above ``train.max_loss``, or, when
    ``train.rise_window`` is set, a mean over that many steps more than ``train.max_rise`` above
    the lowest such mean so far. It sees each step's loss once, at the log points (no extra read
    from the device); the rising rule starts afresh when a run resumes."""

    def __init__(self, cfg: RunConfig, vocab_size: int) -> None:
        t = cfg.train
        self.vocab_size = vocab_size
        self.max_loss = t.max_loss if t.max_loss is not None else default_max_loss(vocab_size)
        self.window, self.max_rise = t.rise_window, t.max_rise
        self.recent: collections.deque[tuple[int, float]] = collections.deque(maxlen=max(t.rise_window, 5))
        self.lowest_mean = math.inf

    def check(self, step: int, loss: float) -> str | None:
        """None while the run is healthy, else why it diverged, naming the step and the values."""
        self.recent.append((step, loss))
        if not math.isfinite(loss):
            return f"loss is {loss} at step {step}"
        recent = ", ".join(f"step {s}: {v:.4g}" for s, v in list(self.recent)[-5:])
        if loss > self.max_loss:
            return (f"loss {loss:.4g} at step {step}: above train.max_loss = {self.max_loss:.4g} (a uniform prediction "
                    f"over the {self.vocab_size} tokens scores {math.log(self.vocab_size):.3g}; recent losses: {recent}), "
                    "the run diverged")
        if self.window and len(self.recent) >= self.window:
            mean = sum(v for _, v in list(self.recent)[-self.window:]) / self.window
            if mean > self.lowest_mean + self.max_rise:
                return (f"loss at step {step}: the mean over the last {self.window} steps, {mean:.4g}, is "
                        f"{mean - self.lowest_mean:.3g} above the lowest {self.window}-step mean so far "
                        f"({self.lowest_mean:.4g}), more than train.max_rise = {self.max_rise:g} (recent losses: {recent}), "
                        "the run diverged")
            self.lowest_mean = min(self.lowest_mean, mean)
        return None


OUTPUT_ONLY = frozenset({"output"})
"""The group whose norm the trainer measures on every step (:attr:`disco_ds.Scion.track_norms`)."""


class _PendingSteps:
    """Optimizer steps whose loss is still on the device, read back together at the next log point.

    Reading a device scalar on the host waits for every kernel queued before it; once per step
    that would drain the accelerator's queue every step. The trainer reads at a log point (every
    ``logging.interval`` steps, before an evaluation or a checkpoint, at the end) with one
    all-reduce of all pending losses and one copy; tokens/s is the rate over that span.
    """

    def __init__(self, pipe_group: Any = None) -> None:
        self.pipe_group = pipe_group
        """Under a pipeline: the ranks holding this replica's stages, whose norms are combined."""
        self.rows: list[tuple[int, dict[str, Any]]] = []
        self.losses: list[torch.Tensor] = []
        self.norms: list[dict[str, torch.Tensor]] = []
        self.since = time.perf_counter()

    def add(self, step: int, loss: torch.Tensor, metrics: dict[str, Any],
            norms: dict[str, torch.Tensor] | None = None) -> None:
        """Queue ``step``'s mean micro-batch loss (a 0-dim tensor on the device), host metrics and
        Scion's monitored norms (:meth:`disco_ds.Scion.pop_norms`, still on the device)."""
        self.rows.append((step, metrics))
        self.losses.append(loss.reshape(()).float())
        self.norms.append(norms or {})

    def read(self) -> tuple[list[tuple[int, float, dict[str, Any]]], float]:
        """``([(step, loss averaged over ranks, metrics), ...], seconds per step)`` of the pending
        steps (at least one: the trainer reads right after queueing a step)."""
        losses = torch.stack(self.losses)
        if dist.get_world_size() > 1:
            dist.all_reduce(losses)
            losses /= dist.get_world_size()
        if self.pipe_group is not None:
            self.norms = combine_stage_norms(self.norms, self.pipe_group)
        # The norms (the same on every rank) travel back in the same copy as the losses.
        totals = [t.float().reshape(-1) for norms in self.norms for t in norms.values()]
        values = torch.cat([losses, *totals]).tolist()
        pos = len(self.losses)
        out = []
        for (step, metrics), value, norms in zip(self.rows, values, self.norms):
            row = dict(metrics)
            for label, t in norms.items():
                row.update(NormMonitor.metrics(label, values[pos : pos + t.numel()]))
                pos += t.numel()
            out.append((step, value, row))
        now = time.perf_counter()
        seconds_per_step = (now - self.since) / len(self.rows)
        self.rows, self.losses, self.norms, self.since = [], [], [], now
        return out, seconds_per_step


def combine_stage_norms(per_step: list[dict[str, torch.Tensor]], pipe_group: Any) -> list[dict[str, torch.Tensor]]:
    """Each step's monitored norms (:data:`~disco_ds.optim.monitor.TOTALS` per group label)
    combined over the stages of a pipeline, the same on every stage: a group's largest norms are
    the largest over the stages holding some of its matrices, its sums of squares their sum. Which
    labels each step measured comes from every stage's host-side lists (one object all-gather);
    the numbers stay on the device, two all-reduces over ``pipe_group`` for all pending steps."""
    local = [sorted(norms) for norms in per_step]
    gathered: list[Any] = [None] * dist.get_world_size(pipe_group)
    dist.all_gather_object(gathered, local, group=pipe_group)
    measured = [sorted(set().union(*(stage[i] for stage in gathered))) for i in range(len(per_step))]
    labels = sorted(set().union(*measured))
    if not labels:
        return per_step
    table = torch.zeros(len(per_step), len(labels), len(TOTALS), device=communication_device())
    for i, norms in enumerate(per_step):
        for j, label in enumerate(labels):
            if label in norms:
                table[i, j] = norms[label].float()
    largest, sums = table[..., :2].contiguous(), table[..., 2:].contiguous()
    dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=pipe_group)  # norms are never negative
    dist.all_reduce(sums, group=pipe_group)
    table = torch.cat([largest, sums], dim=-1)
    return [{label: table[i, labels.index(label)] for label in measured[i]} for i in range(len(per_step))]


def _validate(cfg: RunConfig, world: int) -> tuple[DataCheck, NormGPTConfig, Plan, dict[str, Any]]:
    """Everything that can be checked without the process group, on every rank before it starts:
    the resume value, the data (headers, sizes, vocabulary, windows), the model config, the plan
    and the engine config. Each failure is a :class:`ConfigError` naming the key and the file."""
    check_resume(cfg)
    dp_world = data_parallel_size(cfg, world)
    data = check_data(cfg)
    try:
        model_config = build_model_config(cfg, data.meta)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    parts = model_config.n_layer + 2
    if cfg.train.pp_size > parts:
        raise ConfigError(f"train.pp_size={cfg.train.pp_size} exceeds the model's {parts} pipeline parts "
                          f"(embedding, {model_config.n_layer} blocks, head); accepted: 1 to {parts}")
    check_vocabulary(data, model_config.vocab_size)
    check_windows(cfg, data, dp_world)
    check_sampling(cfg)
    plan = plan_run(cfg, dp_world)
    try:
        ds_config = engine_config(cfg, plan, model_config)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err) if str(err).startswith("train.deepspeed") else f"train.deepspeed: {err}") from None
    return data, model_config, plan, ds_config


def train(cfg: RunConfig) -> dict[str, Any]:
    """Run (or resume) the configured pretraining; returns the final step, losses and checkpoint.

    Rank 0's console is also written to ``RUN_DIR/train.log`` (:class:`~disco_ds.trainer.metrics.RunLog`),
    errors with their tracebacks included.

    Raises:
        ConfigError: the configuration or the data cannot run (found before the process group starts).
        Diverged: the loss exceeded ``train.max_loss``, kept rising (``train.rise_window``) or
            became NaN/Inf (:class:`NonFiniteLoss`); the newest checkpoint is the last good one.
        CheckpointError: no checkpoint to resume from verifies, the resume would change the run
            (and ``checkpoint.allow_change`` is false), or a save failed (naming the file).
    """
    started = time.time()
    if not dist.is_initialized():
        _single_process_defaults()
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    with RunLog(cfg.run_path / RUN_LOG, enabled=rank == 0):
        return _train(cfg, started)


class _Startup:
    """Prints on rank 0 how long each startup phase took, as it ends: the minute before step 1
    (process group, model, engine, first step) is otherwise silent."""

    def __init__(self, rank: int) -> None:
        self.rank, self.since = rank, time.perf_counter()

    def __call__(self, phase: str) -> None:
        now = time.perf_counter()
        if self.rank == 0:
            print(f"startup     {phase} in {now - self.since:.1f}s", flush=True)
        self.since = now


def _train(cfg: RunConfig, started: float) -> dict[str, Any]:
    """:func:`train` inside its run log; ``started``: the wall time the run began."""
    world = dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))
    startup = _Startup(rank)
    data, model_config, plan, ds_config = _validate(cfg, world)
    startup("configuration and data checked")
    if not dist.is_initialized():
        deepspeed.init_distributed()
    startup("process group ready")
    # Data parallelism runs over model replicas: every TP group reads the same micro-batches.
    dp_world = plan.world_size
    device = communication_device()
    # The checkpoint is chosen (every rank verifies a share of its files) and its run compared with
    # this one before the engine starts: the plan kept from it sets the engine's batch.
    resume = None
    resume_from = select_checkpoint(cfg.checkpoint.resume, cfg.run_path, _rank0_print(rank))
    if resume_from is not None:
        resume = plan_resume(cfg, dp_world, resume_from, json.loads((resume_from / "trainer_state.json").read_text()))
        for change in resume.changes:
            _rank0_print(rank)(f"resume      change allowed by checkpoint.allow_change: {change}")
        if resume.plan != plan:
            plan = resume.plan
            ds_config = engine_config(cfg, plan, model_config)

    data_dir = Path(cfg.data.path)
    meta = data.meta
    eot_id = int(meta["eot_id"]) if cfg.data.document_mask else None
    train_files, val_files = data.train_files, data.val_files
    run_dir = cfg.run_path
    resolved = to_dict(cfg)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
        print(yaml.safe_dump(resolved, sort_keys=False).rstrip(), flush=True)
        print(format_plan(cfg, plan), flush=True)
        print(f"model       {model_config.describe()}", flush=True)

    engine, optimizer = build_engine(cfg, model_config, plan, ds_config, device, startup)
    peaks = [float(g["lr"]) for g in optimizer.param_groups]

    dp_rank, _ = _data_parallel_rank_and_size(cfg, engine)
    stream = TokenStream(train_files, cfg.data.seq_len, cfg.train.micro_batch, dp_rank, dp_world, seed=cfg.data.seed)
    step, tokens = 0, 0
    if resume is not None:
        # Loading puts the checkpoint's hyperparameters into the optimizer's groups; this run's own
        # (the same, or changed under checkpoint.allow_change and logged above) go back on top.
        hyperparameters = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
        state = load_checkpoint(engine, resume.path, engine_state=not resume.relayout)
        if resume.relayout:
            load_portable(engine, optimizer, resume.path / PORTABLE)
        for group, own in zip(optimizer.param_groups, hyperparameters):
            group.update(own)
        step, tokens = int(state["step"]), int(state["tokens"])
        stream.load_state_dict(state["data"])
        if rank == 0:
            source = f" through its {PORTABLE} (another layout: world size, ZeRO stage or pipeline stages)" if resume.relayout else ""
            print(f"resumed     {resume.path} (step {step}, {tokens:,} tokens){source}", flush=True)

    counts = model_config.parameter_counts()
    flops = flops_per_token(counts["non_embedding"] + counts["head"], model_config.n_layer, model_config.d_model, cfg.data.seq_len)
    peak_flops = cfg.logging.peak_tflops * 1e12 * world
    wandb = None
    if cfg.logging.wandb:
        wandb = {"project": cfg.logging.wandb_project, "name": cfg.train.name, "mode": cfg.logging.wandb_mode,
                 "dir": str(run_dir), "config": resolved}
    logger = MetricsLogger(run_dir, plan.run_steps, log_interval=cfg.logging.interval, enabled=rank == 0,
                           wandb=wandb, resume_step=step, started=started)
    tokenizer_dir = data_dir / "tokenizer"
    scion = isinstance(optimizer, Scion)
    guide, output_lr_left = _norm_guide(cfg, plan, model_config, rank) if scion else (None, None)
    last_checkpoint = resume_from
    loss_value = val_loss = float("nan")
    # Under a pipeline each stage's optimizer holds some roles: the learning rates logged are the
    # plan's (every role of the model), the norms are combined over the stages at each read.
    role_peaks = {role: plan.group_lrs[role] for role in model_roles(model_config)}
    pipelined = isinstance(engine, PipelineEngine)
    pending = _PendingSteps(engine.grid.get_pipe_parallel_group() if pipelined else None)
    norms_every = cfg.logging.norms_interval or cfg.logging.interval

    # The portable file lets a resume change the world size or ZeRO stage (Scion, no TP only).
    portable = cfg.checkpoint.portable and scion and cfg.train.tp_size == 1
    watch = _DivergenceWatch(cfg, model_config.vocab_size)

    def checkpoint() -> Path:
        trainer_state = {"step": step, "tokens": tokens, "data": stream.state_dict(), "world_size": world,
                         "batch_tokens": plan.batch_tokens, "loss": loss_value, "run": run_record(cfg, plan)}
        return save_checkpoint(engine, run_dir, step, trainer_state, resolved, model_config,
                               tokenizer_dir if tokenizer_dir.is_dir() else None, cfg.checkpoint.keep,
                               portable=(lambda path: save_portable(engine, optimizer, path)) if portable else None)

    projection = None  # the norm guidance's latest projection (log_pending keeps it)

    def log_pending() -> None:
        """Read the pending steps, stop at the first diverged loss (:class:`_DivergenceWatch`; the
        losses are averaged over ranks, so every rank stops at the same step), log the others, and
        update the norm guidance's projection (printed at the next evaluation)."""
        nonlocal loss_value, projection
        rows = []
        read, seconds_per_step = pending.read()
        # The optimizer's timers and byte counter over the span, per step: read here, not every
        # step (on a GPU, reading its CUDA-event timers waits for the device).
        span = {k: v / len(read) for k, v in optimizer.pop_metrics().items()} if scion else {}
        tokens_per_s = plan.batch_tokens / seconds_per_step
        for row_step, loss, metrics in read:
            cause = watch.check(row_step, loss)
            if cause is not None:
                logger.log_steps(rows)
                message = (f"{cause}: stopping. The newest checkpoint "
                           f"({last_checkpoint or 'none yet'}) is the last good one and was not touched.")
                if rank == 0:
                    print(message, flush=True)
                raise (Diverged if math.isfinite(loss) else NonFiniteLoss)(message)
            loss_value = loss
            rows.append((row_step, {"loss": loss, **metrics, **span, "tokens_per_s": tokens_per_s,
                                    "mfu": flops * tokens_per_s / peak_flops if peak_flops > 0 else 0.0}))
            if guide is not None and OUTPUT_NORM in metrics:
                guide.observe(row_step, float(metrics[OUTPUT_NORM]))
        if guide is not None and rows:
            projection = guide.project(output_lr_left[rows[-1][0]])
            if projection is not None:
                rows[-1][1].update({"norm/output/projected": projection.final_norm, "norm/output/target": guide.target})
        logger.log_steps(rows)

    # The next micro-batch is read and on its way to the device while the current one trains; the
    # stream's position, which checkpoints save, counts only the batches trained on.
    batches = DevicePrefetcher(stream, device)
    pipeline_batches = _pipeline_batches(iter(batches.next_batch, None), eot_id) if pipelined else None
    first_step = True
    while step < plan.run_steps:
        factor = wsd_factor(step, plan.steps, cfg.schedule.warmup, cfg.schedule.decay, cfg.schedule.decay_shape,
                            cfg.schedule.min_lr_ratio)
        for group, peak in zip(optimizer.param_groups, peaks):
            group["lr"] = peak * factor
        if scion:  # every group's norms each norms_interval; the output layer's (the paper's instrument) always
            optimizer.track_norms = True if step % norms_every == 0 else OUTPUT_ONLY
        if pipeline_batches is not None:
            # All micro-batches through the stages and the step; the mean loss over micro-batches
            # and data-parallel ranks comes back on every rank, still on the device.
            mean_loss = engine.train_batch(pipeline_batches)
        else:
            loss_sum = torch.zeros((), device=device)
            for _ in range(plan.accumulation):
                inputs, targets = batches.next_batch()
                loss = _loss(engine, inputs, targets, eot_id)
                engine.backward(loss)
                engine.step()
                loss_sum += loss.detach()
            mean_loss = loss_sum / plan.accumulation
        step += 1
        tokens += plan.batch_tokens
        if first_step:
            get_accelerator().synchronize()  # once: the first step's time, not the time to queue it
            startup("first step done")
            first_step = False
        metrics: dict[str, Any] = {"tokens": float(tokens), "memory_gib": memory_gib()}
        for role, peak in role_peaks.items():
            metrics[f"lr/{role}"] = peak * factor
        pending.add(step, mean_loss, metrics, optimizer.pop_norms() if scion else None)

        last = step == plan.run_steps
        evaluate = bool(cfg.eval.interval and step % cfg.eval.interval == 0) or last
        save = bool(cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0) or last
        # A checkpoint is only written after its step's loss was read and found finite.
        if step % cfg.logging.interval == 0 or evaluate or save:
            log_pending()
        if evaluate:
            val_loss = _evaluate(engine, val_files, cfg, device, eot_id)
            shown: dict[str, Any] = readable_metrics(val_loss, meta)
            if cfg.eval.sample_tokens:
                shown["sample"] = eval_sample(engine, data_dir, meta, cfg.eval.sample_prompt, cfg.eval.sample_tokens,
                                              cfg.data.seq_len, device)
            logger.log_eval(step, shown)
            # log_pending ran for this step just above: its projection is current.
            if projection is not None and rank == 0:
                print(f"norm guide  {projection.message(plan.steps * plan.batch_tokens)}", flush=True)
        if save:
            last_checkpoint = checkpoint()
    logger.close()
    return {"step": step, "tokens": tokens, "loss": loss_value, "val_loss": val_loss,
            "checkpoint": str(last_checkpoint) if last_checkpoint else None, "run_dir": str(run_dir)}
