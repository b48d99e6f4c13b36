"""One rank of a tensor-parallel (AutoTP) DeepSpeed run of NormGPT with disco_ds.Scion.

    torchrun --nproc_per_node W tests/tp_worker.py '{"tp": 2, "stage": 1, ...}' OUT.pt

Builds the small NormGPT of :func:`build_model` (uneven vocabulary and FFN shards, grouped-query
attention), lets DeepSpeed shard it over ``tp`` ranks (W / tp data-parallel replicas with ZeRO
``stage``), records the logits of a fixed batch before training, trains ``steps`` Scion steps on
fixed global batches (every TP rank of a data-parallel group sees the same micro-batch), and
writes, from rank 0, the unsharded fp32 parameters, the logits before and after, and every
rank's exchange counters. With ``"ckpt": DIR`` it also saves a trainer checkpoint there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import deepspeed
from deepspeed.utils import groups, safe_get_full_fp32_param

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from disco_ds import Scion, scion_param_groups  # noqa: E402
from disco_ds.distributed import shutdown_and_exit  # noqa: E402
from disco_ds.distributed.tensor_parallel import autotp_config, gather_tp_shards, tp_spec  # noqa: E402
from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM  # noqa: E402

SEQ = 8
SHAPES = dict(vocab_size=97, d_model=64, n_layer=2, n_head=4, n_kv_head=2, head_dim=16, ffn_hidden_size=135,
              max_position_embeddings=64)


def build_model(seed: int = 0, **overrides) -> NormGPTForCausalLM:
    torch.manual_seed(seed)
    return NormGPTForCausalLM(NormGPTConfig(**{**SHAPES, **overrides}))


def global_batches(steps: int, global_batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(321)
    return [torch.randint(0, SHAPES["vocab_size"], (global_batch, SEQ), generator=gen) for _ in range(steps)]


def probe_batch() -> torch.Tensor:
    return torch.randint(0, SHAPES["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(7))


def scion_kwargs(cfg: dict) -> dict:
    return dict(lr=cfg["lr"], momentum=cfg.get("momentum", 0.1), ns_method=cfg.get("ns_method", "quintic"))


@torch.no_grad()
def full_parameters(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded fp32 parameters: ZeRO gathers over data parallelism, then TP shards are concatenated."""
    tp_group = groups.get_tensor_model_parallel_group()
    tp_world = dist.get_world_size(tp_group)
    out = {}
    for name, p in module.named_parameters():
        full = safe_get_full_fp32_param(p)
        full = (full if full is not None else p).detach().float().contiguous()
        spec = tp_spec(p)
        if spec is not None and tp_world > 1:
            full = gather_tp_shards(full, spec, tp_group)
        out[name] = full.clone()
    return out


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tp, micro, steps = cfg["tp"], cfg.get("micro_batch", 2), cfg["steps"]
    model = build_model()
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": cfg["stage"]},
        "tensor_parallel": autotp_config(model.config, tp),
        "steps_per_print": 1 << 30,
    }
    built: list[Scion] = []

    def make_optimizer(_params):
        # Called by deepspeed.initialize after AutoTP has replaced the weights by their shards.
        opt = Scion(scion_param_groups(model, **scion_kwargs(cfg)), comm_dtype=getattr(torch, cfg.get("comm_dtype", "float32")))
        built.append(opt)
        return opt

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=make_optimizer, config=ds_config)
    opt = built[0]
    dp_rank, dp_world = groups.get_data_parallel_rank(), groups.get_data_parallel_world_size()
    assert dp_world * tp == world, (dp_world, tp, world)
    opt.track_norms = cfg.get("track_norms", False)
    metrics: list[dict[str, float]] = []
    gathered: dict[str, torch.Tensor] = {}
    opt.on_gathered = lambda name, full: gathered.setdefault(name, full.detach().float().clone())

    engine.eval()
    with torch.no_grad():
        logits_before = engine(input_ids=probe_batch()).logits.detach().float().clone()
    engine.train()
    losses = []
    for batch in global_batches(steps, micro * dp_world):
        ids = batch[dp_rank * micro : (dp_rank + 1) * micro]
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
        if opt.track_norms:
            metrics.append({k: v for k, v in opt.pop_metrics().items() if not k.startswith("optimizer/")})
    engine.eval()
    with torch.no_grad():
        logits_after = engine(input_ids=probe_batch()).logits.detach().float().clone()
    params = full_parameters(engine.module)
    if cfg.get("ckpt"):
        from disco_ds.trainer.checkpoint import save_checkpoint

        save_checkpoint(engine, Path(cfg["ckpt"]), steps, {"step": steps}, {"test": True}, model.config, None, keep=1)
    shard_meta = {name: (tuple(p.shape), getattr(p, "ds_autotp_universal_checkpoint_meta", {}).get("partition_dim"))
                  for name, p in engine.module.named_parameters()}
    record = {
        "per_member": dict(opt.stats.per_member),
        "matrices_orthogonalized": opt.stats.matrices_orthogonalized,
        "bytes_sent": opt.stats.bytes_sent,
        "all_to_all_calls": opt.stats.all_to_all_calls,
        "all_reduce_calls": opt.stats.all_reduce_calls,
        "gathered_shapes": {k: tuple(v.shape) for k, v in gathered.items()},
        "optimizer_steps": opt.steps,
        "shard_meta": shard_meta,
        "losses": losses,
        "metrics": metrics,
        "tp_rank": groups.get_tensor_model_parallel_rank(),
        "wrapper": type(engine.optimizer).__name__,
        "dp_rank": dp_rank,
    }
    records: list = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        torch.save({"params": params, "ranks": records, "logits_before": logits_before, "logits_after": logits_after},
                   out_path)
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
