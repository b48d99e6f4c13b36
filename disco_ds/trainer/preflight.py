"""What the trainer checks before the process group and the engine start: the data a run reads.

Every rank runs :func:`check_data` first thing, so a missing ``data.path``, a truncated shard or
token ids beyond the model's vocabulary is one :class:`~disco_ds.trainer.config.ConfigError` line within
seconds of launch, naming the key and the file, instead of a traceback after the engine is built.

The largest token id of a shard is what the vocabulary check needs. ``prepare`` records it per
shard in ``meta.json`` (``max_token_id``), so the check reads no token of a prepared dataset;
shards without a record (written by other tools) are scanned through a memory map, in chunks.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from disco_ds.trainer.config import ConfigError, RunConfig
from disco_ds.data import ShardError, TokenStream, eval_batches, list_shards, read_shard, shard_info

__all__ = ["DataCheck", "check_data", "check_vocabulary", "check_windows", "check_sampling", "check_resume", "max_token_id"]

_SCAN_CHUNK = 1 << 26  # tokens per numpy max() call: 128 MiB of uint16 at most in memory at once


@dataclass(frozen=True)
class DataCheck:
    """The data of a run, checked: ``meta.json`` and the shard paths of both splits."""

    meta: dict[str, Any]
    train_files: list[Path]
    val_files: list[Path]


def _shards(data_dir: Path, split: str) -> list[Path]:
    try:
        files = list_shards(str(data_dir / f"{split}_*.bin"))
    except FileNotFoundError:
        raise ConfigError(f"data.path: {data_dir} has no {split}_*.bin shards; write them with "
                          f"`python -m disco_ds prepare --input ... --out {data_dir}`") from None
    for path in files:
        try:
            shard_info(path)
        except ShardError as err:
            raise ConfigError(f"data.path: {err}") from None
    return files


def check_data(cfg: RunConfig) -> DataCheck:
    """``data.path``: ``meta.json`` readable, and every ``train_*.bin`` / ``val_*.bin`` shard with a
    valid header whose token count matches the file size. Reads headers only.

    Raises:
        ConfigError: naming ``data.path`` and the missing or damaged file.
    """
    data_dir = Path(cfg.data.path)
    meta_path = data_dir / "meta.json"
    if not meta_path.is_file():
        raise ConfigError(f"data.path: {meta_path} does not exist; write shards with "
                          f"`python -m disco_ds prepare --input ... --out {data_dir}`")
    try:
        meta = json.loads(meta_path.read_text())
        int(meta["vocab_size"]), int(meta["eot_id"])
    except (ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"data.path: {meta_path} is not a prepare meta.json with integer vocab_size and "
                          f"eot_id ({type(err).__name__}: {err})") from None
    return DataCheck(meta, _shards(data_dir, "train"), _shards(data_dir, "val"))


def max_token_id(path: Path) -> int:
    """The largest token id of the shard at ``path`` (-1 when empty), scanned through a memory map."""
    tokens = read_shard(path)
    top = -1
    for start in range(0, tokens.size, _SCAN_CHUNK):
        top = max(top, int(tokens[start:start + _SCAN_CHUNK].max()))
    return top


def check_vocabulary(data: DataCheck, vocab_size: int) -> None:
    """Every token id of every shard below ``vocab_size`` (the model's embedding rows).

    Raises:
        ConfigError: naming the shard, its largest id and the model's vocabulary.
    """
    recorded = data.meta.get("max_token_id", {})
    for path in data.train_files + data.val_files:
        top = recorded.get(path.name)
        if top is None:
            top = max_token_id(path)
        if top >= vocab_size:
            raise ConfigError(f"data.path: {path} holds token id {top}, but the model's vocabulary has {vocab_size} "
                              f"ids (0..{vocab_size - 1}); the shards were made with another tokenizer than "
                              f"meta.json's (vocab_size {data.meta['vocab_size']}), or set model.overrides.vocab_size "
                              f"above {top}")


def check_windows(cfg: RunConfig, data: DataCheck, dp_world: int) -> None:
    """Enough tokens for one training window and for one validation micro-batch on every rank.

    Raises:
        ConfigError: naming ``data.seq_len`` / ``eval.tokens`` and the shards.
    """
    seq, micro = cfg.data.seq_len, cfg.train.micro_batch
    try:
        TokenStream(data.train_files, seq, micro, 0, dp_world, seed=cfg.data.seed)
    except ValueError as err:
        raise ConfigError(f"data.seq_len: {err}") from None
    try:
        eval_batches(data.val_files, seq, micro, 0, dp_world, cfg.eval.tokens)
    except ValueError as err:
        raise ConfigError(f"eval.tokens / data.seq_len / train.micro_batch: {err}") from None


def check_sampling(cfg: RunConfig) -> None:
    """With ``eval.sample_tokens``, the data's tokenizer (which decodes the sample) loads.

    Raises:
        ConfigError: naming ``eval.sample_tokens`` and why the tokenizer does not load.
    """
    if not cfg.eval.sample_tokens:
        return
    from disco_ds.data.prepare import load_tokenizer

    try:
        load_tokenizer(cfg.data.path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"eval.sample_tokens={cfg.eval.sample_tokens} needs the tokenizer of data.path to decode "
                          f"the sample, which does not load: {err}; set eval.sample_tokens=0") from None


def check_resume(cfg: RunConfig) -> Path | None:
    """The checkpoint ``checkpoint.resume`` names: None for ``auto`` and ``none``, else the directory.

    Raises:
        ConfigError: the value is neither ``auto``, ``none`` nor an existing directory.
    """
    value = cfg.checkpoint.resume
    if value in ("auto", "none"):
        return None
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(f"checkpoint.resume: {value!r} is not 'auto' (the newest complete checkpoint of the run), "
                          "'none' (start afresh) or an existing checkpoint directory")
    return path
