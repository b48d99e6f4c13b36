"""Tests of the norm-everywhere GPT (models/norm_gpt): architecture, init, caching, HF plumbing.

Everything runs on the "tiny" preset in float32 on CPU; the large presets are only built on the
meta device to check parameter counts.
"""

import ast
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from anywhere, installed or not
    sys.path.insert(0, str(ROOT))

from disco_ds.models.norm_gpt import (  # noqa: E402
    NormGPTConfig,
    NormGPTForCausalLM,
    NormGPTModel,
    register_auto_classes,
)

VOCAB = NormGPTConfig.from_preset("tiny").vocab_size


def make_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return NormGPTForCausalLM(NormGPTConfig.from_preset("tiny", **overrides)).eval()


def random_ids(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model():
    return make_model()


def head_and_hidden(model):
    """(name, Linear) pairs of the hidden matrices, and the head."""
    hidden = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear) and m is not model.lm_head]
    return hidden, model.lm_head


def rms(x):
    return x.float().pow(2).mean(-1).sqrt()


# ----------------------------------------------------------------------------- architecture


def perturbed(model, seed=3):
    """The model with its weights rescaled by random factors, so inputs of RMS 1 can only come from
    the norms (with Scion's init a square orthogonal matrix alone would preserve RMS 1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5 + 2.0 * torch.rand(p.shape[0], 1, generator=g))
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("qkv_norm", [True, False])
def test_every_linear_sees_rms_one_and_qkv_are_normalised_per_head(monkeypatch, qkv_norm):
    m = perturbed(make_model(qkv_norm=qkv_norm))
    cfg = m.config

    linears = [(n, mod) for n, mod in m.named_modules() if isinstance(mod, nn.Linear)]
    assert len(linears) == 7 * cfg.n_layer + 1  # Wq Wk Wv Wo W1 W3 W2 per block, plus the head
    input_rms = {}

    def record_input(name):
        def hook(module, args):  # returns None: observe only, never replace the input
            input_rms[name] = rms(args[0])

        return hook

    handles = [mod.register_forward_pre_hook(record_input(name)) for name, mod in linears]

    # What enters attention: record q, k, v as SDPA receives them ([B, heads, T, head_dim]).
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording_sdpa(q, k, v, *args, **kwargs):
        seen.append((q, k, v))
        return sdpa(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    with torch.no_grad():
        m(random_ids(2, 24))
    for h in handles:
        h.remove()

    assert set(input_rms) == {n for n, _ in linears}, "a Linear layer was never called"
    for name, r in input_rms.items():
        torch.testing.assert_close(r, torch.ones_like(r), atol=1e-4, rtol=0, msg=f"input of {name} is not RMS 1")

    assert len(seen) == cfg.n_layer
    for q, k, v in seen:
        assert q.shape[-1] == k.shape[-1] == v.shape[-1] == cfg.head_dim
        per_head = torch.cat([rms(t).flatten() for t in (q, k, v)])
        if qkv_norm:  # RoPE is a rotation, so q and k keep their unit RMS after it
            torch.testing.assert_close(per_head, torch.ones_like(per_head), atol=1e-4, rtol=0)
        else:  # the switch really removes the per-head norm (and the check above can fail)
            assert (per_head - 1).abs().max() > 0.05


def test_init_matches_scion_geometry(model):
    d = model.config.d_model
    emb = model.get_input_embeddings().weight.double()
    torch.testing.assert_close(rms(emb), torch.ones(emb.shape[0], dtype=torch.float32), atol=1e-5, rtol=0)

    hidden, head = head_and_hidden(model)
    assert len(hidden) == 7 * model.config.n_layer
    shapes = set()
    residual_out = 1 / math.sqrt(2 * model.config.n_layer)  # the paper's total-depth init of Wo and W2
    for name, lin in hidden:
        w = lin.weight.detach().double()
        d_out, d_in = w.shape
        shapes.add((d_out, d_in))
        s = torch.linalg.svdvals(w) * math.sqrt(d_in / d_out)  # singular values in RMS->RMS units
        # All singular values equal (scaled semi-orthogonal), RMS->RMS norm 1, or 1/sqrt(2L) for the
        # last matrix of each residual branch.
        gain = residual_out if name.endswith((".wo", ".w2")) else 1.0
        torch.testing.assert_close(s, torch.full_like(s, gain), atol=1e-5, rtol=0, msg=name)
    assert any(o != i for o, i in shapes), "tiny preset should include rectangular matrices"

    rows = head.weight.detach().double().norm(dim=1)
    torch.testing.assert_close(rows, torch.full_like(rows, 1 / math.sqrt(d)), atol=1e-7, rtol=0)
    assert abs(math.sqrt(d) * rows.max().item() - 1.0) < 1e-6  # ||W_out||_{RMS->inf} = 1
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_causality(n_kv_head):
    m = make_model(n_kv_head=n_kv_head)
    ids = random_ids(2, 20)
    changed = ids.clone()
    changed[:, 12] = (changed[:, 12] + 1) % VOCAB
    with torch.no_grad():
        a, b = m(ids).logits, m(changed).logits
    assert torch.equal(a[:, :12], b[:, :12])
    assert (a[:, 12:] - b[:, 12:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------- KV cache and generation


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_incremental_decoding_matches_full_sequence(n_kv_head):
    from transformers import DynamicCache

    m = make_model(n_kv_head=n_kv_head)
    ids = random_ids(2, 16)
    with torch.no_grad():
        full = m(ids, use_cache=False).logits
        cache = DynamicCache()
        pieces = [m(ids[:, :5], past_key_values=cache, use_cache=True).logits]  # prefill
        pieces.append(m(ids[:, 5:9], past_key_values=cache, use_cache=True).logits)  # chunk after a cache
        for t in range(9, 16):  # then token by token
            out = m(ids[:, t : t + 1], past_key_values=cache, use_cache=True)
            assert out.past_key_values is cache
            pieces.append(out.logits)
    assert cache.get_seq_length() == 16
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=0)


def test_generate_greedy_with_and_without_cache(model):
    prompt = random_ids(2, 7)
    kwargs = dict(max_new_tokens=12, do_sample=False, pad_token_id=0)
    with_cache = model.generate(prompt, use_cache=True, **kwargs)
    without = model.generate(prompt, use_cache=False, **kwargs)
    assert with_cache.shape == (2, 19)
    assert torch.equal(with_cache, without)


def test_left_padded_batch_matches_unpadded_rows(model):
    long, short = random_ids(1, 9, seed=5), random_ids(1, 5, seed=6)
    pad = 4
    batch = torch.cat([long, torch.cat([torch.zeros(1, pad, dtype=torch.long), short], dim=1)])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded_logits = model(batch, attention_mask=mask).logits
        torch.testing.assert_close(padded_logits[1, pad:], model(short).logits[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(padded_logits[0], model(long).logits[0], atol=1e-5, rtol=0)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    together = model.generate(batch, attention_mask=mask, **kwargs)
    assert torch.equal(together[0, 9:], model.generate(long, **kwargs)[0, 9:])
    assert torch.equal(together[1, 9:], model.generate(short, **kwargs)[0, 5:])


def test_logits_to_keep(model):
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, VOCAB)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------- training plumbing


def test_loss_matches_shifted_cross_entropy_and_num_items_in_batch(model):
    ids = random_ids(3, 12)
    labels = ids.clone()
    labels[0, :4] = -100  # e.g. a masked prompt
    with torch.no_grad():
        out = model(ids, labels=labels)
        shifted_logits = out.logits[:, :-1].reshape(-1, VOCAB)
        shifted_labels = labels[:, 1:].reshape(-1)
        mean = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100)
        total = F.cross_entropy(shifted_logits, shifted_labels, ignore_index=-100, reduction="sum")
        torch.testing.assert_close(out.loss, mean, atol=1e-6, rtol=0)
        # Trainer passes the token count of the whole accumulated batch: the loss becomes sum / count.
        n_items = torch.tensor(57)
        scaled = model(ids, labels=labels, num_items_in_batch=n_items).loss
        torch.testing.assert_close(scaled, total / 57, atol=1e-6, rtol=0)
    assert (shifted_labels != -100).sum() != 57  # the two normalisations really differ


def test_gradient_checkpointing_gives_same_loss_and_grads():
    m = make_model().train()
    ids = random_ids(2, 16)
    calls = []
    m.model.layers[0].attn.wq.register_forward_hook(lambda *a: calls.append(1))

    def loss_and_grads():
        m.zero_grad(set_to_none=True)
        calls.clear()
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}, len(calls)

    loss_a, grads_a, calls_a = loss_and_grads()
    # transformers 5 renamed the switch; 4.x only has the old name.
    enable = getattr(m, "activation_checkpointing_enable", m.gradient_checkpointing_enable)
    enable()
    assert all(block.gradient_checkpointing for block in m.model.layers)
    loss_b, grads_b, calls_b = loss_and_grads()
    assert (calls_a, calls_b) == (1, 2), "checkpointing should recompute each block in backward"
    torch.testing.assert_close(loss_b, loss_a, atol=1e-6, rtol=0)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], atol=1e-6, rtol=1e-5, msg=name)


# ----------------------------------------------------------------------------- sizes


@pytest.mark.parametrize("preset", ["tiny", "124m", "1.3b", "paper-proxy", "paper-d8"])
def test_parameter_counts_match_instantiated_model(preset):
    config = NormGPTConfig.from_preset(preset)
    counts = config.parameter_counts()
    if preset == "tiny":
        m = NormGPTForCausalLM(config)
    else:  # shapes only, no memory
        with torch.device("meta"):
            m = NormGPTForCausalLM(config)
    assert counts["total"] == sum(p.numel() for p in m.parameters())
    embedding_like = {id(m.model.embed_tokens.weight), id(m.lm_head.weight)}
    assert counts["non_embedding"] == sum(p.numel() for p in m.parameters() if id(p) not in embedding_like)
    assert counts["embedding"] == counts["head"] == config.vocab_size * config.d_model
    assert counts["total"] == counts["non_embedding"] + counts["embedding"] + counts["head"]
    assert f"{counts['total']:,}" in config.describe()


def test_presets_have_spec_shapes():
    expected = {"124m": (12, 768, 6), "350m": (24, 1024, 8), "760m": (24, 1536, 12), "1.3b": (24, 2048, 16)}
    for name, (layers, width, heads) in expected.items():
        c = NormGPTConfig.from_preset(name)
        assert (c.n_layer, c.d_model, c.n_head, c.head_dim, c.vocab_size) == (layers, width, heads, 128, 50304)
        assert c.ffn_hidden_size % 64 == 0 and 0 <= c.ffn_hidden_size - 8 * width / 3 < 64
        # Names generic HF tooling reads.
        assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (width, layers, heads)
        assert c.tie_word_embeddings is False
    with pytest.raises(ValueError):
        NormGPTConfig(tie_word_embeddings=True)


# The paper's family (arXiv 2510.03871, appendix A.2): layers, width, heads of 64, and its rounded sizes.
PAPER_FAMILY = {
    "paper-proxy": (4, 256, 4, 68_878_336, "69M"),
    "paper-w4": (4, 1024, 16, 314_048_512, "314M"),
    "paper-w12": (4, 3072, 48, 1_250_426_880, "1.25B"),
    "paper-d8": (32, 256, 4, 91_357_184, "91M"),
    "paper-d32": (128, 256, 4, 168_427_520, "168M"),
}


@pytest.mark.parametrize("preset", PAPER_FAMILY)
def test_paper_presets_have_the_papers_shapes_and_counts(preset):
    layers, width, heads, total, rounded = PAPER_FAMILY[preset]
    c = NormGPTConfig.from_preset(preset)
    assert (c.n_layer, c.d_model, c.n_head, c.n_kv_head, c.head_dim) == (layers, width, heads, heads, 64)
    assert (c.vocab_size, c.ffn_hidden_size, c.norm_eps, c.max_position_embeddings) == (128256, 2.75 * width, 1e-20, 4096)
    assert c.parameter_counts()["total"] == total
    value, unit = float(rounded[:-1]), {"M": 1e6, "B": 1e9}[rounded[-1]]
    assert abs(total / unit - value) < 0.5 * 10 ** -(len(rounded[:-1].split(".")[-1]) if "." in rounded else 0)
    assert c.residual_out_gain == 1 / math.sqrt(2 * layers)


def test_residual_out_init_option():
    for option, gain in ((None, 1 / math.sqrt(4)), (1.0, 1.0), (0.5, 0.5)):
        m = make_model(init_residual_out=option)
        for name, lin in m.named_modules():
            if isinstance(lin, nn.Linear) and lin is not m.lm_head:
                expected = gain if name.endswith((".wo", ".w2")) else 1.0
                sigma = torch.linalg.matrix_norm(lin.weight.double(), ord=2).item()
                assert abs(sigma * math.sqrt(lin.in_features / lin.out_features) - expected) < 1e-5, (option, name)
    assert NormGPTConfig.from_preset("tiny").to_dict()["init_residual_out"] is None  # saved, and reloaded as the default


# ----------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    """The tiny model saved as sharded safetensors, with reference logits and a greedy generation."""
    register_auto_classes()
    register_auto_classes()  # idempotent
    path = tmp_path_factory.mktemp("norm_gpt_ckpt") / "ckpt"
    model.save_pretrained(path, max_shard_size="200KB")
    ids, prompt = random_ids(2, 11), random_ids(1, 6, seed=9)
    with torch.no_grad():
        logits = model(ids).logits
    generated = model.generate(prompt, max_new_tokens=10, do_sample=False, pad_token_id=0)
    reference = path.parent / "reference.pt"
    torch.save({"ids": ids, "logits": logits, "prompt": prompt, "generated": generated}, reference)
    return path, reference


def test_save_pretrained_writes_remote_code_and_safetensors(checkpoint):
    path, _ = checkpoint
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "configuration_norm_gpt.py", "modeling_norm_gpt.py"} <= files
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth")) for f in files)
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "norm_gpt"
    assert config["tie_word_embeddings"] is False
    assert config["auto_map"]["AutoConfig"] == "configuration_norm_gpt.NormGPTConfig"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_norm_gpt.NormGPTForCausalLM"
    # The copied files import only each other, torch, transformers and the standard library.
    imported = set()
    for name in ("configuration_norm_gpt.py", "modeling_norm_gpt.py"):
        for node in ast.walk(ast.parse((path / name).read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported.add("." * node.level + (node.module or "").split(".")[0])
    assert imported <= {"math", "logging", "warnings", "torch", "transformers", ".configuration_norm_gpt"}, imported
    assert ".configuration_norm_gpt" in imported


def test_auto_from_pretrained_reproduces_logits(checkpoint):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    path, reference = checkpoint
    ref = torch.load(reference)
    loaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert isinstance(loaded, NormGPTForCausalLM)
    assert loaded.lm_head.weight.data_ptr() != loaded.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(ref["ids"]).logits, ref["logits"])
    assert isinstance(AutoConfig.from_pretrained(path), NormGPTConfig)
    assert isinstance(AutoModel.from_pretrained(path), NormGPTModel)


REMOTE_CODE_SCRIPT = textwrap.dedent(
    """
    import importlib.abc, json, sys

    BLOCKED = ("disco_ds", "models")

    class Blocker(importlib.abc.MetaPathFinder):
        # The package may be installed (even editable) into this interpreter: make it unimportable.
        def find_spec(self, fullname, path=None, target=None):
            if fullname.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{fullname} is blocked in this test", name=fullname)
            return None

    sys.meta_path.insert(0, Blocker())
    importable = {}
    for name in BLOCKED:
        try:
            __import__(name)
            importable[name] = True
        except ImportError:
            importable[name] = False

    import torch
    from transformers import AutoModelForCausalLM

    ckpt, reference = sys.argv[1], sys.argv[2]
    ref = torch.load(reference)
    model = AutoModelForCausalLM.from_pretrained(ckpt, trust_remote_code=True).eval()
    with torch.no_grad():
        logits = model(ref["ids"]).logits
    generated = model.generate(ref["prompt"], max_new_tokens=10, do_sample=False, pad_token_id=0)
    print(json.dumps({
        "importable": importable,
        "leaked": sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED),
        "class_module": type(model).__module__,
        "logits_equal": torch.equal(logits, ref["logits"]),
        "max_diff": (logits - ref["logits"]).abs().max().item(),
        "generated_equal": torch.equal(generated, ref["generated"]),
    }))
    """
)


def test_loads_with_trust_remote_code_without_the_package(checkpoint, tmp_path):
    path, reference = checkpoint
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_CODE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-I", str(script), str(path), str(reference)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["importable"] == {"disco_ds": False, "models": False}
    assert result["leaked"] == []
    assert result["class_module"].startswith("transformers_modules."), result["class_module"]
    assert result["logits_equal"], result["max_diff"]
    assert result["generated_equal"]
