"""The pipeline of ``disco_ds prepare``: :func:`prepare` reads the sources, tokenizes the
documents, splits them into training and validation, and writes the shards, the tokenizer files
and ``meta.json``; with its progress display and the shard writer."""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from disco_ds.data.prepare.readers import Source, collect_sources, documents
from disco_ds.data.prepare.tokenizers import Tokenizer, make_tokenizer, parse_size
from disco_ds.data.shards import temp_path, write_shard

__all__ = [
    "prepare",
    "summary_line",
]

SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")


# =============================================================================================
# Output
# =============================================================================================


class _ShardWriter:
    """Buffers one split's tokens and writes ``{split}_{index:06d}.bin`` every ``shard_tokens``."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int, dtype: np.dtype):
        self.out_dir, self.split, self.shard_tokens, self.dtype = out_dir, split, shard_tokens, dtype
        self.chunks: list[np.ndarray] = []
        self.buffered = 0
        self.tokens = 0
        self.documents = 0
        self.files: list[str] = []
        self.max_ids: dict[str, int] = {}
        """Largest token id per shard: ``meta.json`` keeps them so the trainer checks the
        vocabulary without reading the shards (:mod:`disco_ds.trainer.preflight`)."""

    def add_document(self, tokens: np.ndarray, eot: np.ndarray) -> None:
        for arr in (tokens, eot):
            self.chunks.append(arr.astype(self.dtype, copy=False))
            self.buffered += arr.size
        self.tokens += tokens.size + eot.size
        self.documents += 1
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.chunks)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.chunks, self.buffered = ([rest] if rest.size else []), rest.size

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.files):06d}.bin"
        write_shard(self.out_dir / name, tokens, dtype=self.dtype)
        self.files.append(name)
        self.max_ids[name] = int(tokens.max()) if tokens.size else -1

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.chunks))
        self.chunks, self.buffered = [], 0


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = temp_path(path)
    try:
        with open(tmp, "x") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _clear_output(out: Path, overwrite: bool) -> None:
    old = [p for p in out.iterdir() if SHARD_NAME.match(p.name)]
    meta = out / "meta.json"
    ours = False
    if meta.is_file():
        try:
            ours = json.loads(meta.read_text()).get("created_by") == "disco_ds prepare"
        except (OSError, ValueError):
            ours = False
    if old and not (ours or overwrite):
        raise FileExistsError(
            f"{out} already holds train_/val_ shards that disco_ds prepare did not write (no meta.json "
            "of ours); choose another --out or pass --overwrite"
        )
    if meta.is_file() and (ours or overwrite):
        meta.unlink()
    for p in old:
        p.unlink()


# =============================================================================================
# prepare
# =============================================================================================


def prepare(
    inputs: Sequence[str | os.PathLike] | str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer: str | Tokenizer = "byte",
    *,
    glob: str = "*.txt",
    exclude: Sequence[str] = (),
    text_field: str = "text",
    val_fraction: float = 0.01,
    val_tokens: int | str | None = None,
    shard_tokens: int | str = 100_000_000,
    max_bytes: int | str | None = None,
    seed: int = 0,
    eot_token: str | None = None,
    bpe_min_frequency: int = 2,
    overwrite: bool = False,
    progress: bool = True,
    batch_bytes: int = 1 << 21,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into shards under ``out_dir``; returns the ``meta.json`` content.

    See the :mod:`disco_ds.data.prepare` docstring for the inputs, tokenizers, split and layout. ``val_tokens``
    (if given) replaces ``val_fraction``; ``val_fraction=0`` with no ``val_tokens`` writes no
    validation split. ``progress`` shows a tqdm bar on a terminal and a line per ~5% of the files otherwise.
    """
    t0 = time.time()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(out_dir)
    shard_tokens = parse_size(shard_tokens, "--shard-tokens")
    max_bytes = None if max_bytes is None else parse_size(max_bytes, "--max-bytes")
    val_tokens = None if val_tokens is None else parse_size(val_tokens, "--val-tokens")
    if shard_tokens < 1:
        raise ValueError(f"--shard-tokens must be positive, got {shard_tokens}")
    if max_bytes is not None and max_bytes < 1:
        raise ValueError(f"--max-bytes must be positive, got {max_bytes}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if val_tokens is not None and val_tokens < 0:
        raise ValueError(f"--val-tokens must be >= 0, got {val_tokens}")

    sources = collect_sources([Path(p) for p in inputs], glob, exclude)
    log = _Progress(progress, sources, max_bytes)

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        if progress and str(tokenizer).startswith("bpe:"):
            print(f"prepare: training {tokenizer} on the input text ...", file=sys.stderr, flush=True)
        tok = make_tokenizer(
            str(tokenizer),
            train_texts=lambda: (text for _, text, _ in documents(sources, text_field, max_bytes)),
            eot_token=eot_token,
            min_frequency=bpe_min_frequency,
        )
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")

    out.mkdir(parents=True, exist_ok=True)
    _clear_output(out, overwrite)
    writers = {s: _ShardWriter(out, s, shard_tokens, dtype) for s in ("train", "val")}
    eot = np.array([tok.eot_id], dtype=np.int64)
    use_val_tokens = val_tokens is not None
    want_val = (val_tokens > 0) if use_val_tokens else val_fraction > 0
    rng = np.random.default_rng(seed)
    draws = np.zeros(0)
    doc_index = 0
    # The newest training document is held back, so that it can become the validation document
    # when the draws picked none.
    pending: np.ndarray | None = None
    bytes_read = 0
    per_source = np.zeros((len(sources), 2), dtype=np.int64)  # documents, tokens

    def route(src: int, ids: np.ndarray) -> None:
        nonlocal pending, doc_index, draws
        if use_val_tokens:
            to_val = want_val and writers["val"].tokens < val_tokens
        else:
            if doc_index >= draws.size:
                draws = rng.random(4096)
                doc_index = 0
            to_val = bool(draws[doc_index] < val_fraction)
            doc_index += 1
        per_source[src] += (1, ids.size + 1)
        if to_val:
            writers["val"].add_document(ids, eot)
            return
        if pending is not None:
            writers["train"].add_document(pending, eot)
        pending = ids

    batch: list[tuple[int, str]] = []
    batch_size = 0
    current = -1

    def flush() -> None:
        nonlocal batch, batch_size
        if batch:
            for (src, _), ids in zip(batch, tok.encode_arrays([t for _, t in batch])):
                route(src, ids)
        batch, batch_size = [], 0

    for src, text, nbytes in documents(sources, text_field, max_bytes):
        if src != current:
            flush()
            log.finished_sources(current, src, per_source)
            current = src
        batch.append((src, text))
        batch_size += nbytes
        bytes_read += nbytes
        log.advance(nbytes)
        if batch_size >= batch_bytes:
            flush()
    flush()
    log.finished_sources(current, current + 1, per_source)
    log.close()

    if pending is not None:
        if want_val and writers["val"].documents == 0:
            writers["val"].add_document(pending, eot)
        else:
            writers["train"].add_document(pending, eot)
    for w in writers.values():
        w.close()
    if writers["train"].documents == 0:
        total = writers["train"].documents + writers["val"].documents
        raise ValueError(
            f"no training documents: the input holds {total} non-empty document(s), all taken for "
            "validation; add input, or lower --val-fraction / --val-tokens"
        )

    tok.save_hf(out / "tokenizer")
    meta: dict[str, Any] = {
        "created_by": "disco_ds prepare",
        "format": "modded-nanogpt/llm.c token shards",
        "tokenizer": tok.describe(),
        "vocab_size": int(tok.vocab_size),
        "eot_id": int(tok.eot_id),
        "dtype": dtype.name,
        "tokens": {s: int(w.tokens) for s, w in writers.items()},
        "documents": {s: int(w.documents) for s, w in writers.items()},
        "shards": {s: list(w.files) for s, w in writers.items()},
        "max_token_id": {name: top for w in writers.values() for name, top in w.max_ids.items()},
        "bytes": int(bytes_read),
        "sources": [str(p) for p in inputs],
        "num_files": len(sources),
        "glob": glob,
        "exclude": list(exclude),
        "text_field": text_field,
        "seed": int(seed),
        "val_fraction": None if use_val_tokens else float(val_fraction),
        "val_tokens": val_tokens,
        "shard_tokens": int(shard_tokens),
        "max_bytes": max_bytes,
    }
    _write_json_atomic(out / "meta.json", meta)
    meta["seconds"] = round(time.time() - t0, 3)
    if progress:
        print(summary_line(meta, out), flush=True)
    return meta


def summary_line(meta: dict[str, Any], out: str | os.PathLike) -> str:
    """One line describing a ``prepare`` result."""
    tokens, docs, shards = meta["tokens"], meta["documents"], meta["shards"]
    return (
        f"prepare: {meta['num_files']} file(s), {meta['bytes'] / 1e6:.2f} MB, "
        f"{docs['train'] + docs['val']} documents -> train {tokens['train']:,} tokens "
        f"({len(shards['train'])} shard(s)), val {tokens['val']:,} tokens ({len(shards['val'])} shard(s)); "
        f"tokenizer {meta['tokenizer']['name']} (vocab {meta['vocab_size']}, eot {meta['eot_id']}, "
        f"{meta['dtype']}) -> {out}"
        + (f" in {meta['seconds']:.1f} s" if "seconds" in meta else "")
    )


class _Progress:
    """A tqdm bar over input bytes on a terminal; otherwise a line per ~5% of the files."""

    def __init__(self, enabled: bool, sources: Sequence[Source], max_bytes: int | None):
        self.sources = sources
        self.enabled = enabled
        self.bar = None
        self.lines = False
        if not enabled:
            return
        if sys.stderr.isatty():
            from tqdm import tqdm

            total = sum(s.size for s in sources)
            if max_bytes is not None:
                total = min(total, max_bytes)
            self.bar = tqdm(total=total, unit="B", unit_scale=True, desc="prepare", file=sys.stderr)
        else:
            self.lines = True

    def advance(self, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.update(nbytes)

    def finished_sources(self, start: int, stop: int, counts: np.ndarray) -> None:
        """Report sources ``start`` up to ``stop`` (exclusive) as finished."""
        if not self.lines:
            return
        n = len(self.sources)
        # A line per file is unreadable for thousands of files: report about every 5% of them
        # (and every file of a small input).
        every = max(1, n // 20)
        for i in range(max(start, 0), min(stop, n)):
            if (i + 1) % every and i + 1 != n:
                continue
            done = counts[: i + 1].sum(axis=0)
            print(f"prepare: [{i + 1}/{n}] files, {int(done[0]):,} documents, {int(done[1]):,} tokens "
                  f"(last: {self.sources[i].path})", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
