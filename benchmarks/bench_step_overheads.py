"""What one ``Scion.step()`` costs besides its arithmetic: host–device syncs, collectives and ATen
ops per optimizer step, hardware-independent counts, for this tree and an earlier revision.

    .venv/bin/python benchmarks/bench_step_overheads.py                      # tiny and 124m, W=2, ZeRO-2
    .venv/bin/python benchmarks/bench_step_overheads.py --models tiny --before 5be5427 --stage 3

For each revision (``--before``, default the last commit before the lean-step work, and the
working tree) and each NormGPT preset, one ``torch.distributed.run`` with ``--world`` ranks (gloo)
runs :func:`worker`: the preset's model (float32) in a DeepSpeed engine at ``--stage`` with
``disco_ds.Scion`` over ``scion_param_groups``; one warm-up step (layouts and plans are built at the
first ``step()``), then one profiled step with the norm monitor off and one with it on for every
group, then the monitor's read-out (``pop_metrics()``). The earlier revision runs from a copy of its
tree (``git archive``), the same worker imported against it.

Counted inside ``Scion.step()`` (the client optimizer's step that DeepSpeed's ZeRO wrapper calls;
DeepSpeed's own bookkeeping and parameter all-gather around it are not ours to count), from the
PyTorch profiler's event tree:

* host syncs: ``aten::_local_scalar_dense`` events (every ``.item()``, ``float(t)``, ``bool(t)``,
  ``.tolist()``: on a GPU each one drains the launch queue);
* collectives: ``c10d::`` dispatcher events (all_to_all, all_reduce, all_gather, broadcast, ...);
* ATen ops: outermost ``aten::`` events, those the Python code dispatches itself (on a GPU, each
  is at least one kernel launch).

Rank 0's counts are printed (every rank runs the same plan; counts differ between ranks only by
which matrices each owns). The optimizer step's *time* against DeepSpeed's Muon is
``benchmarks/bench_zero_step.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "5be5427"
"""The last commit before the lean-step work (issue 17): package structure in place, norm monitor
reading every scalar with ``.item()``, exchange re-planned every step."""
SCOPE = "disco_ds.bench.scion_step"


def _count(prof: Any) -> dict[str, int]:
    """Syncs, collectives and outermost ATen ops inside the ``SCOPE`` ranges of a profile (all of
    them when there is no such range, e.g. a profiled ``pop_metrics()``)."""
    roots = [e for e in prof.profiler.kineto_results.experimental_event_tree()]
    scoped, stack = [], list(roots)
    while stack:
        event = stack.pop()
        if event.name == SCOPE:
            scoped.append(event)
        else:
            stack.extend(event.children)
    counts = {"host_syncs": 0, "collectives": 0, "aten_ops": 0}
    stack = [(e, False) for e in (scoped or roots)]
    while stack:
        event, under_aten = stack.pop()
        name = event.name
        if name == "aten::_local_scalar_dense":
            counts["host_syncs"] += 1
        if name.startswith("c10d::"):
            counts["collectives"] += 1
        is_aten = name.startswith("aten::")
        if is_aten and not under_aten:
            counts["aten_ops"] += 1
        stack.extend((child, under_aten or is_aten) for child in event.children)
    return counts


def worker(cfg: dict[str, Any], out: str) -> None:
    """One rank: build, warm up, profile a step with the monitor off, one with it on, and the read-out."""
    import deepspeed
    import torch
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, record_function

    from disco_ds import Scion, scion_param_groups
    from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

    deepspeed.init_distributed(dist_backend="gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)
    config = NormGPTConfig.from_preset(cfg["model"])
    model = NormGPTForCausalLM(config)
    opt = Scion(scion_param_groups(model, lr=0.01))
    ds_config = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": cfg["stage"]},
        "bf16": {"enabled": False},
    }
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    inner_step = opt.step

    def scoped_step(*args: Any, **kwargs: Any) -> Any:
        with record_function(SCOPE):
            return inner_step(*args, **kwargs)

    opt.step = scoped_step
    ids = torch.randint(0, config.vocab_size, (1, cfg["seq"]), generator=torch.Generator().manual_seed(rank))

    def train_step() -> None:
        loss = engine(input_ids=ids, labels=ids, use_cache=False).loss
        engine.backward(loss)
        engine.step()

    result: dict[str, Any] = {}
    train_step()  # warm-up: layouts and exchange plans are built here
    opt.pop_metrics()
    for label, tracked in (("monitor off", False), ("monitor on", True)):
        opt.track_norms = tracked
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            train_step()
        result[label] = _count(prof)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        metrics = opt.pop_metrics()
    result["pop_metrics()"] = _count(prof)
    result["metrics"] = len(metrics)
    if rank == 0:
        Path(out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _tree_at(revision: str, into: Path) -> Path:
    """A copy of the repository at ``revision`` (``git archive``), laid out as installed: the model
    files where ``disco_ds.models`` imports them from."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", revision], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "disco_ds" / "models").symlink_to(into / "models", target_is_directory=True)
    return into


def _installed_tree(into: Path) -> Path:
    """The working tree laid out like :func:`_tree_at` (the editable install's mapping of
    ``disco_ds.models`` onto ``models/`` made a link, so both revisions import alike)."""
    (into / "disco_ds").symlink_to(ROOT / "disco_ds", target_is_directory=True)
    return into


def _launch(tree: Path, cfg: dict[str, Any], world: int, scratch: Path) -> dict[str, Any]:
    out = scratch / f"{cfg['model']}-{tree.name}.json"
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}",
           str(Path(__file__).resolve()), "--worker", json.dumps(cfg), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=scratch)
    if proc.returncode != 0:
        raise SystemExit(f"worker failed ({tree}, {cfg}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "124m"], help="NormGPT presets")
    parser.add_argument("--world", type=int, default=2, help="ranks (gloo, one thread each)")
    parser.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3), help="DeepSpeed ZeRO stage")
    parser.add_argument("--seq", type=int, default=32, help="tokens per rank per step")
    parser.add_argument("--before", default=BEFORE, help="the revision to compare against (git rev)")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(json.loads(args.worker[0]), args.worker[1])
        return

    rows = ["| model | revision | monitor | host syncs | collectives | ATen ops |", "|---|---|---|---:|---:|---:|"]
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for name in ("before", "after"):
            (scratch / name).mkdir()
        trees = {args.before: _tree_at(args.before, (scratch / "before").resolve()),
                 "this tree": _installed_tree((scratch / "after").resolve())}
        for model in args.models:
            cfg = {"model": model, "stage": args.stage, "seq": args.seq}
            for label, tree in trees.items():
                result = _launch(tree, cfg, args.world, scratch)
                for phase in ("monitor off", "monitor on", "pop_metrics()"):
                    c = result[phase]
                    row = f"| {model} | {label} | {phase} | {c['host_syncs']} | {c['collectives']} | {c['aten_ops']} |"
                    rows.append(row)
                    print(row, flush=True)
    table = "\n".join(rows)
    caption = (f"Per optimizer step (`Scion.step()` inside DeepSpeed ZeRO-{args.stage}'s step), rank 0 of W={args.world}, "
               f"float32 model; `pop_metrics()`: the monitor's read-out once per log interval.")
    print("\n" + caption + "\n\n" + table)
    if args.out:
        args.out.write_text(caption + "\n\n" + table + "\n")


if __name__ == "__main__":
    main()
