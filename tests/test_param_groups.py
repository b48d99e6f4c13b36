"""scion_param_groups: roles, geometries and learning rates for plain and Hugging Face models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from disco_ds import Scion, classify_parameters, scion_param_groups


class NamedByConvention(nn.Module):
    """No get_input_embeddings(): classified through the name patterns."""

    def __init__(self) -> None:
        super().__init__()
        self.tok_embeddings = nn.Embedding(64, 16)
        self.layers = nn.ModuleList([nn.Linear(16, 16, bias=True) for _ in range(2)])
        self.norm = nn.LayerNorm(16)
        self.conv = nn.Conv1d(16, 16, 3)
        self.output = nn.Linear(16, 64, bias=False)
        self.scalar = nn.Parameter(torch.ones(()))
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)


def _roles(groups):
    return {name: g["role"] for g in groups for name in g["param_names"]}


def _group(groups, role, norm=None):
    matches = [g for g in groups if g["role"] == role and (norm is None or g["norm"] == norm)]
    assert len(matches) == 1
    return matches[0]


def test_name_patterns_shapes_and_lr_ratios() -> None:
    model = NamedByConvention()
    groups = scion_param_groups(model, lr=0.8)
    roles = _roles(groups)
    assert roles["tok_embeddings.weight"] == "embedding"
    assert roles["output.weight"] == "output"
    assert roles["layers.0.weight"] == roles["conv.weight"] == "hidden"
    assert roles["layers.0.bias"] == roles["norm.weight"] == roles["scalar"] == "vector"
    assert "frozen" not in roles
    assert _group(groups, "embedding")["lr"] == pytest.approx(0.8)
    assert _group(groups, "hidden", "spectral")["lr"] == pytest.approx(0.1)
    assert _group(groups, "hidden", "conv_spectral")["param_names"] == ["conv.weight"]
    assert _group(groups, "output")["lr"] == pytest.approx(0.8)
    assert _group(groups, "vector")["lr"] == pytest.approx(0.1)  # vectors follow the hidden ratio
    assert _group(groups, "embedding")["norm"] == "token_rms"
    assert _group(groups, "output")["norm"] == "row_norm"
    assert _group(groups, "vector")["norm"] == "rms"
    assert all(g["params"] for g in groups)
    # The groups are accepted by Scion as they are, and every trainable parameter appears once.
    opt = Scion(groups)
    seen = [p for g in opt.param_groups for p in g["params"]]
    assert len(seen) == len({id(p) for p in seen}) == sum(p.requires_grad for p in model.parameters())


def test_options_and_overrides() -> None:
    model = NamedByConvention()
    groups = scion_param_groups(
        model, lr=1.0, lr_ratios=(0.5, 0.25, 2.0), vector_lr_ratio=0.0, momentum=0.5, weight_decay=1.0,
        norms={"output": "sign"}, roles={"layers\\.1\\.weight": "output"},
    )
    out = _group(groups, "output")
    assert out["norm"] == "sign" and out["lr"] == 2.0
    assert sorted(out["param_names"]) == ["layers.1.weight", "output.weight"]
    assert _group(groups, "vector")["lr"] == 0.0
    assert all(g["momentum"] == 0.5 and g["weight_decay"] == 1.0 for g in groups)


def test_no_empty_groups_for_model_without_vectors() -> None:
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False))
    groups = scion_param_groups(model, lr=0.1)
    assert [g["role"] for g in groups] == ["hidden"]


def test_unclassifiable_parameter_is_named() -> None:
    model = nn.Module()
    model.experts = nn.Parameter(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match=r"cannot classify parameter 'experts' of shape \(4, 8, 8\)"):
        scion_param_groups(model, lr=0.1)
    groups = scion_param_groups(model, lr=0.1, roles={"experts": "vector"})
    assert groups[0]["role"] == "vector"


def test_bad_arguments_name_accepted_values() -> None:
    model = NamedByConvention()
    with pytest.raises(ValueError, match=r"roles\['x'\] = 'head' is not a role; accepted values"):
        scion_param_groups(model, lr=0.1, roles={"x": "head"})
    with pytest.raises(ValueError, match=r"norms\['output'\] = 'l2': unknown norm; accepted values"):
        scion_param_groups(model, lr=0.1, norms={"output": "l2"})
    with pytest.raises(ValueError, match="lr_ratios"):
        scion_param_groups(model, lr=0.1, lr_ratios=(1, 1))


def test_ds_shape_decides_under_zero3() -> None:
    # zero.Init leaves p.shape == (0,); the real shape is ds_shape.
    model = nn.Sequential(nn.Linear(8, 8, bias=False))
    w = model[0].weight
    w.data = torch.empty(0)
    w.ds_shape = torch.Size([8, 8])
    assert classify_parameters(model)["0.weight"][0] == "hidden"


def test_llama_is_classified_without_mapping() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg)
    roles = _roles(scion_param_groups(model, lr=0.1))
    assert roles["model.embed_tokens.weight"] == "embedding"
    assert roles["lm_head.weight"] == "output"
    assert roles["model.layers.0.self_attn.q_proj.weight"] == "hidden"
    assert roles["model.layers.0.mlp.down_proj.weight"] == "hidden"
    assert roles["model.layers.0.input_layernorm.weight"] == "vector"
    assert roles["model.norm.weight"] == "vector"


def test_gpt2_tied_head_positions_and_conv1d() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    groups = scion_param_groups(model, lr=0.1)
    roles = _roles(groups)
    assert roles["transformer.wte.weight"] == "output"  # tied with lm_head: tied_role
    assert "lm_head.weight" not in roles  # one tensor, listed once
    assert roles["transformer.wpe.weight"] == "embedding"
    # Conv1D stores [d_in, d_out]: the spectral scale must come from the transposed shape.
    c_fc = _group(groups, "hidden", "spectral_transposed")
    assert "transformer.h.0.mlp.c_fc.weight" in c_fc["param_names"]
    tied = scion_param_groups(model, lr=0.1, tied_role="embedding")
    assert _roles(tied)["transformer.wte.weight"] == "embedding"
