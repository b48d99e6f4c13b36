"""The batches each data-parallel rank trains and evaluates on, read from token shards
(:mod:`disco_ds.data.shards`).

Training order (:class:`TokenStream`)
-------------------------------------
A *window* is ``seq_len + 1`` consecutive tokens of one shard starting at a multiple of
``seq_len`` (inputs ``window[:-1]``, targets ``window[1:]``); a shard of ``n`` tokens holds
``(n - 1) // seq_len`` windows, and windows never cross shard boundaries. The windows of all
shards are numbered ``0 .. N-1`` in file order (shard by shard), and epoch ``e`` visits them in
one seeded permutation ``π_e`` of ``0 .. N-1``: a window of any shard may follow a window of any
other, so a corpus whose sources sit in different shards is mixed at every step, not one shard
(hundreds of steps) at a time. ``π_e`` is a keyed Feistel network over the window numbers
(keys drawn from ``(seed, e)``), walked until it lands inside ``0 .. N-1``: a bijection
evaluated for just the windows a batch needs, so the order costs no memory and no setup however
many windows the shards hold, and shards are only memory-mapped, never read whole.
Concatenating the epochs gives one infinite *global stream* of windows, which depends only on
the files, ``seq_len`` and the seed — never on the world size or the micro-batch.

Micro-step ``k`` consumes the global windows ``[k*W*B, (k+1)*W*B)`` (``W`` the world size, ``B``
the micro-batch); rank ``r`` takes those whose global index ``i`` has ``i % W == r``, in order.
Hence ranks are disjoint, the union of one micro-step over the ranks is ``W*B`` consecutive
windows of the global stream, and a world of ``W`` ranks with micro-batch ``B`` sees exactly the
windows a single process with micro-batch ``W*B`` sees. The position is one global counter, so
:meth:`TokenStream.state_dict` is the same on every rank and resuming (even with another world
size or micro-batch) continues the global stream exactly where it stopped.

Evaluation (:func:`eval_batches`) reads the windows in file order, without shuffling, interleaved
over the ranks the same way, and gives every rank the same number of batches. When
``max_tokens`` allows only some of the windows, they are spread evenly over all of them, so every
validation shard (and every part of one) is represented, always the same windows.
"""

from __future__ import annotations

import resource
import warnings
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from disco_ds.data.shards import ShardSpec, list_shards, read_shard, shard_info

__all__ = [
    "TokenStream",
    "eval_batches",
    "document_positions",
    "window_order",
]


# --------------------------------------------------------------------------------------------
# The global order: a seeded permutation of the window numbers, evaluated pointwise
# --------------------------------------------------------------------------------------------

FEISTEL_ROUNDS = 6
"""Rounds of the Feistel network behind :func:`window_order` (four already make a keyed
pseudo-random permutation; two more cost nothing at a batch's few hundred indices)."""

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser on a uint64 array (wrapping arithmetic): every input bit reaches
    every output bit, which is what a Feistel round function needs."""
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def _feistel(x: np.ndarray, half_bits: int, keys: np.ndarray) -> np.ndarray:
    """One pass of the balanced Feistel network over ``2 ** (2 * half_bits)`` values."""
    h = np.uint64(half_bits)
    mask = np.uint64((1 << half_bits) - 1)
    left, right = x >> h, x & mask
    for key in keys:
        left, right = right, left ^ (_mix(right ^ key) & mask)
    return (left << h) | right


def window_order(indices: np.ndarray, n: int, seed: int, epoch: int) -> np.ndarray:
    """``π(indices)`` for the seeded permutation ``π`` of ``0 .. n-1`` that epoch ``epoch`` visits.

    A Feistel network permutes the smallest even power of two ``≥ n`` (at most ``4n`` values);
    cycle walking (apply it again while the value is ``≥ n``) restricts it to ``0 .. n-1`` and stays
    a bijection, in fewer than four passes on average. Deterministic across platforms: only uint64
    integer arithmetic, keys from :class:`numpy.random.SeedSequence` of ``(seed, epoch)``.
    """
    x = np.asarray(indices, dtype=np.uint64)
    if n <= 1:
        return np.zeros_like(x, dtype=np.int64)
    bits = (n - 1).bit_length()
    half_bits = (bits + 1) // 2
    keys = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(FEISTEL_ROUNDS, dtype=np.uint64)
    limit = np.uint64(n)
    y = _feistel(x, half_bits, keys)
    out = y >= limit
    while out.any():
        y[out] = _feistel(y[out], half_bits, keys)
        out[out] = y[out] >= limit
    return y.astype(np.int64)


# --------------------------------------------------------------------------------------------
# A set of shards cut into windows
# --------------------------------------------------------------------------------------------


def _max_open_maps() -> int:
    """How many shards stay memory-mapped at once. The global order reads every shard at every
    step, so all of them should stay mapped (a mapping costs address space, not memory); but each
    holds a file descriptor, so they are bounded by a quarter of the process's descriptor limit."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(8, (soft if soft != resource.RLIM_INFINITY else 4096) // 4)


class _Windows:
    """Shards of one split, their window counts, and lazily opened memory maps."""

    def __init__(self, files: ShardSpec, seq_len: int, what: str):
        if int(seq_len) != seq_len or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.seq_len = int(seq_len)
        self.paths = list_shards(files)
        self.tokens = np.zeros(len(self.paths), dtype=np.int64)
        for i, p in enumerate(self.paths):
            self.tokens[i] = shard_info(p)[1]
        self.windows = np.where(self.tokens >= self.seq_len + 1, (self.tokens - 1) // self.seq_len, 0)
        for p, n in zip(self.paths, self.tokens):
            if n < self.seq_len + 1:
                warnings.warn(
                    f"{p}: {int(n)} tokens, fewer than seq_len + 1 = {self.seq_len + 1}; "
                    f"skipping this shard",
                    stacklevel=3,
                )
        self.total = int(self.windows.sum())
        if self.total == 0:
            raise ValueError(
                f"no {what} window of seq_len + 1 = {self.seq_len + 1} tokens in "
                f"{len(self.paths)} shard(s) ({', '.join(str(p) for p in self.paths[:4])}"
                f"{', ...' if len(self.paths) > 4 else ''}): {int(self.tokens.sum())} tokens in all"
            )
        self.ends = np.cumsum(self.windows)
        """``ends[s]``: one past the number of shard ``s``'s last window (windows in file order)."""
        self.max_open = _max_open_maps()
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    def fingerprint(self) -> list[list[Any]]:
        return [[p.name, int(n)] for p, n in zip(self.paths, self.tokens)]

    def split(self, numbers: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Window numbers (file order over all shards) to ``(shard, window within the shard)``."""
        shard = np.searchsorted(self.ends, numbers, side="right")
        return shard, numbers - (self.ends[shard] - self.windows[shard])

    def _map(self, shard: int) -> np.ndarray:
        mm = self._open.get(shard)
        if mm is None:
            mm = read_shard(self.paths[shard])
            self._open[shard] = mm
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        else:
            self._open.move_to_end(shard)
        return mm

    def read(self, shards: np.ndarray, windows: np.ndarray) -> np.ndarray:
        """Row ``i`` is window ``windows[i]`` of shard ``shards[i]``; int64 ``[len, seq_len + 1]``."""
        buf = np.empty((len(shards), self.seq_len + 1), dtype=np.int64)
        starts = np.asarray(windows, dtype=np.int64) * self.seq_len
        for s in np.unique(shards):
            rows = np.flatnonzero(shards == s)
            buf[rows] = self._map(int(s))[starts[rows, None] + self._offsets]
        return buf


def _to_tensors(buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def document_positions(inputs: torch.Tensor, eot_id: int) -> torch.Tensor:
    """Position ids that restart at 0 after every end-of-text token of ``inputs`` [B, T].

    Shards separate documents with end-of-text, so a training window usually holds the tail of one
    document and the head of the next. Fed as ``position_ids``, these make NormGPT attend only
    within each document (it reads a restart at 0 as a document boundary) and start every
    document's RoPE at 0. The end-of-text token closes its document: the token after it opens the
    next. Computed on the tensor's device, without a host sync.
    """
    t = torch.arange(inputs.shape[1], device=inputs.device).expand_as(inputs)
    opens = torch.zeros_like(inputs, dtype=torch.bool)
    opens[:, 1:] = inputs[:, :-1] == eot_id
    opens[:, 0] = True
    start = torch.where(opens, t, torch.zeros_like(t)).cummax(dim=1).values
    return t - start


def _check_layout(micro_batch: int, rank: int, world_size: int) -> None:
    for name, v in (("micro_batch", micro_batch), ("world_size", world_size)):
        if int(v) != v or v < 1:
            raise ValueError(f"{name} must be a positive integer, got {v!r}")
    if int(rank) != rank or not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")


# --------------------------------------------------------------------------------------------
# Training stream
# --------------------------------------------------------------------------------------------


class TokenStream:
    """The training micro-batches of one data-parallel rank, epoch after epoch, forever.

    Args:
        files: shard paths, or anything :func:`list_shards` accepts (a directory, a glob, a list).
        seq_len: tokens per training sequence (each window holds ``seq_len + 1``).
        micro_batch: sequences per call to :meth:`next_batch` on this rank.
        rank, world_size: this rank's index and the data-parallel world size.
        seed: seeds the permutation of the windows of every epoch.

    See the module docstring for the order and the guarantees. Shards shorter than
    ``seq_len + 1`` tokens are skipped with a warning; a :class:`ValueError` is raised when no
    window exists at all, and a :class:`ShardError` for an invalid shard.
    """

    STATE_VERSION = 2
    """2: one permutation over the windows of all shards per epoch. 1 (before): the shards in a
    permutation, each one's windows read together; :meth:`load_state_dict` migrates it."""

    def __init__(
        self,
        files: ShardSpec,
        seq_len: int,
        micro_batch: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
    ):
        _check_layout(micro_batch, rank, world_size)
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self._w = _Windows(files, seq_len, "training")
        self.seq_len = self._w.seq_len
        self.micro_batch = int(micro_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.position = 0
        """Global index of the first window of the next micro-step (same on every rank)."""

    # -- sizes -------------------------------------------------------------------------------
    @property
    def files(self) -> list[Path]:
        """The shard paths, in the order given (skipped shards included)."""
        return list(self._w.paths)

    @property
    def windows_per_epoch(self) -> int:
        """Number of windows (sequences) in one epoch over all shards."""
        return self._w.total

    @property
    def tokens_per_epoch(self) -> int:
        """Number of target tokens in one epoch: ``windows_per_epoch * seq_len``."""
        return self._w.total * self.seq_len

    @property
    def epoch(self) -> int:
        """Epoch (from 0) of the first window of the next micro-step."""
        return self.position // self._w.total

    @property
    def step(self) -> int:
        """Number of micro-steps consumed so far at the current world size and micro-batch."""
        return self.position // (self.world_size * self.micro_batch)

    # -- order -------------------------------------------------------------------------------
    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map global window indices to ``(shard index, window index within the shard)``."""
        indices = np.asarray(indices, dtype=np.int64)
        total = self._w.total
        numbers = np.empty_like(indices)
        epochs = indices // total
        for e in np.unique(epochs):
            sel = epochs == e
            numbers[sel] = window_order(indices[sel] - e * total, total, self.seed, int(e))
        return self._w.split(numbers)

    def global_indices(self, step: int | None = None) -> np.ndarray:
        """Global window indices of this rank's micro-batch at micro-step ``step`` (default: next)."""
        start = self.position if step is None else int(step) * self.world_size * self.micro_batch
        return start + np.arange(self.micro_batch, dtype=np.int64) * self.world_size + self.rank

    # -- batches -----------------------------------------------------------------------------
    def peek(self, ahead: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``(inputs, targets)`` of the micro-step ``ahead`` steps after the next one, without
        moving the position: a prefetcher reads ahead with it while the position (and so
        :meth:`state_dict`) keeps counting only the batches trained on."""
        indices = self.global_indices() + int(ahead) * self.world_size * self.micro_batch
        return _to_tensors(self._w.read(*self.locate(indices)))

    def skip(self, steps: int = 1) -> None:
        """Move the position ``steps`` micro-steps on (the batches were taken with :meth:`peek`)."""
        self.position += int(steps) * self.world_size * self.micro_batch

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)``, each a ``LongTensor`` of shape ``[micro_batch, seq_len]``."""
        batch = self.peek()
        self.skip()
        return batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    # -- checkpointing -----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The exact position in the global stream (plain Python values, identical on every rank)."""
        return {
            "version": self.STATE_VERSION,
            "position": int(self.position),
            "epoch": int(self.epoch),
            "seed": self.seed,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "micro_batch": self.micro_batch,
            "shards": self._w.fingerprint(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where the stream that produced ``state`` stopped.

        The seed, ``seq_len`` and the shards (names and token counts) must match; the world size
        and micro-batch may differ, as long as the position falls on a micro-step boundary of
        this stream's ``world_size * micro_batch``.

        A version-1 state (saved before the global order, when each shard's windows were read
        together) is migrated with a warning: its position, and so its epoch and the number of
        windows trained on, carries over, but the rest of that epoch is drawn from the global
        order, so within that one epoch some windows may come again and others not at all.
        """
        version = state.get("version")
        if version not in (1, self.STATE_VERSION):
            raise ValueError(
                f"TokenStream state version {version!r} is not {self.STATE_VERSION} (or 1, which is "
                "migrated); it was saved by a newer disco_ds"
            )
        for key in ("seed", "seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"TokenStream state has {key}={state[key]!r} but this stream has {getattr(self, key)!r}"
                )
        if [list(x) for x in state["shards"]] != self._w.fingerprint():
            raise ValueError(
                "TokenStream state was saved over different shards (names or token counts differ): "
                f"saved {len(state['shards'])} shard(s), now {len(self._w.paths)}"
            )
        position = int(state["position"])
        if position < 0 or position % (self.world_size * self.micro_batch):
            raise ValueError(
                f"TokenStream position {position} is not a multiple of world_size * micro_batch = "
                f"{self.world_size * self.micro_batch}"
            )
        if version == 1 and position % self._w.total:
            warnings.warn(
                f"the data position was saved by an older disco_ds that read one shard at a time; "
                f"it is migrated to the global order across all shards: position {position} (epoch "
                f"{position // self._w.total}) carries over, but the remaining windows of this epoch "
                "are drawn anew, so some may repeat and others be skipped until the epoch ends",
                stacklevel=2,
            )
        self.position = position


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


def eval_batches(
    files: ShardSpec,
    seq_len: int,
    micro_batch: int,
    rank: int = 0,
    world_size: int = 1,
    max_tokens: int | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Deterministic validation micro-batches of one rank.

    The windows used are all of them in file order (shard by shard, window by window, no
    shuffling) or, when ``max_tokens`` target tokens (over all ranks together) allow only ``m`` of
    the ``N``, the ``m`` at evenly spaced places ``⌊j·N/m⌋``, so that every shard, and so every
    source whose documents sit in their own shards, is represented. Micro-step ``k`` covers the
    used windows ``[k*W*B, (k+1)*W*B)`` and rank ``r`` those with index ``≡ r (mod W)``, as in
    training. Only whole micro-steps are used, so every rank yields the same number of batches
    (DeepSpeed's collectives need that). Raises :class:`ValueError` if the shards (or
    ``max_tokens``) do not hold one micro-batch for every rank. Validation happens at the call,
    the reading lazily as the iterator is consumed.
    """
    _check_layout(micro_batch, rank, world_size)
    w = _Windows(files, seq_len, "validation")
    per_step = int(world_size) * int(micro_batch)
    usable = w.total
    if max_tokens is not None:
        if max_tokens < 0:
            raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
        usable = min(usable, int(max_tokens) // w.seq_len)
    steps = usable // per_step
    if steps == 0:
        raise ValueError(
            f"validation data too small: {w.total} window(s) of {w.seq_len + 1} tokens"
            + (f" (max_tokens={max_tokens} allows {usable})" if max_tokens is not None else "")
            + f", but one batch on every rank needs world_size * micro_batch = {per_step}"
        )
    return _eval_iter(w, steps, int(micro_batch), int(rank), int(world_size))


def _eval_iter(
    w: _Windows, steps: int, micro_batch: int, rank: int, world_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    used = steps * world_size * micro_batch
    for k in range(steps):
        j = k * world_size * micro_batch + np.arange(micro_batch, dtype=np.int64) * world_size + rank
        yield _to_tensors(w.read(*w.split(j * w.total // used)))
