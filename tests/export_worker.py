"""One rank of the checkpoints that tests/test_export.py exports.

    torchrun --nproc_per_node 2 tests/export_worker.py '{"stages": [0, 2, 3], "bf16_stages": [1], "steps": 2}' ROOT

For every ZeRO stage: a tiny NormGPT trained for a few steps with disco_ds.Scion inside the
DeepSpeed engine, saved in the trainer's checkpoint layout under ``ROOT/stage<S>/`` (``ds/``,
``latest``, ``model/config.json``, ``trainer_state.json``, ``config.yaml``, ``COMPLETE``), plus, from
rank 0, ``ROOT/stage<S>_logits.pt``: the live model's logits on fixed input ids.

Every stage in ``bf16_stages`` is also run with a bf16 model and the trainer's default fp32
gradients (at stage 1 that is DeepSpeed's ``BF16_Optimizer``), saved under ``ROOT/stage<S>_bf16/``,
with the full fp32 master weights in ``ROOT/stage<S>_bf16_masters.pt``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import deepspeed

from deepspeed.utils import safe_get_full_fp32_param

from disco_ds import Scion, scion_param_groups
from disco_ds.integrations.deepspeed_config import gradient_dtype_keys
from disco_ds.distributed import shutdown_and_exit
from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

MICRO_BATCH, SEQ = 2, 16


def input_ids(vocab: int) -> torch.Tensor:
    """The fixed ids on which the live and the exported model are compared."""
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(7))


def run_stage(stage: int, steps: int, root: Path, rank: int, world: int, bf16: bool = False) -> None:
    torch.manual_seed(0)
    model = NormGPTForCausalLM(NormGPTConfig.from_preset("tiny"))
    ds_config = {
        "train_micro_batch_size_per_gpu": MICRO_BATCH,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": stage},
    }
    if bf16:
        ds_config.update({"bf16": {"enabled": True}, **gradient_dtype_keys("float32")})
    optimizer = Scion(scion_param_groups(model, lr=0.01))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(100 + rank)
    for _ in range(steps):
        ids = torch.randint(0, vocab, (MICRO_BATCH, SEQ), generator=gen)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()

    name = f"stage{stage}_bf16" if bf16 else f"stage{stage}"
    ckpt = root / name
    engine.save_checkpoint(str(ckpt), tag="ds")
    masters = {n: safe_get_full_fp32_param(p).detach().clone() for n, p in engine.module.named_parameters()} if bf16 else {}
    engine.module.eval()
    ids = input_ids(vocab)
    with torch.no_grad():
        if stage == 3:
            # Whole parameters on every rank for one plain forward; the engine's hooks stay quiet
            # because the gathered parameters are already available.
            with deepspeed.zero.GatheredParameters(list(engine.module.parameters())):
                logits = engine.module(input_ids=ids).logits.float()
        else:
            logits = engine.module(input_ids=ids).logits.float()
    if rank == 0:
        engine.module.config.save_pretrained(ckpt / "model")
        (ckpt / "trainer_state.json").write_text(json.dumps({"step": steps, "stage": stage, "world_size": world}))
        (ckpt / "config.yaml").write_text(f"model: tiny\nzero_stage: {stage}\n")
        (ckpt / "COMPLETE").write_text("")
        torch.save({"ids": ids, "logits": logits}, root / f"{name}_logits.pt")
        if bf16:
            torch.save(masters, root / f"{name}_masters.pt")
    dist.barrier()


def main() -> None:
    cfg = json.loads(sys.argv[1])
    root = Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    for stage in cfg["stages"]:
        run_stage(stage, cfg.get("steps", 2), root, rank, world)
    for stage in cfg.get("bf16_stages", []):
        run_stage(stage, cfg.get("steps", 2), root, rank, world, bf16=True)
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
