"""One rank of a DeepSpeed run that saves or loads a portable Scion checkpoint; launched by
tests/test_reshard.py.

    torchrun --nproc_per_node W tests/reshard_worker.py '{"stage": 2, ...}' OUT.pt

Trains tests/zero_worker.py's ``OddModel`` on its fixed global batches (rank r takes the r-th
``micro_batch`` rows of each global batch, so runs at different world sizes see the same global
batches when ``micro_batch · W`` is the same). Before step ``lr_scale_at`` every group's lr is
multiplied by ``lr_scale`` (a stand-in for a schedule, so that a resumed run must take its lrs from
the checkpoint).

* ``"load": PATH``: ``load_portable`` right after ``deepspeed.initialize``, then continue from the
  restored ``engine.global_steps`` to ``steps``.
* ``"save": {"k": PATH, ...}``: after optimizer step k, ``save_portable`` to PATH, then go on
  training to ``steps`` (so a run that saves is also the uninterrupted reference).

Rank 0 writes the full fp32 parameters at the end, and the loss on a fixed probe batch taken just
before each save and just after loading (it checks the model's own weights, not only the fp32
masters).
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

sys.path.insert(0, str(Path(__file__).parent))
from zero_worker import SEQ, VOCAB, build_model, global_batches  # noqa: E402

from disco_ds import Scion, scion_param_groups  # noqa: E402
from disco_ds.distributed import shutdown_and_exit  # noqa: E402
from disco_ds.integrations.reshard import load_portable, save_portable  # noqa: E402


def probe_loss(engine: deepspeed.DeepSpeedEngine) -> float:
    batch = torch.randint(0, VOCAB, (4, SEQ), generator=torch.Generator().manual_seed(7))
    engine.eval()
    with torch.no_grad():
        loss = engine(batch)
    engine.train()
    return float(loss)


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, steps = cfg["micro_batch"], cfg["steps"]
    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": 1,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": cfg["stage"], **cfg.get("zero", {})},
        "bf16": {"enabled": cfg.get("bf16", False)},
    }
    model = build_model()
    groups = scion_param_groups(model, lr=cfg["lr"], momentum=0.1, ns_method="svd")
    opt = Scion(groups, comm_dtype=torch.float32)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)

    record: dict = {"cfg": cfg, "world": world}
    first_step = 0
    if cfg.get("load"):
        info = load_portable(engine, opt, cfg["load"])
        first_step = engine.global_steps
        record.update(loaded=info, global_steps_after_load=engine.global_steps,
                      global_samples_after_load=engine.global_samples,
                      lrs_after_load=[float(g["lr"]) for g in opt.param_groups], probe_loss_after_load=probe_loss(engine))

    for step, batch in enumerate(global_batches(steps, micro * world)):
        if step < first_step:
            continue
        if step == cfg.get("lr_scale_at", 1):
            for group in opt.param_groups:
                group["lr"] *= cfg.get("lr_scale", 0.5)
        loss = engine(batch[rank * micro : (rank + 1) * micro])
        engine.backward(loss)
        engine.step()
        if str(step + 1) in cfg.get("save", {}):
            record.setdefault("saves", {})[step + 1] = {
                "probe_loss": probe_loss(engine), "lrs": [float(g["lr"]) for g in opt.param_groups]}
            save_portable(engine, opt, cfg["save"][str(step + 1)])

    params = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None at stage 0, where p itself is the full parameter
        params[name] = (full if full is not None else p).detach().float().clone().cpu()
    record.update(params=params, global_steps=engine.global_steps)
    if rank == 0:
        torch.save(record, out_path)
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
