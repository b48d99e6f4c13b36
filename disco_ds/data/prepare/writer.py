"""The pipeline of ``disco_ds prepare``: :func:`prepare` reads the sources a piece at a time,
tokenizes the pieces (in worker processes with ``--workers``, results in input order) into a
temporary file, then writes the documents in a seeded shuffled order, split into training and
validation with every input in both (:func:`validation_documents`), as shards, with the tokenizer
files and ``meta.json``; with its progress display and the shard writer."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from disco_ds.data.prepare.parallel import Encoder, EncodeError, usable_cores
from disco_ds.data.prepare.readers import READ_BYTES, Piece, Source, collect_sources, location, pieces
from disco_ds.data.prepare.tokenizers import Tokenizer, make_tokenizer, parse_size
from disco_ds.data.shards import temp_path, write_shard

__all__ = [
    "prepare",
    "summary_line",
    "validation_documents",
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

    def add(self, tokens: np.ndarray) -> None:
        """Append tokens of the current document (a document may come in several pieces)."""
        if not tokens.size:
            return
        self.chunks.append(tokens.astype(self.dtype, copy=False))
        self.buffered += tokens.size
        self.tokens += tokens.size
        while self.buffered >= self.shard_tokens:
            flat = np.concatenate(self.chunks)
            self._write(flat[: self.shard_tokens])
            rest = flat[self.shard_tokens :]
            self.chunks, self.buffered = ([rest] if rest.size else []), rest.size

    def end_document(self, eot: np.ndarray) -> None:
        """Close the current document with the end-of-text token."""
        self.add(eot)
        self.documents += 1

    def _write(self, tokens: np.ndarray) -> None:
        name = f"{self.split}_{len(self.files):06d}.bin"
        write_shard(self.out_dir / name, tokens, dtype=self.dtype)
        self.files.append(name)
        self.max_ids[name] = int(tokens.max()) if tokens.size else -1

    def close(self) -> None:
        if self.buffered:
            self._write(np.concatenate(self.chunks))
        self.chunks, self.buffered = [], 0


class _Spool:
    """Every document's tokens in input order, in an anonymous temporary file in the output
    directory (so a corpus of any size, a huge text file included, is held in bounded memory),
    with an index in memory: each document's start, length and input.

    The documents go to the shards only when all are known (:func:`_write_documents`), because
    their order there is a seeded permutation of all of them: a streaming pass could only mix
    documents that happen to be read close together, never the sources given one after another.
    """

    def __init__(self, out_dir: Path, dtype: np.dtype):
        self.dtype = dtype
        self.file = tempfile.TemporaryFile(dir=out_dir)
        self.size = 0
        self.starts = array("q")
        self.lengths = array("q")
        self.inputs = array("q")
        self.open = False  # a document has pieces here and its last is still to come

    def add(self, tokens: np.ndarray, input_index: int, last: bool) -> None:
        """Tokens of a piece of the current document (of ``--input`` number ``input_index``);
        ``last`` closes the document."""
        if not self.open:
            self.starts.append(self.size)
            self.inputs.append(input_index)
            self.open = True
        self.file.write(memoryview(np.ascontiguousarray(tokens, dtype=self.dtype)).cast("B"))
        self.size += tokens.size
        if last:
            self.lengths.append(self.size - self.starts[-1])
            self.open = False

    def tokens(self) -> np.ndarray:
        """All tokens, memory-mapped read-only (the index's starts and lengths point into it)."""
        self.file.flush()
        if self.size == 0:
            return np.zeros(0, dtype=self.dtype)
        return np.memmap(self.file, dtype=self.dtype, mode="r", shape=(self.size,)).view(np.ndarray)

    def close(self) -> None:
        """Delete the temporary file."""
        self.file.close()


def validation_documents(
    order: np.ndarray,
    inputs: np.ndarray,
    sizes: np.ndarray,
    val_fraction: float,
    val_tokens: int | None,
) -> np.ndarray:
    """Which documents go to validation (a boolean mask over the documents), from every input.

    ``order`` is the order the documents are written in, ``inputs[i]`` the ``--input`` document
    ``i`` came from and ``sizes[i]`` its tokens (end-of-text included). Each input with ``n ≥ 2``
    documents gives its first documents in ``order`` (a seeded random sample when ``order`` is
    shuffled): with ``val_tokens``, until they hold their input's share of ``val_tokens``
    (``⌈val_tokens · tokens of the input / all tokens⌉``); otherwise ``round(val_fraction · n)``
    of them; at least one either way, and never all ``n``, so that every input is in both splits
    and the validation loss weighs the inputs as training does. When no input has two documents,
    the first document in ``order`` is the validation split (if one is wanted at all).
    """
    val = np.zeros(order.size, dtype=bool)
    want = (val_tokens > 0) if val_tokens is not None else val_fraction > 0
    if not want or order.size == 0:
        return val
    total = int(sizes.sum())
    ordered_inputs = inputs[order]
    for source in np.unique(inputs):
        docs = order[ordered_inputs == source]
        n = docs.size
        if n < 2:
            continue
        if val_tokens is not None:
            share = -(-val_tokens * int(sizes[docs].sum()) // total)
            take = int(np.searchsorted(np.cumsum(sizes[docs]), share)) + 1
        else:
            take = round(val_fraction * n)
        val[docs[: min(max(take, 1), n - 1)]] = True
    if not val.any():
        val[order[0]] = True
    return val


def _write_documents(spool: _Spool, writers: dict[str, _ShardWriter], eot: np.ndarray, shuffle: bool,
                     seed: int, val_fraction: float, val_tokens: int | None, inputs: int) -> np.ndarray:
    """Write the spooled documents to the shards, in a permutation drawn from ``seed`` (input
    order without ``shuffle``), each to the split :func:`validation_documents` chooses; returns
    the documents and tokens of every input per split, ``[input, split (train, val), (documents,
    tokens)]``."""
    starts = np.frombuffer(spool.starts, dtype=np.int64)
    lengths = np.frombuffer(spool.lengths, dtype=np.int64)
    sources = np.frombuffer(spool.inputs, dtype=np.int64)
    n = lengths.size
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    val = validation_documents(order, sources, lengths + 1, val_fraction, val_tokens)
    counts = np.zeros((inputs, 2, 2), dtype=np.int64)
    np.add.at(counts, (sources, val.astype(np.int64), 0), 1)
    np.add.at(counts, (sources, val.astype(np.int64), 1), lengths + 1)
    tokens = spool.tokens()
    train, held_out = writers["train"], writers["val"]
    for i in order:
        writer = held_out if val[i] else train
        writer.add(tokens[starts[i] : starts[i] + lengths[i]])
        writer.end_document(eot)
    return counts


def _batches(items: Iterable[Piece], batch_bytes: int) -> Iterator[list[Piece]]:
    """Consecutive pieces in lists of about ``batch_bytes`` of text."""
    batch: list[Piece] = []
    size = 0
    for item in items:
        batch.append(item)
        size += item.nbytes
        if size >= batch_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


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
    workers: int | None = None,
    shuffle: bool = True,
    batch_bytes: int = 1 << 21,
    read_bytes: int = READ_BYTES,
) -> dict[str, Any]:
    """Tokenize ``inputs`` into shards under ``out_dir``; returns the ``meta.json`` content.

    See the :mod:`disco_ds.data.prepare` docstring for the inputs, tokenizers, split and layout. ``val_tokens``
    (if given) replaces ``val_fraction``; ``val_fraction=0`` with no ``val_tokens`` writes no
    validation split. ``progress`` shows a tqdm bar on a terminal and a line per ~5% of the files otherwise.

    ``workers`` processes tokenize (None: the usable cores, but this process for the byte
    tokenizer and for a tokenizer object without :meth:`~Tokenizer.portable`; 1: this process, no
    pool);
    the shards and ``meta.json`` are the same for any number. Text goes to them in batches of
    about ``batch_bytes`` (an input of one batch is encoded here); a text file is read
    ``read_bytes`` at a time. The tokens wait in a temporary file in ``out_dir`` until all are
    known (the output directory needs room for the tokens twice meanwhile); then the documents are
    written in a permutation drawn from ``seed`` (``shuffle=False``: in input order) and split as
    :func:`validation_documents` says.
    """
    t0 = time.time()
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int) or workers < 1):
        raise ValueError(f"--workers must be a whole number of processes, at least 1; got {workers!r}")
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

    if isinstance(tokenizer, Tokenizer):
        tok = tokenizer
    else:
        if progress and str(tokenizer).startswith("bpe:"):
            print(f"prepare: training {tokenizer} on the input text ...", file=sys.stderr, flush=True)
        # The pieces of a text file are cut where GPT-2's pre-tokenizer, which bpe:N uses,
        # splits anyway: the training sees the same words as on whole files.
        tok = make_tokenizer(
            str(tokenizer),
            train_texts=lambda: (p.text for p in pieces(sources, text_field, max_bytes, read_bytes)),
            eot_token=eot_token,
            min_frequency=bpe_min_frequency,
        )
    if workers is None:
        # The byte tokenizer's encoding costs less than sending the text to a worker: a pool only
        # slows it down (the standard library's .py files: 44-54 MB/s in this process, 7.5 MB/s
        # through 2 workers, their start included).
        workers = usable_cores() if tok.kind != "byte" and tok.portable() is not None else 1
    dtype = np.dtype("<u2") if tok.vocab_size <= 2**16 else np.dtype("<u4")

    out.mkdir(parents=True, exist_ok=True)
    _clear_output(out, overwrite)
    writers = {s: _ShardWriter(out, s, shard_tokens, dtype) for s in ("train", "val")}
    eot = np.array([tok.eot_id], dtype=dtype)
    spool = _Spool(out, dtype)
    log = _Progress(progress, sources, max_bytes)
    per_source = np.zeros((len(sources), 2), dtype=np.int64)  # documents, tokens
    bytes_read = 0
    current = -1
    # A tokenizer that cannot encode a text file in pieces gets each one whole.
    items = pieces(sources, text_field, max_bytes, read_bytes if tok.piecewise else None)
    try:
        with Encoder(tok, workers, dtype, text=lambda piece: piece.text) as encoder:
            for batch, arrays in encoder.map(_batches(items, batch_bytes)):
                for piece, ids in zip(batch, arrays):
                    if piece.source != current:
                        log.finished_sources(current, piece.source, per_source)
                        current = piece.source
                    spool.add(ids, sources[piece.source].input, piece.last)
                    per_source[piece.source] += (piece.last, ids.size + piece.last)
                    bytes_read += piece.nbytes
                    log.advance(piece.nbytes, ids.size + piece.last)
        log.finished_sources(current, current + 1, per_source)
        tokenize_seconds = log.close(encoder.used)
        if progress:
            how = "in a permutation drawn from --seed" if shuffle else "in input order"
            print(f"prepare: writing {len(spool.lengths):,} documents {how}", file=sys.stderr, flush=True)
        counts = _write_documents(spool, writers, eot, shuffle, seed, val_fraction, val_tokens, len(inputs))
        for w in writers.values():
            w.close()
    except EncodeError as e:
        piece = e.item
        raise ValueError(
            f"{location(sources[piece.source], piece.where)}: the {tok.name} tokenizer failed: {e.message}"
        ) from None
    finally:
        spool.close()
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
        "shuffle": bool(shuffle),
        "source_documents": {s: counts[:, k, 0].tolist() for k, s in enumerate(("train", "val"))},
        "source_tokens": {s: counts[:, k, 1].tolist() for k, s in enumerate(("train", "val"))},
        "val_fraction": None if val_tokens is not None else float(val_fraction),
        "val_tokens": val_tokens,
        "shard_tokens": int(shard_tokens),
        "max_bytes": max_bytes,
    }
    _write_json_atomic(out / "meta.json", meta)
    meta["seconds"] = round(time.time() - t0, 3)
    if progress:
        print(summary_line(meta, out, tokenize_seconds=tokenize_seconds, workers=encoder.used), flush=True)
    return meta


def _rate(count: float, seconds: float) -> float:
    return count / seconds if seconds > 0 else 0.0


def summary_line(
    meta: dict[str, Any],
    out: str | os.PathLike,
    *,
    tokenize_seconds: float | None = None,
    workers: int | None = None,
) -> str:
    """One line describing a ``prepare`` result, with its throughput: text MB/s and tokens/s over
    ``tokenize_seconds`` (the tokenizing pass, with ``workers`` processes) when given, else over
    the whole run's ``meta["seconds"]``."""
    tokens, docs, shards = meta["tokens"], meta["documents"], meta["shards"]
    line = (
        f"prepare: {meta['num_files']} file(s), {meta['bytes'] / 1e6:.2f} MB, "
        f"{docs['train'] + docs['val']} documents -> train {tokens['train']:,} tokens "
        f"({len(shards['train'])} shard(s)), val {tokens['val']:,} tokens ({len(shards['val'])} shard(s)); "
        f"tokenizer {meta['tokenizer']['name']} (vocab {meta['vocab_size']}, eot {meta['eot_id']}, "
        f"{meta['dtype']}) -> {out}"
    )
    total = tokens["train"] + tokens["val"]

    def rates(seconds: float) -> str:
        return f"{_rate(meta['bytes'], seconds) / 1e6:.2f} MB/s, {_rate(total, seconds):,.0f} tokens/s"

    if "seconds" in meta:
        line += f" in {meta['seconds']:.1f} s"
    if tokenize_seconds is not None:
        workers_text = f" with {workers} worker(s)" if workers else ""
        line += f"; tokenizing {tokenize_seconds:.1f} s{workers_text}: {rates(tokenize_seconds)}"
    elif "seconds" in meta:
        line += f": {rates(meta['seconds'])}"
    return line


class _Progress:
    """Throughput of the tokenizing pass, shown as a tqdm bar over input bytes on a terminal,
    otherwise as a line per ~5% of the files; :meth:`close` reports the whole pass."""

    def __init__(self, enabled: bool, sources: Sequence[Source], max_bytes: int | None):
        self.sources = sources
        self.enabled = enabled
        self.bar = None
        self.lines = False
        self.start = time.perf_counter()
        self.bytes = 0
        self.tokens = 0
        self.shown = self.start  # when the bar's tokens/s was last updated
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

    def _rates(self) -> str:
        seconds = time.perf_counter() - self.start
        return f"{_rate(self.bytes, seconds) / 1e6:.2f} MB/s, {_rate(self.tokens, seconds):,.0f} tokens/s"

    def advance(self, nbytes: int, ntokens: int) -> None:
        """Count text whose tokens reached the writers."""
        self.bytes += nbytes
        self.tokens += ntokens
        if self.bar is not None:
            self.bar.update(nbytes)
            now = time.perf_counter()
            if now - self.shown > 0.5:  # tqdm shows MB/s itself; tokens/s at most twice a second
                self.bar.set_postfix_str(f"{_rate(self.tokens, now - self.start):,.0f} tokens/s", refresh=False)
                self.shown = now

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
            print(f"prepare: [{i + 1}/{n}] files, {int(done[0]):,} documents, {int(done[1]):,} tokens, "
                  f"{self._rates()} (last: {self.sources[i].path})", file=sys.stderr)

    def close(self, workers: int) -> float:
        """End the display, report the pass's throughput with ``workers`` processes; returns the
        pass's seconds."""
        seconds = time.perf_counter() - self.start
        if self.bar is not None:
            self.bar.close()
        if self.enabled:
            print(f"prepare: tokenized {self.bytes / 1e6:.2f} MB into {self.tokens:,} tokens in {seconds:.1f} s "
                  f"with {workers} worker(s): {self._rates()}", file=sys.stderr, flush=True)
        return seconds
