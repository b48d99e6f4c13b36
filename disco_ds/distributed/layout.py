"""Who holds what: :class:`Fragment` and :class:`Layout`, the parameter-layout objects every
distributed path of Scion speaks.

A :class:`Layout` describes one closed set of whole parameters ("members") spread over a process
group: which rank holds which contiguous stretch ("fragment") of each member's flattened entries,
and where in the holder's buffer. The providers (:mod:`disco_ds.distributed.providers`) build
layouts from how DeepSpeed (or nobody) holds the parameters; :mod:`disco_ds.distributed.exchange`
moves fragments along them. Nothing here communicates.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

__all__ = ["Fragment", "FragmentViews", "Layout", "logical_shape", "matrix_view_shape", "row_pieces", "shape_numel", "group_rank_and_size"]


@dataclass(frozen=True)
class Fragment:
    """``numel`` entries of member ``member`` (flattened) from ``start``, at ``offset`` in the holder's buffer."""

    member: int
    start: int
    numel: int
    offset: int


class FragmentViews(Mapping[Fragment, torch.Tensor]):
    """Fragments of one flat 1-D buffer, each at its :attr:`Fragment.offset`, as a read-only mapping
    ``fragment -> view``.

    What a flat ZeRO partition hands the distributed LMO: the exchange packs its send buffers from
    :attr:`buffer` with one ``index_select`` instead of one copy per fragment, while every other
    reader still sees a ``dict[Fragment, Tensor]``. Views are made on access (no per-step work for
    fragments nobody reads).
    """

    def __init__(self, buffer: torch.Tensor, fragments: list[Fragment]) -> None:
        if buffer.dim() != 1:
            raise ValueError(f"FragmentViews needs a flat 1-D buffer, got shape {tuple(buffer.shape)}")
        self.buffer = buffer
        self._fragments = list(fragments)
        self._known = frozenset(self._fragments)

    def __getitem__(self, f: Fragment) -> torch.Tensor:
        if f not in self._known:
            raise KeyError(f)
        return self.buffer.narrow(0, f.offset, f.numel)

    def __iter__(self) -> Iterator[Fragment]:
        return iter(self._fragments)

    def __len__(self) -> int:
        return len(self._fragments)


@dataclass
class Layout:
    """Which rank holds which fragments of which whole parameters, over one process group."""

    shapes: list[tuple[int, ...]]
    fragments: list[list[Fragment]]  # per rank of ``group``, sorted by (member, start)
    group: Any
    rank: int
    replicated: bool = False  # every rank holds every member whole (stage 0 / DDP)
    blocks: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Members stored column block by column block (a matrix split along dim 1 over tensor-parallel
    ranks): member -> block widths. Such a member's flat index space is the concatenation of its
    ``[rows, width]`` blocks, each row-major; every other member is plain row-major."""
    sources: list[list[Fragment]] | None = None
    """Per rank, the fragments it contributes to gathers and sums, when several ranks hold copies of
    the same entries (tensor-parallel replicas): each entry then counts once. None: all fragments."""
    plans: dict[Any, Any] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Exchange plans computed for this layout (:func:`disco_ds.distributed.exchange.matrix_plan`),
    kept with it so that a cached layout is never planned twice."""
    sums_span_ranks: dict[str, bool] = field(default_factory=dict, init=False, repr=False, compare=False)
    """Per separable-norm axis, whether some summed slice has entries on several ranks
    (:func:`disco_ds.distributed.exchange.separable_sums_span_ranks`), computed once."""
    _whole: dict[int, list[int]] = field(init=False, repr=False)
    _copied: frozenset[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        held: dict[tuple[int, int], int] = {}
        for r, frags in enumerate(self.fragments):
            for f in frags:
                held[(f.member, r)] = held.get((f.member, r), 0) + f.numel
        self._whole = {m: [r for r in range(len(self.fragments)) if held.get((m, r), 0) == self.numel(m)]
                       for m in range(len(self.shapes))}
        copied: set[int] = set()
        if self.sources is not None:
            for frags, srcs in zip(self.fragments, self.sources):
                own = set(srcs)
                copied.update(f.member for f in frags if f not in own)
        self._copied = frozenset(copied)

    @property
    def world_size(self) -> int:
        return len(self.fragments)

    def numel(self, member: int) -> int:
        return shape_numel(self.shapes[member])

    def local(self) -> list[Fragment]:
        return self.fragments[self.rank]

    def whole_holders(self, member: int) -> list[int]:
        """Ranks that hold all of ``member`` locally."""
        return self._whole[member]

    def contributes(self, rank: int) -> list[Fragment]:
        """The fragments ``rank`` sends to owners and adds to sums (each entry once in the group)."""
        return self.fragments[rank] if self.sources is None else self.sources[rank]

    def has_copies(self, member: int) -> bool:
        """Whether several ranks hold copies of some entries of ``member`` (replicas must then
        receive bit-identical updates)."""
        return len(self._whole[member]) > 1 or member in self._copied

    def pieces(self, frag: Fragment) -> list[tuple[int, int, int, int, int]]:
        """Rectangles ``(offset in fragment, first row, rows, first column, columns)`` of the member's
        ``[rows, cols]`` view (:func:`matrix_view_shape`) that ``frag`` covers."""
        cols = matrix_view_shape(self.shapes[frag.member])[1]
        widths = self.blocks.get(frag.member)
        if widths is None:
            return row_pieces(frag, cols)
        rows = matrix_view_shape(self.shapes[frag.member])[0]
        base = col0 = 0
        for width in widths:
            size = rows * width
            if frag.start < base + size:
                if frag.start + frag.numel > base + size:
                    raise ValueError(f"fragment {frag} crosses a column block of member {frag.member}")
                inner = Fragment(frag.member, frag.start - base, frag.numel, frag.offset)
                return [(o, r, n, c + col0, w) for o, r, n, c, w in row_pieces(inner, width)]
            base += size
            col0 += width
        raise ValueError(f"fragment {frag} lies outside member {frag.member}")

    def to_matrix(self, member: int, flat: torch.Tensor) -> torch.Tensor:
        """The whole member in its logical shape from its flat index space (a view when row-major)."""
        widths = self.blocks.get(member)
        if widths is None:
            return flat.view(self.shapes[member])
        rows = matrix_view_shape(self.shapes[member])[0]
        parts = flat.split([rows * w for w in widths])
        return torch.cat([part.view(rows, w) for part, w in zip(parts, widths)], dim=1).view(self.shapes[member])

    def from_matrix(self, member: int, matrix: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_matrix`: the member's flat index space."""
        widths = self.blocks.get(member)
        if widths is None:
            return matrix.reshape(-1)
        rows = matrix_view_shape(self.shapes[member])[0]
        return torch.cat([b.reshape(-1) for b in matrix.reshape(rows, -1).split(list(widths), dim=1)])


def logical_shape(p: torch.Tensor) -> tuple[int, ...]:
    """A parameter's real shape: under ZeRO-3 (``zero.Init``) ``p.shape`` is a flat placeholder and
    DeepSpeed keeps the real one in ``ds_shape``."""
    return tuple(int(s) for s in getattr(p, "ds_shape", p.shape))


def matrix_view_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """``[rows, cols]`` of a member seen as a matrix: first dimension by the rest; a vector is one row."""
    rows = int(shape[0]) if len(shape) >= 2 else 1
    return rows, max(1, shape_numel(shape)) // rows


def row_pieces(frag: Fragment, cols: int) -> list[tuple[int, int, int, int]]:
    """Split a fragment of a row-major ``[rows, cols]`` matrix into rectangular pieces
    ``(offset in fragment, first row, number of rows, first column, number of columns)``: a partial
    first row, the whole rows in the middle, a partial last row."""
    pieces, pos, end = [], frag.start, frag.start + frag.numel
    while pos < end:
        row, col = divmod(pos, cols)
        if col == 0 and end - pos >= cols:
            nrows = (end - pos) // cols
            pieces.append((pos - frag.start, row, nrows, 0, cols))
            pos += nrows * cols
        else:
            width = min(cols - col, end - pos)
            pieces.append((pos - frag.start, row, 1, col, width))
            pos += width
    return pieces


def shape_numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def group_rank_and_size(group: Any) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)
