"""The tokenizers of ``disco_ds prepare`` (byte, trained byte-level BPE, ``tokenizer.json``,
GPT-2 through ``tiktoken``), their Hugging Face files, and :func:`load_tokenizer`, which rebuilds
the tokenizer of a prepared directory."""

from __future__ import annotations

import base64
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "EOT_TOKEN",
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "TiktokenTokenizer",
    "make_tokenizer",
    "tokenizer_from_portable",
    "train_bpe",
    "load_gpt2",
    "load_tokenizer",
    "parse_size",
]

EOT_TOKEN = "<|endoftext|>"
"""The end-of-text token of the byte, bpe and gpt2 tokenizers."""

_EOT_CANDIDATES = (EOT_TOKEN, "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "<|im_end|>", "[SEP]")

GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
"""GPT-2's pre-tokenization regex (used when ``tiktoken_ext`` does not provide it)."""

_GPT2_PATTERNS = (GPT2_PATTERN, r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
"""GPT-2's regex as current and older ``tiktoken`` versions spell it (the same expression)."""

_GPT2_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
_GPT2_HELP = (
    "GPT-2 BPE needs its encoding file offline. Get gpt2.tiktoken (identical to r50k_base.tiktoken, "
    f"sha256 306cd27f…; from {_GPT2_URL}, or whisper/assets/gpt2.tiktoken in the openai-whisper "
    "sdist) and pass --tokenizer gpt2:/path/to/gpt2.tiktoken, or put it in $TIKTOKEN_CACHE_DIR "
    "under the name sha1(url) that tiktoken expects."
)


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
    than the largest id), ``eot_id`` and ``eot_token`` (the end-of-text id and its text), and
    ``piecewise``: whether a document may be encoded in the pieces that
    :func:`~disco_ds.data.prepare.readers.last_cut` cuts, giving the tokens of the whole.
    """

    kind: str = ""
    name: str = ""
    vocab_size: int = 0
    eot_id: int = 0
    eot_token: str = EOT_TOKEN
    piecewise: bool = False

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

    def portable(self) -> dict[str, Any] | None:
        """A picklable description from which :func:`tokenizer_from_portable` builds the same
        tokenizer in another process; None for a tokenizer that has none."""
        return None

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
    piecewise = True

    def portable(self) -> dict[str, Any]:
        return {"type": "byte"}

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
        self.piecewise = _gpt2_byte_level(json.loads(self._tk.to_str()))

    def portable(self) -> dict[str, Any]:
        return {"type": "hf", "json": self._tk.to_str(), "kind": self.kind, "name": self.name,
                "eot_token": self.eot_token}

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
        self.piecewise = encoding._pat_str in _GPT2_PATTERNS

    def portable(self) -> dict[str, Any]:
        enc = self._enc
        return {"type": "tiktoken", "name": self.name, "encoding": enc.name, "pat_str": enc._pat_str,
                "mergeable_ranks": enc._mergeable_ranks, "special_tokens": enc._special_tokens,
                "n_vocab": enc.n_vocab}

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


def _gpt2_byte_level(config: dict[str, Any]) -> bool:
    """Whether a ``tokenizer.json`` (parsed) encodes plain text as GPT-2's byte-level BPE does:
    no normalizer, the ByteLevel pre-tokenizer with GPT-2's regex and no prefix space, a BPE
    without dropout, and no added token that would be matched in the text (special tokens are
    not: :class:`HFTokenizer` encodes them as text)."""
    pre = config.get("pre_tokenizer") or {}
    model = config.get("model") or {}
    return (
        config.get("normalizer") is None
        and pre.get("type") == "ByteLevel"
        and pre.get("use_regex", True) is True
        and pre.get("add_prefix_space") is False
        and model.get("type") == "BPE"
        and model.get("dropout") is None
        and all(t.get("special") for t in config.get("added_tokens") or [])
    )


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


def parse_size(value: str | int | float | None, what: str) -> int:
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
        vocab = parse_size(spec[4:], "bpe vocabulary")
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


def tokenizer_from_portable(desc: dict[str, Any]) -> Tokenizer:
    """The tokenizer that :meth:`Tokenizer.portable` described (in a worker process)."""
    if desc["type"] == "byte":
        return ByteTokenizer()
    if desc["type"] == "hf":
        from tokenizers import Tokenizer as TkTokenizer

        return HFTokenizer(TkTokenizer.from_str(desc["json"]), kind=desc["kind"], name=desc["name"],
                           eot_token=desc["eot_token"])
    if desc["type"] == "tiktoken":
        import tiktoken

        enc = tiktoken.Encoding(
            name=desc["encoding"],
            pat_str=desc["pat_str"],
            mergeable_ranks=desc["mergeable_ranks"],
            special_tokens=desc["special_tokens"],
            explicit_n_vocab=desc["n_vocab"],
        )
        return TiktokenTokenizer(enc, name=desc["name"])
    raise ValueError(f"unknown portable tokenizer type {desc['type']!r}")


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
