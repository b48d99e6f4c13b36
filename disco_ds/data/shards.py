"""The token-shard file format: writing, validating, reading and listing shards.

Shard format (SPEC 7; the modded-nanogpt / llm.c ``.bin`` file)
----------------------------------------------------------------
A shard is a 1024-byte header of 256 little-endian int32 followed by the tokens:

* ``header[0]`` — magic: :data:`MAGIC_UINT16` (20240520) or :data:`MAGIC_UINT32` (20240801);
* ``header[1]`` — version: :data:`VERSION_UINT16` (1) with the first magic, :data:`VERSION_UINT32`
  (7) with the second;
* ``header[2]`` — the number of tokens; the rest of the header is zero;
* the body — that many tokens, little-endian ``uint16`` (version 1) or ``uint32`` (version 7).

Documents are separated by the end-of-text token and may run across shard boundaries.
:func:`write_shard` writes a shard atomically, :func:`read_shard` validates one and memory-maps its
body, and :func:`list_shards` resolves a directory, a glob or a list to shard paths.
"""

from __future__ import annotations

import glob as _glob
import os
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Union

import numpy as np

__all__ = [
    "HEADER_INTS",
    "HEADER_BYTES",
    "MAGIC_UINT16",
    "VERSION_UINT16",
    "MAGIC_UINT32",
    "VERSION_UINT32",
    "ShardError",
    "write_shard",
    "read_shard",
    "shard_info",
    "list_shards",
    "temp_path",
]

HEADER_INTS = 256
"""Number of little-endian int32 in a shard header."""
HEADER_BYTES = HEADER_INTS * 4
"""Size of a shard header in bytes (1024)."""
MAGIC_UINT16 = 20240520
"""Magic number of a shard with uint16 tokens (modded-nanogpt / llm.c, GPT-2 vocabularies)."""
VERSION_UINT16 = 1
"""Format version paired with :data:`MAGIC_UINT16`."""
MAGIC_UINT32 = 20240801
"""Magic number of a shard with uint32 tokens (llm.c, vocabularies above 65,536)."""
VERSION_UINT32 = 7
"""Format version paired with :data:`MAGIC_UINT32`."""

_FORMATS: dict[int, tuple[int, np.dtype]] = {
    MAGIC_UINT16: (VERSION_UINT16, np.dtype("<u2")),
    MAGIC_UINT32: (VERSION_UINT32, np.dtype("<u4")),
}

PathLike = Union[str, os.PathLike]
ShardSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


class ShardError(ValueError):
    """A shard file is missing or is not a valid modded-nanogpt / llm.c token shard."""


# --------------------------------------------------------------------------------------------
# Writing and reading one shard
# --------------------------------------------------------------------------------------------


def temp_path(path: Path) -> Path:
    """A fresh hidden name beside ``path`` (created with the usual permissions, unlike mkstemp).

    Write the file there, then ``os.replace`` it over ``path``: readers never see a partial file.
    """
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")


def write_shard(path: PathLike, tokens: Any, dtype: str | np.dtype | None = None) -> Path:
    """Write ``tokens`` (a 1-D array-like of non-negative ints) as one shard at ``path``.

    The token type is ``uint16`` (magic 20240520, version 1) when every token is below 65,536 and
    ``uint32`` (magic 20240801, version 7) otherwise; pass ``dtype="uint16"``/``"uint32"`` to
    force one (e.g. to keep every shard of a large vocabulary in ``uint32``). The file is written
    to a temporary file in the same directory, flushed to disk and renamed over ``path``, so a
    reader never sees a partial shard. Returns ``path`` as a :class:`~pathlib.Path`.
    """
    path = Path(path)
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"{path}: tokens must be 1-D, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{path}: tokens must be integers, got dtype {arr.dtype}")
    if arr.size >= 2**31:
        raise ValueError(f"{path}: {arr.size} tokens do not fit the int32 token count of the header")
    lo = int(arr.min()) if arr.size else 0
    hi = int(arr.max()) if arr.size else 0
    if lo < 0 or hi >= 2**32:
        raise ValueError(f"{path}: tokens must lie in [0, 2**32), found range [{lo}, {hi}]")
    if dtype is None:
        dt = np.dtype("<u2") if hi < 2**16 else np.dtype("<u4")
    else:
        dt = np.dtype(dtype).newbyteorder("<")
        if dt not in (np.dtype("<u2"), np.dtype("<u4")):
            raise ValueError(f"{path}: dtype must be uint16 or uint32, got {dtype}")
        if hi >= 2 ** (8 * dt.itemsize):
            raise ValueError(f"{path}: token {hi} does not fit {dt.name}")
    magic = MAGIC_UINT16 if dt.itemsize == 2 else MAGIC_UINT32
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[0] = magic
    header[1] = _FORMATS[magic][0]
    header[2] = arr.size

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(header.tobytes())
            body = np.ascontiguousarray(arr, dtype=dt)
            f.write(memoryview(body).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def shard_info(path: PathLike) -> tuple[np.dtype, int]:
    """Validate the shard at ``path`` without mapping its body; returns ``(dtype, num_tokens)``.

    Raises :class:`ShardError` when the file is missing, shorter than the header, has an
    unknown magic or version, or its size is not ``header + num_tokens * itemsize``.
    """
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"{path}: shard file not found (expected an existing .bin token shard)")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(
            f"{path}: truncated header: expected at least {HEADER_BYTES} bytes, found {size}"
        )
    with open(path, "rb") as f:
        header = np.frombuffer(f.read(HEADER_BYTES), dtype="<i4")
    magic, version, count = (int(v) for v in header[:3])
    if magic not in _FORMATS:
        raise ShardError(
            f"{path}: wrong magic: expected {MAGIC_UINT16} (uint16) or {MAGIC_UINT32} (uint32), "
            f"found {magic}"
        )
    want_version, dt = _FORMATS[magic]
    if version != want_version:
        raise ShardError(
            f"{path}: unsupported version: expected {want_version} for magic {magic}, found {version}"
        )
    if count < 0:
        raise ShardError(f"{path}: corrupt header: negative token count {count}")
    expected = HEADER_BYTES + count * dt.itemsize
    if size != expected:
        what = "truncated" if size < expected else "oversized"
        raise ShardError(
            f"{path}: {what}: header says {count} {dt.name} tokens, so expected {expected} bytes, "
            f"found {size}"
        )
    return dt, count


def read_shard(path: PathLike) -> np.ndarray:
    """Validate the shard at ``path`` (see :func:`shard_info`) and memory-map its tokens.

    Returns a read-only 1-D ``numpy.memmap`` of ``uint16`` or ``uint32`` (a plain empty array for
    a shard of zero tokens). Nothing is read until it is indexed.
    """
    dt, count = shard_info(path)
    if count == 0:
        empty = np.zeros(0, dtype=dt)
        empty.flags.writeable = False
        return empty
    return np.memmap(path, dtype=dt, mode="r", offset=HEADER_BYTES, shape=(count,))


def list_shards(spec: ShardSpec, pattern: str = "*.bin") -> list[Path]:
    """Resolve ``spec`` to a list of shard paths.

    ``spec`` is a directory (its files matching ``pattern``, default ``*.bin``, sorted), a glob
    (``data/train_*.bin``, sorted), one file, or a list of any of these (concatenated in order).
    Raises :class:`FileNotFoundError` naming ``spec`` when nothing matches.
    """
    if isinstance(spec, (str, os.PathLike)):
        items = [spec]
    else:
        items = list(spec)
        if not items:
            raise FileNotFoundError("no shard files: the list of shards is empty")
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.is_dir():
            found = sorted(q for q in p.glob(pattern) if q.is_file())
        elif p.is_file():
            found = [p]
        elif _glob.has_magic(str(item)):
            found = sorted(Path(q) for q in _glob.glob(str(item)) if Path(q).is_file())
        else:
            found = []
        if not found:
            where = f"directory {str(p)!r} has no files matching {pattern!r}" if p.is_dir() else (
                f"{str(item)!r} matches no file"
            )
            raise FileNotFoundError(f"no shard files: {where}")
        out.extend(found)
    return out
