"""``disco_ds export CHECKPOINT OUT_DIR``: a training checkpoint to a Hugging Face model folder.

A checkpoint written by the trainer is a directory::

    CKPT/
      latest              DeepSpeed's tag file ("ds")
      ds/                 engine.save_checkpoint(CKPT, tag="ds"), any ZeRO stage
      model/config.json   the model configuration (+ generation_config.json)
      tokenizer/          tokenizer files (optional)
      trainer_state.json, config.yaml, COMPLETE

The export rebuilds the full fp32 weights on CPU (ZeRO 1–3 through DeepSpeed's ``zero_to_fp32``,
stage 0 from the module state, pipeline stages merged from the checkpoint's portable file or from
DeepSpeed's per-part files), loads them strictly into a model built from ``model/config.json``,
casts to the requested dtype and writes, with ``save_pretrained``, a folder that loads anywhere with
``AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)``: ``config.json`` with
``auto_map``, the two model source files, safetensors weights, ``generation_config.json``, the
tokenizer files and a short ``README.md``. No GPU and no process group are needed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch

__all__ = ["ExportError", "export_checkpoint", "training_dtype", "load_fp32_state_dict", "clean_state_dict", "add_arguments", "main"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COMPLETE_MARKER = "COMPLETE"
DEFAULT_TAG = "ds"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.", "_forward_module.")
PORTABLE_FILE = "portable.pt"  # the trainer's checkpoint.PORTABLE (the trainer imports this module, not the reverse)
_MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json")


class ExportError(RuntimeError):
    """The checkpoint is incomplete or does not match its model configuration."""


# ---------------------------------------------------------------------------- reading the checkpoint


def _deepspeed_dir(checkpoint: Path) -> tuple[Path, str]:
    """``(CKPT/<tag>, tag)`` after checking the checkpoint is complete."""
    if not checkpoint.is_dir():
        raise ExportError(f"checkpoint directory {checkpoint} does not exist")
    if not (checkpoint / COMPLETE_MARKER).is_file():
        raise ExportError(
            f"checkpoint {checkpoint} is incomplete: the {COMPLETE_MARKER} marker file is missing "
            "(the run probably stopped while saving it); export an earlier checkpoint"
        )
    latest = checkpoint / "latest"
    tag = latest.read_text().strip() if latest.is_file() else DEFAULT_TAG
    ds_dir = checkpoint / tag
    if not ds_dir.is_dir():
        raise ExportError(f"checkpoint {checkpoint} has no DeepSpeed directory {ds_dir}")
    if not (checkpoint / "model" / "config.json").is_file():
        raise ExportError(f"checkpoint {checkpoint} has no model configuration {checkpoint / 'model' / 'config.json'}")
    return ds_dir, tag


def _bf16_optimizer_files(ds_dir: Path) -> list[Path]:
    """The per-rank files of DeepSpeed's ``BF16_Optimizer`` (ZeRO-1 with a bf16 model and fp32
    gradient accumulation, the trainer's default for bf16 at stage 1), in rank order; else ``[]``.

    They hold fp32 master partitions but no ``zero_stage``, so ``zero_to_fp32`` cannot read them."""
    files = sorted(ds_dir.glob("bf16_zero_pp_rank_*_mp_rank_00_optim_states.pt"),
                   key=lambda f: int(f.name.split("_")[4]))
    if not files:
        return []
    state = torch.load(files[0], map_location="cpu", mmap=True, weights_only=False).get("optimizer_state_dict", {})
    return files if {"single_partition_of_fp32_groups", "param_slice_mappings"} <= state.keys() else []


def _bf16_optimizer_masters(files: list[Path], module: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp32 master weights of a ``BF16_Optimizer`` checkpoint, keyed like ``module``.

    Each param group is one flat buffer (the group's parameters back to back, padded at the end)
    cut into equal partitions, one per rank: concatenating the ranks' partitions restores it. The
    parameters' order comes from the per-rank ``param_slice_mappings`` (name -> where this rank's
    fragment sits in its partition), their sizes from the module weights; every fragment address
    is checked against the layout this implies. Frozen parameters keep their module weight."""
    states = [torch.load(f, map_location="cpu", weights_only=False)["optimizer_state_dict"] for f in files]
    masters = {name: t.float() for name, t in module.items()}
    for group, _ in enumerate(states[0]["single_partition_of_fp32_groups"]):
        partitions = [s["single_partition_of_fp32_groups"][group] for s in states]
        size = partitions[0].numel()
        flat = torch.cat(partitions)
        names = list(dict.fromkeys(name for s in states for name in s["param_slice_mappings"][group]))
        offset = 0
        for name in names:
            numel = module[name].numel()
            for rank, s in enumerate(states):
                address = s["param_slice_mappings"][group].get(name)
                lo, hi = max(offset, rank * size), min(offset + numel, (rank + 1) * size)
                expected = (lo - rank * size, hi - lo) if lo < hi else None
                found = (address.start, address.numel) if address is not None else None
                if found != expected:
                    raise ExportError(f"{files[rank]}: {name} is at {found} of param group {group}, "
                                      f"expected {expected}: not the flat layout of DeepSpeed's BF16_Optimizer")
            masters[name] = flat[offset:offset + numel].view(module[name].shape).clone()
            offset += numel
    return masters


def _is_zero_checkpoint(ds_dir: Path) -> bool:
    """Whether ``ds_dir`` holds ZeRO (stage 1–3) partitions that ``zero_to_fp32`` understands.

    bf16 at stage 0 also writes ``bf16_zero_pp_rank_*`` optimizer files, but without a ZeRO stage."""
    optim_files = sorted(ds_dir.glob("*zero_pp_rank_*_optim_states.pt"))
    if not optim_files:
        return False
    state = torch.load(optim_files[0], map_location="cpu", mmap=True, weights_only=False)
    return "zero_stage" in state.get("optimizer_state_dict", {})


def clean_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes from the keys: leading ``module.`` (DDP, DeepSpeed) and
    ``_forward_module.``, and ``_orig_mod.`` (``torch.compile``) wherever it occurs."""
    cleaned = {}
    for key, value in state.items():
        new = key
        while new.startswith(_WRAPPER_PREFIXES):
            new = new.split(".", 1)[1]
        new = new.replace("._orig_mod.", ".")
        if new in cleaned:
            raise ExportError(f"two checkpoint keys map to {new!r} after removing wrapper prefixes")
        cleaned[new] = value
    return cleaned


def load_fp32_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a trainer checkpoint, on CPU, with wrapper prefixes removed.

    ZeRO stages 1–3: the fp32 master partitions of every rank, merged by
    ``deepspeed.utils.zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint``, or for DeepSpeed's
    ``BF16_Optimizer`` (ZeRO-1, bf16 model, fp32 gradients) by :func:`_bf16_optimizer_masters`. Stage 0: the
    ``module`` state of ``mp_rank_00_model_states.pt`` (with bf16 at stage 0 these are the 16-bit
    training weights, not fp32 masters; a warning says so).
    """
    checkpoint = Path(checkpoint)
    ds_dir, tag = _deepspeed_dir(checkpoint)
    from disco_ds.distributed.tensor_parallel import merge_tp_shards, tp_checkpoint_ranks
    from disco_ds.integrations.pipeline import is_pipeline_checkpoint

    if is_pipeline_checkpoint(ds_dir):
        return _merge_pipeline_stages(checkpoint, ds_dir)

    tp_ranks = tp_checkpoint_ranks(ds_dir)
    if tp_ranks > 1:
        # Tensor parallelism: each TP rank t wrote its shards as ``*mp_rank_{t:02d}*`` files, which
        # DeepSpeed's readers (written for mp_rank_00) take one rank at a time from a directory of
        # links; the shards are then concatenated along the dimension AutoTP split them.
        import tempfile

        shards = []
        for t in range(tp_ranks):
            with tempfile.TemporaryDirectory() as tmp:
                view = Path(tmp) / tag
                view.mkdir()
                for f in ds_dir.iterdir():
                    if f"mp_rank_{t:02d}_" in f.name:
                        (view / f.name.replace(f"mp_rank_{t:02d}_", "mp_rank_00_")).symlink_to(f.resolve())
                (Path(tmp) / COMPLETE_MARKER).touch()
                (Path(tmp) / "model").mkdir()
                (Path(tmp) / "model" / "config.json").symlink_to((checkpoint / "model" / "config.json").resolve())
                (Path(tmp) / "latest").write_text(tag)
                shards.append(load_fp32_state_dict(Path(tmp)))
        return merge_tp_shards(shards)
    if _is_zero_checkpoint(ds_dir):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        return clean_state_dict(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag))
    model_file = ds_dir / "mp_rank_00_model_states.pt"
    if not model_file.is_file():
        raise ExportError(f"checkpoint {checkpoint} has neither ZeRO partitions nor {model_file}")
    # DeepSpeed's own files, pickled with non-tensor objects: weights_only=False as DeepSpeed loads them.
    module = torch.load(model_file, map_location="cpu", weights_only=False).get("module")
    if not module:
        raise ExportError(f"{model_file} holds no 'module' weights")
    bf16_files = _bf16_optimizer_files(ds_dir)
    if bf16_files:
        return clean_state_dict(_bf16_optimizer_masters(bf16_files, module))
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in module.values()):
        warnings.warn(f"{model_file}: stage-0 module weights are not fp32; exporting them as they are", stacklevel=2)
    return clean_state_dict({k: v.float() if v.is_floating_point() else v for k, v in module.items()})


def _merge_pipeline_stages(checkpoint: Path, ds_dir: Path) -> dict[str, torch.Tensor]:
    """A pipeline run's whole model: the fp32 masters of every stage from the checkpoint's portable
    file (written from all stages, under Hugging Face names), or without one the stages' per-part
    weight files merged (the model's dtype; with a bf16 model a warning says so)."""
    from disco_ds.integrations.pipeline import merge_stage_files
    from disco_ds.integrations.reshard import PORTABLE_FORMAT

    portable = checkpoint / PORTABLE_FILE
    if portable.is_file():
        record = torch.load(portable, map_location="cpu", weights_only=True)
        if record.get("format") != PORTABLE_FORMAT:
            raise ExportError(f"{portable} is not a portable Scion checkpoint (format {PORTABLE_FORMAT!r})")
        return dict(record["params"])
    config = json.loads((checkpoint / "model" / "config.json").read_text())
    try:
        state = merge_stage_files(ds_dir, int(config["n_layer"]))
    except ValueError as err:
        raise ExportError(str(err)) from None
    if any(t.is_floating_point() and t.dtype != torch.float32 for t in state.values()):
        warnings.warn(f"{ds_dir}: the pipeline stages' weights are not fp32 and the checkpoint has no {PORTABLE_FILE} "
                      "with fp32 masters; exporting the stages' weights as they are", stacklevel=3)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


# ---------------------------------------------------------------------------- building the model


def _tie_aliases(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fill the names of tied parameters the state lacks from the name it has, and drop extra names
    of tied parameters the model stores once (e.g. a head tied to the embedding)."""
    state = dict(state)
    expected = set(model.state_dict().keys())
    groups: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(name)
    for names in groups.values():
        if len(names) < 2:
            continue
        present = [n for n in names if n in state]
        for n in names:
            if n not in state and present:
                state[n] = state[present[0]]
        for n in names:
            if n not in expected and n in state:
                del state[n]
    return state


def _build_model(config_dir: Path, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The causal LM of ``config_dir/config.json`` with ``state`` loaded strictly (no random init)."""
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    import disco_ds.models  # noqa: F401  (registers NormGPT with the Auto classes)

    config = AutoConfig.from_pretrained(config_dir)
    with torch.device("meta"):  # shapes only: every tensor comes from the checkpoint
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    state = _tie_aliases(model, state)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise ExportError(
            f"the checkpoint weights do not match {config_dir / 'config.json'}: "
            f"missing {missing or 'none'}; unexpected {unexpected or 'none'}"
        )
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    wrong = [f"{n} {tuple(t.shape)} != {shapes[n]}" for n, t in state.items() if tuple(t.shape) != shapes[n]]
    if wrong:
        raise ExportError(f"the checkpoint weights do not match {config_dir / 'config.json'}: shapes {wrong}")
    model.load_state_dict(state, strict=True, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:
        raise ExportError(f"tensors not restored from the checkpoint: {leftovers}")
    if (config_dir / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(config_dir)
    return model.eval()


# ---------------------------------------------------------------------------- writing the folder


def _copy_tokenizer(tokenizer_dir: Path, out_dir: Path) -> list[str]:
    copied = []
    for src in sorted(tokenizer_dir.iterdir()):
        if src.name in _MODEL_FILES or src.suffix in (".py", ".safetensors"):
            warnings.warn(f"not copying {src}: it would replace a file of the model", stacklevel=3)
            continue
        if src.is_dir():
            shutil.copytree(src, out_dir / src.name, dirs_exist_ok=True)
        else:
            shutil.copy2(src, out_dir / src.name)
        copied.append(src.name)
    return copied


def training_dtype(checkpoint: Path) -> str:
    """The precision the checkpoint's run trained in (``train.bf16`` of its ``config.yaml``):
    ``"bfloat16"`` or ``"float32"``; ``"float32"`` when the file does not say."""
    import yaml

    try:
        resolved = yaml.safe_load((checkpoint / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return "float32"
    train = resolved.get("train") if isinstance(resolved, dict) else None
    return "bfloat16" if isinstance(train, dict) and train.get("bf16") is True else "float32"


def _generation_ids(model: torch.nn.Module, tokenizer_dir: Path, out_dir: Path) -> None:
    """Make generation stop at the tokenizer's end of text and never emit an id it cannot decode.

    ``eos_token_id`` and ``pad_token_id`` (the tokenizer's pad token, else its end of text, which
    then also becomes the exported tokenizer's pad token) go into ``config.json`` and
    ``generation_config.json``; the embedding rows beyond the tokenizer's vocabulary (the model's
    vocabulary is padded to a multiple of 64) go into ``suppress_tokens``, which ``generate``
    applies with plain ``transformers`` whatever the model's code."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)  # no config.json there: no remote code involved
    if tokenizer.eos_token_id is None:
        warnings.warn(f"{tokenizer_dir}: the tokenizer has no eos_token; generation will not stop at end of text", stacklevel=3)
        return
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
        tokenizer.save_pretrained(out_dir)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for config in (model.config, model.generation_config):
        config.eos_token_id, config.pad_token_id = eos, pad
    padded = range(len(tokenizer), model.config.vocab_size)
    model.generation_config.suppress_tokens = list(padded) or None


def _training_step(checkpoint: Path) -> int | None:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    for key in ("step", "global_step"):
        if isinstance(state.get(key), int):
            return state[key]
    return None


def _model_card(model: torch.nn.Module, checkpoint: Path, dtype: str, has_tokenizer: bool) -> str:
    config = model.config
    describe = config.describe() if hasattr(config, "describe") else f"{sum(p.numel() for p in model.parameters()):,} parameters"
    step = _training_step(checkpoint)
    trained = f" after {step:,} optimizer steps" if step is not None else ""
    load_tokenizer = (
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder", trust_remote_code=True)\n' if has_tokenizer else "# no tokenizer was saved with this checkpoint\n"
    )
    return f"""---
library_name: transformers
tags: [disco_ds, {config.model_type}, scion, causal-lm]
---

# {config.model_type} ({type(model).__name__})

A causal language model trained with disco_ds (the Scion optimizer under DeepSpeed
ZeRO){trained}, exported from `{checkpoint.name}` with `disco_ds export`.

- Shape: {describe}
- Weights: `{dtype}` safetensors
- The model code ships with the weights (`configuration_*.py`, `modeling_*.py`, listed in
  `auto_map` of `config.json`); it needs only `torch` and `transformers`, not disco_ds.

## Loading

```python
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("path/to/this/folder", trust_remote_code=True)
{load_tokenizer}```

`trust_remote_code=True` runs the two Python files in this folder: read them first. The tokenizer
is a plain `PreTrainedTokenizerFast`; transformers 5 reads `config.json` before it and would
otherwise ask whether to run the model's code. `generate` stops at the tokenizer's end of text
(`eos_token_id`) and never emits the padding rows of the embedding (`suppress_tokens` in
`generation_config.json`).
"""


def export_checkpoint(
    checkpoint: Path,
    out_dir: Path,
    *,
    dtype: str | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> Path:
    """Write a Hugging Face model folder from a trainer checkpoint; returns ``out_dir``.

    Args:
        checkpoint: the checkpoint directory (``.../checkpoints/step_00000100``), or a run
            directory, meaning its newest complete checkpoint.
        out_dir: the folder to write; must be empty or absent unless ``overwrite``.
        dtype: ``"bfloat16"``, ``"float32"`` or ``"float16"`` for the saved weights; None: the
            run's training precision (:func:`training_dtype`).
        max_shard_size: largest safetensors shard, e.g. ``"2GB"`` (an index file lists the shards).
        overwrite: write into a non-empty ``out_dir``, replacing a previous export's files.

    Raises:
        ExportError: the checkpoint is incomplete (the message names the missing file), or its
            weights do not match ``model/config.json`` (the message names the keys).
    """
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    if not (checkpoint / "COMPLETE").exists() and (checkpoint / "checkpoints").is_dir():
        from disco_ds.trainer.checkpoint import latest_checkpoint

        newest = latest_checkpoint(checkpoint)  # a run directory: its newest complete checkpoint
        if newest is None:
            raise ExportError(f"run directory {checkpoint} has no complete checkpoint under {checkpoint / 'checkpoints'}")
        checkpoint = newest
    dtype = dtype or training_dtype(checkpoint)
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, not {dtype!r}")
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise ExportError(f"{out_dir} exists and is not empty (pass overwrite=True / --force to replace it)")
        for stale in list(out_dir.glob("model*.safetensors")) + list(out_dir.glob("model.safetensors.index.json")):
            stale.unlink()
    state = load_fp32_state_dict(checkpoint)
    model = _build_model(checkpoint / "model", state)
    del state
    model.to(DTYPES[dtype])
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer_dir = checkpoint / "tokenizer"
    has_tokenizer = tokenizer_dir.is_dir() and bool(_copy_tokenizer(tokenizer_dir, out_dir))
    if has_tokenizer:
        _generation_ids(model, tokenizer_dir, out_dir)
    # transformers 5 always writes safetensors (and ignores safe_serialization); 4.x needs the flag.
    model.save_pretrained(out_dir, safe_serialization=True, max_shard_size=max_shard_size)
    (out_dir / "README.md").write_text(_model_card(model, checkpoint, dtype, has_tokenizer), encoding="utf-8")
    return out_dir


# ---------------------------------------------------------------------------- command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``disco_ds export``."""
    parser.add_argument("checkpoint", type=Path, help="checkpoint directory, e.g. runs/tiny/checkpoints/step_00000100")
    parser.add_argument("out_dir", type=Path, help="Hugging Face model folder to write")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="dtype of the saved weights (default: the run's training precision, train.bf16)")
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty OUT_DIR")


def main(args: argparse.Namespace) -> int:
    """Run ``disco_ds export``; returns the exit status."""
    try:
        out = export_checkpoint(args.checkpoint, args.out_dir, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, overwrite=args.force)
    except ExportError as exc:
        print(f"disco_ds export: error: {exc}", file=sys.stderr)
        return 1
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {args.checkpoint} -> {out} ({args.dtype or 'training precision'}): {files}")
    print(f'load with AutoModelForCausalLM.from_pretrained("{out}", trust_remote_code=True)')
    return 0


def _cli(argv: Any = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m disco_ds.integrations.export", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return main(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(_cli())
