"""Pipeline parallelism against data parallelism on the same two ranks: per-rank memory and step time.

    python benchmarks/bench_pipeline_step.py                 # tiny and a 124m-wide shape, ~3 minutes here
    python benchmarks/bench_pipeline_step.py --shapes tiny --steps 10

Each layout is two ranks under the real ``deepspeed`` launcher, built by the trainer's own
``build_engine`` (``benchmarks/pipeline_bench_worker.py``): ``PP=2 × DP=1`` (one replica cut into
two stages, DeepSpeed's pipeline engine, Scion per stage) and ``PP=1 × DP=2`` (two replicas). Both
run ZeRO-1, an fp32 model, Scion with bf16 transport, the same tokens per optimizer step (the
pipeline's one replica takes twice the micro-batches) on synthetic tokens.

Per rank: parameters held; the bytes of weights, fp32 gradients (ZeRO-1 keeps them whole), fp32
master partitions and Scion's momentum, counted from the engine's tensors; the peak resident memory
of the process (everything: activations, allocator, libraries); the median wall time of one
optimizer step after warm-up steps (forward, backward, communication and Scion's step; CUDA-synchronised
on a GPU). Shapes: the ``tiny`` preset, and ``124m-wide``: the 124m preset's width (d 768, 6 heads of
128, vocabulary 50304) with 2 blocks, which two CPU cores step through in seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from launching import free_port, worker_env  # noqa: E402 -- the tests' launch helpers

WORKER = Path(__file__).with_name("pipeline_bench_worker.py")
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
SHAPES = {
    "tiny": {"preset": "tiny", "n_layer": 2, "seq_len": 128, "micro_batch": 4, "global_sequences": 32},
    "124m-wide": {"preset": "124m", "n_layer": 2, "seq_len": 128, "micro_batch": 2, "global_sequences": 8},
}
MIB = 1 << 20


def run_layout(shape: dict, pp_size: int, steps: int, warmup: int) -> list[dict]:
    """Both ranks' records of one layout (two ranks, ``pp_size`` stages)."""
    with tempfile.TemporaryDirectory() as out:
        spec = {**shape, "pp_size": pp_size, "steps": steps, "warmup": warmup, "out": out}
        cmd = [str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(free_port()), str(WORKER), json.dumps(spec)]
        proc = subprocess.run(cmd, cwd=REPO, env=worker_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            raise SystemExit(f"bench_pipeline_step: {cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return [json.loads((Path(out) / f"rank_{r}.json").read_text()) for r in range(2)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps per layout")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    args = parser.parse_args(argv)
    rows = ["| shape | layout | rank | stage | accumulation | parameters (M) | weights+grads+masters+momentum MiB "
            "| peak RSS MiB | step s | tokens/s |", "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    ratios = []
    for name in args.shapes.split(","):
        shape = SHAPES[name]
        tokens = shape["global_sequences"] * shape["seq_len"]
        results = {}
        for pp_size, layout in ((2, "PP=2 × DP=1"), (1, "PP=1 × DP=2")):
            records = run_layout(shape, pp_size, args.steps, args.warmup)
            results[layout] = records
            for r in records:
                static = r["weights_bytes"] + r["gradients_bytes"] + r["masters_bytes"] + r["momentum_bytes"]
                rows.append(f"| {name} | {layout} | {r['rank']} | {r['stage']} | {r['accumulation']} | {r['parameters'] / 1e6:.2f} "
                            f"| {static / MIB:.1f} | {r['peak_rss_bytes'] / MIB:.0f} | {r['step_s']:.3f} | {tokens / r['step_s']:,.0f} |")
        pp, dp = results["PP=2 × DP=1"], results["PP=1 × DP=2"]

        def static(r: dict) -> int:
            return r["weights_bytes"] + r["gradients_bytes"] + r["masters_bytes"] + r["momentum_bytes"]

        ratios.append(f"{name}: PP/DP step time {max(r['step_s'] for r in pp) / max(r['step_s'] for r in dp):.2f}×, "
                      f"largest rank's weights+grads+optimizer {max(map(static, pp)) / max(map(static, dp)):.2f}×, "
                      f"parameters per rank {max(r['parameters'] for r in pp) / max(r['parameters'] for r in dp):.2f}×")
    print("\n".join(rows))
    print()
    print("\n".join(ratios))
    return 0


if __name__ == "__main__":
    sys.exit(main())
