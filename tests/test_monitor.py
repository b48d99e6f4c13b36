"""The SPEC 4 instrument inside Scion's step, against exact norms computed from the weights.

The multi-process equality (norms from ZeRO fragments = single-process norms) is in test_zero.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from disco_ds import Scion, scion_param_groups
from disco_ds.distributed import ExchangeStats, Fragment, Layout, matrix_products
from disco_ds.optim.monitor import ROLE_NORM_KIND, exact_operator_norm, fans
from disco_ds.models.norm_gpt.configuration_norm_gpt import NormGPTConfig
from disco_ds.models.norm_gpt.modeling_norm_gpt import NormGPTForCausalLM


def test_matrix_products_from_fragments_equal_dense() -> None:
    """Fragments cutting rows anywhere (partial first row, whole rows, partial last row)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(7, 5, generator=gen), torch.randn(9, generator=gen)
    cuts = [(0, 0, 3), (0, 3, 14), (0, 17, 18), (1, 0, 4), (1, 4, 5)]  # (member, start, numel)
    frags = [Fragment(m, start, n, 0) for m, start, n in cuts]
    layout = Layout(shapes=[(7, 5), (9,)], fragments=[frags], group=None, rank=0)
    flat = {0: a.reshape(-1), 1: b}
    tensors = [{f: flat[f.member][f.start : f.start + f.numel] for f in frags}]
    v = {0: torch.randn(5, generator=gen), 1: torch.randn(9, generator=gen)}
    forward = matrix_products(layout, tensors, [v], transpose=False, stats=ExchangeStats())[0]
    torch.testing.assert_close(forward[0][0], a @ v[0])
    torch.testing.assert_close(forward[0][1], a.square().sum(dim=1))
    torch.testing.assert_close(forward[1][0], (b @ v[1]).reshape(1))
    y = {0: torch.randn(7, generator=gen), 1: torch.randn(1, generator=gen)}
    back = matrix_products(layout, tensors, [y], transpose=True, stats=ExchangeStats())[0]
    torch.testing.assert_close(back[0], a.T @ y[0])
    torch.testing.assert_close(back[1], b * y[1])


def _train(track: bool, steps: int, weight_decay: float = 0.0):
    torch.manual_seed(0)
    model = NormGPTForCausalLM(NormGPTConfig.from_preset("tiny"))
    opt = Scion(scion_param_groups(model, lr=0.02, weight_decay=weight_decay))
    opt.track_norms = track
    ids = torch.randint(0, model.config.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    before, metrics = {}, {}
    for _ in range(steps):
        before = {id(p): p.detach().clone() for p in model.parameters()}
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        metrics = opt.pop_metrics()
    return model, opt, before, metrics


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_norms_match_exact_values(weight_decay: float) -> None:
    model, opt, before, metrics = _train(True, steps=25, weight_decay=weight_decay)
    for group in opt.param_groups:
        role, norm = group["role"], opt.norm_of(group)
        kind = ROLE_NORM_KIND[role]
        weight = max(exact_operator_norm(kind, fans(norm, tuple(p.shape)), p.detach()) for p in group["params"])
        update = max(exact_operator_norm(kind, fans(norm, tuple(p.shape)), p.detach() - before[id(p)]) for p in group["params"])
        w_sq = sum(p.detach().double().square().sum() for p in group["params"])
        dw_sq = sum((p.detach() - before[id(p)]).double().square().sum() for p in group["params"])
        if kind == "rms_to_rms":
            # Power iteration, one round per step from the carried vector: an estimate from below
            # that has converged to a few percent after 25 slowly moving steps.
            assert weight * 0.97 <= metrics[f"norm/{role}/weight"] <= weight * (1 + 1e-5), role
            assert update * 0.9 <= metrics[f"norm/{role}/update"] <= update * (1 + 1e-4), role
        else:
            assert metrics[f"norm/{role}/weight"] == pytest.approx(weight, rel=1e-5), role
            assert metrics[f"norm/{role}/update"] == pytest.approx(update, rel=1e-3), role
        assert metrics[f"effective_lr/{role}"] == pytest.approx(math.sqrt(dw_sq / w_sq), rel=1e-3), role
    if weight_decay == 0:
        # The output layer's update has RMS→∞ norm lr·ρ by construction of its LMO (rows of RMS 1).
        assert metrics["norm/output/update"] == pytest.approx(0.02, rel=1e-3)


def test_tracking_does_not_change_the_trajectory() -> None:
    tracked, _, _, metrics = _train(True, steps=3)
    plain, _, _, quiet = _train(False, steps=3)
    for (name, p), q in zip(tracked.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), name
    assert any(k.startswith("norm/") for k in metrics)
    assert not any(k.startswith("norm/") or k.startswith("effective_lr/") for k in quiet)


def test_step_timing_is_split() -> None:
    _, _, _, metrics = _train(False, steps=2)
    assert metrics["optimizer/step_s"] > 0
    assert 0 < metrics["optimizer/newton_schulz_s"] <= metrics["optimizer/step_s"]
    assert metrics["optimizer/comm_s"] == 0.0  # one process: no collective
