"""What the trainer logs, on rank 0: a JSON-lines file, wandb, the console and a plot.

One :class:`MetricsLogger` per run directory:

* ``run_dir/metrics.jsonl`` gets one line per :meth:`MetricsLogger.log` / :meth:`MetricsLogger.log_eval`
  call, ``{"step": 120, "loss": 2.31, ...}``; validation metrics carry a ``val/`` prefix. The file is
  the run's full history: a resumed run first drops the lines a crashed run wrote after its last
  checkpoint, then appends.
* wandb (optional) receives the same dictionaries, with ``step`` as their x axis. The run id is
  kept in ``run_dir/wandb_id`` so a resumed run continues the same wandb run (``resume="allow"``);
  a fresh run (``resume_step=0``) gets a new id.
* The console shows a tqdm bar when stdout is a terminal, otherwise one line every ``log_interval``
  steps::

      step 120/600 | loss 2.314 | lr 1.2e-02 | 45.1k tok/s | MFU 31.2% | mem 3.1 GiB | ‖W_out‖ 27.3 | eta 4m12s

* Every row also carries ``time`` (Unix wall time) and ``elapsed`` (seconds since the run started,
  in this process: a resumed run counts from its own start).
* :meth:`MetricsLogger.close` draws ``run_dir/curves.png``: loss (train and validation) against step
  and, when logged, the RMS→∞ norm of the output layer (``norm/output/weight``, SPEC 4).

On ranks other than 0 pass ``enabled=False``: every method is then a no-op.

:class:`RunLog` keeps rank 0's console (configuration, plan, resume, warnings, DeepSpeed's log
lines, errors with their tracebacks) in ``run_dir/train.log``, appended to by every launch.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import os
import secrets
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["flops_per_token", "memory_gib", "MetricsLogger", "RunLog", "METRICS_FILE", "CURVES_FILE", "RUN_LOG"]

METRICS_FILE = "metrics.jsonl"
RUN_LOG = "train.log"
CURVES_FILE = "curves.png"
WANDB_ID_FILE = "wandb_id"
OUTPUT_NORM = "norm/output/weight"
_STEP_TIME_WINDOW = 20  # steps in the moving average behind the ETA
_warned_no_matplotlib = False


def flops_per_token(n_params_non_embedding: int, n_layer: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token, forward plus backward: ``6·N + 12·L·d·T``.

    The convention of PaLM (Chowdhery et al. 2022, appendix B): ``6·N`` for the matrix multiplies
    of the ``N`` weights (2 FLOPs per multiply-add forward, twice that backward), plus ``12·L·d·T``
    for the attention scores and their weighted sum over a context of ``T`` tokens (``d`` = total
    width of the query heads), counted without causal masking savings. ``N`` should count every
    weight used in a matrix multiply (the output head included, the embedding lookup excluded).
    Model FLOPs utilisation is then ``flops_per_token · tokens_per_s / peak_flops``.
    """
    return 6.0 * n_params_non_embedding + 12.0 * n_layer * d_model * seq_len


def memory_gib() -> float:
    """Peak memory in GiB: allocated by PyTorch on the current CUDA device, else the process's peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**30
    try:
        import resource
    except ImportError:  # Windows
        return 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux


def _duration(seconds: float) -> str:
    """``42s``, ``4m12s``, ``3h05m``."""
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _si(x: float) -> str:
    """``950``, ``45.1k``, ``1.23M``."""
    if abs(x) >= 1e6:
        return f"{x / 1e6:.2f}M"
    if abs(x) >= 1e3:
        return f"{x / 1e3:.1f}k"
    return f"{x:.0f}"


def _learning_rate(metrics: dict[str, Any]) -> Any:
    if "lr" in metrics:
        return metrics["lr"]
    return next((v for k, v in metrics.items() if k.startswith("lr/")), None)


def _real(value: Any) -> float | None:
    """``value`` as a float if it is a real number (not a bool), else ``None``."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _as_number(value: Any) -> Any:
    """Tensors and numpy scalars to Python floats; anything else unchanged."""
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    try:
        return float(value)
    except (TypeError, ValueError):
        return value


class MetricsLogger:
    """Logs training metrics to ``run_dir/metrics.jsonl``, wandb and the console (see the module doc).

    Args:
        run_dir: the run directory (created if needed).
        total_steps: the last step of the run (for the progress bar and the ETA).
        log_interval: print a console line every this many steps when stdout is not a terminal.
        enabled: ``False`` on ranks other than 0: nothing is written, printed or sent.
        wandb: ``None`` for no wandb, else a dict with keys ``project``, ``name``, ``mode``
            (``"offline"``, ``"online"`` or ``"disabled"``), ``dir`` (default ``$WANDB_DIR``, else
            ``run_dir``) and ``config`` (the resolved run configuration). Missing keys fall back to
            wandb's own environment variables (``WANDB_PROJECT``, ``WANDB_MODE``, ...).
        resume_step: the step of the checkpoint the run resumes from (0 for a fresh run). Lines of
            ``metrics.jsonl`` with a larger step (written after that checkpoint by a crashed run)
            are dropped; a fresh run starts the file anew.
        started: Unix time the run started (``elapsed`` counts from it); default: now.
    """

    def __init__(
        self,
        run_dir: Path,
        total_steps: int,
        *,
        log_interval: int = 10,
        enabled: bool = True,
        wandb: dict[str, Any] | None = None,
        resume_step: int = 0,
        started: float | None = None,
    ) -> None:
        self.enabled = enabled
        self.started = time.time() if started is None else started
        if not enabled:
            return
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total_steps = total_steps
        self.log_interval = max(1, log_interval)
        self.resume_step = resume_step
        self.path = self.run_dir / METRICS_FILE
        self._truncate(resume_step)
        self._file = self.path.open("a", encoding="utf-8")
        self._wandb_cfg = dict(wandb) if wandb and wandb.get("mode") != "disabled" else None
        self._wandb_run: Any = None
        self._step_times: collections.deque[float] = collections.deque(maxlen=_STEP_TIME_WINDOW)
        self._last_step, self._last_time = resume_step, math.nan  # the first step (warm-up) is not timed
        self._bar: Any = None
        if sys.stdout.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=resume_step, file=sys.stdout, dynamic_ncols=True, unit="step")
        self._closed = False

    # ------------------------------------------------------------------ public

    def log(self, step: int, metrics: dict[str, float]) -> None:
        """Record the training metrics of optimizer step ``step`` (every step, here or in :meth:`log_steps`)."""
        self.log_steps([(step, metrics)])

    def log_steps(self, rows: list[tuple[int, dict[str, Any]]]) -> None:
        """Record the metrics of consecutive optimizer steps read back together (the trainer reads
        the device once per log interval). They count as one span for the ETA."""
        if not self.enabled or not rows:
            return
        self._time_step(rows[-1][0])
        for step, raw in rows:
            metrics = {k: _as_number(v) for k, v in raw.items()}
            self._write(step, metrics)
            if self._bar is not None:
                self._bar.set_postfix_str(self._postfix(metrics), refresh=False)
                self._bar.update(step - self._bar.n)
            elif step % self.log_interval == 0 or step == self.total_steps:
                print(self._console_line(step, metrics), flush=True)

    def log_eval(self, step: int, metrics: dict[str, float]) -> None:
        """Record validation metrics at ``step``; keys get a ``val/`` prefix. Always printed."""
        if not self.enabled:
            return
        metrics = {(k if k.startswith("val/") else f"val/{k}"): _as_number(v) for k, v in metrics.items()}
        self._write(step, metrics)
        parts = [f"eval step {step}/{self.total_steps}"]
        parts += [f"{k} {v:#.4g}" if _real(v) is not None else f"{k} {v!r}" for k, v in metrics.items()]
        line = " | ".join(parts)
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def eta_seconds(self, step: int) -> float:
        """Estimated seconds to ``total_steps``, from the mean of the last step times."""
        if not self.enabled or not self._step_times:
            return math.nan
        return sum(self._step_times) / len(self._step_times) * max(0, self.total_steps - step)

    def close(self) -> None:
        """Finish wandb, close the file and the bar, and draw ``run_dir/curves.png``. Idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._file.close()
        if self._bar is not None:
            self._bar.close()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        plot_curves(self.path, self.run_dir / CURVES_FILE)

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _truncate(self, resume_step: int) -> None:
        """Keep only the lines up to ``resume_step`` (none for a fresh run); drop a torn last line."""
        if not self.path.exists():
            return
        kept = []
        if resume_step > 0:
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    if json.loads(line)["step"] <= resume_step:
                        kept.append(line + "\n")
                except (ValueError, KeyError, TypeError):
                    continue
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, self.path)

    def _write(self, step: int, metrics: dict[str, Any]) -> None:
        now = time.time()
        self._file.write(json.dumps({"step": step, **metrics, "time": round(now, 3),
                                     "elapsed": round(now - self.started, 3)}) + "\n")
        self._file.flush()
        if self._wandb_cfg is not None:
            run = self._wandb_run or self._init_wandb()
            if run is not None:
                # Our step is a metric, not wandb's internal step: after a resume the steps between
                # the checkpoint and the crash come again, which wandb's own step would drop.
                run.log({"step": step, **metrics})

    def _init_wandb(self) -> Any:
        cfg = self._wandb_cfg
        try:
            import wandb
        except ImportError:
            warnings.warn("wandb is not installed: logging to metrics.jsonl and the console only", stacklevel=3)
            self._wandb_cfg = None
            return None
        id_file = self.run_dir / WANDB_ID_FILE
        if id_file.exists() and self.resume_step > 0:
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # wandb ids: 8 lowercase letters or digits
            id_file.write_text(run_id + "\n")
        wandb_dir = Path(cfg.get("dir") or os.environ.get("WANDB_DIR") or self.run_dir)
        wandb_dir.mkdir(parents=True, exist_ok=True)
        self._wandb_run = wandb.init(
            project=cfg.get("project"),
            name=cfg.get("name"),
            mode=cfg.get("mode"),
            dir=str(wandb_dir),
            config=cfg.get("config"),
            id=run_id,
            resume="allow",
        )
        self._wandb_run.define_metric("step")
        self._wandb_run.define_metric("*", step_metric="step")
        return self._wandb_run

    def _time_step(self, step: int) -> None:
        now = time.perf_counter()
        if step > self._last_step and math.isfinite(self._last_time):
            self._step_times.append((now - self._last_time) / (step - self._last_step))
        self._last_step, self._last_time = step, now

    def _fields(self, metrics: dict[str, Any]) -> list[str]:
        """The console fields for the known metric names, in a fixed order."""
        formats = (
            (metrics.get("loss"), "loss {:.3f}"),
            (_learning_rate(metrics), "lr {:.1e}"),
            (metrics.get("tokens_per_s"), None),
            (metrics.get("mfu"), "MFU {:.1%}"),
            (metrics.get("memory_gib"), "mem {:.1f} GiB"),
            (metrics.get(OUTPUT_NORM), "‖W_out‖ {:.1f}"),
        )
        fields = []
        for raw, fmt in formats:
            value = _real(raw)
            if value is not None:
                fields.append(f"{_si(value)} tok/s" if fmt is None else fmt.format(value))
        return fields

    def _console_line(self, step: int, metrics: dict[str, Any]) -> str:
        fields = [f"step {step}/{self.total_steps}", *self._fields(metrics), f"eta {_duration(self.eta_seconds(step))}"]
        return " | ".join(fields)

    def _postfix(self, metrics: dict[str, Any]) -> str:
        keep = [f for f in self._fields(metrics) if f.startswith(("loss", "lr")) or f.endswith("tok/s")]
        return ", ".join(keep + [f"eta {_duration(self.eta_seconds(self._last_step))}"])


class _Tee(io.TextIOBase):
    """A text stream that writes to ``stream`` and to ``log``, except progress-bar redraws (text
    with a carriage return), which would fill the log with copies of one line."""

    def __init__(self, stream: Any, log: io.TextIOBase) -> None:
        self.stream, self.log = stream, log

    def write(self, text: str) -> int:
        self.stream.write(text)
        if "\r" not in text:
            self.log.write(text)
        return len(text)

    def flush(self) -> None:
        self.stream.flush()
        self.log.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self.stream, "encoding", "utf-8")


class RunLog:
    """``with RunLog(run_dir / "train.log", enabled=rank == 0):`` copies what this process prints
    (stdout, stderr, warnings, DeepSpeed's logger) into the file, and an exception leaving the block
    with its traceback (a :class:`~disco_ds.trainer.config.ConfigError` as its one-line message). Appends,
    so the launches of a resumed run follow each other, each under a dated header."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = Path(path), enabled
        self._file: Any = None
        self._saved: tuple[Any, Any] = (None, None)
        self._handler: logging.Handler | None = None

    def __enter__(self) -> RunLog:
        if not self.enabled:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("a", encoding="utf-8", buffering=1)
        self._file.write(f"==== {time.strftime('%Y-%m-%d %H:%M:%S %z')} {' '.join(sys.argv)}\n")
        self._saved = (sys.stdout, sys.stderr)
        sys.stdout, sys.stderr = _Tee(sys.stdout, self._file), _Tee(sys.stderr, self._file)
        # DeepSpeed's logger holds the stream it was created with (before the tee): a handler of its own.
        self._handler = logging.StreamHandler(self._file)
        self._handler.setFormatter(logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s"))
        logging.getLogger("DeepSpeed").addHandler(self._handler)
        return self

    def __exit__(self, kind: Any, error: BaseException | None, tb: Any) -> None:
        if not self.enabled or self._file is None:
            return
        from disco_ds.trainer.config import ConfigError

        sys.stdout, sys.stderr = self._saved
        logging.getLogger("DeepSpeed").removeHandler(self._handler)
        if isinstance(error, ConfigError):
            self._file.write(f"configuration error: {error}\n")
        elif error is not None and not isinstance(error, SystemExit):
            self._file.write("".join(traceback.format_exception(kind, error, tb)))
        self._file.close()
        self._file = None


def _read_history(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return rows


def plot_curves(metrics_path: Path, out_path: Path) -> Path | None:
    """Draw loss (train, and validation if logged) and the output-layer norm against step from a
    ``metrics.jsonl`` file into a PNG. Returns the PNG path, or ``None`` without matplotlib or data."""
    global _warned_no_matplotlib
    try:
        from matplotlib.figure import Figure  # no pyplot: the caller's backend is left alone
    except ImportError:
        if not _warned_no_matplotlib:
            warnings.warn("matplotlib is not installed: skipping the training-curve plot", stacklevel=2)
            _warned_no_matplotlib = True
        return None
    rows = _read_history(Path(metrics_path)) if Path(metrics_path).exists() else []

    def series(key: str) -> tuple[list[int], list[float]]:
        pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    train, val, norm = series("loss"), series("val/loss"), series(OUTPUT_NORM)
    if not (train[0] or val[0]):
        return None
    panels = 2 if norm[0] else 1
    fig = Figure(figsize=(6.5 * panels, 4.2), layout="constrained")
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    if train[0]:
        ax.plot(*train, lw=1, label="train")
    if val[0]:
        ax.plot(*val, "o-", ms=3, label="validation")
    ax.set(xlabel="step", ylabel="loss", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if norm[0]:
        axes[1].plot(*norm, lw=1, color="tab:red", label="measured")
        projected, target = series("norm/output/projected"), series("norm/output/target")
        if projected[0]:  # norm guidance: where the norm was heading at each log point
            axes[1].plot(*projected, lw=1, ls="--", color="tab:purple", label="projected to the end of the run")
        if target[0]:
            axes[1].axhline(target[1][-1], color="k", lw=1, ls=":", label=f"target {target[1][-1]:g}")
        axes[1].set(xlabel="step", ylabel="RMS→∞ norm", title="output layer ‖W_out‖ (RMS→∞)")
        axes[1].grid(alpha=0.3)
        if projected[0] or target[0]:
            axes[1].legend()
    fig.savefig(out_path, dpi=110)
    return Path(out_path)
