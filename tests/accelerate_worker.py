"""One rank of an accelerate + DeepSpeed run with disco_ds.Scion; launched by tests/test_hf.py.

    torchrun --nproc_per_node 2 tests/accelerate_worker.py '{"stage": 2, "steps": 3}' OUT.pt

``Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=recipes/deepspeed/zero{stage}.json))``,
then ``accelerator.prepare(model, Scion(...), dataloader)`` and a plain loop. Rank 0 writes the
initial and final full fp32 parameters, the micro-batches of every rank, and what the engine steps.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).parent))

import deepspeed  # noqa: E402
from accelerate import Accelerator, DeepSpeedPlugin, PartialState  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402
from hf_worker import LR, MICRO_BATCH, REPO, PatternDataset, build_model, initial_params  # noqa: E402

from disco_ds import Scion, scion_param_groups  # noqa: E402
from disco_ds.distributed import shutdown_and_exit  # noqa: E402


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_path = Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    config = json.loads((REPO / "recipes" / "deepspeed" / f"zero{cfg['stage']}{cfg.get('config_suffix', '')}.json").read_text())
    # CPU only: accelerate finds no distributed backend without a GPU unless the process state is
    # created for CPU first (gloo, as the Trainer's use_cpu does); on GPUs this line is not needed.
    PartialState(cpu=True)
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config))
    model = build_model("normgpt")  # under zero.Init at ZeRO-3: the plugin's HfDeepSpeedConfig is alive
    built_partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    init = initial_params(model)
    # fp32 transport and exact orthogonalisation, so the run can be compared at fp32 resolution.
    optimizer = Scion(scion_param_groups(model, LR, ns_method="svd"), comm_dtype=torch.float32)
    loader = torch.utils.data.DataLoader(PatternDataset(), batch_size=MICRO_BATCH, shuffle=False)
    engine, prepared_optimizer, loader = accelerator.prepare(model, optimizer, loader)

    batches: list[torch.Tensor] = []
    model.register_forward_pre_hook(lambda m, a, kw: batches.append(kw["input_ids"].detach().clone()), with_kwargs=True)
    losses = []
    engine.train()
    for step, batch in enumerate(loader):
        if step == cfg["steps"]:
            break
        loss = engine(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        accelerator.backward(loss)  # DeepSpeed: engine.backward, then engine.step (the Scion step)
        prepared_optimizer.step()  # a no-op under DeepSpeed, kept as in any accelerate loop
        prepared_optimizer.zero_grad()
        losses.append(loss.item())

    params = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p)  # collective at ZeRO-3
        params[name] = None if full is None else full.detach().float().clone().cpu()
    record = {
        "engine_class": type(engine).__name__,
        "basic_optimizer_class": type(engine.basic_optimizer).__name__,
        "basic_is_user_scion": engine.basic_optimizer is optimizer,
        "engine_stage": engine.zero_optimization_stage(),
        "built_partitioned": built_partitioned,
        "gradient_clipping": engine.gradient_clipping(),
        "scion_steps": optimizer.steps,
        "state_numel": sum(t.numel() for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)),
        "batches": batches,
        "losses": losses,
    }
    records: list = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    if dist.get_rank() == 0:
        torch.save({"init": init, "params": params, "ranks": records}, out_path)
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
