"""orthogonalize() against the exact SVD oracle on the inputs that break naive implementations."""

from __future__ import annotations

import pytest
import torch

from disco_ds import orthogonalize
from disco_ds.optim.newton_schulz import (POLAR_EXPRESS_COEFFS, QUINTIC_COEFFS, _polynomial_iteration, ns_flops,
                                         ns_transient_bytes, orthogonalize_stack, uses_gram)


def _ill_conditioned(m: int, n: int, cond: float, gen: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen))
    k = min(m, n)
    s = torch.logspace(0, -torch.log10(torch.tensor(cond)).item(), k)
    return U[:, :k] @ torch.diag(s) @ V[:, :k].T


def _cases() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    low_rank = torch.randn(48, 4, generator=gen) @ torch.randn(4, 80, generator=gen)
    return {
        "random_square": torch.randn(64, 64, generator=gen),
        "wide": torch.randn(32, 96, generator=gen),
        "tall": torch.randn(96, 32, generator=gen),
        "ill_conditioned": _ill_conditioned(64, 64, 1e3, gen),
        "rank_deficient": low_rank,
        "batched": torch.randn(3, 40, 72, generator=gen),
        "scaled_tiny": 1e-6 * torch.randn(50, 30, generator=gen),
    }


CASES = _cases()


def _exact_polar(G: torch.Tensor) -> torch.Tensor:
    return orthogonalize(G.float(), method="svd")


def _transfer(X: torch.Tensor, G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NS is a matrix function: X = U·p(Σ)·Vᵀ for G = U·Σ·Vᵀ. Returns (σ_i / ‖G‖_F, p(σ_i))."""
    U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    p = torch.diagonal(U.mT @ X.float() @ Vh.mT, dim1=-2, dim2=-1)
    return S / torch.linalg.matrix_norm(G.float(), keepdim=False).unsqueeze(-1), p


# After 5 quintic steps every singular value above ~2e-3·‖G‖_F lands in the band (the slope at 0
# is a = 3.4445, and 3.4445⁵ ≈ 485); smaller ones are still on their way up, never above it.
QUINTIC_RELATIVE_FLOOR = 2e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", sorted(CASES))
def test_quintic_singular_values_in_band(case: str, dtype: torch.dtype) -> None:
    G = CASES[case].to(dtype)
    X = orthogonalize(G)
    assert X.shape == G.shape and X.dtype == dtype
    assert torch.isfinite(X).all()
    # The quintic maps [0, 1] into [0, ~1.2]: nothing, not even amplified bf16 noise, exceeds it.
    assert torch.linalg.svdvals(X.float()).max() < 1.25
    rel, p = _transfer(X, G)
    in_range = rel > QUINTIC_RELATIVE_FLOOR
    assert in_range.any()
    band = p[in_range]
    assert band.min() > 0.65 and band.max() < 1.25, (band.min().item(), band.max().item())


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_polar_express_closer_to_polar_factor_than_quintic(case: str, dtype: torch.dtype) -> None:
    G = CASES[case].to(dtype)
    U, S, Vh = torch.linalg.svd(G.float(), full_matrices=False)
    # U Vᵀ of the numerical range. Directions below bf16 resolution hold only rounding noise,
    # which both iterations amplify alike; the comparison is about the polynomial, so it is
    # measured on G's range.
    keep = (S > 1e-3 * S.amax(-1, keepdim=True)).to(S.dtype)
    Ur, Vr = U * keep.unsqueeze(-2), Vh.mT * keep.unsqueeze(-2)
    exact = Ur @ Vr.mT

    def range_error(X: torch.Tensor) -> torch.Tensor:
        return (Ur.mT @ (X.float() - exact) @ Vr).norm()

    for steps in (5, 8):
        err_quintic = range_error(orthogonalize(G, steps, "quintic"))
        err_pe = range_error(orthogonalize(G, steps, "polar_express"))
        assert err_pe < err_quintic, (steps, err_pe.item(), err_quintic.item())


def test_svd_oracle_is_polar_factor() -> None:
    G = CASES["random_square"]
    X = orthogonalize(G, method="svd")
    torch.testing.assert_close(X @ X.T, torch.eye(64), atol=1e-5, rtol=0)
    # Polar factor: X·(XᵀG) = G with XᵀG symmetric positive semi-definite.
    P = X.T @ G
    torch.testing.assert_close(P, P.T, atol=1e-4, rtol=0)
    assert torch.linalg.eigvalsh((P + P.T) / 2).min() > -1e-4


def test_batched_equals_per_matrix() -> None:
    G = CASES["batched"]
    batched = orthogonalize(G)
    for i in range(G.shape[0]):
        torch.testing.assert_close(batched[i], orthogonalize(G[i]), atol=0, rtol=0)


def test_tall_is_transpose_of_wide() -> None:
    """A tall matrix is iterated from the right (``XᵀX``), a wide one from the left: the same
    polynomial (exactly so in float64, see below), so in bf16 both orientations are equally close
    to the float64 iteration, not bit-identical."""
    G = CASES["wide"]
    torch.testing.assert_close(orthogonalize(G.T, method="svd"), orthogonalize(G, method="svd").T, atol=1e-6, rtol=0)
    exact = _direct_float64(G, 5)
    errors = [float((u - exact).norm() / exact.norm()) for u in (orthogonalize(G), orthogonalize(G.T).T)]
    assert max(errors) <= 1.5 * min(errors) + 1e-3, errors


def test_scale_invariance() -> None:
    G = CASES["random_square"]
    torch.testing.assert_close(orthogonalize(1000 * G), orthogonalize(G), atol=2e-2, rtol=0)


@pytest.mark.parametrize("method", ["quintic", "polar_express", "svd"])
def test_zero_input_gives_zero_not_nan(method: str) -> None:
    for shape in [(8, 8), (4, 16), (2, 16, 4)]:
        X = orthogonalize(torch.zeros(shape), method=method)
        assert torch.equal(X, torch.zeros(shape))


def test_polar_express_beyond_table_repeats_last_triple() -> None:
    assert len(POLAR_EXPRESS_COEFFS) == 8
    assert POLAR_EXPRESS_COEFFS[-1] == (1.875, -1.25, 0.375)
    a, b, c = POLAR_EXPRESS_COEFFS[0]
    assert a == pytest.approx(8.28721201814563 / 1.01) and c == pytest.approx(17.300387312530933 / 1.01**5)
    assert QUINTIC_COEFFS == (3.4445, -4.7750, 2.0315)
    G = CASES["random_square"]
    X = orthogonalize(G, steps=12, method="polar_express")
    s = torch.linalg.svdvals(X.float())
    assert (s - 1).abs().max() < 0.05


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="accepted values"):
        orthogonalize(torch.randn(4, 4), method="cubic")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="matrix"):
        orthogonalize(torch.randn(4))


def test_ns_flops_counts_small_gram() -> None:
    # m ≤ n after the transpose: 4·m²·n + 2·m³ per step in the direct form.
    assert ns_flops(10, 20, 1) == 4 * 100 * 20 + 2 * 1000
    assert ns_flops(20, 10, 5) == ns_flops(10, 20, 5)
    assert ns_flops(10, 40, 5, gram=False) == 5 * (4 * 100 * 40 + 2 * 1000)
    # The Gram form at 5 steps (restarts before steps 2 and 4): 12·m²·n + 22·m³.
    assert ns_flops(10, 40, 5) == 12 * 100 * 40 + 22 * 1000
    # It is chosen where it is cheaper: n > 1.5·m at 5 steps; never for a square matrix.
    assert not uses_gram(64, 64, 5) and not uses_gram(64, 96, 5) and uses_gram(64, 97, 5) and uses_gram(97, 64, 5)
    assert ns_flops(64, 64, 5) == ns_flops(64, 64, 5, gram=False)


def _spectrum(m: int, n: int, singular_values: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    U, _ = torch.linalg.qr(torch.randn(m, m, generator=gen))
    V, _ = torch.linalg.qr(torch.randn(n, m, generator=gen))
    return (U * singular_values) @ V.T


@pytest.mark.parametrize("method", ["quintic", "polar_express"])
@pytest.mark.parametrize("steps", [1, 2, 3, 5, 10])
def test_gram_form_is_the_direct_form_in_exact_arithmetic(method: str, steps: int) -> None:
    """Both forms are the same polynomial: in float64 they agree to round-off, for every restart
    pattern (restarts before steps 2, 4, 6, 8), wide and tall (iterated from the right)."""
    gen = torch.Generator().manual_seed(3)
    G = torch.randn(2, 24, 80, generator=gen, dtype=torch.float64)
    X = G / torch.linalg.matrix_norm(G, keepdim=True)
    wide = _polynomial_iteration(X, steps, method, tall=False, gram=False)
    for tall, inputs in ((False, X), (True, X.mT)):
        direct = _polynomial_iteration(inputs, steps, method, tall, gram=False)
        gram = _polynomial_iteration(inputs, steps, method, tall, gram=True)
        assert gram.shape == direct.shape == inputs.shape
        torch.testing.assert_close(gram, direct, rtol=1e-9, atol=1e-9)
        # p(X Xᵀ)·X = X·p(XᵀX): the tall iteration is the transpose of the wide one.
        torch.testing.assert_close(direct, wide.mT if tall else wide, rtol=1e-9, atol=1e-9)


def _direct_float64(G: torch.Tensor, steps: int) -> torch.Tensor:
    X = (G / torch.linalg.matrix_norm(G.double())).double()
    return _polynomial_iteration(X, steps, "quintic", gram=False).float()


@pytest.mark.parametrize("steps", [5, 10])
@pytest.mark.parametrize("spectrum", ["gaussian", "power_law", "power_law_squared", "low_rank"])
def test_gram_form_in_bf16_stays_as_accurate_as_the_direct_form(spectrum: str, steps: int) -> None:
    """In bf16 the Gram recursion drifts; restarting every 2 steps keeps its error against the
    float64 iteration within 2× the direct bf16 form's (measured: 0.9–1.7×) and finite. Restarting
    every 3 steps fails this at 10 steps."""
    gen = torch.Generator().manual_seed(4)
    m, n = 192, 768
    index = torch.arange(1, m + 1, dtype=torch.float32)
    G = {
        "gaussian": lambda: torch.randn(m, n, generator=gen),
        "power_law": lambda: _spectrum(m, n, 1 / index, gen),
        "power_law_squared": lambda: _spectrum(m, n, 1 / index**2, gen),
        "low_rank": lambda: _spectrum(m, n, torch.where(index <= 8, 100.0, 1e-3), gen),
    }[spectrum]()
    assert uses_gram(m, n, steps)
    reference = _direct_float64(G, steps)
    errors = {}
    for gram in (False, True):
        out = orthogonalize(G, steps, gram=gram)
        assert torch.isfinite(out).all()
        errors[gram] = ((out - reference).norm() / reference.norm()).item()
    assert errors[True] <= 2 * errors[False] + 1e-3, errors


@pytest.mark.parametrize("method", ["quintic", "polar_express", "svd"])
@pytest.mark.parametrize("case", ["wide", "tall", "random_square"])
def test_stack_equals_separate_calls_scaled(case: str, method: str) -> None:
    """What an owner runs on its matrices equals one orthogonalize per matrix, entry for entry."""
    gen = torch.Generator().manual_seed(1)
    mats = [CASES[case]] + [torch.randn(CASES[case].shape, generator=gen) for _ in range(2)]
    out = orthogonalize_stack(mats, method=method, scale=0.75)
    assert out.shape == (3, *mats[0].shape) and out.dtype == torch.float32 and out.is_contiguous()
    for g, u in zip(mats, out):
        torch.testing.assert_close(u, orthogonalize(g, method=method, scale=0.75), atol=0, rtol=0)
        torch.testing.assert_close(u, 0.75 * orthogonalize(g, method=method), atol=4e-3, rtol=0)  # one bf16 rounding
    with pytest.raises(ValueError, match="one shape"):
        orthogonalize_stack([CASES["wide"], CASES["tall"]])


def _peak_bytes_above_start(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    from disco_ds.trainer.memory import profiled_peak_bytes

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return profiled_peak_bytes(prof)


@pytest.mark.parametrize("shape", [(96, 256), (256, 96)])
def test_stack_peak_memory_is_what_ns_transient_bytes_says(shape: tuple[int, int]) -> None:
    """No fp32 copy of the inputs: the peak is the bf16 working set (the output comes after it)."""
    mats = [torch.randn(shape) for _ in range(4)]
    peak = _peak_bytes_above_start(lambda: orthogonalize_stack(mats))
    predicted = ns_transient_bytes(*shape, batch=4)
    # On top: the matmul library's packing workspace (oneDNN's here, 15% of the formula at
    # these sizes) and a few per-matrix norms.
    assert predicted <= peak <= 1.25 * predicted, (peak, predicted)
