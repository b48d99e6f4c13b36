"""Optimizer-step time and bytes sent per step under DeepSpeed ZeRO 1/2/3 on CPU (gloo):
``disco_ds.Scion`` ("ours") versus DeepSpeed 0.19's built-in Muon (``"optimizer": {"type": "Muon"}``)
and versus a naive all-gather-everything Scion, at world sizes 1, 2 and 4.

Run (default: about 8 minutes on 2 CPU cores at a load average of 3–4, 13 minutes at 5–6;
``--quick``: about 2–3 minutes)::

    .venv/bin/python benchmarks/bench_zero_step.py --out zero_step.md
    .venv/bin/python benchmarks/bench_zero_step.py --quick
    .venv/bin/python benchmarks/bench_zero_step.py --worlds 1,2 --stages 2 --d-model 384 --layers 5

One ``torch.distributed.run`` per (stage, world size) runs ``benchmarks/zero_step_worker.py`` on
every rank. Inside it the same model (same seed) is wrapped three times, in three DeepSpeed
engines with the same config (fp32, ``gradient_clipping: 0``, ``zero_allow_untested_optimizer``),
and the engines are stepped in interleaved rounds on the same batches, the order rotating every
round, so that load from other processes hits all three alike:

* **ours**: ``disco_ds.Scion(scion_param_groups(model, lr, momentum=0.1, nesterov=True),
  comm_dtype=torch.bfloat16)``: each matrix's fragments travel to one owner (``all_to_all``),
  which runs Newton–Schulz once; the update fragments travel back.
* **ds_muon**: DeepSpeed's ``MuonWithAuxAdam`` (``momentum 0.9`` ≡ Scion ``m = 0.1``; DeepSpeed's
  ``muon_update`` is Nesterov and runs 5 steps, so Scion runs ``nesterov=True`` and 5 steps;
  ``ns_method "standard"`` = the same quintic in bf16 as Scion, not DeepSpeed's default
  ``"gram"``; its ``muon_update`` is ``torch.compile``-d as shipped, ``--ds-eager`` turns that off).
  DeepSpeed tags the ``ndim ≥ 2`` parameters whose name lacks ``embed``/``lm_head``: exactly the
  hidden matrices Scion orthogonalises. Embedding, head and gain go to its auxiliary Adam
  (``torch_adam``), where Scion uses token / row / RMS norms: the matrices are the same.
* **naive**: ``NaiveAllGatherScion`` (in the worker): Scion's momentum on the local flat
  partition, one ``all_gather_into_tensor`` of the partition (bf16 on the wire, as ours), every
  rank rebuilds every full parameter and runs every LMO, keeps its slice.

Model: embedding (vocab × d), ``--layers`` blocks of ``up d→4d``, ``mix d→d``, ``down 4d→d``
(no biases; 3 hidden matrices per block of unequal sizes, so that ZeRO-1/2 partition boundaries
fall inside matrices as in a real model), an RMSNorm gain and a head. Per rank a micro-batch of
``--micro-batch × --seq`` tokens (weak scaling: fwd+bwd per rank is constant in W).

Timings (per rank the median over ``--steps`` iterations after ``--warmup``, then the max over
ranks):

* ``fwd+bwd``: ``engine(x)`` + ``engine.backward(loss)``, minus DeepSpeed Muon's Newton–Schulz that
  runs inside backward (below);
* ``opt-step``: ``engine.step()`` (DeepSpeed's bookkeeping, the client optimizer, the all-gather
  of updated parameters) **plus**, for DeepSpeed Muon at ZeRO-1/2, the time of its ``muon_update``
  calls inside ``engine.backward`` (ZeRO-1/2 orthogonalises while filling the gradient partitions,
  ``stage_1_and_2.py::get_flat_partition``, at the accumulation boundary of backward; ZeRO-3 does
  it in ``step()``, ``stage3.py::_apply_muon_to_accumulated_grads``). Without that the Muon
  "step" would look free;
* ``step()``: the client optimizer's ``step()`` alone (Scion / naive / ``MuonWithAuxAdam``, which at
  ZeRO only applies the precomputed update and the auxiliary Adam);
* ``comm``: wall time spent inside collectives during the client ``step()`` (ours: the
  ``all_to_all`` rounds and the norm ``all_reduce``; it includes waiting for the slowest rank).

Bytes (summed over ranks, per step): every ``torch.distributed`` collective is wrapped and counted
under a direct-send model: all_to_all = the splits sent to other ranks; all_gather = (W−1) × the
input; all_reduce = 2(W−1)/W × the tensor; reduce_scatter = (W−1)/W × the input.

* ``opt MB``: the collectives the optimizer itself adds. Ours: everything inside ``Scion.step()``
  (the all_to_all bytes plus the norms' all_reduce buffers equal ``opt.stats.bytes_sent``, checked); naive: its all-gather,
  analytically W(W−1)·P·2 bytes for flat partitions of P elements; DeepSpeed Muon ZeRO-3: the
  collectives inside ``_apply_muon_to_accumulated_grads`` = all-gather of the gradient and
  momentum partitions (``_partitioned_buffers_all_gather``), then per round of W matrices an
  all_gather of the updated full gradients and of the full momenta (``_muon_update_sub_group``),
  all in fp32: 4 × (W−1) × N × 4 bytes for N hidden-matrix elements (plus padding for mixed shapes);
  DeepSpeed Muon ZeRO-1/2: 0, it adds no collective (each rank orthogonalises the full all-reduced
  gradient of every matrix it holds a piece of, redundantly for matrices split across ranks).
* ``all MB/iter``: every collective of the iteration (gradient reduction, parameter gathers, ...).

Target (issue): at W ≥ 2, ours' opt-step < DeepSpeed Muon's, and ours' ``step()`` at W ≤
``step()`` at W=1 / W + comm. Every rank runs with ``OMP_NUM_THREADS=1`` at every world size, so
W=1 is the one-core baseline; W=4 runs 4 ranks on 2 cores (oversubscribed 2×), so its wall times
cannot show a 1/4 scaling; the CPU-time line of the target check is the oversubscription-free
view. Other processes may load the machine: the load average is printed per launch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = ROOT / "benchmarks" / "zero_step_worker.py"
KINDS = ("ours", "ds_muon", "naive")
LABEL = {"ours": "ours (Scion)", "ds_muon": "DeepSpeed Muon", "naive": "naive all-gather"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(stage: int, world: int, cfg: dict, timeout: int, logdir: Path, verbose: bool) -> dict:
    out = logdir / f"z{stage}_w{world}.json"
    log = logdir / f"z{stage}_w{world}.log"
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::FutureWarning")
    if cfg["ds_eager"]:
        env["TORCHDYNAMO_DISABLE"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           str(WORKER), json.dumps({**cfg, "stage": stage}), str(out)]
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        try:
            proc = subprocess.run(cmd, env=env, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    load1 = os.getloadavg()[0]
    if out.exists():
        result = json.loads(out.read_text())
    else:
        tail = log.read_text().splitlines()[-15:]
        result = {"stage": stage, "world": world, "optimizers": {}, "notes": [f"launch failed (rc {rc}): " + " | ".join(tail)]}
    result.update(rc=rc, launch_s=wall, load_before=load0, load_after=load1, log=str(log))
    if verbose:
        print(log.read_text(), file=sys.stderr)
    return result


def ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "—" if a is None or b is None or b == 0 else f"{a / b:.2f}"


def mb(x: float | None) -> str:
    return "—" if x is None else f"{x / 1e6:.2f}"


def entry(results: dict, stage: int, world: int, kind: str) -> dict | None:
    r = results.get((stage, world))
    if r is None:
        return None
    e = r["optimizers"].get(kind)
    return e if e and "error" not in e and "opt" in e else None


def render(results: dict, args: argparse.Namespace, cfg: dict, meta: dict) -> str:
    lines: list[str] = []
    add = lines.append
    add("# ZeRO optimizer step: Scion vs DeepSpeed Muon vs naive all-gather (CPU, gloo)")
    add("")
    add(f"- command: `{meta['command']}`")
    add(f"- machine: {meta['cpus']} CPU cores ({platform.processor() or platform.machine()}), no GPU; torch {meta['torch']}, "
        f"deepspeed {meta['deepspeed']}; every rank OMP_NUM_THREADS=1 (W=4 on {meta['cpus']} cores is oversubscribed)")
    add(f"- model: vocab {cfg['vocab']}, d {cfg['d_model']}, {cfg['layers']} blocks × (up {cfg['d_model']}→{cfg['mult'] * cfg['d_model']}, "
        f"mix {cfg['d_model']}→{cfg['d_model']}, down {cfg['mult'] * cfg['d_model']}→{cfg['d_model']}) = {3 * cfg['layers']} hidden "
        f"matrices ({meta['hidden_numel'] / 1e6:.2f} M elements), {meta['total_numel'] / 1e6:.2f} M parameters; "
        f"{cfg['micro_batch']}×{cfg['seq']} tokens per rank; fp32; gradient_clipping 0")
    add(f"- optimizers: momentum β 0.9 (Scion m 0.1), Nesterov, 5 Newton–Schulz steps (quintic, bf16); DeepSpeed Muon "
        f"ns_method \"{cfg['ds_ns_method']}\", muon_update {'eager (--ds-eager)' if cfg['ds_eager'] else 'torch.compile-d (as shipped)'}; "
        f"Scion / naive comm dtype {cfg['comm_dtype']}, Newton–Schulz {'torch.compile-d (--compile)' if cfg.get('compile') else 'eager'}, "
        f"{'Gram form for wide matrices' if cfg['ns_gram'] else 'direct form only (--no-gram)'}")
    add(f"- timing: median of {cfg['steps']} iterations after {cfg['warmup']} warm-up, max over ranks; bytes summed over ranks")
    add("- load average (1 min) before / after each launch: " + ", ".join(
        f"Z{s}/W{w} {r['load_before']:.2f}/{r['load_after']:.2f}" for (s, w), r in sorted(results.items())))
    add(f"- total wall time {meta['total_s']:.0f} s")
    add("")
    add("| ZeRO | W | optimizer | opt-step ms | opt-step CPU ms | engine.step ms | NS in bwd ms | step() ms | step() CPU ms "
        "| comm ms | fwd+bwd ms | opt-step ÷ fwd+bwd | opt MB/step | all MB/iter | NS calls/step | ÷ DS Muon | ÷ own W=1 |")
    add("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for stage in args.stages:
        for world in args.worlds:
            r = results.get((stage, world))
            if r is None:
                continue
            ds = entry(results, stage, world, "ds_muon")
            for kind in KINDS:
                e = entry(results, stage, world, kind)
                if e is None:
                    err = (r["optimizers"].get(kind) or {}).get("error", "not run (see notes)")
                    add(f"| {stage} | {world} | {LABEL[kind]} | refused / failed: {err[:160]} |" + "  |" * 13)
                    continue
                base = entry(results, stage, 1, kind)
                add(f"| {stage} | {world} | {LABEL[kind]} | {ms(e['opt'])} | {ms(e['opt_cpu'])} | {ms(e['step'])} | "
                    f"{ms(e['ns_in_bwd']) if kind == 'ds_muon' else '—'} | {ms(e['client'])} | {ms(e['client_cpu'])} | "
                    f"{ms(e['client_comm'])} | {ms(e['fb'])} | "
                    f"{ratio(e['opt'], e['fb'])} | {mb(e['bytes_opt'])} | {mb(e['bytes_iter'])} | {e.get('matrices_per_step', 0):.0f} | "
                    f"{ratio(e['opt'], ds['opt'] if ds else None)} ({ratio(e['opt_cpu'], ds['opt_cpu'] if ds else None)}) | "
                    f"{ratio(e['opt'], base['opt'] if base else None)} ({ratio(e['opt_cpu'], base['opt_cpu'] if base else None)}) |")
    add("")
    add("Columns: opt-step = engine.step() + DeepSpeed Muon's Newton–Schulz inside backward (ZeRO-1/2); NS in bwd = that part; "
        "CPU = the rank's process CPU time over the same span (max over ranks), which other processes' load and the 2× "
        "oversubscription at W=4 do not inflate; "
        "step() = the client optimizer's step() alone; comm = wall time inside collectives during step(); "
        "fwd+bwd excludes NS in bwd; opt MB = bytes of the collectives the optimizer adds; all MB = every collective of the "
        "iteration; NS calls = Newton–Schulz calls per step summed over ranks (redundancy shows as > the number of hidden matrices); "
        "÷ DS Muon and ÷ own W=1 divide opt-step times, wall (CPU).")
    add("")
    add("## Targets (W ≥ 2)")
    add("")
    for stage in args.stages:
        one = entry(results, stage, 1, "ours")
        for world in args.worlds:
            if world < 2:
                continue
            ours, ds = entry(results, stage, world, "ours"), entry(results, stage, world, "ds_muon")
            if ours is None:
                add(f"- ZeRO-{stage}, W={world}: ours did not run")
                continue
            parts = []
            if ds is not None:
                ok = ours["opt"] < ds["opt"]
                ok_cpu = ours["opt_cpu"] < ds["opt_cpu"]
                parts.append(f"ours < DS Muon: {'HOLDS' if ok else 'FAILS'} ({ms(ours['opt'])} vs {ms(ds['opt'])} ms opt-step, "
                             f"{ratio(ours['opt'], ds['opt'])}×; CPU time {'holds' if ok_cpu else 'fails'}: {ms(ours['opt_cpu'])} vs "
                             f"{ms(ds['opt_cpu'])} ms; whole iteration {ms(ours['iter'])} vs {ms(ds['iter'])} ms)")
            else:
                parts.append("ours < DS Muon: n/a (DS Muon did not run)")
            if one is not None:
                bound = one["client"] / world + ours["client_comm"]
                ok = ours["client"] <= bound
                parts.append(f"step() ≤ step(W=1)/W + comm: {'HOLDS' if ok else 'FAILS'} ({ms(ours['client'])} vs "
                             f"{ms(one['client'])}/{world} + {ms(ours['client_comm'])} = {ms(bound)} ms)")
                ebound = one["step"] / world + ours["step_comm"]
                parts.append(f"with engine.step() and all its collectives: {'holds' if ours['step'] <= ebound else 'fails'} "
                             f"({ms(ours['step'])} vs {ms(one['step'])}/{world} + {ms(ours['step_comm'])} = {ms(ebound)} ms)")
                cbound = one["client_cpu"] / world
                parts.append(f"CPU time of step(): {ms(ours['client_cpu'])} ms vs {ms(one['client_cpu'])}/{world} = {ms(cbound)} ms "
                             f"({ours['client_cpu'] / cbound:.2f}× the ideal 1/W)")
            add(f"- ZeRO-{stage}, W={world}: " + "; ".join(parts))
    add("")
    add("## Notes")
    add("")
    for (stage, world), r in sorted(results.items()):
        for note in r.get("notes", []):
            add(f"- ZeRO-{stage}, W={world}: {note}")
        o = r["optimizers"].get("ours", {})
        if "bytes_stats" in o and world > 1:
            # ExchangeStats counts an all_reduce as its buffer; the meter as a ring, 2(W−1)/W of it.
            expected = o["bytes_client_a2a"] + o.get("bytes_client_all_reduce", 0.0) * world / (2 * (world - 1))
            same = abs(o["bytes_stats"] - expected) < 1
            add(f"- ZeRO-{stage}, W={world}: ours all_to_all bytes {mb(o['bytes_client_a2a'])} MB + norm all_reduce buffers "
                f"{'==' if same else '!='} opt.stats.bytes_sent {mb(o['bytes_stats'])} MB; hidden matrices whole on one rank: "
                f"{o.get('matrices_whole_on_one_rank')}, split across ranks: {o.get('matrices_split')}")
        d = r.get("ours_vs_naive_update_diff")
        if d and world > 1:
            add(f"- ZeRO-{stage}, W={world}: ‖Δours − Δnaive‖/‖Δours‖ after all iterations: hidden {d['hidden']:.1e}, "
                f"all {d['all']:.1e} (bf16 on the wire; 0 would mean bit-identical)")
        m = r["optimizers"].get("ds_muon", {})
        if "muon_tagged" in m and m["muon_tagged"] != 3 * cfg["layers"]:
            add(f"- ZeRO-{stage}, W={world}: DS Muon tagged {m['muon_tagged']} parameters use_muon, expected {3 * cfg['layers']}")
        if r.get("rc") not in (0, None):
            add(f"- ZeRO-{stage}, W={world}: launcher exit status {r['rc']} (log {r['log']})")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", default="1,2,4", help="comma-separated world sizes (default 1,2,4)")
    p.add_argument("--stages", default="1,2,3", help="comma-separated ZeRO stages (default 1,2,3)")
    p.add_argument("--d-model", type=int, default=512)
    p.add_argument("--layers", type=int, default=5, help="MLP blocks, 3 hidden matrices each (default 5)")
    p.add_argument("--mult", type=int, default=4, help="hidden width multiplier (default 4)")
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=4, help="sequences per rank")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=5, help="measured iterations per optimizer")
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--comm-dtype", default="bfloat16", help="Scion / naive wire dtype (default bfloat16)")
    p.add_argument("--ds-ns-method", default="standard", choices=("standard", "gram"),
                   help="DeepSpeed Muon's Newton–Schulz (standard = Scion's quintic; gram = DeepSpeed's default)")
    p.add_argument("--ds-eager", action="store_true", help="disable torch.compile of DeepSpeed's muon_update")
    p.add_argument("--no-gram", action="store_true",
                   help="Scion and naive run Newton–Schulz in the direct form only (optimizer.ns_gram: false), the same "
                        "matmuls as DeepSpeed's \"standard\"")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile Scion's Newton–Schulz iteration too (what train.compile does)")
    p.add_argument("--quick", action="store_true", help="d 256, 3 blocks, vocab 2048, 1 warm-up + 3 iterations (2–3 minutes)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per launch")
    p.add_argument("--out", help="write the markdown here (and the raw results to OUT.json)")
    p.add_argument("--verbose", action="store_true", help="print the workers' logs")
    args = p.parse_args()
    args.worlds = [int(x) for x in args.worlds.split(",")]
    args.stages = [int(x) for x in args.stages.split(",")]
    if args.quick:
        args.d_model, args.layers, args.warmup, args.steps, args.vocab = 256, 3, 1, 3, 2048
    cfg = {
        "vocab": args.vocab, "d_model": args.d_model, "layers": args.layers, "mult": args.mult, "seq": args.seq,
        "micro_batch": args.micro_batch, "warmup": args.warmup, "steps": args.steps, "lr": args.lr,
        "comm_dtype": args.comm_dtype, "ds_ns_method": args.ds_ns_method, "ds_eager": args.ds_eager, "compile": args.compile,
        "ns_gram": not args.no_gram,
        "optimizers": list(KINDS), "verbose": True,
    }
    import torch  # noqa: F401 - versions for the header only
    import deepspeed

    d, h = args.d_model, args.mult * args.d_model
    hidden = args.layers * (2 * d * h + d * d)
    meta = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "cpus": os.cpu_count(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
        "hidden_numel": hidden, "total_numel": hidden + 2 * args.vocab * d + d,
    }
    results: dict = {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_zero_step_") as tmp:
        logdir = Path(tmp)
        # Stage-major, so the W=1/2/4 runs a ratio compares are close together in time.
        for stage in args.stages:
            for world in args.worlds:
                print(f"ZeRO-{stage}, W={world} ... (load {os.getloadavg()[0]:.2f})", file=sys.stderr, flush=True)
                r = launch(stage, world, cfg, args.timeout, logdir, args.verbose)
                results[(stage, world)] = r
                print(f"  done in {r['launch_s']:.0f} s; notes: {r.get('notes')}", file=sys.stderr, flush=True)
    meta["total_s"] = time.perf_counter() - t0
    text = render(results, args, cfg, meta)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out + ".json").write_text(json.dumps({f"z{s}_w{w}": r for (s, w), r in results.items()}, indent=1))


if __name__ == "__main__":
    main()
