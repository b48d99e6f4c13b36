"""Scion's optimizer step under tensor parallelism (DeepSpeed AutoTP) on CPU (gloo): TP = 2 versus
TP = 1 at the same number of ranks, same NormGPT, same ZeRO stage.

Run (about 2 minutes on 2 busy CPU cores with the defaults)::

    .venv/bin/python benchmarks/bench_tp.py
    .venv/bin/python benchmarks/bench_tp.py --world 4 --stage 2 --d-model 512 --layers 4 --out tp.md

For each TP size, one ``torch.distributed.run`` of this file in worker mode builds the same NormGPT
(same seed), lets ``deepspeed.initialize`` shard it (``tensor_parallel`` from
``disco_ds.distributed.tensor_parallel.autotp_config``), builds ``disco_ds.Scion`` from the shards, and times
``--steps`` training steps after ``--warmup``. Per rank the median per step, then the max over
ranks:

* ``fwd+bwd``: ``engine(ids, labels)`` + ``engine.backward`` (includes AutoTP's activation
  all-reduces);
* ``opt step``: Scion's ``step()`` over all its calls in one engine step (layout, momentum,
  ``all_to_all`` of fragments to the owners, Newton–Schulz, ``all_to_all`` back, the norm
  ``all_reduce``); ``NS``: the Newton–Schulz part on the busiest rank; ``comm``: time inside the
  optimizer's collectives;
* ``engine step``: DeepSpeed's whole ``engine.step()`` (ZeRO bookkeeping, the client step, the
  parameter all-gather);
* ``opt MB/step``: bytes the optimizer sends (``Scion.stats.bytes_sent``: the fragments to and
  from owners, the norm sums), summed over ranks; ``NS/rank``: matrices each rank orthogonalised
  per step (max over ranks) — the exactly-once total is the number of hidden matrices.

TP = 1 with W ranks is ZeRO data parallelism over W replicas; TP = 2 splits every hidden matrix and
the head over 2 ranks (W / 2 replicas). The logical matrices and their Newton–Schulz work are the
same; what changes is where the fragments come from (and, under TP, that an owner always gathers
from both TP ranks).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(cfg: dict, out: str) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    sys.path.insert(0, str(REPO))
    import deepspeed
    import torch
    import torch.distributed as dist

    from disco_ds import Scion, scion_param_groups
    from disco_ds.distributed import shutdown_and_exit
    from disco_ds.distributed.tensor_parallel import autotp_config
    from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    d = cfg["d_model"]
    model = NormGPTForCausalLM(NormGPTConfig(vocab_size=cfg["vocab"], d_model=d, n_layer=cfg["layers"],
                                             n_head=max(2, d // 64), head_dim=64, max_position_embeddings=cfg["seq"]))
    ds_config = {"train_micro_batch_size_per_gpu": cfg["micro"], "gradient_accumulation_steps": 1,
                 "gradient_clipping": 0.0, "zero_allow_untested_optimizer": True,
                 "zero_optimization": {"stage": cfg["stage"]}, "steps_per_print": 1 << 30}
    built = []

    def make(_params):
        built.append(Scion(scion_param_groups(model, lr=0.01), comm_dtype=torch.bfloat16))
        return built[-1]

    if cfg["tp"] > 1:
        ds_config["tensor_parallel"] = autotp_config(model.config, cfg["tp"])
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make, config=ds_config)
    else:
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make(None), config=ds_config)
    opt = built[0]
    from deepspeed.utils import groups

    dp_rank = groups.get_data_parallel_rank() if cfg["tp"] > 1 else rank
    gen = torch.Generator().manual_seed(1 + dp_rank)
    rows = {k: [] for k in ("fwd_bwd", "opt_step", "ns", "comm", "engine_step", "bytes", "matrices")}
    for it in range(cfg["warmup"] + cfg["steps"]):
        ids = torch.randint(0, cfg["vocab"], (cfg["micro"], cfg["seq"]), generator=gen)
        s = opt.stats
        before = (s.step_seconds, s.ns_seconds, s.comm_seconds, s.bytes_sent, s.matrices_orthogonalized)
        dist.barrier()
        t0 = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        t1 = time.perf_counter()
        engine.step()
        t2 = time.perf_counter()
        if it >= cfg["warmup"]:
            rows["fwd_bwd"].append(t1 - t0)
            rows["engine_step"].append(t2 - t1)
            rows["opt_step"].append(s.step_seconds - before[0])
            rows["ns"].append(s.ns_seconds - before[1])
            rows["comm"].append(s.comm_seconds - before[2])
            rows["bytes"].append(s.bytes_sent - before[3])
            rows["matrices"].append(s.matrices_orthogonalized - before[4])
    record = {k: statistics.median(v) for k, v in rows.items()}
    records = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        params = sum(p.numel() for p in model.parameters())
        Path(out).write_text(json.dumps({"ranks": records, "local_params": params}))
    shutdown_and_exit()


def launch(cfg: dict, world: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
               "--master_port", str(29600 + os.getpid() % 300 + cfg["tp"]), __file__, "--worker", json.dumps(cfg), str(out)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        if proc.returncode != 0:
            raise RuntimeError(proc.stdout[-2000:] + proc.stderr[-4000:])
        return json.loads(out.read_text())


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]), sys.argv[3])
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--stage", type=int, default=1)
    ap.add_argument("--d-model", type=int, default=384)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args()
    lines = [f"NormGPT d={args.d_model}, {args.layers} layers, vocab {args.vocab}; {args.world} CPU ranks (gloo), "
             f"ZeRO-{args.stage}, micro-batch {args.micro}×{args.seq}, bf16 transport, quintic NS; "
             f"median of {args.steps} steps, max over ranks",
             "",
             "| TP × DP | fwd+bwd ms | opt step ms | NS ms | comm ms | engine step ms | opt MB/step (all ranks) | NS/rank | params/rank |",
             "|---|---|---|---|---|---|---|---|---|"]
    for tp in (1, 2):
        cfg = {"tp": tp, "stage": args.stage, "d_model": args.d_model, "layers": args.layers, "vocab": args.vocab,
               "seq": args.seq, "micro": args.micro, "steps": args.steps, "warmup": args.warmup}
        r = launch(cfg, args.world)
        ranks = r["ranks"]
        row = (f"| {tp} × {args.world // tp} | {1e3 * max(x['fwd_bwd'] for x in ranks):.1f} "
               f"| {1e3 * max(x['opt_step'] for x in ranks):.1f} | {1e3 * max(x['ns'] for x in ranks):.1f} "
               f"| {1e3 * max(x['comm'] for x in ranks):.1f} | {1e3 * max(x['engine_step'] for x in ranks):.1f} "
               f"| {sum(x['bytes'] for x in ranks) / 1e6:.2f} | {max(x['matrices'] for x in ranks):.0f} "
               f"| {r['local_params']:,} |")
        lines.append(row)
        print(row, flush=True)
    text = "\n".join(lines)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
