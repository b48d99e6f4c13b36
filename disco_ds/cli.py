"""``python -m disco_ds`` / ``disco-ds``: train, prepare, export, recipe, plan, sweep, verify.

    disco-ds prepare --input DIR --out data/stdlib-bytes --tokenizer byte --glob '*.py'
    disco-ds recipe recipes/gpt-124m.yaml [key=value ...] [--world-size 8]
    disco-ds plan gpt-1.3b --world-size 64 [--tp 2] [--zero 1] [--gpu h200] [--intra-bw 450] [--inter-bw 50]
    disco-ds train recipes/tiny.yaml [key=value ...]
    deepspeed --num_gpus 8 --module disco_ds train recipes/gpt-124m.yaml [key=value ...]
    disco-ds export runs/tiny/checkpoints/step_00000977 exported/tiny
    disco-ds verify runs/tiny
    disco-ds sweep recipes/tiny.yaml --lr 0.05,0.1,0.2 --batch-tokens 2048,4096 --horizons 524288,1048576 --out runs/sweep

The ``deepspeed`` launcher appends ``--local_rank=N``; it is accepted and ignored (the rank comes
from the environment the launcher sets).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["main"]


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.micro_batch=4")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_plan_arguments(parser: argparse.ArgumentParser) -> None:
    from disco_ds.trainer.cluster_plan import DEFAULT_MFU, GPUS, GPUS_PER_NODE, INFINIBAND_GBPS, NVLINK_GBPS

    parser.add_argument("recipe", help="a YAML recipe or a recipe name in recipes/ (tiny, gpt-1.3b, ...)")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.micro_batch=4")
    parser.add_argument("--world-size", required=True,
                        help="launched ranks (GPUs); several, comma-separated, print one summary row each")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per replica (default 1)")
    parser.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=None, help="ZeRO stage (default: the recipe's)")
    parser.add_argument("--gpu", choices=sorted(GPUS), default="h100", help="accelerator (default h100)")
    parser.add_argument("--intra-bw", type=float, default=NVLINK_GBPS,
                        help=f"GB/s per GPU per direction inside a node (default {NVLINK_GBPS:g}, NVLink 4)")
    parser.add_argument("--inter-bw", type=float, default=INFINIBAND_GBPS,
                        help=f"GB/s per GPU per direction between nodes (default {INFINIBAND_GBPS:g}, NDR 400 Gb/s)")
    parser.add_argument("--gpus-per-node", type=int, default=GPUS_PER_NODE, help=f"default {GPUS_PER_NODE}")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"fraction of the bf16 peak reached by the model and Newton–Schulz (default {DEFAULT_MFU:g})")
    parser.add_argument("--max-gather-numel", type=int, default=None,
                        help="Scion's max_gather_numel, the round bound (default: Scion's)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _train(args: argparse.Namespace) -> int:
    from disco_ds.trainer.checkpoint import CheckpointError
    from disco_ds.trainer.config import load_config
    from disco_ds.distributed import shutdown_and_exit
    from disco_ds.trainer.loop import Diverged, train

    cfg = load_config(args.recipe, args.overrides)
    try:
        train(cfg)
    except Diverged:
        shutdown_and_exit(3)
    except CheckpointError as err:  # raised on every rank alike: leave together
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"disco-ds: checkpoint error: {err}", file=sys.stderr, flush=True)
        shutdown_and_exit(1)
    # gloo can abort in its destructors after the work is done: leave cleanly.
    shutdown_and_exit(0)


def _recipe(args: argparse.Namespace) -> int:
    import yaml

    from disco_ds.trainer.config import load_config, to_dict
    from disco_ds.trainer.memory import format_memory
    from disco_ds.trainer.scaling import data_parallel_size, format_plan, plan_run

    cfg = load_config(args.recipe, args.overrides)
    # The launched ranks, as `train` counts them: tensor parallelism divides them into replicas.
    world = args.world_size or cfg.train.reference_world_size * cfg.train.tp_size * cfg.train.pp_size
    plan = plan_run(cfg, data_parallel_size(cfg, world))
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print()
    print(format_plan(cfg, plan))
    print(format_memory(cfg, plan, world))
    return 0


def _plan(args: argparse.Namespace) -> int:
    """Scion's exchange and the step's cost on a cluster, from the recipe's shapes (no GPUs needed)."""
    from disco_ds.trainer.cluster_plan import GPUS, Cluster, format_plan, format_summary_table, plan_cluster
    from disco_ds.trainer.config import ConfigError

    try:
        worlds = [int(w) for w in args.world_size.split(",")]
    except ValueError:
        raise ConfigError(f"--world-size {args.world_size!r}: accepted: a positive integer or a comma-separated list") from None
    if any(w < 1 for w in worlds):
        raise ConfigError(f"--world-size {args.world_size!r}: every world size must be at least 1")
    plans = []
    for world in worlds:
        cluster = Cluster(world, args.tp, GPUS[args.gpu], args.gpus_per_node, args.intra_bw, args.inter_bw, args.mfu)
        plans.append(plan_cluster(args.recipe, cluster, zero_stage=args.zero, overrides=args.overrides,
                                  max_gather_numel=args.max_gather_numel))
    print(format_plan(plans[0]) if len(plans) == 1 else format_summary_table(plans))
    return 0


def _verify(args: argparse.Namespace) -> int:
    """Print the state of every checkpoint of a run (or of one checkpoint); 1 if any is damaged."""
    from pathlib import Path

    from disco_ds.trainer.checkpoint import COMPLETE, verify_checkpoint

    target = Path(args.path)
    if (target / COMPLETE).is_file() or target.name.startswith(("step_", ".tmp_step_")):
        checkpoints = [target]
    else:
        root = target / "checkpoints"
        checkpoints = sorted(root.glob("step_*")) + sorted(root.glob(".tmp_step_*")) if root.is_dir() else []
    if not checkpoints:
        print(f"disco-ds verify: {target} holds no checkpoints (expected RUN_DIR/checkpoints/step_* or a checkpoint)",
              file=sys.stderr)
        return 2
    damaged = 0
    for path in checkpoints:
        if path.name.startswith(".tmp_"):
            print(f"{path}  partial: a save that never completed (ignored; the next save removes it)")
            continue
        report = verify_checkpoint(path)
        if not report.ok:
            damaged += 1
            print(f"{path}  DAMAGED")
            for problem in report.problems:
                print(f"    {problem}")
        elif report.verified:
            print(f"{path}  ok: {report.files} files, {report.bytes:,} bytes match their sha256")
        else:
            print(f"{path}  unverified: saved before checksums (COMPLETE holds no manifest)")
    return 1 if damaged else 0


def build_parser() -> argparse.ArgumentParser:
    from disco_ds.data import prepare
    from disco_ds.integrations import export
    from disco_ds.trainer import sweep

    parser = argparse.ArgumentParser(prog="disco-ds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="pretrain NormGPT with a recipe (single process or under the deepspeed launcher)")
    _add_recipe_arguments(train)
    train.set_defaults(run=_train)
    recipe = commands.add_parser("recipe", help="print a recipe's resolved configuration and its derived batch size and lr")
    _add_recipe_arguments(recipe)
    recipe.add_argument("--world-size", type=int, default=None,
                        help="launched ranks, as `train` will see them (default: the recipe's reference_world_size × tp_size)")
    recipe.set_defaults(run=_recipe)
    plan = commands.add_parser("plan", help="Scion's exchange, the optimizer step's cost and a ZeRO recommendation for a cluster, "
                               "from the recipe's shapes")
    _add_plan_arguments(plan)
    plan.set_defaults(run=_plan)
    prep = commands.add_parser("prepare", help="tokenise local text into training shards")
    prepare.add_arguments(prep)
    prep.set_defaults(run=prepare.main)
    ver = commands.add_parser("verify", help="check every checkpoint of a run against its checksums")
    ver.add_argument("path", help="a run directory (RUN_DIR) or one checkpoint (RUN_DIR/checkpoints/step_N)")
    ver.set_defaults(run=_verify)
    exp = commands.add_parser("export", help="turn a training checkpoint into a Hugging Face model folder")
    export.add_arguments(exp)
    exp.set_defaults(run=export.main)
    swp = commands.add_parser("sweep", help="the paper's lr x batch x horizon sweep with its fits and plots")
    sweep.add_arguments(swp)
    swp.set_defaults(run=sweep.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m disco_ds`` and the ``disco-ds`` console script."""
    from disco_ds.trainer.config import ConfigError

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow an option (`recipe R --world-size 4 train.tp_size=2`): argparse leaves
    # the key=value words after the option unparsed.
    overrides = [word for word in extra if "=" in word and not word.startswith("-")]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [word for word in extra if word not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args) or 0)
    except ConfigError as err:
        print(f"disco-ds: configuration error: {err}", file=sys.stderr)
        return 2
