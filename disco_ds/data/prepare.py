"""``disco_ds prepare``: tokenize local text into training and validation token shards.

Inputs are text files (one document each), directories (searched recursively for ``--glob``,
default ``*.txt``, in sorted order; hidden entries and those matching ``--exclude`` are skipped),
``.jsonl`` files (one document per line, the string field ``--text-field``), ``.parquet`` files
(that column; needs ``pyarrow``) and Hugging Face ``datasets`` directories written by
``save_to_disk`` (needs ``datasets``; the ``train`` split of a ``DatasetDict``). Every document is
followed by the end-of-text token; empty documents are dropped. Document text is tokenized as plain
text: a literal ``<|endoftext|>`` inside a document is not turned into the special token.

Tokenizers (``--tokenizer``):

* ``byte`` — UTF-8 bytes, ids 0..255, end-of-text 256 (vocabulary 257); needs no files.
* ``bpe:N`` — a byte-level BPE of vocabulary ``N`` trained here on the input text with
  ``tokenizers`` (special token ``<|endoftext|>``).
* a path to a ``tokenizer.json`` (or a directory holding one), with ``--eot-token`` naming its
  end-of-text token when it is not one of the usual names.
* ``gpt2`` / ``gpt2:FILE`` — GPT-2's BPE through ``tiktoken``; offline it needs the encoding file
  ``gpt2.tiktoken`` (= ``r50k_base.tiktoken``), given as ``FILE`` or found in
  ``$TIKTOKEN_CACHE_DIR``.

The output directory holds ``train_000000.bin, ...`` and ``val_000000.bin, ...`` (the shard format
of :mod:`disco_ds.data`), ``meta.json`` (written last: its presence marks a complete run) and
``tokenizer/`` with Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) that ``transformers.AutoTokenizer.from_pretrained`` loads offline.
:func:`load_tokenizer` rebuilds the tokenizer from such a directory.

Validation split: with ``--val-fraction f`` each document goes to validation independently with
probability ``f``, drawn from ``--seed`` (so the split does not depend on the tokenizer), and at
least one document does; with ``--val-tokens n`` the first documents, in input order, go to
validation until it holds at least ``n`` tokens.
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from disco_ds.data import _temp_name, write_shard

__all__ = [
    "EOT_TOKEN",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "make_tokenizer",
    "train_bpe",
    "load_gpt2",
    "load_tokenizer",
    "Source",
    "collect_sources",
    "iter_documents",
    "prepare",
    "summary_line",
    "add_arguments",
    "main",
]

EOT_TOKEN = "<|endoftext|>"
"""The end-of-text token of the byte, bpe and gpt2 tokenizers."""

_EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's pre-tokenization regex (used when ``tiktoken_ext`` does not provide it)."""

_GPT2_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
_GPT2_HELP = (
    "GPT-2 BPE needs its encoding file offline. Get gpt2.tiktoken (identical to r50k_base.tiktoken, "
    f"sha256 306cd27f…; from {_GPT2_URL}, or whisper/assets/gpt2.tiktoken in the openai-whisper "
    "sdist) and pass --tokenizer gpt2:/path/to/gpt2.tiktoken, or put it in $TIKTOKEN_CACHE_DIR "
    "under the name sha1(url) that tiktoken expects."
)

SHARD_NAME = re.compile(r"^(train|val)_\d{6}\.bin$")


# =============================================================================================
# Tokenizers
# =============================================================================================


def _byte_to_unicode() -> dict[int, str]:
    """The byte-level alphabet: printable Latin-1 bytes stand for themselves, the other bytes
    take the code points from 256 upwards, in byte order (the byte-level BPE convention)."""
    printable = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    table: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _write_hf_files(tk: Any, out_dir: str | os.PathLike, eot: str) -> Path:
    """Write ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tk.save(str(out / "tokenizer.json"))
    special = {"bos_token": eot, "eos_token": eot, "unk_token": eot}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "clean_up_tokenization_spaces": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": 1_000_000_000,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return out


class Tokenizer:
    """What ``prepare`` and the trainer need from a tokenizer.

    Attributes: ``kind`` (``byte``/``bpe``/``json``/``gpt2``), ``name``, ``vocab_size`` (one more
    than the largest id), ``eot_id`` and ``eot_token`` (the end-of-text id and its text).
    """

    kind: str = ""
    name: str = ""
    vocab_size: int = 0
    eot_id: int = 0
    eot_token: str = EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, taken as plain text (no special tokens)."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; the end-of-text id decodes to ``eot_token``."""
        raise NotImplementedError

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Encode many documents at once; one integer array per document."""
        return [np.asarray(self.encode(t), dtype=np.int64) for t in texts]

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        """Write Hugging Face tokenizer files to ``out_dir`` (loadable offline by
        ``transformers.AutoTokenizer.from_pretrained(out_dir)``, encoding as :meth:`encode`)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The tokenizer's entry of ``meta.json``."""
        return {
            "kind": self.kind,
            "name": self.name,
            "vocab_size": int(self.vocab_size),
            "eot_id": int(self.eot_id),
            "eot_token": self.eot_token,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are byte values, 256 is end-of-text (vocabulary 257)."""

    kind = "byte"
    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace"))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.frombuffer(t.encode("utf-8", errors="replace"), dtype=np.uint8) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if i == self.eot_id:
                parts.append(run.decode("utf-8", errors="replace"))
                parts.append(self.eot_token)
                run = bytearray()
            elif 0 <= i < 256:
                run.append(i)
            else:
                raise ValueError(f"byte tokenizer: id {i} is outside 0..256")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def hf_tokenizer(self) -> Any:
        """The equivalent ``tokenizers.Tokenizer``: a byte-level BPE with no merges whose ids are
        the byte values, plus ``<|endoftext|>`` as id 256."""
        from tokenizers import Tokenizer as TkTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        table = _byte_to_unicode()
        tk = TkTokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        tk.decoder = decoders.ByteLevel()
        tk.add_special_tokens([self.eot_token])
        if tk.token_to_id(self.eot_token) != self.eot_id:  # pragma: no cover - tokenizers invariant
            raise RuntimeError("byte tokenizer: <|endoftext|> did not get id 256")
        return tk

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        return _write_hf_files(self.hf_tokenizer(), out_dir, self.eot_token)


class HFTokenizer(Tokenizer):
    """A ``tokenizers.Tokenizer`` (a trained BPE, or any ``tokenizer.json``)."""

    def __init__(self, tk: Any, kind: str, name: str, eot_token: str | None = None):
        from tokenizers import Tokenizer as TkTokenizer

        self._tk = TkTokenizer.from_str(tk.to_str())  # private copy: its flags are ours
        self._tk.encode_special_tokens = True  # documents are plain text
        self._tk.no_padding()
        self._tk.no_truncation()
        self.kind = kind
        self.name = name
        vocab = self._tk.get_vocab(with_added_tokens=True)
        if eot_token is None:
            eot_token = next((t for t in _EOT_CANDIDATES if t in vocab), None)
            if eot_token is None:
                raise ValueError(
                    f"tokenizer {name!r} has none of the end-of-text tokens {list(_EOT_CANDIDATES)}; "
                    "name it with --eot-token"
                )
        if eot_token not in vocab:
            raise ValueError(f"tokenizer {name!r} has no token {eot_token!r}")
        self.eot_token = eot_token
        self.eot_id = int(vocab[eot_token])
        self.vocab_size = int(max(vocab.values())) + 1

    @property
    def backend(self) -> Any:
        """The wrapped ``tokenizers.Tokenizer``."""
        return self._tk

    def encode(self, text: str) -> list[int]:
        return list(self._tk.encode(text, add_special_tokens=False).ids)

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tk.encode_batch_fast(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=False)

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        from tokenizers import Tokenizer as TkTokenizer

        return _write_hf_files(TkTokenizer.from_str(self._tk.to_str()), out_dir, self.eot_token)


class TiktokenTokenizer(Tokenizer):
    """GPT-2's BPE through ``tiktoken`` (``encode_ordinary``); end-of-text 50256."""

    kind = "gpt2"

    def __init__(self, encoding: Any, name: str = "gpt2"):
        self._enc = encoding
        self.name = name
        self.eot_id = int(encoding.eot_token)
        self.vocab_size = int(encoding.n_vocab)
        self.eot_token = EOT_TOKEN

    def encode(self, text: str) -> list[int]:
        return list(self._enc.encode_ordinary(text))

    def encode_arrays(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(ids, dtype=np.int64) for ids in self._enc.encode_ordinary_batch(list(texts))]

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def save_hf(self, out_dir: str | os.PathLike) -> Path:
        from transformers.convert_slow_tokenizer import TikTokenConverter

        ranks = getattr(self._enc, "_mergeable_ranks", None)
        if ranks is None:  # pragma: no cover - tiktoken internals
            raise RuntimeError("tiktoken encoding does not expose its mergeable ranks")
        with tempfile.TemporaryDirectory() as tmp:
            vocab_file = Path(tmp) / "ranks.tiktoken"
            with open(vocab_file, "w") as f:
                for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
                    f.write(f"{base64.b64encode(token).decode()} {rank}\n")
            tk = TikTokenConverter(
                vocab_file=str(vocab_file),
                pattern=self._enc._pat_str,
                extra_special_tokens={self.eot_token: self.eot_id},
            ).converted()
        return _write_hf_files(tk, out_dir, self.eot_token)


def _gpt2_pattern() -> str:
    try:
        from tiktoken_ext import openai_public

        return str(getattr(openai_public, "r50k_pat_str", GPT2_PATTERN))
    except ImportError:  # pragma: no cover - ships with tiktoken
        return GPT2_PATTERN


def load_gpt2(path: str | os.PathLike | None = None) -> TiktokenTokenizer:
    """GPT-2's tokenizer from a ``.tiktoken`` encoding file (or a directory holding
    ``gpt2.tiktoken`` / ``r50k_base.tiktoken``), else from ``$TIKTOKEN_CACHE_DIR``.

    The end-of-text token gets the id after the last rank (50256 for GPT-2).
    """
    try:
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe
    except ImportError as e:
        raise ImportError(
            f"--tokenizer gpt2 needs the optional package tiktoken (pip install tiktoken). {_GPT2_HELP}"
        ) from e
    if path is not None:
        p = Path(path)
        if p.is_dir():
            found = [p / n for n in ("gpt2.tiktoken", "r50k_base.tiktoken") if (p / n).is_file()]
            if not found:
                raise FileNotFoundError(f"{p}: no gpt2.tiktoken or r50k_base.tiktoken in this directory. {_GPT2_HELP}")
            p = found[0]
        if not p.is_file():
            raise FileNotFoundError(f"{p}: GPT-2 encoding file not found. {_GPT2_HELP}")
        ranks = load_tiktoken_bpe(str(p))
        eot = len(ranks)
        enc = tiktoken.Encoding(
            name="gpt2",
            pat_str=_gpt2_pattern(),
            mergeable_ranks=ranks,
            special_tokens={EOT_TOKEN: eot},
            explicit_n_vocab=eot + 1,
        )
        return TiktokenTokenizer(enc, name="gpt2")
    if not os.environ.get("TIKTOKEN_CACHE_DIR"):
        raise FileNotFoundError(f"--tokenizer gpt2 without a file and TIKTOKEN_CACHE_DIR is unset. {_GPT2_HELP}")
    errors = []
    for name in ("r50k_base", "gpt2"):
        try:
            return TiktokenTokenizer(tiktoken.get_encoding(name), name="gpt2")
        except Exception as e:  # network failure, missing cache file, hash mismatch
            errors.append(f"{name}: {type(e).__name__}: {e}")
    raise FileNotFoundError(
        f"tiktoken could not load GPT-2 from TIKTOKEN_CACHE_DIR={os.environ['TIKTOKEN_CACHE_DIR']} "
        f"({'; '.join(errors)}). {_GPT2_HELP}"
    )


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> HFTokenizer:
    """Train a byte-level BPE of at most ``vocab_size`` tokens (the 256-symbol byte alphabet,
    ``<|endoftext|>`` and the learned merges) on ``texts``. A small corpus may give fewer."""
    from tokenizers import Tokenizer as TkTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"bpe vocabulary must be at least 257 (256 bytes + end-of-text), got {vocab_size}")
    tk = TkTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=int(vocab_size),
        min_frequency=int(min_frequency),
        special_tokens=[EOT_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return HFTokenizer(tk, kind="bpe", name=f"bpe:{vocab_size}", eot_token=EOT_TOKEN)


def _load_json_tokenizer(path: Path, eot_token: str | None, kind: str = "json", name: str | None = None) -> HFTokenizer:
    from tokenizers import Tokenizer as TkTokenizer

    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json here")
    return HFTokenizer(TkTokenizer.from_file(str(file)), kind=kind, name=name or str(path), eot_token=eot_token)


def make_tokenizer(
    spec: str,
    train_texts: Callable[[], Iterable[str]] | None = None,
    eot_token: str | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """Build the tokenizer named by ``spec``: ``byte``, ``bpe:N`` (trained on ``train_texts()``),
    ``gpt2`` / ``gpt2:FILE``, or a path to a ``tokenizer.json`` (or a directory holding one)."""
    spec = str(spec)
    if spec == "byte":
        return ByteTokenizer()
    if spec.startswith("bpe:"):
        vocab = _parse_size(spec[4:], "bpe vocabulary")
        if train_texts is None:
            raise ValueError("a bpe tokenizer is trained on the input text: pass train_texts")
        return train_bpe(train_texts(), vocab, min_frequency=min_frequency)
    if spec == "gpt2" or spec.startswith("gpt2:"):
        return load_gpt2(spec[5:] or None)
    path = Path(spec)
    if path.exists():
        return _load_json_tokenizer(path, eot_token)
    raise ValueError(
        f"unknown tokenizer {spec!r}: expected byte, bpe:N, gpt2, gpt2:/path/to/gpt2.tiktoken, "
        "or an existing path to a tokenizer.json"
    )


def load_tokenizer(data_dir: str | os.PathLike) -> Tokenizer:
    """Rebuild the tokenizer that ``prepare`` used for ``data_dir`` (from its ``meta.json`` and
    ``tokenizer/``); a directory holding just a ``tokenizer.json`` works too."""
    d = Path(data_dir)
    meta_file = d / "meta.json"
    if meta_file.is_file():
        info = json.loads(meta_file.read_text()).get("tokenizer", {})
        if info.get("kind") == "byte":
            return ByteTokenizer()
        tok = _load_json_tokenizer(d / "tokenizer", info.get("eot_token"), kind=info.get("kind", "json"), name=info.get("name"))
        if "eot_id" in info and tok.eot_id != info["eot_id"]:
            raise ValueError(f"{d}: tokenizer end-of-text id {tok.eot_id} differs from meta.json's {info['eot_id']}")
        return tok
    for cand in (d / "tokenizer", d):
        if (cand / "tokenizer.json").is_file():
            return _load_json_tokenizer(cand, None)
    raise FileNotFoundError(f"{d}: neither meta.json nor tokenizer.json found (not a prepare output directory)")


# =============================================================================================
# Inputs
# =============================================================================================


@dataclass
class Source:
    """One input: ``kind`` is ``text``, ``jsonl``, ``parquet`` or ``hf``; ``size`` in bytes."""

    path: Path
    kind: str
    size: int


def _file_kind(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _excluded(rel: Path, exclude: Sequence[str]) -> bool:
    if any(part.startswith(".") for part in rel.parts):
        return True
    return any(fnmatch.fnmatch(part, pat) for pat in exclude for part in rel.parts) or any(
        fnmatch.fnmatch(rel.as_posix(), pat) for pat in exclude
    )


def collect_sources(
    inputs: Sequence[str | os.PathLike], glob: str = "*.txt", exclude: Sequence[str] = ()
) -> list[Source]:
    """Expand ``inputs`` (files and directories) into the ordered list of sources to read.

    Inside directories: the files matching ``glob``, sorted, except those with a hidden path
    component or a path component (or relative path) matching a pattern of ``exclude``.
    """
    sources: list[Source] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            sources.append(Source(p, _file_kind(p), p.stat().st_size))
        elif p.is_dir():
            if _is_hf_dataset_dir(p):
                size = sum(f.stat().st_size for f in p.rglob("*.arrow"))
                sources.append(Source(p, "hf", size))
                continue
            found = sorted(f for f in p.rglob(glob) if f.is_file() and not _excluded(f.relative_to(p), exclude))
            if not found:
                raise FileNotFoundError(f"{p}: no file matches --glob {glob!r} in this directory")
            sources.extend(Source(f, _file_kind(f), f.stat().st_size) for f in found)
        else:
            raise FileNotFoundError(f"{p}: input not found")
    if not sources:
        raise FileNotFoundError("no input given")
    return sources


def _read_text(path: Path) -> Iterator[str]:
    yield path.read_bytes().decode("utf-8", errors="replace")


def _read_jsonl(path: Path, field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict) or field not in row:
                keys = list(row) if isinstance(row, dict) else type(row).__name__
                raise ValueError(f"{path}:{lineno}: no field {field!r} (found {keys}); set --text-field")
            text = row[field]
            if not isinstance(text, str):
                raise ValueError(f"{path}:{lineno}: field {field!r} is {type(text).__name__}, not a string")
            yield text


def _read_parquet(path: Path, field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading .parquet needs the optional package pyarrow (pip install pyarrow)") from e
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {names}); set --text-field")
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield str(text)


def _read_hf_dataset(path: Path, field: str) -> Iterator[str]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"{path}: reading a Hugging Face save_to_disk directory needs the optional package datasets "
            "(pip install datasets)"
        ) from e
    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        parts = [ds["train"]] if "train" in ds else [ds[k] for k in sorted(ds)]
    else:
        parts = [ds]
    for part in parts:
        if field not in part.column_names:
            raise ValueError(f"{path}: no column {field!r} (columns: {part.column_names}); set --text-field")
        for batch in part.select_columns([field]).iter(batch_size=1024):
            for text in batch[field]:
                if text is not None:
                    yield str(text)


def iter_documents(source: Source, text_field: str = "text") -> Iterator[str]:
    """The documents of one source, in order (empty documents included)."""
    if source.kind == "text":
        return _read_text(source.path)
    if source.kind == "jsonl":
        return _read_jsonl(source.path, text_field)
    if source.kind == "parquet":
        return _read_parquet(source.path, text_field)
    if source.kind == "hf":
        return _read_hf_dataset(source.path, text_field)
    raise ValueError(f"unknown source kind {source.kind!r}")


def _documents(
    sources: Sequence[Source], text_field: str, max_bytes: int | None
) -> Iterator[tuple[int, str, int]]:
    """``(source index, text, utf-8 bytes)`` of the non-empty documents, stopping at ``max_bytes``
    (the document that crosses the cap is cut at a character boundary)."""
    used = 0
    for i, src in enumerate(sources):
        for text in iter_documents(src, text_field):
            if not text:
                continue
            nbytes = len(text.encode("utf-8", errors="replace"))
            if max_bytes is not None and used + nbytes > max_bytes:
                cut = text.encode("utf-8", errors="replace")[: max_bytes - used]
                text = cut.decode("utf-8", errors="ignore")
                nbytes = len(text.encode("utf-8"))
                if text:
                    yield i, text, nbytes
                return
            used += nbytes
            yield i, text, nbytes
            if max_bytes is not None and used >= max_bytes:
                return


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
    tmp = _temp_name(path)
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


def _parse_size(value: str | int | float | None, what: str) -> int:
    """``100M`` → 100_000_000; suffixes k, M, G, T (powers of 1000) or Ki, Mi, Gi (of 1024), an
    optional trailing B."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, float):
        if value != int(value):
            raise ValueError(f"{what}: {value} is not a whole number")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMgGtT]i?)?[bB]?\s*", str(value))
    if not m:
        raise ValueError(f"{what}: cannot read {value!r} as a size (e.g. 100M, 20MB, 65536)")
    number, suffix = float(m.group(1)), (m.group(2) or "")
    base = 1024 if suffix.endswith("i") else 1000
    power = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[suffix[:1].lower()]
    result = number * base**power
    if result != int(result):
        raise ValueError(f"{what}: {value!r} is not a whole number")
    return int(result)


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

    See the module docstring for the inputs, tokenizers, split and layout. ``val_tokens``
    (if given) replaces ``val_fraction``; ``val_fraction=0`` with no ``val_tokens`` writes no
    validation split. ``progress`` shows a tqdm bar on a terminal and a line per ~5% of the files otherwise.
    """
    t0 = time.time()
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out = Path(out_dir)
    shard_tokens = _parse_size(shard_tokens, "--shard-tokens")
    max_bytes = None if max_bytes is None else _parse_size(max_bytes, "--max-bytes")
    val_tokens = None if val_tokens is None else _parse_size(val_tokens, "--val-tokens")
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
            train_texts=lambda: (text for _, text, _ in _documents(sources, text_field, max_bytes)),
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

    for src, text, nbytes in _documents(sources, text_field, max_bytes):
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


# =============================================================================================
# CLI
# =============================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` options to ``parser``."""
    parser.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                        help="text/.jsonl/.parquet files, directories (searched with --glob), or "
                             "Hugging Face save_to_disk directories")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", default="byte",
                        help="byte | bpe:N | gpt2[:FILE.tiktoken] | path/to/tokenizer.json (default: byte)")
    parser.add_argument("--glob", default="*.txt", help="file pattern inside input directories (default: *.txt)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                        help="skip directory entries whose name or relative path matches (e.g. site-packages test)")
    parser.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/datasets (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of documents for validation, at least one (default: 0.01)")
    parser.add_argument("--val-tokens", default=None,
                        help="instead: the first documents until validation holds this many tokens (e.g. 1M)")
    parser.add_argument("--shard-tokens", default="100M", help="tokens per shard (default: 100M)")
    parser.add_argument("--max-bytes", default=None, help="stop after this much input text (e.g. 20MB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split (default: 0)")
    parser.add_argument("--eot-token", default=None, help="end-of-text token of a tokenizer.json")
    parser.add_argument("--bpe-min-frequency", type=int, default=2, help="bpe:N training min pair frequency")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace train_/val_ shards in --out that prepare did not write")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary line")


def main(args: argparse.Namespace) -> int:
    """Run ``prepare`` from parsed arguments; returns the exit code (1 on a reported error)."""
    try:
        prepare(
            args.input,
            args.out,
            args.tokenizer,
            glob=args.glob,
            exclude=args.exclude,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            val_tokens=args.val_tokens,
            shard_tokens=args.shard_tokens,
            max_bytes=args.max_bytes,
            seed=args.seed,
            eot_token=args.eot_token,
            bpe_min_frequency=args.bpe_min_frequency,
            overwrite=args.overwrite,
            progress=not args.quiet,
        )
    except (ValueError, OSError, ImportError) as e:
        print(f"disco_ds prepare: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # python -m disco_ds.data.prepare ...
    _parser = argparse.ArgumentParser(prog="disco_ds prepare", description=__doc__.split("\n\n")[0])
    add_arguments(_parser)
    sys.exit(main(_parser.parse_args()))
