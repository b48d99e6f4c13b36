"""Orthogonalisation of matrices: the ``NS`` of Scion's spectral LMO.

``orthogonalize(G)`` approximates the orthogonal polar factor ``U Vᵀ`` of ``G = U Σ Vᵀ``
(all singular values pushed to 1) with an odd polynomial iteration run in bf16 matmuls:

* ``"quintic"``: Muon's fixed quintic ``(3.4445, −4.7750, 2.0315)``, the default. It is tuned for
  speed, not convergence: after 5 steps every singular value above about 2e-3·‖G‖_F ends in a
  band around 1 (about 0.7–1.2), which the momentum-averaged LMO tolerates; smaller ones (the
  tail of a square random matrix) are still on their way up, never above the band.
* ``"polar_express"``: per-step optimal coefficients (arXiv 2505.16932), which converge to
  ``U Vᵀ`` much more closely at the same number of steps.
* ``"svd"``: the exact ``U Vᵀ`` in fp32, the oracle of the test suite.

Pure mathematics: no distributed code lives here.
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["orthogonalize", "compile_iteration", "NS_METHODS", "QUINTIC_COEFFS", "POLAR_EXPRESS_COEFFS", "ns_flops"]

NSMethod = Literal["quintic", "polar_express", "svd"]
NS_METHODS: tuple[str, ...] = ("quintic", "polar_express", "svd")

QUINTIC_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express triples; the first seven are damped by 1.01 (a/1.01, b/1.01³, c/1.01⁵) so that
# bf16 round-off cannot push a singular value past the polynomial's stable range, and the input
# is normalised by 1.01·‖X‖_F for the same reason. Steps beyond the list repeat the last triple.
_POLAR_EXPRESS_RAW: tuple[tuple[float, float, float], ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.948690853482295, -2.908902115962949, 0.5518191394370137),
    (3.318419657370602, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.668903984574749, 0.4188073119525673),
    (1.891301407787398, -1.267995827194587, 0.3768040894852483),
    (1.875001480853448, -1.250001645399949, 0.3750001645474248),
)
_PE_DAMPING = 1.01
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = tuple(
    (a / _PE_DAMPING, b / _PE_DAMPING**3, c / _PE_DAMPING**5) for a, b, c in _POLAR_EXPRESS_RAW
) + ((1.875, -1.25, 0.375),)

_EPS = 1e-7


def _coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    if method == "quintic":
        return [QUINTIC_COEFFS] * steps
    table = POLAR_EXPRESS_COEFFS
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def _polynomial_iteration(G: torch.Tensor, steps: int, method: str) -> torch.Tensor:
    """Odd polynomial iteration on a wide (rows ≤ cols) batch ``[..., m, n]``."""
    # Normalise in fp32 so the largest singular value is ≤ 1 (‖G‖_2 ≤ ‖G‖_F), then iterate in bf16.
    G32 = G.float()
    fro = torch.linalg.matrix_norm(G32, ord="fro", keepdim=True)
    if method == "polar_express":
        fro = fro * _PE_DAMPING
    X = (G32 / (fro + _EPS)).to(torch.bfloat16)
    # Fused multiply-adds: B = b·A + c·A·A and X = a·X + B·X in one kernel each.
    fma = torch.addmm if X.ndim == 2 else torch.baddbmm
    batch_shape = X.shape[:-2]
    if X.ndim > 3:  # baddbmm takes one batch dimension
        X = X.reshape(-1, *X.shape[-2:])
    for a, b, c in _coefficients(method, steps):
        A = X @ X.mT
        B = fma(A, A, A, beta=b, alpha=c)
        X = fma(X, B, X, beta=a, alpha=1.0)
    return X.reshape(*batch_shape, *X.shape[-2:])


_iteration = _polynomial_iteration
"""What :func:`orthogonalize` runs: :func:`_polynomial_iteration`, or its compiled form (:func:`compile_iteration`)."""


def compile_iteration(enabled: bool = True) -> None:
    """Run the polynomial iteration of every later :func:`orthogonalize` call ``torch.compile``-d
    (one graph of its bf16 matmuls and fused multiply-adds per matrix shape and method), or, with
    ``enabled=False``, eagerly again. Process-wide: ``train.compile`` turns it on at startup."""
    global _iteration
    _iteration = torch.compile(_polynomial_iteration) if enabled else _polynomial_iteration


def _svd_polar(G: torch.Tensor) -> torch.Tensor:
    """Exact ``U Vᵀ`` in fp32; rank-deficient directions (σ ≈ 0) map to 0, like NS does."""
    G32 = G.float()
    U, S, Vh = torch.linalg.svd(G32, full_matrices=False)
    # Zero singular values carry no direction; NS maps them to 0 as well, so keep them at 0.
    tol = S.amax(dim=-1, keepdim=True) * max(G32.shape[-2:]) * torch.finfo(torch.float32).eps
    mask = (S > tol).to(G32.dtype)
    return (U * mask.unsqueeze(-2)) @ Vh


def orthogonalize(G: torch.Tensor, steps: int = 5, method: NSMethod = "quintic") -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U Vᵀ`` of a matrix or a batch of matrices.

    Args:
        G: tensor of shape ``[m, n]`` or ``[..., m, n]``; every leading index is one matrix, so
            same-shape matrices stacked together are orthogonalised in one batched matmul chain.
        steps: iterations of the polynomial (ignored by ``"svd"``).
        method: ``"quintic"`` (default), ``"polar_express"`` or ``"svd"``.

    Returns:
        A tensor of ``G``'s shape and dtype. Iterative methods normalise in fp32 and run their
        matmuls in bf16; tall matrices are transposed so the Gram matrix is the small one.
        A zero matrix returns zeros.
    """
    if method not in NS_METHODS:
        raise ValueError(f"orthogonalize: unknown method {method!r}; accepted values: {list(NS_METHODS)}")
    if G.ndim < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch [..., m, n]; got shape {tuple(G.shape)}")
    if method == "svd":
        return _svd_polar(G).to(G.dtype)
    if steps < 1:
        raise ValueError(f"orthogonalize: steps must be ≥ 1, got {steps}")
    tall = G.size(-2) > G.size(-1)
    X = G.mT if tall else G
    X = _iteration(X, steps, method)
    if tall:
        X = X.mT
    return X.to(G.dtype)


def ns_flops(rows: int, cols: int, steps: int = 5) -> int:
    """Matmul FLOPs of one ``orthogonalize`` call on a ``rows × cols`` matrix.

    With ``m ≤ n`` after the transpose, each step costs ``X Xᵀ`` (2m²n), ``A·A`` (2m³) and
    ``B·X`` (2m²n). Used to balance Newton–Schulz work across ranks and to report throughput.
    """
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m**3)
