"""The LMO library: one small class per geometry.

Scion picks, for every parameter, a norm ball and steps along the ball's linear minimisation
oracle ``lmo(g) = argmax_{‖u‖ ≤ 1} ⟨g, u⟩`` (Scion subtracts ``lr·ρ·lmo``). Each class here is
one geometry with

* ``lmo(g)``: the direction, scale-invariant in ``g`` (so the un-bias-corrected momentum works),
* ``init_(w)``: an initialisation on the ball's boundary (``norm(w) = 1``),
* ``norm(w)``: the norm itself (for monitoring, SPEC 4),
* ``dual_norm(g)``: ``⟨g, lmo(g)⟩``, the best first-order decrease of a unit step.

A group's ``norm`` key is the class's registered ``name``. Adding a geometry is adding one class
decorated with ``@register_norm``.

Three families matter to the distributed optimizer, which never needs to read the formulas:

* :class:`MatrixNorm` (spectral): the LMO needs the whole matrix; ``lmo`` accepts a batch
  ``[..., m, n]`` of same-shape matrices and runs one batched Newton–Schulz.
* :class:`SeparableNorm` (token RMS, row, column, vector RMS): ``lmo(g) = g · factor(s)`` where
  ``s`` is the sum of squares of ``g`` along one axis. Sharded callers sum squares over their
  fragments, complete ``s`` with one ``all_reduce`` and call :meth:`SeparableNorm.factor`.
* :class:`ElementwiseNorm` (sign): each entry's direction depends only on itself and the shape.

All shapes are ``[d_out, d_in]`` (``nn.Linear`` layout; an embedding is ``[vocab, d]``).
Pure mathematics: no distributed code lives here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar, Literal

import torch

from disco_ds.optim.newton_schulz import NS_METHODS, orthogonalize, orthogonalize_stack

__all__ = [
    "Norm",
    "MatrixNorm",
    "SeparableNorm",
    "ElementwiseNorm",
    "Spectral",
    "SpectralMax",
    "SpectralTransposed",
    "SpectralConv",
    "TokenRMS",
    "RowNorm",
    "ColNorm",
    "Sign",
    "VectorRMS",
    "NORMS",
    "register_norm",
    "make_norm",
    "lmo_many",
]

EPS = 1e-12
"""Guards every division by a norm; a zero gradient gives a zero direction."""

NORMS: dict[str, type["Norm"]] = {}


def register_norm(cls: type["Norm"]) -> type["Norm"]:
    """Class decorator: make a geometry available under ``cls.name`` as a group's ``norm``."""
    if cls.name in NORMS:
        raise ValueError(f"norm name {cls.name!r} is registered twice ({NORMS[cls.name]} and {cls})")
    NORMS[cls.name] = cls
    return cls


def make_norm(name: str, *, ns_steps: int = 5, ns_method: str = "quintic", ns_gram: bool = True) -> "Norm":
    """Build the geometry registered as ``name``; Newton–Schulz options go to matrix norms."""
    if name not in NORMS:
        raise ValueError(f"unknown norm {name!r}; accepted values: {sorted(NORMS)}")
    cls = NORMS[name]
    if issubclass(cls, MatrixNorm):
        return cls(ns_steps=ns_steps, ns_method=ns_method, ns_gram=ns_gram)
    return cls()


class Norm:
    """A norm ball: its LMO, an initialisation on its boundary, and the norm and its dual."""

    name: ClassVar[str]
    min_ndim: ClassVar[int] = 2
    """Parameters with fewer dimensions cannot use this geometry (checked by the optimizer)."""

    def lmo(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dual_norm(self, g: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _fill_(w: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        w.copy_(value.to(w.dtype))
    return w


# --------------------------------------------------------------------------------------------
# Matrix norms: the LMO is a scaled orthogonalisation of the whole matrix.
# --------------------------------------------------------------------------------------------


class MatrixNorm(Norm):
    """``lmo(g) = s · NS(g)`` with a shape-dependent scale ``s``, on the parameter seen as a matrix."""

    def __init__(self, ns_steps: int = 5, ns_method: str = "quintic", ns_gram: bool = True) -> None:
        if ns_method not in NS_METHODS:
            raise ValueError(f"unknown ns_method {ns_method!r}; accepted values: {list(NS_METHODS)}")
        if ns_steps < 1:
            raise ValueError(f"ns_steps must be ≥ 1, got {ns_steps}")
        self.ns_steps = ns_steps
        self.ns_method = ns_method
        self.ns_gram = ns_gram
        """Evaluate Newton–Schulz in the Gram form where it needs fewer FLOPs
        (:func:`~disco_ds.optim.newton_schulz.uses_gram`)."""

    def to_matrix(self, g: torch.Tensor) -> torch.Tensor:
        """The parameter as the matrix (or batch ``[..., m, n]``) that Newton–Schulz sees."""
        return g

    def scale(self, shape: torch.Size | tuple[int, ...]) -> float:
        """The LMO's scale for a parameter of this shape."""
        raise NotImplementedError

    @property
    def update_dtype(self) -> torch.dtype | None:
        """The dtype of the updates: the iterative methods' bf16, which their last product already
        holds (an fp32 copy would add a pass and no precision, and a master weight adds a bf16
        update in fp32); ``None`` (the input's) for the exact ``"svd"`` oracle."""
        return None if self.ns_method == "svd" else torch.bfloat16

    def lmo_batch(self, matrices: Sequence[torch.Tensor], shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """LMO of ``to_matrix`` views of parameters of one ``shape``, as one ``[B, m, n]`` tensor in
        :attr:`update_dtype` (:func:`~disco_ds.optim.newton_schulz.orthogonalize_stack`: no stacked
        copy of the inputs)."""
        return orthogonalize_stack(matrices, steps=self.ns_steps, method=self.ns_method, scale=self.scale(shape),
                                   gram=self.ns_gram, out_dtype=self.update_dtype)

    def lmo(self, g: torch.Tensor) -> torch.Tensor:
        return orthogonalize(self.to_matrix(g), steps=self.ns_steps, method=self.ns_method, gram=self.ns_gram,
                             scale=self.scale(g.shape), out_dtype=self.update_dtype).reshape(g.shape)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        return torch.linalg.matrix_norm(self.to_matrix(w).float(), ord=2) / self.scale(w.shape)

    def dual_norm(self, g: torch.Tensor) -> torch.Tensor:
        return self.scale(g.shape) * torch.linalg.matrix_norm(self.to_matrix(g).float(), ord="nuc")

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        q = torch.empty(w.shape, dtype=torch.float32, device=w.device)
        torch.nn.init.orthogonal_(q)
        return _fill_(w, q * self.scale(w.shape))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ns_steps={self.ns_steps}, ns_method={self.ns_method!r}, ns_gram={self.ns_gram})"


@register_norm
class Spectral(MatrixNorm):
    """RMS→RMS operator norm, for hidden matrices: ``lmo = √(d_out/d_in) · NS(g)``."""

    name = "spectral"

    def scale(self, shape: torch.Size | tuple[int, ...]) -> float:
        return math.sqrt(shape[-2] / shape[-1])


@register_norm
class SpectralTransposed(MatrixNorm):
    """Spectral for weights stored ``[d_in, d_out]`` (GPT-2's ``Conv1D``): ``√(d_out/d_in)`` from the stored shape."""

    name = "spectral_transposed"

    def scale(self, shape: torch.Size | tuple[int, ...]) -> float:
        return math.sqrt(shape[-1] / shape[-2])


@register_norm
class SpectralMax(MatrixNorm):
    """Spectral with ``max(1, √(d_out/d_in))``, for image-like input layers with tiny ``d_in``."""

    name = "spectral_max"

    def scale(self, shape: torch.Size | tuple[int, ...]) -> float:
        return max(1.0, math.sqrt(shape[-2] / shape[-1]))


@register_norm
class SpectralConv(MatrixNorm):
    """Conv kernels ``[out, in, k…]``: NS on ``[out, in·k…]`` times ``√(out/in) / (number of taps)``."""

    name = "conv_spectral"
    min_ndim = 3

    def to_matrix(self, g: torch.Tensor) -> torch.Tensor:
        return g.reshape(g.shape[0], -1)

    def scale(self, shape: torch.Size | tuple[int, ...]) -> float:
        return math.sqrt(shape[0] / shape[1]) / math.prod(int(k) for k in shape[2:])

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        # One orthogonal [out, in] matrix per kernel tap, each scaled like the LMO.
        taps = torch.empty(math.prod(w.shape[2:]), w.shape[0], w.shape[1], dtype=torch.float32, device=w.device)
        for tap in taps:
            torch.nn.init.orthogonal_(tap)
        kernel = taps.permute(1, 2, 0).reshape(w.shape)
        return _fill_(w, kernel * self.scale(w.shape))


# --------------------------------------------------------------------------------------------
# Separable norms: the LMO rescales slices by their own L2 norm, so shards can compute it from
# partial sums of squares.
# --------------------------------------------------------------------------------------------

Axis = Literal["row", "col", "all"]


def sum_of_squares(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Sums of squares of ``x`` in fp32, along ``dim`` (``None``: over all entries). Along the
    last dimension or over all entries it is one fused reduction (the square of the 2-norm: one
    read of ``x``, no squared copy); along another dimension, where that reduction is slow on
    the CPU, the square and the sum are separate."""
    if dim is None or dim in (-1, x.dim() - 1):
        return torch.linalg.vector_norm(x, 2, dim=dim, keepdim=keepdim, dtype=torch.float32).square_()
    return x.float().square().sum(dim=dim, keepdim=keepdim)


class SeparableNorm(Norm):
    """``lmo(g) = g · factor(s)``, ``s`` = sum of squares of ``g`` per row, per column or in all."""

    axis: ClassVar[Axis]

    def sum_squares(self, g: torch.Tensor) -> torch.Tensor:
        """Per-slice sums of squares in fp32, shaped to broadcast against ``g``."""
        if self.axis == "row":
            return sum_of_squares(g, -1, keepdim=True)
        if self.axis == "col":
            return sum_of_squares(g, -2, keepdim=True)
        return sum_of_squares(g)

    def factor(self, sum_squares: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """The multiplier applied to ``g`` given its completed sums of squares."""
        raise NotImplementedError

    def lmo(self, g: torch.Tensor) -> torch.Tensor:
        return (g.float() * self.factor(self.sum_squares(g), g.shape)).to(g.dtype)

    def dual_norm(self, g: torch.Tensor) -> torch.Tensor:
        return (g.float() * self.lmo(g).float()).sum()


@register_norm
class TokenRMS(SeparableNorm):
    """Per-token RMS (ℓ1→RMS) for an embedding ``[vocab, d]``: every token row gets RMS 1."""

    name = "token_rms"
    axis = "row"

    def factor(self, sum_squares: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return math.sqrt(shape[-1]) / (sum_squares.sqrt() + EPS)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        return w.float().square().mean(dim=-1).sqrt().amax()

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        return _fill_(w, self.lmo(torch.randn(w.shape, device=w.device)))


@register_norm
class RowNorm(SeparableNorm):
    """RMS→∞ operator norm for the output head ``[vocab, d]``: rows ``g_i / (‖g_i‖·√d)``."""

    name = "row_norm"
    axis = "row"

    def factor(self, sum_squares: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return 1.0 / (sum_squares.sqrt() * math.sqrt(shape[-1]) + EPS)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        return math.sqrt(w.shape[-1]) * torch.linalg.vector_norm(w.float(), dim=-1).amax()

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        return _fill_(w, self.lmo(torch.randn(w.shape, device=w.device)))


@register_norm
class ColNorm(SeparableNorm):
    """Column norm (ℓ1→RMS) for a general input layer ``[d_out, d_in]``: columns get RMS 1."""

    name = "col_norm"
    axis = "col"

    def factor(self, sum_squares: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return math.sqrt(shape[-2]) / (sum_squares.sqrt() + EPS)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        return w.float().square().mean(dim=-2).sqrt().amax()

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        return _fill_(w, self.lmo(torch.randn(w.shape, device=w.device)))


@register_norm
class VectorRMS(SeparableNorm):
    """RMS norm for 1-D parameters (biases, gains): ``lmo = g / RMS(g)``; initialised to zero."""

    name = "rms"
    axis = "all"
    min_ndim = 0

    def factor(self, sum_squares: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return math.sqrt(max(math.prod(shape), 1)) / (sum_squares.sqrt() + EPS)

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        return w.float().square().mean().sqrt()

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return w.zero_()


class ElementwiseNorm(Norm):
    """The LMO acts on each entry alone (given the parameter's shape): shards need no communication."""

    def lmo_elements(self, g: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        """LMO entries for any subset ``g`` of the entries of a parameter of this ``shape``."""
        raise NotImplementedError

    def lmo(self, g: torch.Tensor) -> torch.Tensor:
        return self.lmo_elements(g, g.shape)


@register_norm
class Sign(ElementwiseNorm):
    """ℓ∞-type geometry: ``lmo = sign(g) / d_in``."""

    name = "sign"
    min_ndim = 1

    def lmo_elements(self, g: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        return torch.sign(g) / shape[-1]

    def norm(self, w: torch.Tensor) -> torch.Tensor:
        return w.float().abs().amax() * w.shape[-1]

    def dual_norm(self, g: torch.Tensor) -> torch.Tensor:
        return g.float().abs().sum() / g.shape[-1]

    def init_(self, w: torch.Tensor) -> torch.Tensor:
        signs = torch.randint(0, 2, w.shape, device=w.device).float() * 2 - 1
        return _fill_(w, signs / w.shape[-1])


def lmo_many(norm: Norm, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """``[norm.lmo(t) for t in tensors]``, with same-shape matrices orthogonalised in one batch
    whatever their dtypes (an owner's matrices come from its fp32 partition and from the bf16
    gather buffer: each is normalised into the bf16 batch on its own)."""
    if not isinstance(norm, MatrixNorm):
        return [norm.lmo(t) for t in tensors]
    by_shape: dict[tuple[tuple[int, ...], torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        by_shape.setdefault((tuple(t.shape), t.device), []).append(i)
    out: list[torch.Tensor] = [torch.empty(0)] * len(tensors)
    for (shape, _), indices in by_shape.items():
        if len(indices) == 1:  # no stacking copy for a lone matrix
            out[indices[0]] = norm.lmo(tensors[indices[0]])
            continue
        for i, u in zip(indices, norm.lmo_batch([norm.to_matrix(tensors[i]) for i in indices], shape).unbind(0)):
            out[i] = u.reshape(shape)
    return out
