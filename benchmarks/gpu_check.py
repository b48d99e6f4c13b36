"""GPU acceptance run: the real trainer, checkpoint, resume and export on the GPUs present, plus
throughput, the optimizer's share of the step and Newton–Schulz TFLOP/s, reported as markdown.

Every case in :data:`CASES` (the one table to edit) goes through the real command line, each step a
subprocess with a timeout whose whole process group is killed when it runs over, so nothing hangs:

1. ``deepspeed --num_gpus N --module disco_ds train RECIPE ...`` for 20 steps: a validation pass
   and a checkpoint at step 20, the loss finite and falling;
2. the same command with ``checkpoint.resume=auto`` to step 24: it must resume from step 20 (the
   first resumed loss nearer the trained loss than the initial one), evaluate and checkpoint again;
3. ``python -m disco_ds export RUN_DIR RUN_DIR/hf --dtype float32``;
4. the export loaded with ``transformers.AutoModelForCausalLM`` (in the run's dtype) on the GPU:
   its loss on the run's own validation windows must equal the run's last logged ``val/loss``.

Cases: the ``tiny`` and ``gpt-124m`` recipes at ZeRO 0/1/2/3 and ZeRO-2 with optimizer offload on
one GPU (NCCL), the 124m recipe with AdamW, and with ≥ 2 GPUs 2 ranks at every stage and TP=2.
Data: byte-level shards of the Python standard library's source (``disco_ds prepare``, nothing is
downloaded); the 124m cases keep GPT-2's padded vocabulary (``model.overrides={vocab_size: 50304}``)
so that their compute is the recipe's. Every run starts at the recipe's peak learning rate
(``schedule.warmup=0``) so that 20 steps show learning.

The cases flagged ``measure`` run first, alone on the GPU: their tokens/s and MFU (median of steps
6–20, MFU against ``--peak-tflops``) and the optimizer's share of the step, from the
``optimizer/step_s``, ``optimizer/comm_s`` and ``optimizer/newton_schulz_s`` metrics that Scion
logs into ``RUN_DIR/metrics.jsonl``, are reported. The other cases then run ``--jobs`` at a time
(their timings are not reported: they share the GPU). Before the cases, a subprocess times
``disco_ds.optim.newton_schulz.orthogonalize`` with CUDA events on every hidden-matrix shape of every
recipe in ``recipes/``, one matrix and all of that shape in one batched call (what one owner does at
world size 1), FLOPs by ``ns_flops`` (SPEC 5.4: steps·(4m²n + 2m³), m ≤ n), against the bf16 peak
and a measured 8192³ bf16 matmul.

Output: the markdown report at ``--out`` (default ``runs/gpu_check/gpu_check.md``) and everything
behind it, with the tail of the log of every failed step, in JSON (``--json``, default next to
``--out``); both are rewritten after every case. Logs and runs stay under ``--workdir``. Exit
status: 0 when every case that ran passed, 1 otherwise, 2 when the machine lacks what the run needs.

Without a CUDA device (or with ``--dry-run``) it prints the plan, every command of every case, and
exits 0; the test suite runs that. ``--device cpu`` (hidden, for developers) runs the selected cases
on CPU ranks with gloo to smoke-test this script; it measures nothing.

Runtime (estimated from process start-ups, which dominate 24-step runs; not yet measured on a GPU,
and the plan prints the estimate for the selected cases): about 6 minutes for the 11 one-GPU cases on
one H100/H200 (on 2 CPU cores a tiny case takes 45–70 s), about 4 with ``--quick``; with 2 GPUs the
full set is about 10 minutes, so there use ``--quick`` or ``--cases``. ``--budget-s`` (default 540 s)
stops starting cases, and kills running ones, so that the report is written within 9 minutes in any
case; a SIGTERM or Ctrl-C does the same at once::

    python benchmarks/gpu_check.py [--quick] [--cases 'tiny-*,124m-z1'] [--out gpu_check.md]
        [--jobs 3] [--budget-s 540] [--peak-tflops 989] [--workdir runs/gpu_check] [--dry-run]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import fnmatch
import functools
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
# The GPU machine runs a bare checkout with its own Python, where disco_ds is not installed.
sys.path.insert(0, str(REPO))

# ---------------------------------------------------------------------------------------------
# The cases: edit here.
# ---------------------------------------------------------------------------------------------

STEPS = 20
"""Steps of the first run of every case (validation and checkpoint at its end)."""
RESUME_STEPS = 4
"""Further steps of the resumed run."""
TIMED_FROM_STEP = 6
"""Throughput statistics use steps TIMED_FROM_STEP..STEPS: the first ones include warm-up."""
MIN_LOSS_DROP = 0.1
"""Nats the training loss must fall from step 1 to step STEPS (at the recipe's peak learning rate)."""
EXPORT_RTOL = {"float32": 1e-4, "bfloat16": 5e-3}
"""Relative tolerance between the run's last val/loss and the export's, by the run's dtype (the
export holds the fp32 master weights; loaded in bf16 they round to the engine's bf16 weights)."""


@dataclass(frozen=True)
class Recipe:
    """A recipe and what the acceptance run changes in it."""

    path: str
    overrides: tuple[str, ...]
    estimate_s: int
    """Estimated wall time of one case (two launches, export, load), for the plan only."""
    timeout_s: int
    """Time limit of one whole case."""


RECIPES: dict[str, Recipe] = {
    "tiny": Recipe("recipes/tiny.yaml", ("eval.tokens=65536",), estimate_s=50, timeout_s=240),
    # GPT-2's padded vocabulary on byte-level data: the recipe's compute, nothing to download.
    "gpt-124m": Recipe("recipes/gpt-124m.yaml", ("model.overrides={vocab_size: 50304}", "eval.tokens=262144"),
                       estimate_s=75, timeout_s=360),
}

COMMON_OVERRIDES: tuple[str, ...] = (
    "schedule.warmup=0",     # the peak learning rate from step 1: 20 steps show learning
    "eval.interval=0",       # validation at the end of each run only
    "checkpoint.interval=0",  # a checkpoint at the end of each run only
    "checkpoint.keep=2",
    "logging.interval=5",
    "logging.wandb=false",
)

# Optimizer offload through a DeepSpeed overlay (train.deepspeed=FILE), which the trainer merges
# into its generated config; Scion is a client optimizer, so DeepSpeed must not force its own.
OFFLOAD_OVERLAY: dict[str, Any] = {
    "zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memory": True}},
    "zero_force_ds_cpu_optimizer": False,
}


@dataclass(frozen=True)
class Case:
    """One acceptance case: a recipe on ``gpus`` ranks at one ZeRO stage (and TP or pipeline size)."""

    name: str
    recipe: str
    gpus: int
    zero: int
    tp: int = 1
    pp: int = 1
    optimizer: str = "scion"
    offload: bool = False
    measure: bool = False
    """Run alone on the GPUs and report tokens/s, MFU and the optimizer's share of the step."""
    quick: bool = False
    """Part of ``--quick``."""
    overrides: tuple[str, ...] = ()


BF16_GRADS = ("train.grad_dtype=bfloat16",)

CASES: tuple[Case, ...] = (
    Case("tiny-z0", "tiny", 1, 0),
    Case("tiny-z1", "tiny", 1, 1),
    Case("tiny-z2", "tiny", 1, 2, quick=True),
    Case("tiny-z3", "tiny", 1, 3),
    Case("tiny-z2-offload", "tiny", 1, 2, offload=True, quick=True),
    # Without ZeRO DeepSpeed accumulates a bf16 model's gradients in bf16: the trainer asks for it
    # explicitly (train.grad_dtype, default float32, is refused at stage 0 with bf16).
    Case("124m-z0", "gpt-124m", 1, 0, overrides=BF16_GRADS),
    Case("124m-z1", "gpt-124m", 1, 1, measure=True, quick=True),
    Case("124m-z2", "gpt-124m", 1, 2),
    Case("124m-z3", "gpt-124m", 1, 3, quick=True),
    Case("124m-z2-offload", "gpt-124m", 1, 2, offload=True),
    # AdamW's own learning rate (the Scion anchor does not transfer); throughput does not depend on it.
    Case("124m-z1-adamw", "gpt-124m", 1, 1, optimizer="adamw", measure=True, quick=True, overrides=("optimizer.lr=6e-4",)),
    # With >= 2 GPUs: a world of one skips many collectives, so these matter most.
    Case("tiny-2r-z0", "tiny", 2, 0),
    Case("tiny-2r-z1", "tiny", 2, 1),
    Case("tiny-2r-z2", "tiny", 2, 2, quick=True),
    Case("tiny-2r-z3", "tiny", 2, 3, quick=True),
    Case("tiny-2r-z2-offload", "tiny", 2, 2, offload=True),
    Case("tiny-tp2", "tiny", 2, 2, tp=2, quick=True),
    Case("tiny-pp2", "tiny", 2, 1, pp=2, quick=True),
    Case("124m-2r-z0", "gpt-124m", 2, 0, overrides=BF16_GRADS),
    Case("124m-2r-z1", "gpt-124m", 2, 1),
    Case("124m-2r-z2", "gpt-124m", 2, 2),
    Case("124m-2r-z3", "gpt-124m", 2, 3),
    Case("124m-tp2", "gpt-124m", 2, 1, tp=2),
    Case("124m-pp2", "gpt-124m", 2, 1, pp=2),
)

DATA_TIMEOUT_S = 300
NS_TIMEOUT_S = 180
EXPORT_CHECK_FILE = "export_check.json"
PREPARE_ARGS: tuple[str, ...] = ("--glob", "*.py", "--exclude", "site-packages", "--max-bytes", "8MB",
                                 "--val-tokens", "400000", "--tokenizer", "byte", "--quiet")
"""Byte shards of the standard library as ``make demo`` makes them, with validation enough for
the 124m evaluation (``eval.tokens`` above)."""

# ---------------------------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------------------------


@dataclass
class Context:
    """Where and how the cases run."""

    workdir: Path
    device: str
    """``cuda``, or ``cpu`` for the developers' smoke test."""
    gpus: int
    peak_tflops: float
    base_port: int
    python: str = field(default_factory=lambda: sys.executable)
    deadline: float = math.inf
    """``time.monotonic()`` after which nothing runs any more."""

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"

    @property
    def offload_overlay(self) -> Path:
        return self.workdir / "offload_overlay.json"

    def run_dir(self, case: Case) -> Path:
        return self.workdir / "runs" / case.name

    def log(self, case_name: str, phase: str) -> Path:
        return self.workdir / "logs" / f"{case_name}.{phase}.log"


def _arg(path: Path | str) -> str:
    """A path as a command argument: relative to the repository (every command runs there) when inside it."""
    path = Path(path).absolute()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def deepspeed_launcher(python: str) -> list[str]:
    """The ``deepspeed`` launcher of this Python, else the one on PATH, else the same program as a module
    (a package installed with ``pip --target`` has no script on PATH)."""
    beside = Path(python).parent / "deepspeed"
    if beside.is_file():
        return [_arg(beside)]
    found = shutil.which("deepspeed")
    return [found] if found else [_arg(python), "-m", "deepspeed.launcher.runner"]


def prepare_command(ctx: Context) -> list[str]:
    """``disco_ds prepare`` on this Python's standard library source."""
    stdlib = sysconfig.get_paths()["stdlib"]
    return [_arg(ctx.python), "-m", "disco_ds", "prepare", "--input", stdlib, *PREPARE_ARGS, "--out", _arg(ctx.data_dir)]


def train_command(case: Case, ctx: Context, *, resume: bool) -> list[str]:
    """The launcher command of the first run (``resume=False``) or of the resumed run of ``case``."""
    recipe = RECIPES[case.recipe]
    port = ctx.base_port + 2 * CASES.index(case) + int(resume)
    overrides = [
        f"data.path={_arg(ctx.data_dir)}", f"train.run_dir={_arg(ctx.run_dir(case))}",
        f"train.zero_stage={case.zero}", f"train.tp_size={case.tp}", f"train.pp_size={case.pp}", f"optimizer.name={case.optimizer}",
        f"logging.peak_tflops={ctx.peak_tflops:g}", *COMMON_OVERRIDES, *recipe.overrides, *case.overrides,
    ]
    if case.offload:
        overrides.append(f"train.deepspeed={_arg(ctx.offload_overlay)}")
    overrides.append(f"train.max_steps={STEPS + RESUME_STEPS if resume else STEPS}")
    overrides.append(f"checkpoint.resume={'auto' if resume else 'none'}")
    return [*deepspeed_launcher(ctx.python), "--num_gpus", str(case.gpus), "--master_port", str(port),
            "--module", "disco_ds", "train", recipe.path, *overrides]


def export_command(case: Case, ctx: Context) -> list[str]:
    """``disco_ds export`` of the run's newest checkpoint, fp32 (the master weights)."""
    run_dir = ctx.run_dir(case)
    return [_arg(ctx.python), "-m", "disco_ds", "export", _arg(run_dir), _arg(run_dir / "hf"), "--dtype", "float32", "--force"]


def verify_command(case: Case, ctx: Context) -> list[str]:
    """This script's hidden ``--verify-export``: the export's validation loss under transformers."""
    run_dir = ctx.run_dir(case)
    return [_arg(ctx.python), _arg(__file__), "--verify-export", _arg(run_dir / "hf"), _arg(run_dir), "--device", ctx.device]


def case_commands(case: Case, ctx: Context) -> dict[str, list[str]]:
    """Every command of ``case``, by phase, in order."""
    return {"train": train_command(case, ctx, resume=False), "resume": train_command(case, ctx, resume=True),
            "export": export_command(case, ctx), "verify": verify_command(case, ctx)}


# ---------------------------------------------------------------------------------------------
# Subprocesses that cannot hang
# ---------------------------------------------------------------------------------------------

_RUNNING: set[subprocess.Popen] = set()
_RUNNING_LOCK = threading.RLock()  # re-entered by the SIGTERM handler in the main thread


def _subprocess_env(device: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled",
           "TOKENIZERS_PARALLELISM": "false"}
    if device == "cpu":
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop ``proc``'s process group (the launcher and its ranks): SIGTERM, then SIGKILL after 10 s."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(cmd: list[str], log: Path, timeout_s: float, env: dict[str, str]) -> int | None:
    """Run ``cmd`` in the repository, output into ``log``; its exit status, or ``None`` when it ran past
    ``timeout_s`` and its whole process group was killed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w", encoding="utf-8") as out:
        out.write(f"$ {shlex.join(cmd)}\n")
        out.flush()
        # A session of its own: on a timeout the launcher's rank processes are killed with it.
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
        with _RUNNING_LOCK:
            _RUNNING.add(proc)
        try:
            return proc.wait(timeout=max(1.0, timeout_s))
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None
        except BaseException:  # interrupted: never leave the ranks running
            _kill_group(proc)
            raise
        finally:
            with _RUNNING_LOCK:
                _RUNNING.discard(proc)


def _signal_running(sig: signal.Signals) -> None:
    """Send ``sig`` to the process group of every step running now (their waits then return)."""
    with _RUNNING_LOCK:
        running = list(_RUNNING)
    for proc in running:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass


# A Python exception as a rank prints it ("[rank0]: ValueError: ..."), and the error lines of our CLI.
_EXCEPTION_LINE = re.compile(r"^(?:\[rank\d+\]:\s*)?(?:[\w.]+\.)?\w*(?:Error|Exception|Interrupt)\b.*|.*\berror: .*")


def _error_line(log: Path) -> str:
    """The most telling line of a failed step's log: the last exception or error message (the
    launcher's own closing line only repeats the command), else the last line."""
    lines = [ln.strip() for ln in log.read_text(encoding="utf-8", errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if _EXCEPTION_LINE.match(ln)]
    line = (errors or lines or ["(no output)"])[-1]
    return line if len(line) <= 240 else line[:237] + "..."


def _tail(log: Path, chars: int = 3000) -> str:
    return log.read_text(encoding="utf-8", errors="replace")[-chars:]


# ---------------------------------------------------------------------------------------------
# Reading a run
# ---------------------------------------------------------------------------------------------


class CaseFailure(Exception):
    """A check of a case failed; the message is the reason shown in the report."""


def read_metrics(run_dir: Path) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """The training rows (by step) and the validation losses (by step) of ``RUN_DIR/metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CaseFailure(f"{path} was not written")
    train: dict[int, dict[str, Any]] = {}
    val: dict[int, float] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if "val/loss" in row:
            val[int(row["step"])] = float(row["val/loss"])
        elif "loss" in row:
            train[int(row["step"])] = row
    return train, val


def _check_checkpoint(run_dir: Path, step: int) -> None:
    path = run_dir / "checkpoints" / f"step_{step:08d}"
    if not (path / "COMPLETE").is_file():
        raise CaseFailure(f"no complete checkpoint {path.name} after step {step}")


def check_first_run(run_dir: Path) -> dict[int, dict[str, Any]]:
    """Steps 1..STEPS logged with finite, falling losses, a validation loss and a checkpoint at STEPS."""
    train, val = read_metrics(run_dir)
    if sorted(train) != list(range(1, STEPS + 1)):
        raise CaseFailure(f"logged steps {sorted(train)[:3]}..{sorted(train)[-3:]}, expected 1..{STEPS}")
    losses = [float(train[s]["loss"]) for s in range(1, STEPS + 1)]
    if not all(math.isfinite(v) for v in losses):
        raise CaseFailure(f"non-finite training loss: {losses}")
    if not losses[-1] < losses[0] - MIN_LOSS_DROP:
        raise CaseFailure(f"loss did not fall by {MIN_LOSS_DROP}: step 1 {losses[0]:.3f}, step {STEPS} {losses[-1]:.3f}")
    if STEPS not in val or not math.isfinite(val[STEPS]):
        raise CaseFailure(f"no finite val/loss at step {STEPS}")
    _check_checkpoint(run_dir, STEPS)
    return train


def check_resumed_run(run_dir: Path, log: Path) -> tuple[dict[int, dict[str, Any]], dict[int, float]]:
    """The second run resumed from step STEPS, continued the trained model to STEPS+RESUME_STEPS,
    evaluated and checkpointed."""
    end = STEPS + RESUME_STEPS
    if not re.search(rf"resumed\s+\S+ \(step {STEPS},", log.read_text(encoding="utf-8", errors="replace")):
        raise CaseFailure(f"the resumed run did not report resuming from step {STEPS}")
    train, val = read_metrics(run_dir)
    if sorted(train) != list(range(1, end + 1)):
        raise CaseFailure(f"after the resume logged steps {sorted(train)[:3]}..{sorted(train)[-3:]}, expected 1..{end}")
    first, trained, resumed = (float(train[s]["loss"]) for s in (1, STEPS, STEPS + 1))
    # A model that restarted from scratch would be back near the initial loss.
    if not (math.isfinite(resumed) and resumed < (first + trained) / 2):
        raise CaseFailure(f"resumed loss {resumed:.3f} is not near the trained {trained:.3f} (initial {first:.3f})")
    if end not in val or not math.isfinite(val[end]):
        raise CaseFailure(f"no finite val/loss at step {end}")
    _check_checkpoint(run_dir, end)
    return train, val


OPTIMIZER_TIMERS = {"optimizer/step_s": "optimizer_s", "optimizer/comm_s": "comm_s",
                    "optimizer/newton_schulz_s": "newton_schulz_s"}
"""Scion's timers in metrics.jsonl (see ``Scion.pop_metrics``) and their names in the results."""


def step_statistics(train: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Medians over steps TIMED_FROM_STEP..STEPS: tokens/s, MFU, step time and the optimizer's parts
    (Scion only), plus the peak memory of the whole run."""
    rows = [train[s] for s in range(TIMED_FROM_STEP, STEPS + 1) if s in train]
    stats: dict[str, float] = {"peak_memory_gib": max(float(r.get("memory_gib", 0.0)) for r in train.values())}
    if not rows:
        return stats
    # tokens_per_s = tokens of the step / its wall time: the step time follows from the token count.
    batch = [float(train[s]["tokens"]) - float(train[s - 1]["tokens"]) for s in range(TIMED_FROM_STEP, STEPS + 1)
             if s in train and s - 1 in train]
    step_s = [b / float(r["tokens_per_s"]) for b, r in zip(batch, rows)]
    stats.update(tokens_per_s=statistics.median(float(r["tokens_per_s"]) for r in rows),
                 mfu=statistics.median(float(r["mfu"]) for r in rows), step_s=statistics.median(step_s))
    for key, name in OPTIMIZER_TIMERS.items():
        if all(key in r for r in rows):
            stats[name] = statistics.median(float(r[key]) for r in rows)
            stats[f"{name}_share"] = statistics.median(float(r[key]) / s for r, s in zip(rows, step_s))
    return stats


# ---------------------------------------------------------------------------------------------
# One case
# ---------------------------------------------------------------------------------------------


def _limit_reached(ctx: Context) -> str:
    return "time budget (--budget-s) used up or stopped" if time.monotonic() >= ctx.deadline else "case timeout reached"


@dataclass
class CaseResult:
    """What a case did; ``status`` is ``pass``, ``fail`` or ``skip``."""

    case: Case
    status: str = "skip"
    reason: str = ""
    seconds: float = 0.0
    phases: dict[str, dict[str, Any]] = field(default_factory=dict)
    losses: dict[str, float] = field(default_factory=dict)
    stats: dict[str, float] = field(default_factory=dict)
    log_tail: str = ""


def run_case(case: Case, ctx: Context) -> CaseResult:
    """Train, resume, export and verify ``case``; never raises for a failing case."""
    result = CaseResult(case)
    start = time.monotonic()
    case_deadline = start + RECIPES[case.recipe].timeout_s
    run_dir = ctx.run_dir(case)
    shutil.rmtree(run_dir, ignore_errors=True)
    env = _subprocess_env(ctx.device)

    def phase(name: str, cmd: list[str]) -> Path:
        log = ctx.log(case.name, name)
        began = time.monotonic()
        # ctx.deadline can move closer while the case runs (a SIGTERM from outside).
        remaining = min(case_deadline, ctx.deadline) - began
        if remaining <= 0:
            raise CaseFailure(f"{name}: not started, {_limit_reached(ctx)}")
        rc = run_logged(cmd, log, remaining, env)
        result.phases[name] = {"rc": rc, "seconds": round(time.monotonic() - began, 1), "log": str(log)}
        if rc != 0:
            result.log_tail = _tail(log)
            # Killed by us: at a timeout (None), or by the stop handler (a signal, the deadline gone).
            if rc is None or (rc < 0 and time.monotonic() >= ctx.deadline):
                raise CaseFailure(f"{name}: killed, {_limit_reached(ctx)}")
            raise CaseFailure(f"{name} exited {rc}: {_error_line(log)}")
        return log

    commands = case_commands(case, ctx)
    try:
        phase("train", commands["train"])
        first = check_first_run(run_dir)
        result.stats = step_statistics(first)
        result.losses.update(first=float(first[1]["loss"]), trained=float(first[STEPS]["loss"]))
        resume_log = phase("resume", commands["resume"])
        train, val = check_resumed_run(run_dir, resume_log)
        result.stats["peak_memory_gib"] = max(float(r.get("memory_gib", 0.0)) for r in train.values())
        result.losses.update(resumed=float(train[STEPS + 1]["loss"]), val=val[STEPS + RESUME_STEPS])
        phase("export", commands["export"])
        phase("verify", commands["verify"])
        check = json.loads((run_dir / EXPORT_CHECK_FILE).read_text())
        exported = float(check["val_loss"])
        result.losses["export_val"] = exported
        rel = abs(exported - result.losses["val"]) / abs(result.losses["val"])
        result.losses["export_rel_diff"] = rel
        if not rel <= EXPORT_RTOL[check["dtype"]]:
            raise CaseFailure(f"export's val loss {exported:.6f} != run's {result.losses['val']:.6f} "
                              f"(rel. {rel:.1e} > {EXPORT_RTOL[check['dtype']]:.0e}, {check['dtype']})")
        result.status = "pass"
    except CaseFailure as failure:
        result.status, result.reason = "fail", str(failure)
    except (OSError, ValueError, KeyError) as err:  # a run that wrote nothing readable
        result.status, result.reason = "fail", f"{type(err).__name__}: {err}"
    result.seconds = round(time.monotonic() - start, 1)
    return result


# ---------------------------------------------------------------------------------------------
# The hidden modes that run in their own processes: export check, Newton–Schulz timing
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def verify_export(hf_dir: Path, run_dir: Path, device: str) -> dict[str, Any]:
    """Load the export with ``AutoModelForCausalLM`` in the run's dtype and compute the loss on the
    same validation windows as the trainer's last evaluation (every data-parallel rank's share)."""
    import torch.nn.functional as F
    import yaml
    from transformers import AutoModelForCausalLM

    from disco_ds.trainer.checkpoint import latest_checkpoint
    from disco_ds.data import eval_batches, list_shards

    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
    world = int(json.loads((checkpoint / "trainer_state.json").read_text())["world_size"])
    data_parallel = world // int(cfg["train"]["tp_size"]) // int(cfg["train"].get("pp_size", 1))
    dtype = torch.bfloat16 if cfg["train"]["bf16"] else torch.float32
    model = AutoModelForCausalLM.from_pretrained(hf_dir, trust_remote_code=True, dtype=dtype).to(device).eval()
    files = list_shards(str(Path(cfg["data"]["path"]) / "val_*.bin"))
    seq, micro, tokens = int(cfg["data"]["seq_len"]), int(cfg["train"]["micro_batch"]), int(cfg["eval"]["tokens"])
    total = count = 0.0
    for rank in range(data_parallel):
        for inputs, targets in eval_batches(files, seq, micro, rank, data_parallel, tokens):
            logits = model(input_ids=inputs.to(device)).logits
            # As the trainer's _loss: the mean over the micro-batch, weighted by its tokens.
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.to(device).reshape(-1))
            total += float(loss) * targets.numel()
            count += targets.numel()
    return {"val_loss": total / count, "dtype": str(dtype).removeprefix("torch."), "tokens": int(count),
            "data_parallel": data_parallel}


def recipe_hidden_shapes() -> dict[str, dict[tuple[int, int], int]]:
    """For every recipe in ``recipes/``: its hidden matrices (those Scion orthogonalises) by shape, with
    their number, read from the model built on the meta device."""
    from collections import Counter

    from disco_ds.trainer.config import load_config
    from disco_ds.optim.param_groups import classify_parameters
    from disco_ds.models.norm_gpt.configuration_norm_gpt import NormGPTConfig
    from disco_ds.models.norm_gpt.modeling_norm_gpt import NormGPTForCausalLM

    shapes = {}
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        cfg = load_config(path)
        with torch.device("meta"):  # shapes only, whatever the size
            model = NormGPTForCausalLM(NormGPTConfig.from_preset(cfg.model.preset, **cfg.model.overrides))
        counts = Counter(tuple(p.shape) for role, p in classify_parameters(model).values() if role == "hidden")
        shapes[path.stem] = dict(sorted(counts.items()))
    return shapes


def _cuda_ms(fn: Callable[[], object], repeats: int, warmup: int) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream, by CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def newton_schulz_benchmark(peak_tflops: float) -> dict[str, Any]:
    """Time ``orthogonalize`` (each recipe's ns_steps and method) on every recipe's hidden shapes, one
    matrix and all matrices of the shape batched, and an 8192³ bf16 matmul as the attainable ceiling."""
    from disco_ds.trainer.config import load_config
    from disco_ds.optim.newton_schulz import ns_flops, orthogonalize

    device = torch.device("cuda")
    torch.manual_seed(0)
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    matmul_tflops = 2 * 8192**3 / _cuda_ms(functools.partial(torch.matmul, a, b), repeats=10, warmup=3) / 1e9
    del a, b
    rows = []
    for recipe, shapes in recipe_hidden_shapes().items():
        opt = load_config(REPO / "recipes" / f"{recipe}.yaml").optimizer
        for (m, n), count in shapes.items():
            # fp32 input, as Scion's momentum: the routine normalises in fp32 and iterates in bf16.
            one = torch.randn(m, n, device=device)
            batch = torch.randn(count, m, n, device=device)
            ms_one = _cuda_ms(functools.partial(orthogonalize, one, opt.ns_steps, opt.ns_method), repeats=20, warmup=3)
            ms_all = _cuda_ms(functools.partial(orthogonalize, batch, opt.ns_steps, opt.ns_method), repeats=5, warmup=2)
            flops = ns_flops(m, n, opt.ns_steps)
            rows.append({"recipe": recipe, "shape": [m, n], "count": count, "method": opt.ns_method,
                         "steps": opt.ns_steps, "ms_one": ms_one, "tflops_one": flops / ms_one / 1e9,
                         "ms_batched": ms_all, "tflops_batched": count * flops / ms_all / 1e9})
            del one, batch
    return {"peak_tflops": peak_tflops, "matmul_tflops": matmul_tflops, "rows": rows,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def _num(value: float | None, fmt: str) -> str:
    return "—" if value is None or not math.isfinite(value) else format(value, fmt)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as markdown: environment line, the cases, the throughput table, Newton–Schulz."""
    meta = report["meta"]
    peak = float(meta["peak_tflops"])
    out = ["# disco_ds GPU acceptance (`benchmarks/gpu_check.py`)", "",
           f"{meta['device_name']} × {meta['gpus']} · torch {meta['torch']} · deepspeed {meta['deepspeed']} · "
           f"transformers {meta['transformers']} · bf16 peak {peak:g} TFLOP/s · {meta['date']} · "
           f"{meta['seconds']:.0f} s", "", f"`{meta['command']}`", "",
           f"Each case: {STEPS} steps under `deepspeed --num_gpus N --module disco_ds train` (validation and "
           f"checkpoint at step {STEPS}), `checkpoint.resume=auto` to step {STEPS + RESUME_STEPS}, "
           "`disco_ds export`, and the export loaded with `transformers` must reproduce the run's last "
           "validation loss on the same windows. Peak memory: `torch.cuda.max_memory_allocated` of rank 0 "
           "(`memory_gib` in `metrics.jsonl`).", "",
           "| case | GPUs | ZeRO | TP | optimizer | offload | result | loss 1 → 20 → resumed | val loss run / export (rel.) | peak mem GiB | s |",
           "|---|---:|---:|---:|---|---|---|---|---|---:|---:|"]
    for r in report["cases"]:
        c, losses = r["case"], r["losses"]
        result = {"pass": "pass", "skip": f"skipped: {r['reason']}"}.get(r["status"], f"**FAIL**: {r['reason']}")
        trail = " → ".join(_num(losses.get(k), ".3f") for k in ("first", "trained", "resumed")) if losses else "—"
        val = (f"{_num(losses.get('val'), '.4f')} / {_num(losses.get('export_val'), '.4f')} "
               f"({_num(losses.get('export_rel_diff'), '.1e')})") if "val" in losses else "—"
        out.append(f"| {c['name']} | {c['gpus']} | {c['zero']} | {c['tp']} | {c['optimizer']} | "
                   f"{'cpu' if c['offload'] else '—'} | {result.replace('|', '/')} | {trail} | {val} | "
                   f"{_num(r['stats'].get('peak_memory_gib'), '.1f')} | {r['seconds']:.0f} |")
    measured = [r for r in report["cases"] if r["case"]["measure"] and "tokens_per_s" in r["stats"]]
    if measured:
        out += ["", f"## Throughput (alone on the GPU; medians of steps {TIMED_FROM_STEP}–{STEPS})", "",
                "The optimizer columns are Scion's own timers (`optimizer/step_s`, `optimizer/comm_s`, "
                "`optimizer/newton_schulz_s` in `metrics.jsonl`) against the step's wall time.", "",
                "| case | optimizer | ZeRO | GPUs | tokens/s | MFU | step ms | optimizer ms (share) | comm ms | Newton–Schulz ms |",
                "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in measured:
            c, s = r["case"], r["stats"]
            opt = f"{s['optimizer_s'] * 1e3:.1f} ({s['optimizer_s_share']:.1%})" if "optimizer_s" in s else "—"
            comm = f"{s['comm_s'] * 1e3:.1f}" if "comm_s" in s else "—"
            ns = f"{s['newton_schulz_s'] * 1e3:.1f}" if "newton_schulz_s" in s else "—"
            out.append(f"| {c['name']} | {c['optimizer']} | {c['zero']} | {c['gpus']} | {s['tokens_per_s']:,.0f} | "
                       f"{s['mfu']:.1%} | {s['step_s'] * 1e3:.1f} | {opt} | {comm} | {ns} |")
        by_opt = {(r["case"]["recipe"], r["case"]["zero"], r["case"]["gpus"], r["case"]["optimizer"]): r["stats"]["step_s"]
                  for r in measured}
        for (recipe, zero, gpus, name), step_s in by_opt.items():
            adamw = by_opt.get((recipe, zero, gpus, "adamw"))
            if name == "scion" and adamw:
                out += ["", f"{recipe}, ZeRO {zero}, {gpus} GPU(s): a Scion step takes {step_s / adamw:.2f}× an AdamW step."]
    ns = report.get("newton_schulz")
    if ns and ns.get("rows"):
        out += ["", "## Newton–Schulz (`disco_ds.orthogonalize`, CUDA events)", "",
                f"bf16 matmul 8192³: {ns['matmul_tflops']:.0f} TFLOP/s ({ns['matmul_tflops'] / peak:.0%} of the "
                f"{peak:g} peak). FLOPs per matrix: steps·(4m²n + 2m³), m ≤ n (SPEC 5.4). \"All\": every hidden "
                "matrix of that shape in the model in one batched call.", "",
                "| recipe | shape | matrices | method | ms one | TFLOP/s one | % peak | ms all | TFLOP/s all | % peak |",
                "|---|---|---:|---|---:|---:|---:|---:|---:|---:|"]
        for row in ns["rows"]:
            m, n = row["shape"]
            out.append(f"| {row['recipe']} | {m}×{n} | {row['count']} | {row['method']} ×{row['steps']} | "
                       f"{row['ms_one']:.3f} | {row['tflops_one']:.1f} | {row['tflops_one'] / peak:.1%} | "
                       f"{row['ms_batched']:.2f} | {row['tflops_batched']:.1f} | {row['tflops_batched'] / peak:.1%} |")
    elif ns and ns.get("error"):
        out += ["", f"Newton–Schulz timing failed: {ns['error']}"]
    return "\n".join(out) + "\n"


def write_report(report: dict[str, Any], md_path: Path, json_path: Path) -> None:
    """Write the markdown and the JSON (atomically: a reader never sees half a file)."""
    for path, text in ((md_path, render_markdown(report)), (json_path, json.dumps(report, indent=2, default=str))):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# Plan and main
# ---------------------------------------------------------------------------------------------


def select_cases(patterns: str | None, quick: bool) -> list[Case]:
    """The cases named by comma-separated names or globs (all by default), restricted to the quick
    ones with ``quick``. An unknown name is an error listing the known ones."""
    chosen = [c for c in CASES if c.quick] if quick else list(CASES)
    if patterns:
        wanted = [p.strip() for p in patterns.split(",") if p.strip()]
        unknown = [p for p in wanted if not any(fnmatch.fnmatchcase(c.name, p) for c in CASES)]
        if unknown:
            raise SystemExit(f"gpu_check: unknown case(s) {unknown}; known: {', '.join(c.name for c in CASES)}")
        chosen = [c for c in chosen if any(fnmatch.fnmatchcase(c.name, p) for p in wanted)]
    return chosen


def estimate_seconds(cases: list[Case], gpus: int, jobs: int) -> float:
    """Rough wall time of a run: data and Newton–Schulz, the measured cases one by one, the rest in ``jobs`` lanes."""
    runnable = [c for c in cases if c.gpus <= gpus]
    alone = sum(RECIPES[c.recipe].estimate_s for c in runnable if c.measure)
    shared = sum(RECIPES[c.recipe].estimate_s for c in runnable if not c.measure)
    return 40 + alone + shared / max(1, jobs)


def print_plan(cases: list[Case], ctx: Context, jobs: int, reason: str) -> None:
    """Print every command the run would execute, case by case."""
    print(f"gpu_check plan ({reason}; nothing is run)")
    print(f"workdir {_arg(ctx.workdir)}; {STEPS} steps + resume to {STEPS + RESUME_STEPS} per case; "
          f"measured cases alone, the others {jobs} at a time")
    for gpus in (1, 2):
        print(f"estimated wall time with {gpus} GPU(s): ~{estimate_seconds(cases, gpus, jobs) / 60:.0f} min "
              "(from process start-ups; not yet measured on a GPU)")
    print(f"\n[data] (skipped when {_arg(ctx.data_dir / 'meta.json')} exists)\n  {shlex.join(prepare_command(ctx))}")
    print("\n[newton-schulz] orthogonalize timed with CUDA events on the recipes' hidden shapes:")
    for recipe, shapes in recipe_hidden_shapes().items():
        print(f"  {recipe}: " + ", ".join(f"{m}×{n} ×{k}" for (m, n), k in shapes.items()))
    if any(c.offload for c in cases):
        print(f"\n[offload overlay] {_arg(ctx.offload_overlay)} = {json.dumps(OFFLOAD_OVERLAY)}")
    for case in cases:
        flags = [f"{case.gpus} GPU(s)", f"ZeRO {case.zero}", f"TP {case.tp}", f"PP {case.pp}", case.optimizer]
        if case.offload:
            flags.append("optimizer offload")
        if case.measure:
            flags.append("measured alone")
        flags.append(f"timeout {RECIPES[case.recipe].timeout_s} s")
        if case.gpus > 1:
            flags.append("needs >= 2 GPUs")
        print(f"\n[case {case.name}] " + ", ".join(flags))
        for phase, cmd in case_commands(case, ctx).items():
            print(f"  {phase:<6} {shlex.join(cmd)}")


def _versions() -> dict[str, str]:
    import importlib.metadata

    out = {"torch": torch.__version__, "python": platform.python_version()}
    for name in ("deepspeed", "transformers"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def _run_newton_schulz(ctx: Context) -> dict[str, Any]:
    out = ctx.workdir / "newton_schulz.json"
    out.unlink(missing_ok=True)
    log = ctx.log("newton_schulz", "bench")
    cmd = [_arg(ctx.python), _arg(__file__), "--ns-bench", _arg(out), "--peak-tflops", f"{ctx.peak_tflops:g}"]
    remaining = min(NS_TIMEOUT_S, ctx.deadline - time.monotonic())
    if remaining <= 0:
        return {"error": "not run: time budget used up or stopped"}
    rc = run_logged(cmd, log, remaining, _subprocess_env(ctx.device))
    if rc != 0:
        return {"error": "killed at its timeout" if rc is None else f"exited {rc}: {_error_line(log)}"}
    return json.loads(out.read_text())


def run_all(cases: list[Case], ctx: Context, jobs: int, md_path: Path, json_path: Path, command: str) -> int:
    """Data, Newton–Schulz, the measured cases alone, then the others ``jobs`` at a time; the report is
    rewritten after each. Returns the exit status."""
    began = time.monotonic()
    versions = _versions()
    report: dict[str, Any] = {
        "meta": {"device": ctx.device, "gpus": ctx.gpus, "peak_tflops": ctx.peak_tflops, "command": command,
                 "device_name": torch.cuda.get_device_name(0) if ctx.device == "cuda" else f"CPU ({platform.processor() or 'cpu'})",
                 "date": time.strftime("%Y-%m-%d %H:%M"), "seconds": 0.0, "steps": STEPS, "resume_steps": RESUME_STEPS,
                 **versions},
        "cases": [],
    }
    results: dict[str, CaseResult] = {}
    lock = threading.Lock()

    def record(result: CaseResult) -> None:
        with lock:
            results[result.case.name] = result
            report["cases"] = [asdict(results[c.name]) for c in cases if c.name in results]
            report["meta"]["seconds"] = round(time.monotonic() - began, 1)
            write_report(report, md_path, json_path)
        print(f"[{result.status}] {result.case.name} ({result.seconds:.0f} s){': ' + result.reason if result.reason else ''}",
              flush=True)

    if versions["deepspeed"] == "missing" or versions["transformers"] == "missing":
        print("gpu_check: deepspeed and transformers must be importable by this Python "
              f"({sys.executable}); carry them as wheels to a bare GPU machine", file=sys.stderr)
        return 2
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    if not (ctx.data_dir / "meta.json").is_file():
        log = ctx.log("data", "prepare")
        rc = run_logged(prepare_command(ctx), log, DATA_TIMEOUT_S, _subprocess_env(ctx.device))
        if rc != 0:
            print(f"gpu_check: preparing the data failed ({log}): {_error_line(log)}", file=sys.stderr)
            return 2
    ctx.offload_overlay.write_text(json.dumps(OFFLOAD_OVERLAY, indent=2))
    if ctx.device == "cuda":
        report["newton_schulz"] = _run_newton_schulz(ctx)

    runnable = [c for c in cases if c.gpus <= ctx.gpus]
    for case in cases:
        if case.gpus > ctx.gpus:
            record(CaseResult(case, reason=f"needs {case.gpus} GPUs"))

    def attempt(case: Case) -> CaseResult:
        if time.monotonic() > ctx.deadline - 30:  # too little left to finish one
            return CaseResult(case, reason="time budget (--budget-s) used up or stopped")
        return run_case(case, ctx)

    for case in (c for c in runnable if c.measure):
        record(attempt(case))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in concurrent.futures.as_completed([pool.submit(attempt, c) for c in runnable if not c.measure]):
            record(future.result())
    report["meta"]["seconds"] = round(time.monotonic() - began, 1)
    write_report(report, md_path, json_path)
    print(render_markdown(report))
    print(f"report: {md_path}, {json_path}")
    return 0 if all(r.status == "pass" for r in results.values() if r.case.gpus <= ctx.gpus) else 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=None, help="comma-separated case names or globs, e.g. 'tiny-*,124m-z1' (default: all)")
    parser.add_argument("--quick", action="store_true", help="only the cases marked quick (about half the time)")
    parser.add_argument("--out", type=Path, default=None, help="markdown report (default: WORKDIR/gpu_check.md)")
    parser.add_argument("--json", type=Path, default=None, help="JSON results (default: --out with .json)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "gpu_check", help="data, runs and logs")
    parser.add_argument("--jobs", type=int, default=3, help="cases run at once after the measured ones (default 3)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stop starting cases, and kill running ones, this many seconds after the start (default 540)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak per GPU for MFU and %% of peak (default 989: H100/H200 SXM)")
    parser.add_argument("--base-port", type=int, default=29700, help="master ports: base + 2·case index (+1 for the resume)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit, even with a GPU")
    # For developers: the case machinery on CPU ranks (gloo); nothing GPU-specific is measured.
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help=argparse.SUPPRESS)
    # Internal modes, each run in its own process by this script.
    parser.add_argument("--verify-export", nargs=2, type=Path, metavar=("HF_DIR", "RUN_DIR"), help=argparse.SUPPRESS)
    parser.add_argument("--ns-bench", type=Path, metavar="OUT_JSON", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point; see the module docstring."""
    args = _parser().parse_args(argv)
    if args.verify_export:
        hf_dir, run_dir = args.verify_export
        result = verify_export(hf_dir, run_dir, "cuda:0" if args.device == "cuda" else "cpu")
        (run_dir / EXPORT_CHECK_FILE).write_text(json.dumps(result, indent=2))
        print(json.dumps(result))
        return 0
    if args.ns_bench:
        args.ns_bench.write_text(json.dumps(newton_schulz_benchmark(args.peak_tflops), indent=2))
        return 0

    cases = select_cases(args.cases, args.quick)
    cuda = args.device == "cuda" and torch.cuda.is_available()
    gpus = torch.cuda.device_count() if cuda else (2 if args.device == "cpu" else 0)
    ctx = Context(workdir=args.workdir.absolute(), device=args.device, gpus=gpus, peak_tflops=args.peak_tflops,
                  base_port=args.base_port)
    jobs = 1 if args.device == "cpu" else max(1, args.jobs)  # CPU ranks share the few cores
    if args.dry_run or (args.device == "cuda" and not cuda):
        print_plan(cases, ctx, jobs, "dry run" if args.dry_run else "no CUDA device")
        return 0
    ctx.deadline = time.monotonic() + args.budget_s
    md_path = (args.out or ctx.workdir / "gpu_check.md").absolute()
    json_path = (args.json or md_path.with_suffix(".json")).absolute()
    stopped_by: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # SIGTERM from an outer timeout, or Ctrl-C: end the launched ranks now, start nothing more,
        # and let run_all finish the report of what ran (the worker threads return at once).
        stopped_by.append(signum)
        ctx.deadline = -math.inf
        _signal_running(signal.SIGKILL)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    status = run_all(cases, ctx, jobs, md_path, json_path, shlex.join(["python", _arg(__file__), *(argv or sys.argv[1:])]))
    return 128 + stopped_by[0] if stopped_by else status


if __name__ == "__main__":
    sys.exit(main())
