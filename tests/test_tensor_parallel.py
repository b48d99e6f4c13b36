"""Tensor parallelism: NormGPT sharded by DeepSpeed AutoTP, Scion orthogonalising whole matrices.

Multi-process cases launch ``tests/tp_worker.py`` with ``torchrun`` (CPU, gloo): TP = 2 on 2 ranks
(ZeRO-1, ZeRO-2) and TP = 2 × DP = 2 on 4 ranks (ZeRO-2, ZeRO-3). The model has an uneven
vocabulary (97 → 49 + 48 rows of the head) and FFN (135 → 68 + 67), and grouped-query attention.
With fp32 transport and the exact (SVD) orthogonalisation the only differences to one process are
fp32 reassociations (the split matmuls, all-reduced partial sums), hence 1e-5 after 3 steps.
Exactly-once: summed over the whole TP×DP grid, every hidden matrix was orthogonalised once per
step, by an owner that saw it whole (its logical, unsharded shape).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from tp_worker import build_model, global_batches, probe_batch, scion_kwargs  # noqa: E402
from launching import torchrun  # noqa: E402

from disco_ds import Scion, scion_param_groups  # noqa: E402
from disco_ds.distributed import ExchangeStats, Fragment, Layout, distributed_lmo, matrix_products  # noqa: E402
from disco_ds.optim.norms import make_norm  # noqa: E402
from disco_ds.distributed.tensor_parallel import (  # noqa: E402
    autotp_config,
    check_tensor_parallel_shapes,
    merge_tp_shards,
    partition_dim_of,
)
from disco_ds.models.norm_gpt import NormGPTConfig  # noqa: E402
from disco_ds.models.norm_gpt.modeling_norm_gpt import rms_norm, sharded_rms_norm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "tp_worker.py"
ENV = {**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
HIDDEN = [f"model.layers.{i}.{m}.weight" for i in range(2)
          for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w3", "mlp.w2")]


# ---------------------------------------------------------------------------- units (one process)


def test_blocked_layout_roundtrip_and_pieces() -> None:
    """A row-parallel matrix lives in the layout as column blocks; the owner reassembles it."""
    w = torch.arange(4 * 7, dtype=torch.float32).view(4, 7)
    widths = (4, 3)
    flat = torch.cat([w[:, :4].reshape(-1), w[:, 4:].reshape(-1)])
    layout = Layout(shapes=[(4, 7)], fragments=[[Fragment(0, 0, 28, 0)]], group=None, rank=0, blocks={0: widths})
    assert torch.equal(layout.to_matrix(0, flat), w)
    assert torch.equal(layout.from_matrix(0, w), flat)
    # A fragment inside the second block (its entries 2..7) covers columns 4..6 of rows 0..2.
    frag = Fragment(0, 16 + 2, 6, 0)
    covered = torch.zeros(4, 7)
    for o, row, rows, col, cols in layout.pieces(frag):
        covered[row : row + rows, col : col + cols] = flat[frag.start + o : frag.start + o + rows * cols].view(rows, cols)
    expected = torch.zeros(4, 7)
    expected.view(-1)[[6, 11, 12, 13, 18, 19]] = w.view(-1)[[6, 11, 12, 13, 18, 19]]
    assert torch.equal(covered, expected)
    with pytest.raises(ValueError, match="crosses a column block"):
        layout.pieces(Fragment(0, 14, 4, 0))


def test_blocked_layout_lmos_equal_whole_matrix() -> None:
    """Spectral, row and column LMOs and the monitor's products see the logical matrix."""
    g = torch.randn(6, 10, generator=torch.Generator().manual_seed(0))
    widths = (6, 4)
    flat = torch.cat([g[:, :6].reshape(-1), g[:, 6:].reshape(-1)])
    frags = [Fragment(0, 0, 20, 0), Fragment(0, 20, 36 - 20, 20), Fragment(0, 36, 24, 36)]
    layout = Layout(shapes=[(6, 10)], fragments=[frags], group=None, rank=0, blocks={0: widths})
    for name in ("spectral", "row_norm", "col_norm", "token_rms"):
        norm = make_norm(name, ns_method="svd") if name == "spectral" else make_norm(name)
        out = distributed_lmo(layout, norm, {f: flat[f.start : f.start + f.numel] for f in frags}, comm_dtype=torch.float32)
        got = layout.to_matrix(0, torch.cat([out[f] for f in frags]))
        torch.testing.assert_close(got, norm.lmo(g), atol=1e-5, rtol=0, msg=name)
    v = torch.randn(10)
    res = matrix_products(layout, [{f: flat[f.start : f.start + f.numel] for f in frags}], [{0: v}],
                          transpose=False, stats=ExchangeStats())
    torch.testing.assert_close(res[0][0][0], g @ v)
    torch.testing.assert_close(res[0][0][1], g.square().sum(dim=1))


def test_sharded_rms_norm_is_rms_norm_without_a_group() -> None:
    x = torch.randn(2, 3, 40)
    assert torch.equal(sharded_rms_norm(x, 1e-6, 40, None), rms_norm(x, 1e-6))


def test_autotp_config_and_refusals() -> None:
    cfg = NormGPTConfig(vocab_size=97, d_model=64, n_layer=1, n_head=4, n_kv_head=2, head_dim=16)
    section = autotp_config(cfg, 2)
    assert section["autotp_size"] == 2 and not section["partition_config"]["use_default_specs"]
    with pytest.raises(ValueError, match="n_kv_head .2. divisible by 4"):
        check_tensor_parallel_shapes(cfg, 4)
    with pytest.raises(ValueError, match="divisible by 3"):
        autotp_config(NormGPTConfig(vocab_size=97, d_model=64, n_layer=1, n_head=4, head_dim=16), 3)
    assert partition_dim_of("model.layers.3.attn.wq.weight") == 0
    assert partition_dim_of("model.layers.3.mlp.w2.weight") == 1
    assert partition_dim_of("lm_head.weight") == 0
    assert partition_dim_of("model.embed_tokens.weight") is None


def test_merge_tp_shards() -> None:
    w = torch.randn(5, 6)
    e = torch.randn(3, 2)
    shards = [{"a.mlp.w2.weight": w[:, :4], "lm_head.weight": w[:3], "embed.weight": e},
              {"a.mlp.w2.weight": w[:, 4:], "lm_head.weight": w[3:], "embed.weight": e}]
    merged = merge_tp_shards(shards)
    assert torch.equal(merged["a.mlp.w2.weight"], w) and torch.equal(merged["lm_head.weight"], w)
    shards[1]["embed.weight"] = e + 1
    with pytest.raises(ValueError, match="differs across tensor-parallel ranks"):
        merge_tp_shards(shards)


# ---------------------------------------------------------------------------- multi-process


def run_workers(tmp_path: Path, world: int, **cfg) -> dict:
    cfg = {"steps": 3, "lr": 0.05, "tp": 2, **cfg}
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = torchrun(WORKER, world, json.dumps(cfg), str(tmp_path / "result.pt"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    result["cfg"] = cfg
    return result


def single_process(cfg: dict, dp_world: int) -> tuple[torch.nn.Module, list[dict[str, float]], torch.Tensor]:
    """The unsharded model trained by one process on the same global batches; its logits before."""
    model = build_model()
    model.eval()
    with torch.no_grad():
        before = model(input_ids=probe_batch()).logits
    model.train()
    opt = Scion(scion_param_groups(model, **scion_kwargs(cfg)))
    opt.track_norms = cfg.get("track_norms", False)
    metrics = []
    micro = cfg.get("micro_batch", 2)
    for batch in global_batches(cfg["steps"], micro * dp_world):
        loss = sum(model(input_ids=batch[i * micro : (i + 1) * micro], labels=batch[i * micro : (i + 1) * micro]).loss
                   for i in range(dp_world)) / dp_world
        opt.zero_grad()
        loss.backward()
        opt.step()
        if opt.track_norms:
            metrics.append({k: v for k, v in opt.pop_metrics().items() if not k.startswith("optimizer/")})
    model.eval()
    return model, metrics, before


def check_against_single_process(result: dict, world: int, atol: float) -> None:
    dp_world = world // result["cfg"]["tp"]
    model, metrics, before = single_process(result["cfg"], dp_world)
    # Forward: the TP model's (gathered) logits equal the unsharded model's.
    torch.testing.assert_close(result["logits_before"], before, atol=1e-5, rtol=0)
    # K Scion steps: the unsharded parameters equal single-process Scion's.
    for name, ref in model.named_parameters():
        torch.testing.assert_close(result["params"][name], ref.detach(), atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        torch.testing.assert_close(result["logits_after"], model(input_ids=probe_batch()).logits, atol=20 * atol, rtol=0)
    # Exactly once over the TP×DP grid, each time by an owner holding the whole logical matrix.
    total: dict[str, int] = {}
    for rank in result["ranks"]:
        for key, count in rank["per_member"].items():
            total[key] = total.get(key, 0) + count
        for key, shape in rank["gathered_shapes"].items():
            assert shape == tuple(dict(model.named_parameters())[key].shape), (key, shape)
    assert total == {name: result["cfg"]["steps"] for name in HIDDEN}, total
    # Every rank holds shards: TP really split the weights (no rank orthogonalised a shard alone).
    for rank in result["ranks"]:
        assert rank["shard_meta"]["model.layers.0.mlp.w2.weight"] == ((64, 68 if rank["tp_rank"] == 0 else 67), 1)
        assert rank["shard_meta"]["lm_head.weight"] == ((49 if rank["tp_rank"] == 0 else 48, 64), 0)
    if metrics:
        for rank in result["ranks"]:
            for got, ref in zip(rank["metrics"], metrics, strict=True):
                assert got.keys() == ref.keys()
                for key in ref:
                    assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


@pytest.mark.parametrize("stage", [1, 2])
def test_tp2_matches_single_process(tmp_path: Path, stage: int) -> None:
    result = run_workers(tmp_path, 2, stage=stage, ns_method="svd", comm_dtype="float32", track_norms=stage == 2)
    assert {r["wrapper"] for r in result["ranks"]} == {"DeepSpeedZeroOptimizer"}
    check_against_single_process(result, 2, atol=1e-5)


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_tp2_dp2_matches_single_process(tmp_path: Path, stage: int) -> None:
    """Stage 0: whole shards replicated over DP (copies count once); 2 and 3: ZeRO fragments of shards."""
    if (os.cpu_count() or 1) < 2:
        pytest.skip("4 gloo ranks need at least 2 cores")
    result = run_workers(tmp_path, 4, stage=stage, ns_method="svd", comm_dtype="float32", track_norms=stage == 0)
    assert {(r["tp_rank"], r["dp_rank"]) for r in result["ranks"]} == {(0, 0), (1, 0), (0, 1), (1, 1)}
    check_against_single_process(result, 4, atol=1e-5)


def test_tp2_default_transport_and_newton_schulz(tmp_path: Path) -> None:
    """bf16 on the wire and bf16 quintic Newton–Schulz: equal to one process at bf16 resolution."""
    result = run_workers(tmp_path, 2, stage=2, comm_dtype="bfloat16")
    check_against_single_process(result, 2, atol=2e-3 * result["cfg"]["steps"])


def test_tp_checkpoint_exports_unsharded_hf_model(tmp_path: Path) -> None:
    """A TP=2 run's trainer checkpoint exports to one Hugging Face folder whose logits are the live model's."""
    from disco_ds.integrations.export import export_checkpoint
    from transformers import AutoModelForCausalLM

    ckpt_root = tmp_path / "run"
    result = run_workers(tmp_path, 2, stage=2, ckpt=str(ckpt_root))
    ckpt = sorted((ckpt_root / "checkpoints").glob("step_*"))[-1]
    assert any("mp_rank_01" in p.name for p in ckpt.rglob("*.pt")), "expected one file set per TP rank"
    out = export_checkpoint(ckpt, tmp_path / "hf", dtype="float32")
    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), result["params"][name], atol=0, rtol=0, msg=lambda m: f"{name}: {m}")
    with torch.no_grad():
        logits = model(input_ids=probe_batch()).logits
    torch.testing.assert_close(logits, result["logits_after"], atol=1e-5, rtol=0)


def test_trainer_launcher_with_tp_size(tmp_path: Path) -> None:
    """``deepspeed --module disco_ds train recipe train.tp_size=2``: trains, checkpoints, exports."""
    data = tmp_path / "data"
    stdlib = sysconfig.get_paths()["stdlib"]
    subprocess.run([sys.executable, "-m", "disco_ds", "prepare", "--input", stdlib, "--glob", "json/*.py",
                    "--out", str(data), "--tokenizer", "byte", "--max-bytes", "200KB", "--val-fraction", "0.05",
                    "--quiet"], check=True, env=ENV, cwd=REPO, timeout=300)
    run_dir = tmp_path / "run"
    args = {"data.path": data, "data.seq_len": 32, "train.run_dir": run_dir, "train.zero_stage": 1, "train.tp_size": 2,
            "train.micro_batch": 2, "train.tokens": 1e5, "train.global_batch_tokens": 64, "train.max_steps": 4,
            "optimizer.lr": 0.05, "schedule.warmup": 0.0, "checkpoint.interval": 4, "eval.interval": 0,
            "eval.tokens": 256, "logging.interval": 1, "train.bf16": False}
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2",
           "--master_port", str(29450 + os.getpid() % 40), "--module", "disco_ds", "train",
           str(REPO / "recipes/tiny.yaml"), *[f"{k}={v}" for k, v in args.items()]]
    proc = subprocess.run(cmd, env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows if "loss" in r and "val/loss" not in r] == [1, 2, 3, 4]
    exported = subprocess.run([sys.executable, "-m", "disco_ds", "export", str(run_dir), str(tmp_path / "hf"),
                               "--dtype", "float32"], env=ENV, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert exported.returncode == 0, exported.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True)
    assert model.lm_head.weight.shape[0] == model.config.vocab_size  # the head is whole again
