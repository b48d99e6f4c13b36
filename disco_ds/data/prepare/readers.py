"""The inputs of ``disco_ds prepare``: text files, ``.jsonl``, ``.parquet`` and Hugging Face
``save_to_disk`` directories, expanded into sources and read as documents, a bounded piece at a
time (a text file is one document however large; it is read in pieces)."""

from __future__ import annotations

import codecs
import fnmatch
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "READ_BYTES",
    "Source",
    "Piece",
    "collect_sources",
    "last_cut",
    "iter_pieces",
    "location",
    "pieces",
]

READ_BYTES = 1 << 20
"""How much of a text file is read at a time: a piece of its document is about this long."""


@dataclass
class Source:
    """One file or dataset to read: ``kind`` is ``text``, ``jsonl``, ``parquet`` or ``hf``;
    ``size`` in bytes; ``input`` the index of the ``--input`` it was found under (the unit the
    validation split takes documents from)."""

    path: Path
    kind: str
    size: int
    input: int = 0


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
    for index, item in enumerate(inputs):
        p = Path(item)
        if p.is_file():
            sources.append(Source(p, _file_kind(p), p.stat().st_size, index))
        elif p.is_dir():
            if _is_hf_dataset_dir(p):
                size = sum(f.stat().st_size for f in p.rglob("*.arrow"))
                sources.append(Source(p, "hf", size, index))
                continue
            found = sorted(f for f in p.rglob(glob) if f.is_file() and not _excluded(f.relative_to(p), exclude))
            if not found:
                raise FileNotFoundError(f"{p}: no file matches --glob {glob!r} in this directory")
            sources.extend(Source(f, _file_kind(f), f.stat().st_size, index) for f in found)
        else:
            raise FileNotFoundError(f"{p}: input not found")
    if not sources:
        raise FileNotFoundError("no input given")
    return sources


_CUT = re.compile(r"\S[ \n]")
"""A space or newline after a character that is not whitespace: where text is cut into pieces."""


def last_cut(text: str) -> int:
    r"""The last position ``p > 0`` where ``text[p]`` is a space or a newline and ``text[p - 1]`` is
    not whitespace, or 0 if there is none.

    For a tokenizer whose pre-tokenization is GPT-2's regular expression (byte-level BPE: the
    ``bpe:N`` tokenizers trained here, GPT-2 itself; trivially the byte tokenizer),
    ``encode(text[:p]) + encode(text[p:])`` equals ``encode(text)`` at such a position, whatever
    follows ``p``, so also when ``--max-bytes`` cuts the text further on: a pre-token starts at
    ``p`` (pre-tokens of non-whitespace never hold whitespace but a leading space, and a whitespace
    run cannot start before ``text[p - 1]``), the pre-tokens before ``p`` do not depend on what
    comes after it, and the expression has no look-behind. Python's whitespace (``str.isspace``)
    contains the regex engines' ``\s``, so ``text[p - 1]`` is not whitespace for them either.
    """
    # Search a growing tail: the last cut is near the end in any ordinary text, and doubling the
    # window keeps a text without cuts linear.
    window = 4096
    while True:
        start = max(0, len(text) - window)
        last = None
        for last in _CUT.finditer(text, start):
            pass
        if last is not None:
            return last.start() + 1
        if start == 0:
            return 0
        window *= 2


def _read_text(path: Path, read_bytes: int | None) -> Iterator[tuple[int, str, bool]]:
    """The file as one document, in pieces of about ``read_bytes`` cut at :func:`last_cut`
    positions (one piece when ``read_bytes`` is None); decoded as UTF-8 with invalid bytes
    replaced, exactly as a decoding of the whole file would."""
    if read_bytes is None:
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text:
            yield 0, text, True
        return
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    parts: list[str] = []  # decoded text not yet given out
    prev = ""  # its last character: a cut may fall on the first character of the next block
    with open(path, "rb") as f:
        while block := f.read(read_bytes):
            new = decoder.decode(block)
            p = last_cut(prev + new)
            if p > 0:
                cut = p - len(prev)
                parts.append(new[:cut])
                yield 0, "".join(parts), False
                parts = [new[cut:]]
            else:
                parts.append(new)
            if new:
                prev = new[-1]
    parts.append(decoder.decode(b"", final=True))
    text = "".join(parts)
    if text:
        yield 0, text, True


def _read_jsonl(path: Path, field: str) -> Iterator[tuple[int, str, bool]]:
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
            yield lineno, text, True


def _read_parquet(path: Path, field: str) -> Iterator[tuple[int, str, bool]]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(f"{path}: reading .parquet needs the optional package pyarrow (pip install pyarrow)") from e
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    if field not in names:
        raise ValueError(f"{path}: no column {field!r} (columns: {names}); set --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[field]):
        for text in batch.column(0).to_pylist():
            if text is not None:
                yield row, str(text), True
            row += 1


def _read_hf_dataset(path: Path, field: str) -> Iterator[tuple[int, str, bool]]:
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
    row = 0
    for part in parts:
        if field not in part.column_names:
            raise ValueError(f"{path}: no column {field!r} (columns: {part.column_names}); set --text-field")
        for batch in part.select_columns([field]).iter(batch_size=1024):
            for text in batch[field]:
                if text is not None:
                    yield row, str(text), True
                row += 1


def iter_pieces(
    source: Source, text_field: str = "text", read_bytes: int | None = READ_BYTES
) -> Iterator[tuple[int, str, bool]]:
    """``(where, text, last)`` for the pieces of the documents of one source, in order (empty
    documents included): a document is a whole text file, a ``.jsonl`` line, or a row.

    A text file comes in pieces of about ``read_bytes`` (see :func:`last_cut`; one piece when
    None), every other document as one piece; ``last`` marks a document's final piece. ``where`` is
    the line number of a ``.jsonl`` document, the row of a ``.parquet``/datasets one, and 0 for text.
    """
    if source.kind == "text":
        return _read_text(source.path, read_bytes)
    if source.kind == "jsonl":
        return _read_jsonl(source.path, text_field)
    if source.kind == "parquet":
        return _read_parquet(source.path, text_field)
    if source.kind == "hf":
        return _read_hf_dataset(source.path, text_field)
    raise ValueError(f"unknown source kind {source.kind!r}")


def location(source: Source, where: int) -> str:
    """Where a document of ``source`` is, for messages: the file, with its line or row."""
    if source.kind == "jsonl":
        return f"{source.path}:{where}"
    if source.kind in ("parquet", "hf"):
        return f"{source.path}: row {where}"
    return str(source.path)


class Piece(NamedTuple):
    """A piece of a document: ``source`` indexes the sources, ``where`` as :func:`iter_pieces`
    gives it, ``nbytes`` the UTF-8 size of ``text``, ``last`` true on the document's final piece."""

    source: int
    where: int
    text: str
    nbytes: int
    last: bool


def pieces(
    sources: Sequence[Source], text_field: str, max_bytes: int | None, read_bytes: int | None = READ_BYTES
) -> Iterator[Piece]:
    """The pieces of the non-empty documents, stopping at ``max_bytes`` (the piece that crosses the
    cap is cut at a character boundary and ends its document)."""
    used = 0
    open_document = False  # pieces of the current document were given out
    for i, src in enumerate(sources):
        for where, text, last in iter_pieces(src, text_field, read_bytes):
            if not text:
                continue
            nbytes = len(text.encode("utf-8", errors="replace"))
            if max_bytes is not None and used + nbytes >= max_bytes:
                if used + nbytes > max_bytes:
                    cut = text.encode("utf-8", errors="replace")[: max_bytes - used]
                    text = cut.decode("utf-8", errors="ignore")
                    nbytes = len(text.encode("utf-8"))
                # An empty final piece still closes a document whose earlier pieces went out.
                if text or open_document:
                    yield Piece(i, where, text, nbytes, True)
                return
            used += nbytes
            open_document = not last
            yield Piece(i, where, text, nbytes, last)
