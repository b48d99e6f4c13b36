"""``python -m disco_ds`` / ``disco-ds``: train, prepare, export, recipe, sweep.

    disco-ds prepare --input DIR --out data/stdlib-bytes --tokenizer byte --glob '*.py'
    disco-ds recipe recipes/gpt-124m.yaml [key=value ...] [--world-size 8]
    disco-ds train recipes/tiny.yaml [key=value ...]
    deepspeed --num_gpus 8 --module disco_ds train recipes/gpt-124m.yaml [key=value ...]
    disco-ds export runs/tiny/checkpoints/step_00000977 exported/tiny
    disco-ds sweep recipes/tiny.yaml --lr 0.05,0.1,0.2 --batch-tokens 2048,4096 --horizons 524288,1048576 --out runs/sweep

The ``deepspeed`` launcher appends ``--local_rank=N``; it is accepted and ignored (the rank comes
from the environment the launcher sets).
"""

from __future__ import annotations

import argparse
import sys

__all__ = ["main"]


def _add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="a YAML recipe, e.g. recipes/tiny.yaml")
    parser.add_argument("overrides", nargs="*", metavar="key.sub=value", help="dotted overrides, e.g. train.micro_batch=4")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _train(args: argparse.Namespace) -> int:
    from disco_ds.config import load_config
    from disco_ds.distributed import shutdown_and_exit
    from disco_ds.train import NonFiniteLoss, train

    cfg = load_config(args.recipe, args.overrides)
    try:
        train(cfg)
    except NonFiniteLoss:
        shutdown_and_exit(3)
    # gloo can abort in its destructors after the work is done: leave cleanly.
    shutdown_and_exit(0)


def _recipe(args: argparse.Namespace) -> int:
    import yaml

    from disco_ds.config import load_config, to_dict
    from disco_ds.scaling import format_plan, plan_run

    cfg = load_config(args.recipe, args.overrides)
    world = args.world_size or cfg.train.reference_world_size
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False).rstrip())
    print()
    print(format_plan(cfg, plan_run(cfg, world)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from disco_ds import export, prepare, sweep

    parser = argparse.ArgumentParser(prog="disco-ds", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="pretrain NormGPT with a recipe (single process or under the deepspeed launcher)")
    _add_recipe_arguments(train)
    train.set_defaults(run=_train)
    recipe = commands.add_parser("recipe", help="print a recipe's resolved configuration and its derived batch size and lr")
    _add_recipe_arguments(recipe)
    recipe.add_argument("--world-size", type=int, default=None, help="data-parallel ranks (default: the recipe's reference)")
    recipe.set_defaults(run=_recipe)
    prep = commands.add_parser("prepare", help="tokenise local text into training shards")
    prepare.add_arguments(prep)
    prep.set_defaults(run=prepare.main)
    exp = commands.add_parser("export", help="turn a training checkpoint into a Hugging Face model folder")
    export.add_arguments(exp)
    exp.set_defaults(run=export.main)
    swp = commands.add_parser("sweep", help="the paper's lr x batch x horizon sweep with its fits and plots")
    sweep.add_arguments(swp)
    swp.set_defaults(run=sweep.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m disco_ds`` and the ``disco-ds`` console script."""
    from disco_ds.config import ConfigError

    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except ConfigError as err:
        print(f"disco-ds: configuration error: {err}", file=sys.stderr)
        return 2
