"""Tokenizing batches of text for ``disco_ds prepare``, in this process or in ``--workers``
worker processes, with the results in input order and a bounded amount of work in flight."""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Generic, TypeVar

import numpy as np

from disco_ds.data.prepare.tokenizers import Tokenizer, tokenizer_from_portable

__all__ = [
    "IN_FLIGHT_PER_WORKER",
    "EncodeError",
    "Encoder",
    "usable_cores",
]

IN_FLIGHT_PER_WORKER = 2
"""Batches submitted per worker and not yet consumed: one being encoded, one queued behind it so
the worker never waits for the reader; more would only hold more text and tokens in memory."""

T = TypeVar("T")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


class EncodeError(Exception):
    """The tokenizer failed on ``item`` (an element of a batch given to :meth:`Encoder.map`);
    ``message`` says how."""

    def __init__(self, item: Any, message: str):
        super().__init__(message)
        self.item = item
        self.message = message


class _TextFailed(Exception):
    """Raised by :func:`_encode` for the text at ``args[0]`` of a batch, with ``args[1]`` the
    tokenizer's error; plain ``args`` so that it crosses the process boundary intact."""


def _encode(tok: Tokenizer, texts: list[str], dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """All tokens of ``texts`` in ``dtype`` (what the shards hold, so that half or a quarter of
    the int64 bytes cross the process boundary) and the number of tokens of each text."""
    try:
        arrays = tok.encode_arrays(texts)
    except Exception:
        # Find the text that fails, so that the error can name its file.
        for i, text in enumerate(texts):
            try:
                tok.encode_arrays([text])
            except Exception as e:
                raise _TextFailed(i, f"{type(e).__name__}: {e}") from None
        raise
    lengths = np.fromiter((a.size for a in arrays), dtype=np.int64, count=len(arrays))
    if not arrays:
        return np.zeros(0, dtype), lengths
    return np.concatenate(arrays, dtype=dtype, casting="unsafe"), lengths


_worker_tokenizer: Tokenizer | None = None


def _worker_init(desc: dict[str, Any]) -> None:
    global _worker_tokenizer
    # Each worker is one of --workers processes: the tokenizers library's own thread pool would
    # only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer_from_portable(desc)


def _worker_encode(texts: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    assert _worker_tokenizer is not None, "worker used before its initializer ran"
    return _encode(_worker_tokenizer, texts, np.dtype(dtype))


class Encoder(Generic[T]):
    """Encodes batches with ``tok``, in this process (``workers == 1``) or in a pool of
    ``workers`` spawned processes that each build the tokenizer from :meth:`Tokenizer.portable`.

    The pool starts with the second batch: a single batch cannot be shared, and an input that
    small is not worth the start of the processes. :attr:`used` is the number of processes that
    encoded (1: this one). Use as a context manager: leaving it stops the pool, also on an error,
    without waiting for work nobody will consume.
    """

    def __init__(self, tok: Tokenizer, workers: int, dtype: np.dtype, text: Callable[[T], str]):
        self.tok, self.workers, self.dtype, self.text = tok, workers, np.dtype(dtype), text
        self.used = 1
        self._pool: ProcessPoolExecutor | None = None
        self._desc = tok.portable() if workers > 1 else None
        if workers > 1 and self._desc is None:
            raise ValueError(f"--workers {workers}: tokenizer {tok.name!r} cannot be built in worker "
                             "processes; use --workers 1")

    def __enter__(self) -> Encoder[T]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def map(self, batches: Iterable[Sequence[T]]) -> Iterator[tuple[Sequence[T], list[np.ndarray]]]:
        """``(batch, token arrays of its items)`` for every batch, in input order.

        With a pool, at most :data:`IN_FLIGHT_PER_WORKER` batches per worker are submitted and not
        yet consumed: ``batches`` is read only as fast as the results are taken. Raises
        :class:`EncodeError` for an item the tokenizer fails on, and :class:`ChildProcessError`
        when a worker process dies.
        """
        rest = iter(batches)
        head = list(itertools.islice(rest, 2))
        if self.workers == 1 or len(head) < 2:
            for batch in itertools.chain(head, rest):
                yield batch, self._result(batch, lambda: _encode(self.tok, self._texts(batch), self.dtype))
            return
        # spawn, not fork: this process may already run the tokenizers library's threads (a bpe
        # tokenizer was just trained), and a forked copy of a threaded process can deadlock.
        self._pool = ProcessPoolExecutor(
            max_workers=self.workers,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_worker_init,
            initargs=(self._desc,),
        )
        self.used = self.workers
        pending: deque[tuple[Sequence[T], Future]] = deque()
        limit = IN_FLIGHT_PER_WORKER * self.workers
        try:
            for batch in itertools.chain(head, rest):
                pending.append((batch, self._pool.submit(_worker_encode, self._texts(batch), self.dtype.str)))
                if len(pending) >= limit:
                    done, future = pending.popleft()
                    yield done, self._result(done, future.result)
            while pending:
                done, future = pending.popleft()
                yield done, self._result(done, future.result)
        except BrokenProcessPool as e:
            raise ChildProcessError(
                f"a --workers process stopped unexpectedly ({e}); out of memory? try fewer --workers"
            ) from None

    def _texts(self, batch: Sequence[T]) -> list[str]:
        return [self.text(item) for item in batch]

    def _result(
        self, batch: Sequence[T], get: Callable[[], tuple[np.ndarray, np.ndarray]]
    ) -> list[np.ndarray]:
        try:
            flat, lengths = get()
        except _TextFailed as e:
            index, message = e.args
            raise EncodeError(batch[index], message) from None
        return np.split(flat, np.cumsum(lengths)[:-1]) if lengths.size else []
