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

Either polynomial is evaluated in one of two equivalent forms (``gram``): directly on the ``m × n``
iterate (``X ← a·X + (b·A + c·A²)·X`` with ``A = X Xᵀ``), or, for a wide enough matrix, on its
``m × m`` Gram matrix (Gram Newton–Schulz, Dao et al. 2026): every iterate is ``Q·X₀`` for a
polynomial ``Q`` in ``R = X₀X₀ᵀ``, so the steps update ``Q`` and ``R`` and touch ``X`` only when the
form restarts and at the end. In exact arithmetic the two are the same; in bf16 the Gram
recursion ``R ← P R P`` drifts, so it restarts from ``X ← Q·X`` every
:data:`GRAM_RESTART_EVERY` steps, which keeps its error at the direct form's level. The Gram
form is chosen where it needs fewer FLOPs (:func:`ns_flops`): ``n > 1.5·m`` at 5 steps.

Pure mathematics: no distributed code lives here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["orthogonalize", "orthogonalize_stack", "ns_transient_bytes", "compile_iteration", "NS_METHODS", "QUINTIC_COEFFS",
           "POLAR_EXPRESS_COEFFS", "GRAM_RESTART_EVERY", "ns_flops", "uses_gram"]

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

GRAM_RESTART_EVERY = 2
"""Steps between restarts of the Gram form (``X ← Q·X``, ``R ← X Xᵀ``). In bf16, every 3 steps
already lets ``R`` drift out of the polynomial's stable range at 10 steps; every 2 keeps the
error against the float64 iteration within 0.9–1.7× the direct form's, at 5 steps and at 10
(``tests/test_newton_schulz.py``)."""


def _coefficients(method: str, steps: int) -> list[tuple[float, float, float]]:
    if method == "quintic":
        return [QUINTIC_COEFFS] * steps
    table = POLAR_EXPRESS_COEFFS
    return [table[min(i, len(table) - 1)] for i in range(steps)]


def _normalize_into(out: torch.Tensor, matrices: Sequence[torch.Tensor], method: str) -> None:
    """``out[i]`` (bf16) ← ``matrices[i] / ‖matrices[i]‖_F``, divided in fp32 and rounded once on the
    store: no fp32 copy of a normalised matrix exists. ``‖G‖_2 ≤ ‖G‖_F``, so every singular value
    starts ≤ 1 (Polar Express also divides by its damping). All norms in one fp32 reduction."""
    denominators = torch._foreach_norm(list(matrices), 2, dtype=torch.float32)
    if method == "polar_express":
        denominators = torch._foreach_mul(denominators, _PE_DAMPING)
    denominators = torch._foreach_add(denominators, _EPS)
    for i, (G, d) in enumerate(zip(matrices, denominators)):  # by index: a view of out would outlive the loop
        torch.div(G, d, out=out[i])


def _gram_matrix(X: torch.Tensor, tall: bool) -> torch.Tensor:
    """The small Gram matrix of a 3-D batch: ``XᵀX`` of a tall one, ``X Xᵀ`` of a wide one."""
    return torch.bmm(X.mT, X) if tall else torch.bmm(X, X.mT)


def _direct_steps(X: torch.Tensor, coefficients: list[tuple[float, float, float]], tall: bool,
                  scale: float) -> torch.Tensor:
    """The direct form on a 3-D batch: ``X ← a·X + (b·A + c·A²)·X`` with ``A = X Xᵀ`` (wide), or
    its mirror image ``X ← a·X + X·(b·A + c·A²)`` with ``A = XᵀX`` (tall); the last step also
    multiplies by ``scale``."""
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        s = scale if i == last else 1.0
        A = _gram_matrix(X, tall)
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        X = torch.baddbmm(X, X, B, beta=a * s, alpha=s) if tall else torch.baddbmm(X, B, X, beta=a * s, alpha=s)
    return X


def _gram_steps(X: torch.Tensor, coefficients: list[tuple[float, float, float]], tall: bool,
                scale: float) -> torch.Tensor:
    """The Gram form on a 3-D batch: the iterate is ``Q·X`` (wide; ``X·Q`` tall) with ``Q`` and
    ``R``, the small Gram matrix (both ``m × m``, symmetric, polynomials in the same matrix, so
    they commute), carried across steps; step ``(a, b, c)`` with ``Z = b·R + c·R²`` makes
    ``Q ← a·Q + Z·Q`` and ``R ← (a + Z)·R·(a + Z)``. The identity never enters a bf16 sum with
    ``Z`` except in the first ``Q`` after a (re)start, as fused ``beta`` terms keep it apart
    everywhere else. The last product also multiplies by ``scale``."""

    def apply(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        return torch.bmm(X, Q) if tall else torch.bmm(Q, X)

    R = _gram_matrix(X, tall)
    Q = None
    last = len(coefficients) - 1
    for i, (a, b, c) in enumerate(coefficients):
        if i > 0 and i % GRAM_RESTART_EVERY == 0:
            X = apply(Q, X)
            R = _gram_matrix(X, tall)
            Q = None
        Z = torch.baddbmm(R, R, R, beta=b, alpha=c)
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = torch.baddbmm(Q, Z, Q, beta=a, alpha=1.0)
        if i < last and (i + 1) % GRAM_RESTART_EVERY != 0:  # the next step uses R
            RZ = torch.baddbmm(R, Z, R, beta=a, alpha=1.0)
            R = torch.baddbmm(RZ, Z, RZ, beta=a, alpha=1.0)
    if scale != 1.0:
        Q.mul_(scale)  # m × m: cheaper than scaling the m × n result
    return apply(Q, X)


def _polynomial_iteration(X: torch.Tensor, steps: int, method: str, tall: bool = False,
                          gram: bool = False, scale: float = 1.0) -> torch.Tensor:
    """Odd polynomial iteration on a normalised bf16 batch ``[..., rows, cols]``, wide
    (``tall=False``: the Gram matrix is ``X Xᵀ``) or tall (``XᵀX``), in the direct or the Gram
    form, times ``scale`` (folded into the last product: no extra pass). A tall batch is iterated
    in its own orientation, multiplied from the right, so no transpose is ever materialised and
    the result comes out contiguous in the input's shape."""
    batch_shape = X.shape[:-2]
    X = X.reshape(-1, *X.shape[-2:])  # the fused batched kernels take one batch dimension
    coefficients = _coefficients(method, steps)
    X = (_gram_steps if gram else _direct_steps)(X, coefficients, tall, scale)
    return X.reshape(*batch_shape, *X.shape[-2:])


_iteration = _polynomial_iteration
"""What :func:`orthogonalize` runs: :func:`_polynomial_iteration`, or its compiled form (:func:`compile_iteration`)."""


def compile_iteration(enabled: bool = True) -> None:
    """Run the polynomial iteration of every later :func:`orthogonalize` call ``torch.compile``-d
    (one graph of its bf16 matmuls and fused multiply-adds per matrix shape, method and form), or, with
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


def _check(shape: torch.Size, steps: int, method: str) -> None:
    if method not in NS_METHODS:
        raise ValueError(f"orthogonalize: unknown method {method!r}; accepted values: {list(NS_METHODS)}")
    if len(shape) < 2:
        raise ValueError(f"orthogonalize needs a matrix or a batch [..., m, n]; got shape {tuple(shape)}")
    if method != "svd" and steps < 1:
        raise ValueError(f"orthogonalize: steps must be ≥ 1, got {steps}")


def uses_gram(rows: int, cols: int, steps: int) -> bool:
    """Whether :func:`orthogonalize` with ``gram=True`` evaluates a ``rows × cols`` matrix in the
    Gram form: where that needs fewer matmul FLOPs than the direct form."""
    m, n = min(rows, cols), max(rows, cols)
    return _gram_flops(m, n, steps) < _direct_flops(m, n, steps)


def _iterate(X: torch.Tensor, steps: int, method: str, gram: bool, scale: float) -> torch.Tensor:
    """The iteration on a normalised bf16 batch in the parameter's orientation, times ``scale``:
    a tall matrix's Gram matrix is ``XᵀX``, the small one. Returns bf16, same shape, contiguous."""
    rows, cols = X.shape[-2:]
    return _iteration(X, steps, method, rows > cols, gram and uses_gram(rows, cols, steps), scale)


def orthogonalize(G: torch.Tensor, steps: int = 5, method: NSMethod = "quintic", *, gram: bool = True,
                  scale: float = 1.0, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Approximate the orthogonal polar factor ``U Vᵀ`` of a matrix or a batch of matrices.

    Args:
        G: tensor of shape ``[m, n]`` or ``[..., m, n]``; every leading index is one matrix, so
            same-shape matrices stacked together are orthogonalised in one batched matmul chain.
        steps: iterations of the polynomial (ignored by ``"svd"``).
        method: ``"quintic"`` (default), ``"polar_express"`` or ``"svd"``.
        gram: evaluate the polynomial in the Gram form where it needs fewer FLOPs (:func:`uses_gram`);
            ``False`` always runs the direct form.
        scale: multiplies the result, inside the iteration's last bf16 product (an LMO's radius).
        out_dtype: the result's dtype (default ``G``'s); ``torch.bfloat16`` returns the iteration's
            last product itself, with no conversion pass.

    Returns:
        A new tensor of ``G``'s shape and ``out_dtype``. Iterative methods normalise in fp32 and run their
        matmuls in bf16; a tall matrix is iterated from the right, so the Gram matrix is the small one.
        A zero matrix returns zeros.
    """
    _check(G.shape, steps, method)
    out_dtype = out_dtype or G.dtype
    if method == "svd":
        return (_svd_polar(G) * scale).to(out_dtype)
    X = torch.empty(G.shape, dtype=torch.bfloat16, device=G.device)
    _normalize_into(X.view(-1, *G.shape[-2:]), G.reshape(-1, *G.shape[-2:]).unbind(0), method)
    return _iterate(X, steps, method, gram, scale).to(out_dtype)


def orthogonalize_stack(matrices: Sequence[torch.Tensor], steps: int = 5, method: NSMethod = "quintic",
                        *, scale: float = 1.0, gram: bool = True, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """``scale · orthogonalize(m)`` for same-shape matrices ``[m, n]``, as one ``[B, m, n]`` tensor
    in ``out_dtype`` (default: theirs), equal entry for entry to the separate calls
    ``orthogonalize(m, scale=scale, out_dtype=out_dtype)``.

    What an owner of many matrices runs: one batched matmul chain, and no stacked copy of the
    inputs. Each matrix is normalised straight into its slot of one bf16 batch; the scale is folded
    into the iteration's last product, which is the result in bf16 or converted once. Transient
    memory beyond the inputs and the output: the bf16 batch, and the iteration's bf16 Gram
    products and next iterate (:func:`ns_transient_bytes`).
    """
    if not matrices:
        raise ValueError("orthogonalize_stack: no matrices")
    first = matrices[0]
    shape = (len(matrices), *first.shape)
    _check(first.shape, steps, method)
    if len(first.shape) != 2 or any(m.shape != first.shape for m in matrices):
        raise ValueError(f"orthogonalize_stack takes matrices of one shape [m, n]; got {[tuple(m.shape) for m in matrices]}")
    out_dtype = out_dtype or first.dtype
    if method == "svd":
        return (_svd_polar(torch.stack(list(matrices))) * scale).to(out_dtype)
    X = torch.empty(shape, dtype=torch.bfloat16, device=first.device)
    _normalize_into(X, matrices, method)
    return _iterate(X, steps, method, gram, scale).to(out_dtype)


def ns_transient_bytes(rows: int, cols: int, batch: int = 1, steps: int = 5, gram: bool = True) -> int:
    """Peak bytes of the tensors :func:`orthogonalize_stack` allocates for ``batch`` matrices
    ``rows × cols`` with float32 or bf16 inputs, its output included (``m ≤ n`` the smaller
    and the larger side), all bf16. Direct form: during an iteration the normalised batch, the current and
    the next iterate (``m·n`` each) and the Gram matrix ``A`` with its polynomial ``B`` (``m²``
    each). Gram form: at the second restart the normalised batch, the iterate of the first restart
    and the new one (``m·n`` each) beside ``R``, ``Q`` and the last ``Z`` and ``Q·Z`` products
    (``m²`` each). The output is allocated after them. A BLAS library's own workspace inside the
    matmuls is not counted."""
    m, n = min(rows, cols), max(rows, cols)
    if gram and uses_gram(rows, cols, steps):
        return 2 * batch * (3 * m * n + 4 * m * m)
    return 2 * batch * (3 * m * n + 2 * m * m)


def _direct_flops(m: int, n: int, steps: int) -> int:
    # per step X Xᵀ (2m²n), A·A (2m³), B·X (2m²n)
    return steps * (4 * m * m * n + 2 * m**3)


def _gram_flops(m: int, n: int, steps: int) -> int:
    # R = X Xᵀ and the final Q·X (2m²n each); per step Z (2m³), Q·Z unless Q restarts (2m³),
    # the R update unless the next step restarts or none follows (4m³); per restart Q·X and X Xᵀ.
    restarts = (steps - 1) // GRAM_RESTART_EVERY
    square = 0
    for i in range(steps):
        square += 2 + (0 if i % GRAM_RESTART_EVERY == 0 else 2)
        square += 4 if i < steps - 1 and (i + 1) % GRAM_RESTART_EVERY != 0 else 0
    return (4 + 4 * restarts) * m * m * n + square * m**3


def ns_flops(rows: int, cols: int, steps: int = 5, gram: bool = True) -> int:
    """Matmul FLOPs of one ``orthogonalize`` call on a ``rows × cols`` matrix, in the form it runs
    (:func:`uses_gram`). With ``m ≤ n`` the smaller and the larger side, the direct form costs
    ``steps · (4m²n + 2m³)``; the Gram form ``(4 + 4·restarts)·m²n`` plus its ``m × m`` products
    (``12m²n + 22m³`` at 5 steps). Used to balance Newton–Schulz work across ranks and to report
    throughput."""
    m, n = min(rows, cols), max(rows, cols)
    direct = _direct_flops(m, n, steps)
    return min(direct, _gram_flops(m, n, steps)) if gram else direct
