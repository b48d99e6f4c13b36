"""``disco_ds sweep``: the protocol of "Optimal Scaling Needs Optimal Norm" as one command.

One constant-learning-rate run per (η, B), no warmup, no decay, each read at every horizon D on
the way (the paper reads its horizons off one long run, not one run per horizon). Per horizon the
readings give the paper's three results:

* the optimal learning rate η*(B) of every batch size: the vertex of a parabola of log loss in
  log2 η through the points nearest the best one;
* the optimal batch B*: the batch whose optimum is lowest (a parabola in log2 B with ≥ 3 batches);
* the optimal output norm: per batch, the vertex of a parabola of log loss in log2 ‖W_out‖_RMS→∞
  through the (up to) 7 points nearest the optimum, the paper's method; reported at B*.

With ≥ 3 horizons and ≥ 3 batches the exponents of η*(B, D) = γ·B^α·D^β and B*(D) ∝ D^a follow by
least squares, with their standard errors, and the ``scaling.anchor_*`` overrides that re-anchor a
recipe on this sweep. Everything lands in ``OUT/sweep.json`` (the contract below), next to
``loss_vs_lr.png`` and ``loss_vs_norm.png`` (the paper's Fig. 1 and 2)::

    {"runs": [{"lr": float, "batch_tokens": int,
               "horizons": [{"tokens": int, "loss": float, "val_loss": float, "output_norm": float}, ...]},
              ...],
     "fit": {...}}

An interrupted sweep resumes: finished runs (``runs/<name>/result.json``) are not redone, and an
unfinished run resumes from its newest checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = [
    "HorizonReading",
    "RunResult",
    "read_horizons",
    "fit_sweep",
    "plot_sweep",
    "run_sweep",
    "add_arguments",
    "main",
]

OUTPUT_NORM = "norm/output/weight"  # the trainer's name for ‖W_out‖_RMS→∞ (disco_ds.trainer.metrics)
PARABOLA_POINTS = 7  # the paper fits its parabolas through the 7 points nearest the optimum


@dataclass
class HorizonReading:
    """One run read at one horizon: train loss (mean over the last tenth of the steps before it),
    validation loss and the output layer's RMS→∞ norm at that step."""

    tokens: int
    loss: float
    val_loss: float
    output_norm: float


@dataclass
class RunResult:
    lr: float
    batch_tokens: int
    horizons: list[HorizonReading]

    def to_dict(self) -> dict[str, Any]:
        return {"lr": self.lr, "batch_tokens": self.batch_tokens, "horizons": [asdict(h) for h in self.horizons]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunResult":
        return cls(float(d["lr"]), int(d["batch_tokens"]), [HorizonReading(**h) for h in d["horizons"]])


# ----------------------------------------------------------------------------- reading a run


def horizon_steps(horizons: Sequence[int], batch_tokens: int) -> list[int]:
    """The optimizer step at which each horizon is reached; every horizon must be whole batches."""
    steps = []
    for d in horizons:
        if d % batch_tokens:
            raise ValueError(f"horizon {d:,} tokens is not a whole number of batches of {batch_tokens:,} tokens")
        steps.append(d // batch_tokens)
    return steps


def read_horizons(metrics_path: Path, horizons: Sequence[int], batch_tokens: int) -> list[HorizonReading]:
    """Read a finished run's ``metrics.jsonl`` at every horizon (the last row of a step wins: a
    resumed run logs the steps after its checkpoint again)."""
    train: dict[int, dict[str, Any]] = {}
    evals: dict[int, float] = {}
    for line in metrics_path.read_text().splitlines():
        row = json.loads(line)
        if "val/loss" in row:
            evals[row["step"]] = row["val/loss"]
        elif "loss" in row:
            train[row["step"]] = row
    readings = []
    for d, step in zip(horizons, horizon_steps(horizons, batch_tokens)):
        window = [train[s]["loss"] for s in range(max(1, step - max(1, step // 10) + 1), step + 1) if s in train]
        norm_row = train.get(step, {})
        missing = [what for what, ok in (("train loss", window), ("validation loss", step in evals),
                                          (OUTPUT_NORM, OUTPUT_NORM in norm_row)) if not ok]
        if missing:
            raise ValueError(f"{metrics_path}: no {', '.join(missing)} logged at step {step} (horizon {d:,} tokens)")
        readings.append(HorizonReading(d, float(np.mean(window)), float(evals[step]), float(norm_row[OUTPUT_NORM])))
    return readings


# ----------------------------------------------------------------------------- fitting


def _parabola_vertex(x: np.ndarray, y: np.ndarray, points: int = PARABOLA_POINTS) -> tuple[float, float]:
    """(x, y) of the minimum of a parabola through the ``points`` samples nearest (in x) to the best
    one. With fewer than 3 samples, or a fit that opens downwards or lands outside the samples
    used, the best sample itself."""
    best = int(np.argmin(y))
    near = np.argsort(np.abs(x - x[best]), kind="stable")[:points]
    if len(near) < 3 or len(np.unique(x[near])) < 3:
        return float(x[best]), float(y[best])
    a, b, c = np.polyfit(x[near], y[near], 2)
    vertex = -b / (2 * a) if a > 0 else math.nan
    if not (a > 0 and x[near].min() <= vertex <= x[near].max()):
        return float(x[best]), float(y[best])
    return float(vertex), float(c - b * b / (4 * a))


def _least_squares(features: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients and their standard errors (σ²(XᵀX)⁻¹ with σ² from the residuals)."""
    coef, *_ = np.linalg.lstsq(features, target, rcond=None)
    dof = len(target) - features.shape[1]
    residual = target - features @ coef
    sigma2 = float(residual @ residual) / dof if dof > 0 else math.nan
    cov = sigma2 * np.linalg.pinv(features.T @ features)
    return coef, np.sqrt(np.abs(np.diag(cov)))


def fit_sweep(runs: Sequence[RunResult], metric: str = "loss") -> dict[str, Any]:
    """The paper's fits over a sweep (see the module docstring); ``metric`` is ``loss`` or ``val_loss``."""
    horizons = sorted({h.tokens for r in runs for h in r.horizons})
    batches = sorted({r.batch_tokens for r in runs})
    per_horizon = []
    for d in horizons:
        rows = []
        for b in batches:
            points = [(r.lr, h) for r in runs if r.batch_tokens == b for h in r.horizons if h.tokens == d]
            if not points:
                continue
            lr = np.log2([p[0] for p in points])
            log_loss = np.log([getattr(p[1], metric) for p in points])
            log_norm = np.log2([p[1].output_norm for p in points])
            lr_opt, loss_at_lr = _parabola_vertex(lr, log_loss)
            norm_opt, _ = _parabola_vertex(log_norm, log_loss)
            rows.append({"batch_tokens": b, "lr_opt": 2.0**lr_opt, "loss_opt": math.exp(loss_at_lr),
                         "optimal_norm": 2.0**norm_opt, "runs": len(points)})
        log_b = np.log2([row["batch_tokens"] for row in rows])
        b_opt, _ = _parabola_vertex(log_b, np.log([row["loss_opt"] for row in rows]))
        nearest = rows[int(np.argmin(np.abs(log_b - b_opt)))]
        per_horizon.append({"tokens": d, "batches": rows, "batch_opt": 2.0**b_opt,
                            "lr_opt": nearest["lr_opt"], "optimal_norm": nearest["optimal_norm"]})
    fit: dict[str, Any] = {"metric": metric, "horizons": per_horizon}
    if len(horizons) >= 3 and len(batches) >= 3:
        fit.update(_exponents(per_horizon))
    return fit


def _exponents(per_horizon: list[dict[str, Any]]) -> dict[str, Any]:
    """log2 η* = α log2 B + β log2 D + γ over every (B, D), and log2 B* = a log2 D + b."""
    points = [(row["batch_tokens"], h["tokens"], row["lr_opt"]) for h in per_horizon for row in h["batches"]]
    log_b, log_d, log_lr = (np.log2([p[i] for p in points]) for i in range(3))
    (alpha, beta, gamma), (alpha_err, beta_err, gamma_err) = _least_squares(
        np.stack([log_b, log_d, np.ones_like(log_b)], axis=1), log_lr)
    d = np.log2([h["tokens"] for h in per_horizon])
    (a, b), (a_err, b_err) = _least_squares(np.stack([d, np.ones_like(d)], axis=1), np.log2([h["batch_opt"] for h in per_horizon]))
    # Re-anchor at the longest horizon: B*(D) there and η*(B*, D) from the fitted law.
    d_ref = per_horizon[-1]["tokens"]
    b_ref = int(round(2.0 ** (a * math.log2(d_ref) + b)))
    lr_ref = 2.0 ** (alpha * math.log2(b_ref) + beta * math.log2(d_ref) + gamma)
    return {
        "lr_law": {"lr_batch_exponent": alpha, "lr_batch_exponent_err": alpha_err, "lr_tokens_exponent": beta,
                   "lr_tokens_exponent_err": beta_err, "log2_constant": gamma, "log2_constant_err": gamma_err},
        "batch_law": {"batch_exponent": a, "batch_exponent_err": a_err, "log2_constant": b, "log2_constant_err": b_err},
        "anchor_overrides": [f"scaling.anchor_lr={lr_ref:.6g}", f"scaling.anchor_batch_tokens={b_ref}",
                             f"scaling.anchor_tokens={d_ref}", f"scaling.batch_exponent={a:.4g}",
                             f"scaling.lr_batch_exponent={alpha:.4g}", f"scaling.lr_tokens_exponent={beta:.4g}"],
    }


# ----------------------------------------------------------------------------- plots


def plot_sweep(runs: Sequence[RunResult], fit: dict[str, Any], out_dir: Path) -> list[Path]:
    """``loss_vs_lr.png`` and ``loss_vs_norm.png``: one panel per horizon, one curve per batch,
    the optimum marked (the paper's Fig. 1 and 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metric = fit["metric"]
    horizons = fit["horizons"]
    paths = []
    for name, x_of, x_label in (("loss_vs_lr", lambda r, h: r.lr, "learning rate η"),
                                ("loss_vs_norm", lambda r, h: h.output_norm, "‖W_out‖_RMS→∞")):
        fig, axes = plt.subplots(1, len(horizons), figsize=(4.2 * len(horizons), 3.6), squeeze=False)
        for ax, horizon in zip(axes[0], horizons):
            for row in horizon["batches"]:
                pts = sorted((x_of(r, h), getattr(h, metric)) for r in runs if r.batch_tokens == row["batch_tokens"]
                             for h in r.horizons if h.tokens == horizon["tokens"])
                ax.plot(*zip(*pts), marker="o", label=f"B = {row['batch_tokens']:,}")
            if name == "loss_vs_norm":
                ax.axvline(horizon["optimal_norm"], color="k", ls="--", lw=1, label=f"optimal {horizon['optimal_norm']:.3g}")
            else:
                ax.axvline(horizon["lr_opt"], color="k", ls="--", lw=1, label=f"η* {horizon['lr_opt']:.3g}")
            ax.set_xscale("log", base=2)
            ax.set_title(f"D = {horizon['tokens']:,} tokens")
            ax.set_xlabel(x_label)
            ax.set_ylabel(metric.replace("_", " "))
            ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------- running


def run_name(lr: float, batch_tokens: int) -> str:
    return f"lr{lr:.6g}_b{batch_tokens}"


def run_command(recipe: str, lr: float, batch_tokens: int, horizons: Sequence[int], run_dir: Path,
                overrides: Sequence[str], ranks: int, master_port: int) -> list[str]:
    """The ``disco_ds train`` command of one sweep run: constant lr (no warmup, no decay), the
    batch forced, trained to the last horizon, evaluated and logged at every horizon."""
    steps = horizon_steps(horizons, batch_tokens)
    # Evaluations land on every horizon. The trainer writes every step's row (the norm included,
    # norms_interval=1) whatever logging.interval, which only sets how often the device is read.
    every = math.gcd(*steps)
    keys = [
        *overrides,
        f"optimizer.lr={lr!r}", f"train.global_batch_tokens={batch_tokens}", f"train.tokens={max(horizons)}",
        "schedule.warmup=0", "schedule.decay=0", f"train.run_dir={run_dir}", f"eval.interval={every}",
        f"checkpoint.interval={every}", "checkpoint.resume=auto", "logging.norms_interval=1",
    ]
    if ranks > 1:
        launcher = Path(sys.executable).with_name("deepspeed")
        return [str(launcher), "--num_gpus", str(ranks), "--master_port", str(master_port), "--module", "disco_ds",
                "train", recipe, *keys]
    return [sys.executable, "-m", "disco_ds", "train", recipe, *keys]


def run_sweep(recipe: str, lrs: Sequence[float], batches: Sequence[int], horizons: Sequence[int], out: Path,
              overrides: Sequence[str] = (), ranks_per_run: int = 1, parallel: int = 1, metric: str = "loss",
              master_port: int = 29700) -> dict[str, Any]:
    """Run (or resume) the sweep, write ``sweep.json`` and the plots, and return the JSON's content.

    ``parallel`` runs go at once, each on its own ``ranks_per_run`` devices (CUDA_VISIBLE_DEVICES
    slices when GPUs are present)."""
    out.mkdir(parents=True, exist_ok=True)
    for b in batches:
        horizon_steps(horizons, b)  # refuse before running anything
    todo = [(lr, b) for b in batches for lr in lrs if not (out / "runs" / run_name(lr, b) / "result.json").is_file()]
    gpus = _visible_gpus()
    running: list[tuple[subprocess.Popen, float, int, Path, int]] = []
    free_slots = list(range(parallel))
    failures = []
    while todo or running:
        while todo and free_slots:
            slot = free_slots.pop(0)
            lr, b = todo.pop(0)
            run_dir = out / "runs" / run_name(lr, b)
            run_dir.mkdir(parents=True, exist_ok=True)
            env = dict(os.environ)
            if gpus:
                env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus[slot * ranks_per_run:(slot + 1) * ranks_per_run])
            cmd = run_command(recipe, lr, b, horizons, run_dir, overrides, ranks_per_run, master_port + slot)
            print(f"sweep: run {run_name(lr, b)} ({len(todo)} queued)", flush=True)
            log = open(run_dir / "sweep_run.log", "a")
            running.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), lr, b, run_dir, slot))
        time.sleep(1.0)
        for job in list(running):
            proc, lr, b, run_dir, slot = job
            if proc.poll() is None:
                continue
            running.remove(job)
            free_slots.append(slot)
            if proc.returncode != 0:
                failures.append(f"{run_name(lr, b)} exited with {proc.returncode} (see {run_dir / 'sweep_run.log'})")
                continue
            result = RunResult(lr, b, read_horizons(run_dir / "metrics.jsonl", horizons, b))
            (run_dir / "result.json").write_text(json.dumps(result.to_dict(), indent=1))
    if failures:
        raise RuntimeError("sweep runs failed: " + "; ".join(failures))
    runs = [RunResult.from_dict(json.loads((out / "runs" / run_name(lr, b) / "result.json").read_text()))
            for b in batches for lr in lrs]
    fit = fit_sweep(runs, metric)
    document = {"runs": [r.to_dict() for r in runs], "fit": fit}
    (out / "sweep.json").write_text(json.dumps(document, indent=1))
    plot_sweep(runs, fit, out)
    return document


def _visible_gpus() -> list[str]:
    try:
        import torch
    except ImportError:
        return []
    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def _ints(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides for every run")
    parser.add_argument("--lr", type=_floats, required=True, help="learning rates, comma-separated")
    parser.add_argument("--batch-tokens", type=_ints, required=True, help="batch sizes in tokens, comma-separated")
    parser.add_argument("--horizons", type=_ints, required=True, help="token horizons read on the way, comma-separated")
    parser.add_argument("--out", type=Path, required=True, help="sweep folder (sweep.json, plots, runs/)")
    parser.add_argument("--ranks-per-run", type=int, default=1, help="ranks of each run (the deepspeed launcher when > 1)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (each on its own GPUs when there are)")
    parser.add_argument("--metric", choices=("loss", "val_loss"), default="loss", help="what the fits minimise")


def main(args: argparse.Namespace) -> int:
    document = run_sweep(args.recipe, args.lr, args.batch_tokens, args.horizons, args.out, args.overrides,
                         args.ranks_per_run, args.parallel, args.metric)
    for h in document["fit"]["horizons"]:
        print(f"D = {h['tokens']:,}: B* ≈ {h['batch_opt']:,.0f} tokens, η* ≈ {h['lr_opt']:.4g}, "
              f"optimal ‖W_out‖_RMS→∞ ≈ {h['optimal_norm']:.3g}")
    for line in document["fit"].get("anchor_overrides", []):
        print(line)
    print(f"wrote {args.out / 'sweep.json'}, {args.out / 'loss_vs_lr.png'}, {args.out / 'loss_vs_norm.png'}")
    return 0
