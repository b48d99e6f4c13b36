"""A lean model step: RMSNorm without float32 copies of the activations, a cross-entropy without
[tokens, vocab] float32 logits, and ``train.compile``.

* ``rms_norm`` (``_RMSNorm``) keeps x in its own dtype and one float32 number per row; its
  gradient equals the float32 reference ``F.rms_norm(x.float())`` (float32: to 1e-6; bfloat16: to
  one bf16 rounding of the float32 gradient, what the reference itself returns).
* ``linear_cross_entropy`` recomputes each chunk's logits in backward; loss and gradients equal
  the unchunked ``F.cross_entropy(hidden @ W.T)`` (float32: to 1e-6; bfloat16: no further from a
  float32 reference than the unchunked bf16 computation), and autograd saves nothing of shape
  [tokens, vocab]. ``NormGPTForCausalLM(return_logits=False)`` and the trainer's ``_loss`` use it,
  also under ZeRO-3 (a 2-rank ``torchrun`` of this file: the output layer's weight is gathered in
  forward and backward; the reduced gradients and the losses equal those with full logits).
* ``train.compile: true`` trains (a single-process ``disco_ds train`` whose inductor cache fills).

Saved bytes are counted with ``torch.autograd.graph.saved_tensors_hooks``, each storage once,
parameters excluded (they are weights, not activations).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from launching import torchrun
from test_train import ENV, REPO, data_dir, losses, overrides, run, val_loss  # noqa: F401  (data_dir: a fixture)

from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM
from disco_ds.models.norm_gpt import modeling_norm_gpt as modeling
from disco_ds.models.norm_gpt.modeling_norm_gpt import (
    AttentionMask,
    NormGPTBlock,
    linear_cross_entropy,
    rms_norm,
    rope_cos_sin,
    sharded_rms_norm,
)

BF16_ULP = 2.0**-8  # spacing of bfloat16 numbers relative to their magnitude (8 significant bits)


def saved_tensors(fn: Callable[[], torch.Tensor], exclude: Iterable[torch.Tensor] = ()) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(the tensors autograd saves while ``fn()`` runs, each storage once, those of ``exclude``
    left out; ``fn()``'s result, which keeps them alive)."""
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    found: dict[int, torch.Tensor] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            found.setdefault(ptr, t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return list(found.values()), out


def nbytes(tensors: list[torch.Tensor]) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def reference_norm(x: torch.Tensor, eps: float, width: int | None = None, group: object = None) -> torch.Tensor:
    """The RMSNorm before this change: autograd through the float32 computation."""
    return F.rms_norm(x.float(), (x.size(-1),), eps=eps).type_as(x)


def grad_of(norm: Callable[..., torch.Tensor], x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().requires_grad_()
    return torch.autograd.grad(norm(x, 1e-6), x, g)[0]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ----------------------------------------------------------------------------- RMSNorm


def test_rms_norm_fp32_forward_and_gradient_equal_the_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 96, generator=gen) * 3
    g = torch.randn(3, 17, 96, generator=gen)
    xr = x.clone().requires_grad_()
    torch.testing.assert_close(rms_norm(xr, 1e-6), reference_norm(x, 1e-6), rtol=1e-6, atol=1e-7)
    expected = grad_of(reference_norm, x, g)
    for norm in (rms_norm, lambda t, eps: sharded_rms_norm(t, eps, 96)):
        got = grad_of(norm, x, g)
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
        assert relative(got, expected) < 1e-6


def test_rms_norm_bf16_gradient_is_the_fp32_gradient_rounded_once() -> None:
    """Both paths compute the gradient in float32 from the same bf16 x and g and round it to bf16
    once, so each element lies within one bf16 spacing of the float32 gradient (half of one from
    the rounding, the rest for float32 reassociation), and the two agree as closely."""
    gen = torch.Generator().manual_seed(1)
    x = (torch.randn(4, 33, 128, generator=gen) * 2).bfloat16()
    g = torch.randn(4, 33, 128, generator=gen).bfloat16()
    exact = grad_of(reference_norm, x.float(), g.float())  # float32 throughout
    new, old = grad_of(rms_norm, x, g), grad_of(reference_norm, x, g)
    assert new.dtype == torch.bfloat16
    for got in (new, old):
        torch.testing.assert_close(got.float(), exact, rtol=BF16_ULP, atol=1e-6 * float(exact.abs().max()))
    torch.testing.assert_close(new.float(), old.float(), rtol=BF16_ULP, atol=1e-6 * float(exact.abs().max()))
    # The forward is the reference's to the bit: the same float32 arithmetic, one rounding.
    assert torch.equal(rms_norm(x.clone().requires_grad_(), 1e-6), reference_norm(x, 1e-6))


def test_a_bf16_block_saves_no_fp32_copy_of_any_normalised_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    config = NormGPTConfig.from_preset("tiny", n_layer=1)
    torch.manual_seed(0)
    block = NormGPTBlock(config, 0).to(torch.bfloat16).train()
    B, T, d = 2, 24, config.d_model
    x = torch.randn(B, T, d).bfloat16().requires_grad_()
    cos, sin = rope_cos_sin(torch.arange(T)[None], config.head_dim, config.rope_theta, torch.bfloat16)
    # What the norms of one block normalise: the residual stream (twice), q, k, v per head, the
    # concatenated heads before Wo and the gated product before W2.
    normalised = {(B, T, d), (B, T, config.n_head, config.head_dim), (B, T, config.n_head * config.head_dim),
                  (B, T, config.ffn_hidden_size)}

    def forward() -> torch.Tensor:
        return block(x, cos=cos, sin=sin, mask=AttentionMask())[0]

    def fp32_activations(tensors: list[torch.Tensor]) -> list[tuple[int, ...]]:
        return [tuple(t.shape) for t in tensors if t.dtype == torch.float32 and tuple(t.shape) in normalised]

    new, out = saved_tensors(forward, block.parameters())
    new_grad = torch.autograd.grad(out.float().square().sum(), x)[0]
    with monkeypatch.context() as patch:
        patch.setattr(modeling, "sharded_rms_norm", reference_norm)  # rms_norm calls it too
        old, out = saved_tensors(forward, block.parameters())
        old_grad = torch.autograd.grad(out.float().square().sum(), x)[0]

    assert len(fp32_activations(old)) >= 5, "the reference should save float32 copies (else this test shows nothing)"
    assert fp32_activations(new) == []
    # What the norms keep instead: one float32 number per row.
    assert any(t.dtype == torch.float32 and t.shape[-1] == 1 and t.shape[:2] == (B, T) for t in new)
    # Each float32 copy gives way to (at most) its bf16 input: at least half its bytes are gone.
    copies = nbytes([t for t in old if t.dtype == torch.float32 and tuple(t.shape) in normalised])
    assert nbytes(new) <= nbytes(old) - copies / 2
    # The same forward to the bit; each of the block's seven norms may round its input gradient one
    # bf16 spacing apart (see above), and the bf16 matmuls after them carry that on.
    torch.testing.assert_close(new_grad.float(), old_grad.float(), rtol=4 * BF16_ULP, atol=1e-3 * float(old_grad.abs().max()))


# ----------------------------------------------------------------------------- cross-entropy


def ce_inputs(dtype: torch.dtype, n: int = 203, d: int = 48, vocab: int = 97) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    hidden = F.rms_norm(torch.randn(n, d, generator=gen), (d,)).to(dtype)
    weight = (torch.randn(vocab, d, generator=gen) * 0.5).to(dtype)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::9] = -100  # ignored tokens
    return hidden, weight, targets


def reference_ce(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The trainer's loss before this change: full logits, upcast, then the summed cross-entropy."""
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="sum")


def loss_and_grads(fn: Callable[..., torch.Tensor], hidden: torch.Tensor, weight: torch.Tensor,
                   targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    h, w = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    loss = fn(h, w, targets)
    return (loss.detach(), *torch.autograd.grad(loss, (h, w)))


@pytest.mark.parametrize("chunk", [1, 37, 203, 10_000])
def test_chunked_cross_entropy_equals_the_unchunked_one_in_fp32(chunk: int) -> None:
    hidden, weight, targets = ce_inputs(torch.float32)
    expected = loss_and_grads(reference_ce, hidden, weight, targets)
    got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=chunk), hidden, weight, targets)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, expected):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()), msg=name)
        assert relative(a, b) < 1e-6, name


def test_chunked_cross_entropy_in_bf16_is_as_close_to_fp32_as_the_unchunked_bf16_one() -> None:
    """bf16 hidden states and weight. The float32 reference runs on the same (bf16-valued) numbers;
    the unchunked bf16 computation differs from it by rounding the logits and the gradients to
    bf16 (about 0.1-1% relative). The chunked one rounds the same things, and the weight's
    gradient once more per chunk before its float32 sum: no further from float32 than the
    computation it replaces (a margin of 1.5 for the different rounding pattern), and within 1%."""
    hidden, weight, targets = ce_inputs(torch.bfloat16, n=512, d=64, vocab=300)
    exact = loss_and_grads(reference_ce, hidden.float(), weight.float(), targets)
    old = loss_and_grads(reference_ce, hidden, weight, targets)
    new = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=100), hidden, weight, targets)
    assert new[0].dtype == torch.float32 and new[1].dtype == new[2].dtype == torch.bfloat16
    for name, a, b, ref in zip(("loss", "d hidden", "d weight"), new, old, exact):
        assert relative(a, ref) <= max(1.5 * relative(b, ref), 1e-6), name
        assert relative(a, ref) < 1e-2, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_cross_entropy_saves_no_logits(dtype: torch.dtype) -> None:
    hidden, weight, targets = ce_inputs(dtype)
    h, w = hidden.requires_grad_(), weight.requires_grad_()
    new, _ = saved_tensors(lambda: linear_cross_entropy(h, w, targets, chunk_size=50), [w])
    old, _ = saved_tensors(lambda: reference_ce(h, w, targets), [w])
    n, vocab = targets.numel(), weight.shape[0]
    assert any(t.numel() == n * vocab and t.dtype == torch.float32 for t in old), "the reference keeps fp32 logits"
    # No logits, not even a chunk's: nothing saved but the weight (excluded) has a vocabulary dimension.
    assert not any(vocab in t.shape for t in new), [tuple(t.shape) for t in new]
    assert nbytes(new) < nbytes(old)


def test_chunked_cross_entropy_under_autocast_matches_autocast_linear() -> None:
    """Under autocast the chunks make their logits in the autocast dtype, as F.linear would."""
    hidden, weight, targets = ce_inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = loss_and_grads(reference_ce, hidden, weight, targets)
        got = loss_and_grads(lambda h, w, t: linear_cross_entropy(h, w, t, chunk_size=64), hidden, weight, targets)
    for name, a, b in zip(("loss", "d hidden", "d weight"), got, expected):
        assert a.dtype == b.dtype, name
        assert relative(a, b) < 1e-2, name


# ----------------------------------------------------------------------------- the model and the trainer


def tiny_model(**overrides: object) -> NormGPTForCausalLM:
    torch.manual_seed(0)
    return NormGPTForCausalLM(NormGPTConfig.from_preset("tiny", vocab_size=80, **overrides)).train()


def test_return_logits_false_gives_the_hf_loss_and_gradients_without_logits() -> None:
    model = tiny_model()
    ids = torch.randint(0, 80, (3, 20), generator=torch.Generator().manual_seed(3))
    labels = ids.clone()
    labels[0, :5] = -100

    def run_model(**kwargs: object) -> tuple[torch.Tensor, dict[str, torch.Tensor], object]:
        model.zero_grad(set_to_none=True)
        out = model(ids, labels=labels, **kwargs)
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, out.logits

    for kwargs in ({}, {"num_items_in_batch": torch.tensor(41)}, {"shift_labels": labels}):
        loss, grads, logits = run_model(**kwargs)
        lean_loss, lean_grads, lean_logits = run_model(return_logits=False, **kwargs)
        assert logits is not None and lean_logits is None
        torch.testing.assert_close(lean_loss, loss, rtol=1e-6, atol=0)
        for name in grads:
            torch.testing.assert_close(lean_grads[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)

    saved, _ = saved_tensors(lambda: model(ids, labels=labels, return_logits=False).loss, model.parameters())
    assert not any(80 in t.shape for t in saved), [tuple(t.shape) for t in saved]  # no logits: no vocabulary dimension
    with pytest.raises(ValueError, match="pass labels"):
        model(ids, return_logits=False)


def test_trainer_loss_is_the_old_full_logits_loss() -> None:
    from disco_ds.trainer.loop import _loss

    model = tiny_model()
    window = torch.randint(0, 80, (2, 33), generator=torch.Generator().manual_seed(4))
    inputs, targets = window[:, :-1], window[:, 1:]
    loss = _loss(model, inputs, targets, None)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    logits = model(input_ids=inputs, use_cache=False).logits
    old = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    old_grads = torch.autograd.grad(old, list(model.parameters()))
    torch.testing.assert_close(loss, old, rtol=1e-6, atol=0)
    for a, b in zip(grads, old_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def zero3_worker(out: Path) -> None:
    """One rank of the ZeRO-3 check: the trainer's engine (tiny recipe, fp32) runs three steps on
    one window with the trainer's ``_loss`` and again from the same init with full logits. Every
    rank writes ``out.<rank>`` with both loss curves and its partition of the first step's reduced
    gradients (what the ZeRO-3 wrapper hands to Scion)."""
    import deepspeed
    import torch.distributed as dist

    from disco_ds.trainer.build import build_engine, build_model_config, communication_device, engine_config
    from disco_ds.trainer.config import load_config
    from disco_ds.trainer.loop import _loss
    from disco_ds.trainer.scaling import plan_run

    deepspeed.init_distributed(dist_backend="gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    cfg = load_config(REPO / "recipes/tiny.yaml", [
        "train.zero_stage=3", "train.bf16=false", "data.seq_len=32", "train.micro_batch=2",
        f"train.global_batch_tokens={2 * 32 * world}", "train.tokens=1e5", "optimizer.lr=0.05", "schedule.warmup=0.0"])
    plan = plan_run(cfg, world)
    model_config = build_model_config(cfg, {"vocab_size": 97})
    device = communication_device()

    def full_logits_loss(engine: object, inputs: torch.Tensor, targets: torch.Tensor, _eot: None) -> torch.Tensor:
        logits = engine(input_ids=inputs, use_cache=False).logits
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))

    result = {}
    for name, loss_fn in (("chunked", _loss), ("logits", full_logits_loss)):
        engine, _ = build_engine(cfg, model_config, plan, engine_config(cfg, plan, model_config), device)
        # The same window every step: its loss must fall, so the updates are real.
        window = torch.randint(0, model_config.vocab_size, (2, 33), generator=torch.Generator().manual_seed(100 + rank))
        curve, grads = [], None
        for _ in range(3):
            loss = loss_fn(engine, window[:, :-1], window[:, 1:], None)
            engine.backward(loss)
            if grads is None:
                grads = engine.optimizer.grad_partitions_flat_buffer.detach().clone()
            engine.step()
            curve.append(float(loss))
        result[name] = {"losses": curve, "grads": grads}
        engine.destroy()
    torch.save(result, f"{out}.{rank}")
    dist.barrier()


@pytest.mark.slow
def test_zero3_gathers_the_output_layer_for_the_chunked_loss(tmp_path: Path) -> None:
    out = tmp_path / "zero3.pt"
    proc = torchrun(Path(__file__), 2, "zero3", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    for rank in range(2):
        result = torch.load(f"{out}.{rank}")
        chunked, logits = result["chunked"], result["logits"]
        # Later steps differ by the optimizer's amplification of float32 round-off (its
        # orthogonalisation of near-degenerate singular directions), so the losses agree to 1e-5.
        assert chunked["losses"] == pytest.approx(logits["losses"], rel=1e-5)
        assert chunked["losses"][-1] < chunked["losses"][0] - 0.1
        assert chunked["grads"].abs().max() > 0
        torch.testing.assert_close(chunked["grads"], logits["grads"], rtol=1e-5,
                                   atol=1e-6 * float(logits["grads"].abs().max()))


# ----------------------------------------------------------------------------- train.compile


def test_compile_key_is_a_checked_bool() -> None:
    from disco_ds.trainer.config import ConfigError, load_config

    assert load_config(REPO / "recipes/tiny.yaml").train.compile is False
    assert load_config(REPO / "recipes/tiny.yaml", ["train.compile=true"]).train.compile is True
    with pytest.raises(ConfigError, match=r"train\.compile: expected bool, got 'fast'"):
        load_config(REPO / "recipes/tiny.yaml", ["train.compile=fast"])


def test_compiled_newton_schulz_matches_eager() -> None:
    from disco_ds.optim import newton_schulz

    g = torch.randn(3, 48, 80, generator=torch.Generator().manual_seed(5))
    assert newton_schulz.uses_gram(48, 80, 5)
    eager = {gram: newton_schulz.orthogonalize(g, gram=gram) for gram in (False, True)}
    newton_schulz.compile_iteration()
    try:
        assert newton_schulz._iteration is not newton_schulz._polynomial_iteration
        compiled = {gram: newton_schulz.orthogonalize(g, gram=gram) for gram in (False, True)}
    finally:
        newton_schulz.compile_iteration(False)
    assert newton_schulz._iteration is newton_schulz._polynomial_iteration
    # Both run the iteration in bf16: the compiled graph may fuse and round differently.
    torch.testing.assert_close(compiled[False], eager[False], rtol=0, atol=4 * BF16_ULP * float(eager[False].abs().max()))
    # The Gram form carries Q (entries up to a² ≈ 12 between restarts), so one rounding that
    # differs moves the result by more ulps (up to ~15 here); compiled and eager are equally
    # close to the float64 iteration.
    x = g.double() / torch.linalg.matrix_norm(g.double(), keepdim=True)
    exact = newton_schulz._polynomial_iteration(x, 5, "quintic", gram=False).float()
    errors = {name: float((out[True] - exact).norm() / exact.norm()) for name, out in (("eager", eager), ("compiled", compiled))}
    assert errors["compiled"] <= 1.25 * errors["eager"] + 1e-3, errors


@pytest.mark.slow
def test_compiled_training_run_trains(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811  (the fixture)
    """A single-process run with ``train.compile: true``: the model and Newton–Schulz go through
    inductor (its cache fills) and the loss falls as in the eager runs of tests/test_train.py."""
    run_dir, cache = tmp_path / "compiled", tmp_path / "inductor"
    args = overrides(data_dir, run_dir, **{"train.compile": "true", "train.max_steps": 8, "checkpoint.interval": 0})
    proc = run([sys.executable, "-m", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"), *args],
               env={**ENV, "TORCHINDUCTOR_CACHE_DIR": str(cache)})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "compile: true" in proc.stdout  # the resolved config says so
    assert any(p.is_file() for p in cache.rglob("*")), "inductor compiled nothing"
    curve = losses(run_dir)
    assert len(curve) == 8 and curve[8] < curve[1] - 0.3, curve
    assert val_loss(run_dir) < curve[1]


if __name__ == "__main__" and sys.argv[1] == "zero3":
    zero3_worker(Path(sys.argv[2]))
