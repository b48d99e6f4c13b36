"""NormGPT with disco_ds: registration on import, role classification, Scion init and training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from disco_ds import Scion, scion_param_groups
from disco_ds.optim.norms import RowNorm, Spectral, TokenRMS
from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

REPO = Path(__file__).resolve().parents[1]


def tiny_model(seed: int = 0, **overrides) -> NormGPTForCausalLM:
    torch.manual_seed(seed)
    return NormGPTForCausalLM(NormGPTConfig.from_preset("tiny", n_kv_head=2, **overrides))


def test_import_disco_ds_models_registers_auto_classes() -> None:
    # A fresh interpreter in which nothing but disco_ds.models is imported before the Auto classes
    # (plain `import disco_ds` stays torch-only: tests/test_package.py).
    script = (
        "import disco_ds.models\n"
        "from transformers import AutoConfig, AutoModel, AutoModelForCausalLM\n"
        "cfg = AutoConfig.for_model('norm_gpt', vocab_size=64, d_model=32, n_layer=1, n_head=2, head_dim=16)\n"
        "print(type(cfg).__name__, type(AutoModel.from_config(cfg)).__name__,"
        " type(AutoModelForCausalLM.from_config(cfg)).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["NormGPTConfig", "NormGPTModel", "NormGPTForCausalLM"]


def test_roles_without_name_guessing() -> None:
    model = tiny_model()
    groups = scion_param_groups(model, lr=0.1)
    by_role = {g["role"]: g for g in groups}
    assert set(by_role) == {"embedding", "hidden", "output"}  # no gains, no biases: no vectors
    assert by_role["embedding"]["params"] == [model.get_input_embeddings().weight]
    assert by_role["output"]["params"] == [model.get_output_embeddings().weight]
    linears = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear) and m is not model.lm_head]
    assert {id(p) for p in by_role["hidden"]["params"]} == {id(p) for p in linears}
    assert by_role["hidden"]["norm"] == "spectral"
    assert by_role["hidden"]["lr"] == pytest.approx(0.1 / 8)


def _geometry_fingerprint(model: NormGPTForCausalLM) -> dict[str, torch.Tensor]:
    """What the init fixes: per-token RMS, singular values, per-row head norms."""
    out = {"embedding": model.get_input_embeddings().weight.detach().square().mean(1).sqrt(),
           "head": model.get_output_embeddings().weight.detach().norm(dim=1)}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and module is not model.lm_head:
            out[name] = torch.linalg.svdvals(module.weight.detach())
    return out


def test_scion_init_reproduces_model_init() -> None:
    # Scion's init puts every parameter on the unit ball of its norm; the model's matches it once the
    # paper's extra 1/sqrt(2L) on the residual branches' output matrices is switched off.
    own = _geometry_fingerprint(tiny_model(seed=0, init_residual_out=1.0))
    model = tiny_model(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # destroy the model's init first
    Scion.init_(model)
    redone = _geometry_fingerprint(model)
    assert own.keys() == redone.keys()
    for key in own:
        torch.testing.assert_close(redone[key], own[key], atol=1e-5, rtol=1e-5, msg=key)
    # and both sit on the unit balls of their geometries
    assert TokenRMS().norm(model.get_input_embeddings().weight).item() == pytest.approx(1.0, rel=1e-5)
    assert RowNorm().norm(model.get_output_embeddings().weight).item() == pytest.approx(1.0, rel=1e-5)
    assert Spectral().norm(model.model.layers[0].mlp.w2.weight).item() == pytest.approx(1.0, rel=1e-5)


def test_a_few_scion_steps_reduce_the_loss() -> None:
    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    # A repeating pattern: learnable in a few steps.
    pattern = torch.randint(0, model.config.vocab_size, (16,), generator=gen)
    batch = pattern.repeat(4, 4)
    opt = Scion(scion_param_groups(model, lr=0.5))
    losses = []
    for _ in range(10):
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert losses[-1] < 0.5 * losses[0], losses
