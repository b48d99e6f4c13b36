"""The inputs of ``disco_ds prepare``: text files, ``.jsonl``, ``.parquet`` and Hugging Face
``save_to_disk`` directories, expanded into sources and read as documents."""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "Source",
    "collect_sources",
    "iter_documents",
    "documents",
]


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


def documents(
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
