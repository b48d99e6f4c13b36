"""Benchmark of ``disco_ds.orthogonalize`` against ``torch.optim.Muon`` on NormGPT hidden-matrix shapes.

For every shape ``m×n`` (one random Gaussian gradient, shared by all methods) it measures:

* ``orthogonalize`` with ``quintic`` and ``polar_express`` (``--steps`` iterations, bf16 matmuls,
  the direct form), the quintic in the Gram form on shapes where Scion uses it (``n > 1.5·m``),
  and ``svd`` (the exact fp32 oracle);
* a full ``torch.optim.Muon.step()`` (momentum + Newton–Schulz + update, ``weight_decay=0``) and
  a full ``disco_ds.Scion`` step with ``norm="spectral"`` (momentum + LMO + update, its default
  form) on a parameter of that shape, the apples-to-apples optimizer-step comparison.

Each time is the median of ``--repeats`` runs after ``--warmup`` runs, the methods of a shape
timed in interleaved rounds; the ratio column divides by the Muon step's time. GFLOP/s counts
the bf16 matmul FLOPs of ``ns_flops``. Quality is reported next to speed: the singular values
of the result (for the optimizer rows, of the first update of a zero parameter with ``lr = 1``,
divided by the optimizer's shape scale), as their range and ``max |σᵢ − 1|`` (exact ``U Vᵀ`` has
all ``σᵢ = 1``; a square Gaussian matrix has a tail of near-zero σ that 5 steps cannot lift).

A second table orthogonalises ``--batch-size`` same-shape matrices in one batched call versus a
loop of single calls, the reason Scion stacks same-shape parameters: the gain comes from fewer,
larger kernels, so it is large on GPUs and for small matrices and small where a single matrix
already saturates the few cores of a CPU.

On CUDA the timings use CUDA events and the table gains the fraction of ``--peak-tflops``
(default: H100 SXM dense bf16). ``torch.set_num_threads`` is left at its default. The header
compares bf16 and fp32 throughput of the Gram matmul ``X Xᵀ`` (the iteration always runs in
bf16, whatever ``--dtype``, the gradient's dtype, says) and gives the 1-minute load average: on
a CPU shared with other processes the threaded matmuls slow down by large, uneven factors, so
compare rows of one run only.

Run (the default shapes take about 1.5 minutes on 2 idle CPU cores; ``--full`` adds the
2048×5504 FFN matrices of the 2048-wide preset, about 5 more minutes on CPU)::

    .venv/bin/python benchmarks/bench_orthogonalize.py [--shapes 768x768,2048x768] [--full]
        [--repeats 5] [--warmup 1] [--steps 5] [--dtype float32] [--out results.md]
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import disco_ds
from disco_ds import orthogonalize
from disco_ds.optim.newton_schulz import ns_flops, uses_gram

Shape = tuple[int, int]
OptimizerFactory = Callable[[list[torch.nn.Parameter], float], torch.optim.Optimizer]

DEFAULT_SHAPES: tuple[Shape, ...] = ((768, 768), (2048, 768), (768, 2048), (2048, 2048))
"""Attention and FFN matrices of the 768-wide preset, and a 2048-wide attention matrix."""
FULL_EXTRA_SHAPES: tuple[Shape, ...] = ((5504, 2048), (2048, 5504))
"""FFN up / down of the 2048-wide preset (``--full``): 1.5–3.5 s per quintic call on 2 CPU cores."""

MUON_STEP = "Muon step"
SCION_STEP = "Scion step (spectral)"


@dataclass
class Row:
    shape: str
    method: str
    ms: float
    flops: int | None  # matmul FLOPs of one call, for the methods that run Newton–Schulz only
    sigma: torch.Tensor | None  # singular values of the orthogonalised result


@dataclass
class Case:
    method: str
    fn: Callable[[], object]
    flops: int | None = None
    sigma: torch.Tensor | None = None


# ------------------------------------------------------------------------------ timing


def time_call_ms(fn: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call in milliseconds; on CUDA, measured by events around the call."""
    if device.type == "cuda":
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def median_ms(fns: list[Callable[[], object]], device: torch.device, warmup: int, repeats: int) -> list[float]:
    """Median time of each function; they run in interleaved rounds so that a load change on a
    shared machine hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, samples in zip(fns, times):
            samples.append(time_call_ms(fn, device))
    return [statistics.median(samples) for samples in times]


def run_cases(label: str, cases: list[Case], device: torch.device, args: argparse.Namespace) -> list[Row]:
    times = median_ms([c.fn for c in cases], device, args.warmup, args.repeats)
    return [Row(label, c.method, ms, c.flops, c.sigma) for c, ms in zip(cases, times)]


# ------------------------------------------------------------------------------ methods


def singular_values(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(x.float()).cpu()


def first_update(make: OptimizerFactory, grad: torch.Tensor) -> torch.Tensor:
    """Negated first step of an optimizer (``lr = 1``) on a zero parameter with gradient ``grad``."""
    p = torch.nn.Parameter(torch.zeros_like(grad))
    p.grad = grad
    make([p], 1.0).step()
    return -p.detach()


def make_muon(steps: int) -> OptimizerFactory:
    return lambda params, lr: torch.optim.Muon(params, lr=lr, weight_decay=0.0, ns_steps=steps)


def make_scion(steps: int) -> OptimizerFactory:
    return lambda params, lr: disco_ds.Scion([{"params": params, "lr": lr, "norm": "spectral", "ns_steps": steps}])


def bench_shape(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    n_rows, n_cols = shape
    grad = torch.randn(shape, device=device, dtype=dtype)

    cases: list[Case] = []
    methods = [("quintic", "quintic", False), ("polar_express", "polar_express", False), ("svd (exact)", "svd", False)]
    if uses_gram(n_rows, n_cols, args.steps):  # the form Scion runs on this shape
        methods[1:1] = [("quintic, Gram form", "quintic", True)]
    for name, method, gram in methods:
        run = functools.partial(orthogonalize, grad, steps=args.steps, method=method, gram=gram)
        flops = None if method == "svd" else ns_flops(n_rows, n_cols, args.steps, gram=gram)
        cases.append(Case(name, run, flops, singular_values(run())))

    # Shape scales of the updates: Muon's default ("original") lr adjustment √max(1, rows/cols),
    # Scion's spectral LMO √(rows/cols).
    optimizers = (
        (MUON_STEP, make_muon(args.steps), math.sqrt(max(1.0, n_rows / n_cols))),
        (SCION_STEP, make_scion(args.steps), math.sqrt(n_rows / n_cols)),
    )
    for name, make, scale in optimizers:
        param = torch.nn.Parameter(0.02 * torch.randn(shape, device=device, dtype=dtype))
        param.grad = grad
        cases.append(Case(name, make([param], 0.01).step, sigma=singular_values(first_update(make, grad) / scale)))
    return run_cases(f"{n_rows}×{n_cols}", cases, device, args)


def bench_batched(shape: Shape, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> list[Row]:
    """``--batch-size`` same-shape matrices: a loop of single quintic calls, then one batched call."""
    grads = torch.randn(args.batch_size, *shape, device=device, dtype=dtype)
    flops = args.batch_size * ns_flops(*shape, args.steps)

    def loop() -> list[torch.Tensor]:
        return [orthogonalize(g, steps=args.steps) for g in grads]

    cases = [
        Case(f"quintic, loop of {args.batch_size} calls", loop, flops),
        Case("quintic, one batched call", functools.partial(orthogonalize, grads, steps=args.steps), flops),
    ]
    return run_cases(f"{args.batch_size}×{shape[0]}×{shape[1]}", cases, device, args)


# ------------------------------------------------------------------------------ report


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"CPU {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"CPU {platform.processor() or platform.machine()}"


def gram_gflops(
    shape: Shape, dtypes: tuple[torch.dtype, ...], device: torch.device, args: argparse.Namespace
) -> list[float]:
    """Throughput per dtype of the Gram matmul ``X Xᵀ`` of a shape, the dominant product of Newton–Schulz."""
    m, n = min(shape), max(shape)
    xs = [torch.randn(m, n, device=device, dtype=dtype) for dtype in dtypes]
    times = median_ms([functools.partial(torch.matmul, x, x.mT) for x in xs], device, args.warmup, args.repeats)
    return [2 * m * m * n / ms / 1e6 for ms in times]


def rate_cell(row: Row, cuda: bool) -> str:
    """Matmul throughput, in TFLOP/s on CUDA and GFLOP/s on CPU."""
    if row.flops is None:
        return "—"
    gflops = row.flops / row.ms / 1e6
    return f"{gflops / 1e3:.1f}" if cuda else f"{gflops:.0f}"


def rate_unit(cuda: bool) -> str:
    return "TFLOP/s" if cuda else "GFLOP/s"


def sigma_cells(sigma: torch.Tensor | None) -> list[str]:
    if sigma is None:
        return ["—", "—"]
    return [f"{sigma.min():.3g} – {sigma.max():.3g}", f"{(sigma - 1).abs().max():.2e}"]


def main_table(rows: list[Row], cuda: bool, peak_tflops: float) -> list[str]:
    header = ["shape", "method", "ms (median)", "÷ Muon step", rate_unit(cuda)]
    header += ["% of peak"] if cuda else []
    header += ["σ range", r"max \|σ−1\|"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    muon_ms = {r.shape: r.ms for r in rows if r.method == MUON_STEP}
    for r in rows:
        cells = [r.shape, r.method, f"{r.ms:.2f}", f"{r.ms / muon_ms[r.shape]:.2f}", rate_cell(r, cuda)]
        if cuda:
            cells.append("—" if r.flops is None else f"{100 * r.flops / r.ms / 1e9 / peak_tflops:.1f}%")
        cells += sigma_cells(r.sigma)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def batched_table(rows: list[Row], batch_size: int, cuda: bool) -> list[str]:
    loop_ms = rows[0].ms
    lines = [
        f"| matrices | method | ms (median) | ms per matrix | {rate_unit(cuda)} | speed-up vs loop |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        per_matrix = r.ms / batch_size
        cells = [r.shape, r.method, f"{r.ms:.2f}", f"{per_matrix:.2f}", rate_cell(r, cuda), f"{loop_ms / r.ms:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# ------------------------------------------------------------------------------ main


def format_shapes(shapes: tuple[Shape, ...]) -> str:
    return ",".join(f"{m}x{n}" for m, n in shapes)


def parse_shape(text: str) -> Shape:
    rows, cols = (int(v) for v in text.lower().split("x"))
    return rows, cols


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", type=lambda s: [parse_shape(t) for t in s.split(",")],
                        default=format_shapes(DEFAULT_SHAPES),
                        help="comma-separated ROWSxCOLS list (default: %(default)s)")
    parser.add_argument("--full", action="store_true", help=f"also run {format_shapes(FULL_EXTRA_SHAPES)}")
    parser.add_argument("--steps", type=int, default=5, help="Newton–Schulz iterations (all methods and optimizers)")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed rounds (the accuracy call before them warms each method up as well)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-shape", type=parse_shape, default=(768, 768), help="shape of the batched case")
    parser.add_argument("--batch-size", type=int, default=8, help="matrices in the batched case")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="dtype of gradient and parameter; the iteration itself always runs in bf16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for the %% column on CUDA")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="also write the markdown report to this file")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    shapes = list(dict.fromkeys([*args.shapes, *(FULL_EXTRA_SHAPES if args.full else ())]))
    cuda = device.type == "cuda"

    probe = max(shapes, key=lambda s: s[0] * s[1])
    bf16, fp32 = gram_gflops(probe, (torch.bfloat16, torch.float32), device, args)
    header = [
        f"**orthogonalize benchmark** — device: {device_name(device)}, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}, input dtype {args.dtype}, NS steps {args.steps}, "
        f"median of {args.repeats} after {args.warmup} warm-up, "
        f"1-min load average {os.getloadavg()[0]:.1f}",
        "",
        f"Gram matmul {min(probe)}×{max(probe)} @ its transpose: bf16 {bf16:.0f} GFLOP/s, fp32 {fp32:.0f} GFLOP/s.",
        "",
    ]
    print("\n".join(header), flush=True)

    rows: list[Row] = []
    for shape in shapes:
        rows += bench_shape(shape, args, device, dtype)
        print(f"  done {shape[0]}×{shape[1]}", file=sys.stderr, flush=True)
    batched = bench_batched(args.batch_shape, args, device, dtype)

    report = [*header, *main_table(rows, cuda, args.peak_tflops), "", *batched_table(batched, args.batch_size, cuda)]
    print("\n".join(report[len(header):]))
    if args.out is not None:
        args.out.write_text("\n".join(report) + "\n")


if __name__ == "__main__":
    main()
