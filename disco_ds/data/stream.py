"""The batches each data-parallel rank trains and evaluates on, read from token shards
(:mod:`disco_ds.data.shards`).

Training order (:class:`TokenStream`)
-------------------------------------
A *window* is ``seq_len + 1`` consecutive tokens of one shard starting at a multiple of
``seq_len`` (inputs ``window[:-1]``, targets ``window[1:]``); a shard of ``n`` tokens holds
``(n - 1) // seq_len`` windows, and windows never cross shard boundaries. Epoch ``e`` visits every
window exactly once: the shards in a permutation drawn from ``(seed, e)``, and the windows of each
shard in a permutation drawn from ``(seed, e, shard index)``. Concatenating the epochs gives one
infinite *global stream* of windows, which depends only on the files, ``seq_len`` and the seed —
never on the world size or the micro-batch.

Micro-step ``k`` consumes the global windows ``[k*W*B, (k+1)*W*B)`` (``W`` the world size, ``B``
the micro-batch); rank ``r`` takes those whose global index ``i`` has ``i % W == r``, in order.
Hence ranks are disjoint, the union of one micro-step over the ranks is ``W*B`` consecutive
windows of the global stream, and a world of ``W`` ranks with micro-batch ``B`` sees exactly the
windows a single process with micro-batch ``W*B`` sees. The position is one global counter, so
:meth:`TokenStream.state_dict` is the same on every rank and resuming (even with another world
size or micro-batch) continues the global stream exactly where it stopped.

Evaluation (:func:`eval_batches`) reads the windows in file order, without shuffling, interleaved
over the ranks the same way, and gives every rank the same number of batches.
"""

from __future__ import annotations

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
]


# --------------------------------------------------------------------------------------------
# A set of shards cut into windows
# --------------------------------------------------------------------------------------------


class _Windows:
    """Shards of one split, their window counts, and lazily opened memory maps."""

    MAX_OPEN = 8

    def __init__(self, files: ShardSpec, seq_len: int, what: str):
        if int(seq_len) != seq_len or seq_len < 1:
            raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
        self.seq_len = int(seq_len)
        self.paths = list_shards(files)
        self.tokens = np.zeros(len(self.paths), dtype=np.int64)
        self.dtypes: list[np.dtype] = []
        for i, p in enumerate(self.paths):
            dt, n = shard_info(p)
            self.dtypes.append(dt)
            self.tokens[i] = n
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
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)

    def fingerprint(self) -> list[list[Any]]:
        return [[p.name, int(n)] for p, n in zip(self.paths, self.tokens)]

    def _map(self, shard: int) -> np.ndarray:
        mm = self._open.get(shard)
        if mm is None:
            mm = read_shard(self.paths[shard])
            self._open[shard] = mm
            while len(self._open) > self.MAX_OPEN:
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
        seed: seeds the shard and window permutations of every epoch.

    See the module docstring for the order and the guarantees. Shards shorter than
    ``seq_len + 1`` tokens are skipped with a warning; a :class:`ValueError` is raised when no
    window exists at all, and a :class:`ShardError` for an invalid shard.
    """

    STATE_VERSION = 1

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
        self._w = _Windows(files, seq_len, "training")
        self.seq_len = self._w.seq_len
        self.micro_batch = int(micro_batch)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.seed = int(seed)
        self.position = 0
        """Global index of the first window of the next micro-step (same on every rank)."""
        self._order_epoch = -1
        self._order: np.ndarray = np.zeros(0, dtype=np.int64)
        self._ends: np.ndarray = np.zeros(0, dtype=np.int64)
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

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
    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch != self._order_epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._order = rng.permutation(len(self._w.paths)).astype(np.int64)
            self._ends = np.cumsum(self._w.windows[self._order])
            self._order_epoch = epoch
        return self._order, self._ends

    def _window_perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng([self.seed, epoch, shard])
            perm = rng.permutation(int(self._w.windows[shard])).astype(np.int64)
            self._perms[key] = perm
            while len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map global window indices to ``(shard index, window index within the shard)``."""
        indices = np.asarray(indices, dtype=np.int64)
        total = self._w.total
        shards = np.empty_like(indices)
        wins = np.empty_like(indices)
        epochs = indices // total
        for e in np.unique(epochs):
            sel = epochs == e
            within = indices[sel] - e * total
            order, ends = self._epoch_order(int(e))
            slot = np.searchsorted(ends, within, side="right")
            shard = order[slot]
            local = within - (ends[slot] - self._w.windows[shard])
            win = np.empty_like(local)
            for s in np.unique(shard):
                m = shard == s
                win[m] = self._window_perm(int(e), int(s))[local[m]]
            shards[sel] = shard
            wins[sel] = win
        return shards, wins

    def global_indices(self, step: int | None = None) -> np.ndarray:
        """Global window indices of this rank's micro-batch at micro-step ``step`` (default: next)."""
        start = self.position if step is None else int(step) * self.world_size * self.micro_batch
        return start + np.arange(self.micro_batch, dtype=np.int64) * self.world_size + self.rank

    # -- batches -----------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(inputs, targets)``, each a ``LongTensor`` of shape ``[micro_batch, seq_len]``."""
        shards, wins = self.locate(self.global_indices())
        buf = self._w.read(shards, wins)
        self.position += self.world_size * self.micro_batch
        return _to_tensors(buf)

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
        """
        if state.get("version") != self.STATE_VERSION:
            raise ValueError(f"TokenStream state version {state.get('version')!r} is not {self.STATE_VERSION}")
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

    Windows are taken in file order (shard by shard, window by window, no shuffling); micro-step
    ``k`` covers the windows ``[k*W*B, (k+1)*W*B)`` and rank ``r`` those with index ``≡ r (mod
    W)``, as in training. At most ``max_tokens`` target tokens are used over all ranks together
    (``None``: all windows); only whole micro-steps are used, so every rank yields the same number
    of batches (DeepSpeed's collectives need that). Raises :class:`ValueError` if the shards (or
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
    ends = np.cumsum(w.windows)
    for k in range(steps):
        idx = k * world_size * micro_batch + np.arange(micro_batch, dtype=np.int64) * world_size + rank
        shard = np.searchsorted(ends, idx, side="right")
        local = idx - (ends[shard] - w.windows[shard])
        yield _to_tensors(w.read(shard, local))
