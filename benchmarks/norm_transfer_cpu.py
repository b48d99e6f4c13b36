"""A CPU mini-reproduction of "Optimal Scaling Needs Optimal Norm": does the optimal output norm
stay constant across horizons at the scale of the tiny model?

Runs ``disco_ds sweep`` on the tiny recipe over the demo's byte shards (the Python standard
library's source, written by ``make demo`` or here if missing) in the paper's setting (no momentum,
one learning rate for every group, constant lr): 6 learning rates × 2 batch sizes, each run read
at 3 horizons (2^17, 2^18, 2^19 tokens), one process per run, about half an hour on 2 idle CPU
cores. Then it prints, per horizon, B*, η* and the optimal ‖W_out‖_RMS→∞ (the paper's
parabola-vertex method) and says whether the norm is constant within the paper's ±0.2 in log2. Not part of ``make test``::

    .venv/bin/python benchmarks/norm_transfer_cpu.py --out runs/norm_transfer   # then see README
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import sysconfig
from pathlib import Path

from disco_ds.trainer.sweep import run_sweep

ROOT = Path(__file__).resolve().parents[1]
LRS = [2.0**k for k in (-6, -5, -4, -3, -2, -1)]
BATCHES = [2048, 4096]  # 16 and 32 sequences of 128 bytes
HORIZONS = [2**17, 2**18, 2**19]


def ensure_data(path: Path) -> None:
    """The demo's shards: byte-level, the standard library's own source (nothing downloaded)."""
    if (path / "meta.json").is_file():
        return
    stdlib = sysconfig.get_paths()["stdlib"]
    subprocess.run([sys.executable, "-m", "disco_ds", "prepare", "--input", stdlib, "--glob", "*.py", "--exclude",
                    "site-packages", "--max-bytes", "8MB", "--tokenizer", "byte", "--out", str(path)], check=True)


def report(document: dict) -> str:
    """The per-horizon table and the verdict, as markdown."""
    fit = document["fit"]
    rows = ["| horizon (tokens) | B* (tokens) | η* at B* | optimal ‖W_out‖_RMS→∞ | log2 |",
            "|---:|---:|---:|---:|---:|"]
    logs = []
    for h in fit["horizons"]:
        logs.append(math.log2(h["optimal_norm"]))
        rows.append(f"| {h['tokens']:,} | {h['batch_opt']:,.0f} | {h['lr_opt']:.3g} | {h['optimal_norm']:.3g} | {logs[-1]:.2f} |")
    spread = max(logs) - min(logs)
    verdict = (f"The optimal norm spans {spread:.2f} in log2 across horizons "
               + ("(within the paper's ±0.2: constant at this scale)." if spread <= 0.4
                  else "(more than the paper's ±0.2: not constant at this scale)."))
    return "\n".join(rows) + "\n\n" + verdict


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "norm_transfer")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "stdlib-bytes")
    args = parser.parse_args()
    ensure_data(args.data)
    document = run_sweep(
        str(ROOT / "recipes" / "tiny.yaml"), LRS, BATCHES, HORIZONS, args.out,
        overrides=[f"data.path={args.data}", "train.micro_batch=16", "logging.wandb=false", "checkpoint.keep=1",
                   "optimizer.momentum=1.0", "optimizer.lr_ratios=[1.0,1.0,1.0]"],
    )
    text = report(document)
    (args.out / "report.md").write_text(text + "\n")
    print(text)
    print(f"plots: {args.out / 'loss_vs_lr.png'}, {args.out / 'loss_vs_norm.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
