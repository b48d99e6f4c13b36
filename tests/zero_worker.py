"""One rank of a DeepSpeed run with disco_ds.Scion; launched by tests/test_zero.py.

    torchrun --nproc_per_node W tests/zero_worker.py '{"stage": 2, ...}' OUT.pt

With ``"ckpt": DIR`` and ``"save_after": k`` it saves an engine checkpoint after k steps and stops;
with ``"resume": true`` it loads DIR and continues to ``steps``.

Trains a small model with odd shapes (so matrices straddle partition boundaries and padding is
exercised) for a few steps on a fixed global batch sequence, then writes, from rank 0, the full
fp32 parameters, and from every rank its exchange counters.
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import deepspeed
from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

from disco_ds import Scion, ScionLight, scion_param_groups
from disco_ds.distributed import exchange, shutdown_and_exit

VOCAB, WIDTH, HIDDEN, SEQ = 37, 12, 20, 5


class OddModel(nn.Module):
    """Embedding, three hidden matrices of odd sizes, a vector, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.up = nn.Linear(WIDTH, HIDDEN, bias=True)
        self.mid = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.down = nn.Linear(HIDDEN, WIDTH, bias=False)
        self.head = nn.Linear(WIDTH, VOCAB, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        h = torch.tanh(self.up(x))
        h = torch.tanh(self.mid(h))
        x = x + self.down(h)
        logits = self.head(x)
        return nn.functional.cross_entropy(logits.float().reshape(-1, VOCAB), ids.roll(-1, dims=1).reshape(-1))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def global_batches(steps: int, global_batch: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(123)
    return [torch.randint(0, VOCAB, (global_batch, SEQ), generator=gen) for _ in range(steps)]


def build_model(seed: int = 0) -> OddModel:
    torch.manual_seed(seed)
    return OddModel()


class SyncCounter:
    """Host–device syncs per call of a method, as the profiler records them: every ``.item()``,
    ``float(t)``, ``bool(t)`` and ``.tolist()`` runs ``aten::_local_scalar_dense``, on every device."""

    def __init__(self, obj: object, method: str) -> None:
        self.counts: list[int] = []
        inner = getattr(obj, method)

        def counted(*args, **kwargs):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                out = inner(*args, **kwargs)
            self.counts.append(sum(e.name == "aten::_local_scalar_dense" for e in prof.events()))
            return out

        setattr(obj, method, counted)


def _layouts(provider) -> list:
    """The layouts a Scion provider built (the lifted ones under tensor parallelism)."""
    entries = provider.layouts.values()
    return [entry[0] if isinstance(entry, tuple) else entry for entry in entries]


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    micro, accum, steps = cfg["micro_batch"], cfg["accum"], cfg["steps"]

    ds_config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.get("clip", 0.0),
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {"stage": cfg["stage"], **cfg.get("zero", {})},
        "bf16": {"enabled": cfg.get("bf16", False)},
        **cfg.get("ds", {}),
    }
    if cfg.get("zero_init"):
        # ZeRO-3 builds the model already partitioned: p.shape is (0,), only ds_shape is real.
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = build_model()
    else:
        model = build_model()
    optimizer_class = {"Scion": Scion, "ScionLight": ScionLight}[cfg.get("optimizer", "Scion")]
    groups = scion_param_groups(model, lr=cfg["lr"], momentum=cfg.get("momentum", 0.1), ns_method=cfg.get("ns_method", "quintic"))
    opt = optimizer_class(groups, comm_dtype=getattr(torch, cfg.get("comm_dtype", "bfloat16")),
                          max_gather_numel=cfg.get("max_gather_numel", 1 << 27))
    opt.track_norms = cfg.get("track_norms", False)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config)
    # Counted from here on: DeepSpeed calls opt.step through the attribute, once per group or sub-group.
    syncs = {name: SyncCounter(opt, name) for name in ("step", "pop_metrics")} if cfg.get("count_syncs") else {}
    # Exchange planning (owners, rounds, routes) per optimizer step: matrix_plan assigns owners once
    # per plan it builds.
    plannings: list[int] = []
    assign_owners = exchange.assign_owners

    def counted_assign_owners(*args, **kwargs):
        plannings[-1] += 1
        return assign_owners(*args, **kwargs)

    exchange.assign_owners = counted_assign_owners
    metrics: list[dict[str, float]] = []
    # Self-test hook: the owners' gathered momentum on step 1 is m·g; compare g with DeepSpeed's
    # own safe_get_full_grad taken after backward.
    gathered: dict[str, torch.Tensor] = {}
    opt.on_gathered = lambda name, full: gathered.setdefault(name, full.detach().clone().float())
    reference: dict[str, torch.Tensor] = {}
    first_step = 0
    if cfg.get("resume"):
        engine.load_checkpoint(cfg["ckpt"])
        first_step = engine.global_steps
    for step, batch in enumerate(global_batches(steps, micro * accum * world)):
        if step < first_step:
            continue
        if step == cfg.get("save_after"):
            engine.save_checkpoint(cfg["ckpt"])
            break
        plannings.append(0)
        for k in range(accum):
            # Rank r's k-th micro-batch: a disjoint slice of the global batch.
            start = (k * world + rank) * micro
            loss = engine(batch[start : start + micro])
            engine.backward(loss)
            # (DeepSpeed's own safe_get_full_grad crashes under round_robin_gradients, so the
            # round-robin test switches the reference off.)
            if step == first_step and k == accum - 1 and cfg.get("capture_reference", True):
                for name, p in engine.module.named_parameters():
                    if p.dim() == 2 or len(getattr(p, "ds_shape", ())) == 2:
                        reference[name] = safe_get_full_grad(p).detach().clone().float()
            engine.step()
        if opt.track_norms:
            metrics.append({k: v for k, v in opt.pop_metrics().items() if not k.startswith("optimizer/")})

    params = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None at stage 0, where p itself is the full parameter
        params[name] = (full if full is not None else p).detach().float().clone().cpu()
    stats = opt.stats
    # Data-parallel replicas (stage 0) must hold bit-identical parameters on every rank.
    local_weights = {name: p.detach().double().sum().item() for name, p in engine.module.named_parameters()}
    record = {
        "per_member": dict(stats.per_member),
        "matrices_orthogonalized": stats.matrices_orthogonalized,
        "bytes_sent": stats.bytes_sent,
        "all_to_all_calls": stats.all_to_all_calls,
        "rounds": stats.rounds,
        "comm_seconds": stats.comm_seconds,
        "ns_seconds": stats.ns_seconds,
        "state_numel": sum(t.numel() for s in opt.state.values() for t in s.values() if torch.is_tensor(t)),
        "optimizer_steps": opt.steps,
        # ZeRO-Offload partitions staged onto the accelerator for the LMO (an identity copy on the CPU);
        # only the flat-partition providers stage anything.
        "provider": type(opt.provider).__name__,
        "staged_partitions": len(getattr(opt.provider, "staging", {})),
        "local_weights": local_weights,
        "metrics": metrics,
        "syncs": {name: counter.counts for name, counter in syncs.items()},
        "plannings": plannings,
        # Every cached exchange plan's owners and routes, in a form every rank can compare.
        "plans": sorted(repr((plan.owners, [r.members for r in plan.rounds])) for layout in _layouts(opt.provider)
                        for plan in layout.plans.values()),
        # This rank's layouts as shapes and fragments, with each plan's key and the index tensors
        # it packed with: the test plans the same layouts from shapes alone and compares.
        "plan_indices": [{"shapes": layout.shapes, "fragments": layout.fragments, "sources": layout.sources,
                          "blocks": layout.blocks, "replicated": layout.replicated, "rank": layout.rank,
                          "key": key, "indices": {str(where): [[t.tolist() for t in (i.send, i.gather, i.back)]
                                                                   for i in index]
                                                      for where, index in plan._indices.items()}}
                         for layout in _layouts(opt.provider) for key, plan in layout.plans.items()],
        # max |gathered/m − safe_get_full_grad| per matrix this rank owned on the first step
        "gathered_vs_deepspeed": {name: (full / cfg.get("momentum", 0.1) - reference[name].reshape(full.shape)).abs().max().item()
                                  for name, full in gathered.items() if name in reference},
    }
    records: list = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        torch.save({"params": params, "ranks": records}, out_path)
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
