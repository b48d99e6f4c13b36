"""Every LMO against its formula, its scale invariance, its dual-norm property and its init."""

from __future__ import annotations

import math

import pytest
import torch

from disco_ds import orthogonalize
from disco_ds.optim.norms import (
    NORMS,
    ColNorm,
    MatrixNorm,
    RowNorm,
    SeparableNorm,
    Sign,
    Spectral,
    SpectralConv,
    SpectralMax,
    TokenRMS,
    VectorRMS,
    lmo_many,
    make_norm,
)

torch.manual_seed(0)

SHAPES = {
    "spectral": [(48, 80), (80, 48)],
    "spectral_max": [(48, 3), (16, 64)],
    "spectral_transposed": [(48, 80)],
    "conv_spectral": [(8, 4, 3, 3), (6, 5, 3)],
    "token_rms": [(100, 32)],
    "row_norm": [(100, 32)],
    "col_norm": [(40, 24)],
    "sign": [(24, 40), (30,)],
    "rms": [(30,)],
}


def test_every_registered_norm_is_covered() -> None:
    assert set(SHAPES) == set(NORMS)


def _formula(name: str, g: torch.Tensor) -> torch.Tensor:
    """The SPEC 1.2 formulas written out directly (exact SVD for the orthogonal factor)."""
    if name == "spectral":
        return math.sqrt(g.shape[0] / g.shape[1]) * orthogonalize(g, method="svd")
    if name == "spectral_transposed":
        return math.sqrt(g.shape[1] / g.shape[0]) * orthogonalize(g, method="svd")
    if name == "spectral_max":
        return max(1.0, math.sqrt(g.shape[0] / g.shape[1])) * orthogonalize(g, method="svd")
    if name == "conv_spectral":
        taps = math.prod(g.shape[2:])
        flat = orthogonalize(g.reshape(g.shape[0], -1), method="svd")
        return (math.sqrt(g.shape[0] / g.shape[1]) / taps * flat).reshape(g.shape)
    if name == "token_rms":
        return torch.stack([row * math.sqrt(g.shape[1]) / row.norm() for row in g])
    if name == "row_norm":
        return torch.stack([row / (row.norm() * math.sqrt(g.shape[1])) for row in g])
    if name == "col_norm":
        return torch.stack([col / (col.norm() / math.sqrt(g.shape[0])) for col in g.T]).T
    if name == "sign":
        return torch.sign(g) / g.shape[-1]
    if name == "rms":
        return g / g.square().mean().sqrt()
    raise AssertionError(name)


def _cases() -> list[tuple[str, tuple[int, ...]]]:
    return [(name, shape) for name, shapes in SHAPES.items() for shape in shapes]


@pytest.mark.parametrize("name,shape", _cases())
def test_lmo_matches_formula(name: str, shape: tuple[int, ...]) -> None:
    g = torch.randn(shape)
    norm = make_norm(name, ns_method="svd") if issubclass(NORMS[name], MatrixNorm) else make_norm(name)
    torch.testing.assert_close(norm.lmo(g), _formula(name, g), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("name,shape", _cases())
def test_lmo_is_scale_invariant(name: str, shape: tuple[int, ...]) -> None:
    # Scion's momentum has no bias correction; this is why that is harmless.
    g = torch.randn(shape)
    norm = make_norm(name)
    tol = 2e-2 if isinstance(norm, MatrixNorm) else 1e-5  # bf16 iterations
    for c in (1e-3, 7.0, 1e4):
        torch.testing.assert_close(norm.lmo(c * g), norm.lmo(g), atol=tol, rtol=tol)


@pytest.mark.parametrize("name,shape", _cases())
def test_lmo_is_on_unit_sphere_and_attains_dual_norm(name: str, shape: tuple[int, ...]) -> None:
    """⟨g, lmo(g)⟩ = ‖g‖_* and ‖lmo(g)‖ = 1: the LMO is the maximiser over the unit ball."""
    torch.manual_seed(0)  # unseeded, the random-direction check failed about once in a few hundred draws
    g = torch.randn(shape)
    exact = make_norm(name, ns_method="svd") if issubclass(NORMS[name], MatrixNorm) else make_norm(name)
    u = exact.lmo(g)
    assert exact.norm(u).item() == pytest.approx(1.0, rel=1e-4)
    assert (g * u).sum().item() == pytest.approx(exact.dual_norm(g).item(), rel=1e-4)
    # No other point of the ball does better: random feasible directions stay below.
    for _ in range(20):
        v = torch.randn(shape)
        v = v / exact.norm(v)
        assert (g * v).sum() <= exact.dual_norm(g) * (1 + 1e-5)
    # The quintic Newton–Schulz LMO (singular values in ~0.7–1.2) reaches most of the optimum.
    approx = make_norm(name)
    if isinstance(approx, MatrixNorm):
        ratio = (g * approx.lmo(g)).sum().item() / exact.dual_norm(g).item()
        assert 0.8 < ratio < 1.1, ratio


@pytest.mark.parametrize("name,shape", _cases())
def test_init_lies_on_the_ball(name: str, shape: tuple[int, ...]) -> None:
    norm = make_norm(name)
    w = torch.empty(shape)
    norm.init_(w)
    if name == "rms":
        assert torch.count_nonzero(w) == 0  # vectors (biases) start at zero
    elif name == "conv_spectral":
        # One orthogonal matrix per tap, each scaled like the LMO.
        taps = math.prod(shape[2:])
        flat = w.reshape(shape[0], shape[1], taps)
        for t in range(taps):
            s = torch.linalg.svdvals(flat[..., t])
            torch.testing.assert_close(s, torch.full_like(s, norm.scale(shape)), atol=1e-5, rtol=1e-5)
    else:
        assert norm.norm(w).item() == pytest.approx(1.0, rel=1e-4)


def test_init_specifics() -> None:
    emb = TokenRMS().init_(torch.empty(50, 16))
    torch.testing.assert_close(emb.square().mean(1).sqrt(), torch.ones(50))
    head = RowNorm().init_(torch.empty(50, 16))
    torch.testing.assert_close(head.norm(dim=1), torch.full((50,), 1 / 4.0))
    hidden = Spectral().init_(torch.empty(32, 8))
    s = torch.linalg.svdvals(hidden)
    torch.testing.assert_close(s, torch.full((8,), 2.0), atol=1e-5, rtol=0)  # √(32/8)
    col = ColNorm().init_(torch.empty(9, 7))
    torch.testing.assert_close(col.square().mean(0).sqrt(), torch.ones(7))
    sign = Sign().init_(torch.empty(5, 10))
    torch.testing.assert_close(sign.abs(), torch.full((5, 10), 0.1))
    assert (sign > 0).any() and (sign < 0).any()
    assert SpectralMax().scale((4, 64)) == 1.0 and SpectralMax().scale((64, 4)) == 4.0


def test_zero_gradient_gives_zero_direction() -> None:
    for name, shapes in SHAPES.items():
        for shape in shapes:
            u = make_norm(name).lmo(torch.zeros(shape))
            assert torch.isfinite(u).all() and torch.count_nonzero(u) == 0, name


def test_separable_norms_complete_from_partial_sums() -> None:
    """What the sharded optimizer does: sum squares per fragment, add, then apply factor()."""
    g = torch.randn(20, 12)
    for norm in (TokenRMS(), RowNorm(), ColNorm(), VectorRMS()):
        assert isinstance(norm, SeparableNorm)
        if norm.axis == "row":
            parts = [norm.sum_squares(g[:, :5]), norm.sum_squares(g[:, 5:])]
        else:
            parts = [norm.sum_squares(g[:7]), norm.sum_squares(g[7:])]
        if norm.axis == "all":
            total = parts[0] + parts[1]
        elif norm.axis == "row":
            total = parts[0] + parts[1]
        else:
            total = torch.cat([parts[0], parts[1]], dim=-2).sum(-2, keepdim=True)
        torch.testing.assert_close(g * norm.factor(total, g.shape), norm.lmo(g))


def test_lmo_keeps_dtype() -> None:
    for name, shapes in SHAPES.items():
        g = torch.randn(shapes[0]).to(torch.bfloat16)
        assert make_norm(name).lmo(g).dtype == torch.bfloat16, name


def test_lmo_many_batches_same_shapes_and_matches_single_calls() -> None:
    norm = Spectral()
    mats = [torch.randn(16, 24), torch.randn(16, 24), torch.randn(24, 16), torch.randn(16, 24)]
    batched = lmo_many(norm, mats)
    for g, u in zip(mats, batched):
        torch.testing.assert_close(u, norm.lmo(g), atol=0, rtol=0)
    conv = SpectralConv()
    kernels = [torch.randn(4, 3, 3, 3) for _ in range(3)]
    for g, u in zip(kernels, lmo_many(conv, kernels)):
        torch.testing.assert_close(u, conv.lmo(g), atol=0, rtol=0)


def test_lmo_many_batches_mixed_dtypes_in_one_call(monkeypatch) -> None:
    """An owner's matrices come from its fp32 partition and from the bf16 gather buffer: one batch
    per shape all the same, each entry equal to its own call, updates in bf16."""
    import disco_ds.optim.norms as norms

    calls = []
    real = norms.orthogonalize_stack
    monkeypatch.setattr(norms, "orthogonalize_stack", lambda matrices, **kw: calls.append(len(matrices)) or real(matrices, **kw))
    norm = Spectral()
    mats = [torch.randn(16, 24), torch.randn(16, 24).bfloat16(), torch.randn(16, 24)]
    out = lmo_many(norm, mats)
    assert calls == [3]
    for g, u in zip(mats, out):
        assert u.dtype == torch.bfloat16
        torch.testing.assert_close(u, norm.lmo(g), atol=0, rtol=0)


def test_unknown_norm_and_bad_ns_options() -> None:
    with pytest.raises(ValueError, match="accepted values"):
        make_norm("frobenius")
    with pytest.raises(ValueError, match="ns_method"):
        make_norm("spectral", ns_method="cubic")
    with pytest.raises(ValueError, match="ns_steps"):
        make_norm("spectral", ns_steps=0)


def test_adding_a_geometry_is_adding_one_class() -> None:
    from disco_ds import Scion
    from disco_ds.optim.norms import register_norm

    @register_norm
    class UnitRows(SeparableNorm):
        name = "test_unit_rows"
        axis = "row"

        def factor(self, sum_squares, shape):
            return 1.0 / (sum_squares.sqrt() + 1e-12)

        def norm(self, w):
            return w.norm(dim=-1).amax()

        def init_(self, w):
            with torch.no_grad():
                return w.copy_(self.lmo(torch.randn_like(w)))

    try:
        p = torch.nn.Parameter(torch.zeros(6, 4))
        p.grad = torch.randn(6, 4)
        Scion([{"params": [p], "lr": 1.0, "norm": "test_unit_rows", "momentum": 1.0}]).step()
        torch.testing.assert_close(p.detach().norm(dim=1), torch.ones(6))
        with pytest.raises(ValueError, match="registered twice"):
            register_norm(UnitRows)
    finally:
        NORMS.pop("test_unit_rows")
