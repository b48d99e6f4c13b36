"""disco_ds.Scion and ScionLight against a hand-written reference of SPEC 1.1."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn

from disco_ds import Scion, ScionLight, orthogonalize

ROLE_SHAPES = {
    "embedding": ("token_rms", [(50, 16)]),
    "hidden": ("spectral", [(16, 16), (32, 16), (16, 32), (16, 16)]),
    "output": ("row_norm", [(50, 16)]),
    "vector": ("rms", [(16,), (32,)]),
    "conv": ("conv_spectral", [(6, 4, 3, 3)]),
    "sign": ("sign", [(12, 20)]),
    "column": ("col_norm", [(20, 12)]),
    "image_input": ("spectral_max", [(32, 3)]),
}


def reference_lmo(norm: str, d: torch.Tensor, ns_method: str) -> torch.Tensor:
    """SPEC 1.2, one parameter at a time, written without disco_ds.optim.norms."""
    if norm in ("spectral", "spectral_max"):
        s = math.sqrt(d.shape[0] / d.shape[1])
        s = max(1.0, s) if norm == "spectral_max" else s
        return orthogonalize(d, 5, ns_method, scale=s)  # the scale rides in NS's last bf16 product
    if norm == "conv_spectral":
        taps = math.prod(d.shape[2:])
        flat = orthogonalize(d.reshape(d.shape[0], -1), 5, ns_method, scale=math.sqrt(d.shape[0] / d.shape[1]) / taps)
        return flat.reshape(d.shape)
    if norm == "token_rms":
        return d * math.sqrt(d.shape[1]) / (d.norm(dim=1, keepdim=True) + 1e-12)
    if norm == "row_norm":
        return d / (d.norm(dim=1, keepdim=True) * math.sqrt(d.shape[1]) + 1e-12)
    if norm == "col_norm":
        return d * math.sqrt(d.shape[0]) / (d.norm(dim=0, keepdim=True) + 1e-12)
    if norm == "sign":
        return torch.sign(d) / d.shape[-1]
    if norm == "rms":
        return d * math.sqrt(d.numel()) / (d.norm() + 1e-12)
    raise AssertionError(norm)


def reference_scion(params, grads_per_step, groups_cfg, ns_method):
    """Plain-loop Scion: d ← (1−m)d + m·g; u = lmo(d or nesterov); p ← (1−lr·wd)p − lr·ρ·u."""
    params = [p.detach().clone() for p in params]
    bufs = [torch.zeros_like(p) for p in params]
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            cfg = groups_cfg[i]
            m = cfg["momentum"]
            if m < 1:
                bufs[i] = torch.lerp(bufs[i], g, m)  # (1 − m)·d + m·g, rounded as Scion does
                d = torch.lerp(bufs[i], g, m) if cfg["nesterov"] else bufs[i]
            else:
                d = g
            u = reference_lmo(cfg["norm"], d, ns_method)
            params[i] = (1 - cfg["lr"] * cfg["weight_decay"]) * p - cfg["lr"] * cfg["scale"] * u
    return params


def make_problem(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    params, cfgs = [], []
    for i, (role, (norm, shapes)) in enumerate(ROLE_SHAPES.items()):
        for shape in shapes:
            params.append(nn.Parameter(torch.randn(shape, generator=gen)))
            cfgs.append({"role": role, "norm": norm, "lr": 0.01 * (i + 1), "scale": 1.0 + 0.5 * i})
    return params, cfgs


def build_groups(params, cfgs, **shared):
    groups: dict[str, dict] = {}
    for p, cfg in zip(params, cfgs):
        g = groups.setdefault(cfg["role"], {"params": [], **{k: v for k, v in cfg.items()}, **shared})
        g["params"].append(p)
    return list(groups.values())


def random_grads(params, steps, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(p.shape, generator=gen) for p in params] for _ in range(steps)]


@pytest.mark.parametrize("ns_method", ["svd", "quintic"])
@pytest.mark.parametrize("momentum", [0.1, 1.0])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 1.0])
def test_scion_matches_reference(ns_method: str, momentum: float, nesterov: bool, weight_decay: float) -> None:
    params, cfgs = make_problem()
    shared = dict(momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, ns_method=ns_method)
    for c in cfgs:
        c.update(shared)
    steps = 4
    grads = random_grads(params, steps)
    expected = reference_scion(params, grads, cfgs, ns_method)
    opt = Scion(build_groups(params, cfgs))
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    for p, e, c in zip(params, expected, cfgs):
        # Batched vs single NS calls are bit-identical (tested in test_norms); the only slack is
        # fp32 reassociation in the separable norms.
        torch.testing.assert_close(p.detach(), e, atol=1e-5, rtol=1e-5, msg=f"{c['role']} {tuple(p.shape)}")
    if momentum < 1:
        assert all("exp_avg" in opt.state[p] for p in params)
    else:
        assert not opt.state


def test_group_defaults_and_lr_optional() -> None:
    p = nn.Parameter(torch.randn(8, 8))
    opt = Scion([{"params": [p], "lr": 0.1}])
    g = opt.param_groups[0]
    assert (g["norm"], g["momentum"], g["scale"], g["weight_decay"], g["nesterov"]) == ("spectral", 0.1, 1.0, 0.0, False)
    with pytest.raises(ValueError, match="no 'lr'"):
        Scion([p])


def test_parameters_without_grad_are_untouched() -> None:
    a, b = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 8))
    b0 = b.detach().clone()
    opt = Scion([a, b], lr=0.1)
    a.grad = torch.randn(8, 8)
    opt.step()
    assert torch.equal(b.detach(), b0) and b not in opt.state


def test_works_with_lr_scheduler_per_group() -> None:
    params, cfgs = make_problem()
    for c in cfgs:
        c.update(momentum=1.0, nesterov=False, weight_decay=0.0)
    opt = Scion(build_groups(params, cfgs, ns_method="svd"))
    base = [g["lr"] for g in opt.param_groups]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 ** step)
    grads = random_grads(params, 3)
    for step, step_grads in enumerate(grads):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
        sched.step()
        # With momentum 1 and wd 0: p − p' = lr_t·ρ·lmo(g); check the scheduled lr was used.
        for p, b, g, c in zip(params, before, step_grads, cfgs):
            expected = b - c["lr"] * 0.5**step * c["scale"] * reference_lmo(c["norm"], g, "svd")
            torch.testing.assert_close(p.detach(), expected, atol=1e-5, rtol=1e-5)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([b * 0.125 for b in base])


def _train_steps(opt, params, grads):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.add_(g)  # ScionLight keeps its momentum in p.grad; Scion zeroes first
        opt.step()


@pytest.mark.parametrize("cls", [Scion, ScionLight])
def test_state_dict_round_trip_resumes_bit_identically(cls) -> None:
    params, cfgs = make_problem()
    grads = random_grads(params, 6)
    opt = cls(build_groups(params, cfgs))

    def zero(opt):
        if cls is Scion:
            for p in params:
                p.grad = None

    for step_grads in grads[:3]:
        zero(opt)
        _train_steps(opt, params, [step_grads])
    buffer = io.BytesIO()
    torch.save({"params": [p.detach().clone() for p in params], "opt": opt.state_dict()}, buffer)
    for step_grads in grads[3:]:
        zero(opt)
        _train_steps(opt, params, [step_grads])
    uninterrupted = [p.detach().clone() for p in params]

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    params2 = [nn.Parameter(t) for t in saved["params"]]
    opt2 = cls(build_groups(params2, copy.deepcopy(cfgs)))
    opt2.load_state_dict(saved["opt"])
    if cls is ScionLight:
        assert all(p.grad is not None for p in params2), "ScionLight must restore its gradient momentum"
    for step_grads in grads[3:]:
        if cls is Scion:
            for p in params2:
                p.grad = None
        _train_steps(opt2, params2, [step_grads])
    for a, b in zip(uninterrupted, params2):
        assert torch.equal(a, b.detach())


def test_scion_light_matches_scion() -> None:
    params, cfgs = make_problem()
    light_params = [nn.Parameter(p.detach().clone()) for p in params]
    grads = random_grads(params, 5)
    for c in cfgs:
        c.update(momentum=0.1, nesterov=False, weight_decay=0.0)
    opt = Scion(build_groups(params, cfgs, ns_method="svd"))
    light = ScionLight(build_groups(light_params, copy.deepcopy(cfgs), ns_method="svd"))
    for step_grads in grads:
        for p, lp, g in zip(params, light_params, step_grads):
            p.grad = g.clone()
            lp.grad = g.clone() if lp.grad is None else lp.grad.add_(g)
        opt.step()
        light.step()
        light.zero_grad()  # must not destroy the momentum held in p.grad
    for p, lp in zip(params, light_params):
        torch.testing.assert_close(lp.detach(), p.detach(), atol=1e-5, rtol=1e-5)
    assert not light.state  # no momentum buffers


def test_init_applies_group_geometry_times_scale() -> None:
    emb, hid, out, vec = (nn.Parameter(torch.randn(s)) for s in [(40, 16), (32, 16), (40, 16), (16,)])
    groups = [
        {"params": [emb], "norm": "token_rms", "scale": 1.0},
        {"params": [hid], "norm": "spectral", "scale": 2.0},
        {"params": [out], "norm": "row_norm", "scale": 1.0},
        {"params": [vec], "norm": "rms", "scale": 1.0},
    ]
    Scion.init_(groups)
    torch.testing.assert_close(emb.detach().square().mean(1).sqrt(), torch.ones(40))
    torch.testing.assert_close(torch.linalg.svdvals(hid.detach()), torch.full((16,), 2.0 * math.sqrt(2)), atol=1e-5, rtol=0)
    assert (math.sqrt(16) * out.detach().norm(dim=1).max()).item() == pytest.approx(1.0, rel=1e-5)
    assert torch.count_nonzero(vec) == 0


@pytest.mark.parametrize(
    "group,match",
    [
        ({"norm": "frobenius"}, r"param group 0 \(role='hidden'\): unknown norm 'frobenius'; accepted values: \["),
        ({"lr": -0.1}, r"param group 0 \(role='hidden'\): lr must be a number ≥ 0"),
        ({"momentum": 0.0}, r"momentum must be in \(0, 1\]"),
        ({"momentum": 1.5}, r"momentum must be in \(0, 1\]"),
        ({"weight_decay": -1.0}, r"weight_decay must be ≥ 0"),
        ({"scale": 0.0}, r"scale \(radius ρ\) must be > 0"),
        ({"ns_method": "cubic"}, r"unknown ns_method 'cubic'; accepted values"),
    ],
)
def test_bad_group_values_name_group_and_accepted_values(group: dict, match: str) -> None:
    p = nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match=match):
        Scion([{"params": [p], "lr": 0.1, "role": "hidden", **group}])


def test_matrix_norm_on_vector_is_refused() -> None:
    v = nn.Parameter(torch.randn(8))
    with pytest.raises(ValueError, match=r"param group 1 \(role='vector'\): norm 'spectral' needs parameters with ≥ 2 dims.*accepted values for 1-D parameters: \['rms', 'sign'\]"):
        Scion([{"params": [nn.Parameter(torch.randn(4, 4))]}, {"params": [v], "role": "vector", "norm": "spectral"}], lr=0.1)


def test_ds_shape_is_used_for_validation() -> None:
    # Under ZeRO-3 zero.Init, p.shape is (0,) and ds_shape carries the real matrix shape.
    p = nn.Parameter(torch.empty(0))
    p.ds_shape = torch.Size([16, 8])
    Scion([{"params": [p], "norm": "spectral"}], lr=0.1)
    with pytest.raises(ValueError, match="needs parameters with ≥ 2 dims"):
        q = nn.Parameter(torch.empty(16, 8))
        q.ds_shape = torch.Size([128])
        Scion([{"params": [q], "norm": "spectral"}], lr=0.1)


def test_single_process_counters() -> None:
    """Each matrix orthogonalised once per step; LMO time recorded; no communication."""
    params, cfgs = make_problem()
    opt = Scion(build_groups(params, cfgs))
    for step_grads in random_grads(params, 2):
        for p, g in zip(params, step_grads):
            p.grad = g
        opt.step()
    matrices = sum(1 for c in cfgs if c["norm"] in ("spectral", "conv_spectral", "spectral_max"))
    assert opt.stats.matrices_orthogonalized == 2 * matrices
    assert opt.steps == 2 and opt.stats.ns_seconds > 0
    assert opt.stats.all_to_all_calls == 0 and opt.stats.bytes_sent == 0


def test_state_saved_before_a_group_key_existed_loads_with_its_default() -> None:
    """Checkpoints written before ``ns_gram`` existed lack it in their param groups."""
    p = nn.Parameter(torch.randn(8, 16))
    p.grad = torch.randn(8, 16)
    opt = Scion([p], lr=0.1)
    opt.step()
    saved = opt.state_dict()
    for group in saved["param_groups"]:
        del group["ns_gram"]
    resumed = Scion([p], lr=0.1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["ns_gram"] is True
    expected = torch.lerp(opt.state[p]["exp_avg"].clone(), p.grad, 0.1)
    resumed.step()
    torch.testing.assert_close(resumed.state[p]["exp_avg"], expected)
