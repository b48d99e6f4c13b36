"""One rank of ``benchmarks/bench_zero_step.py``: three optimizers, one ZeRO stage, one world size.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node W \\
        benchmarks/zero_step_worker.py '{"stage": 2, ...}' OUT.json

Builds the same model (same seed) three times and wraps each copy in its own DeepSpeed engine
with the same ZeRO config:

* ``ours``: ``disco_ds.Scion`` (matrices routed to one owner each by ``all_to_all``);
* ``ds_muon``: DeepSpeed's built-in ``"optimizer": {"type": "Muon"}`` (``MuonWithAuxAdam``);
* ``naive``: :class:`NaiveAllGatherScion` below, which all-gathers every flat partition so that
  every rank rebuilds every full parameter and runs every LMO.

The engines are then stepped in interleaved rounds (the order rotates every round) on the same
batches, so that a burst of load from other processes hits all three alike. Every collective is
counted by a wrapper around ``torch.distributed`` (installed before DeepSpeed caches its function
pointers) and attributed to the windows open at the time (forward+backward, ``engine.step()``,
the client optimizer's ``step()``, DeepSpeed Muon's ZeRO-3 update). Rank 0 writes one JSON file.
"""

from __future__ import annotations

import functools
import inspect
import json
import math
import os
import statistics
import sys
import time
import traceback
from contextlib import contextmanager
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F
from torch import nn

# ----------------------------------------------------------------------------------------------
# Communication meter: bytes leave a rank under a direct-send model, summed later over ranks.
#   all_to_all(_single): the input splits addressed to other ranks;
#   all_gather(_into_tensor): (W-1) x the input (each peer gets a copy);
#   all_reduce: 2(W-1)/W x the tensor (ring: reduce-scatter + all-gather);
#   reduce_scatter: (W-1)/W x the input; broadcast: (W-1) x the tensor, on the source.
# ----------------------------------------------------------------------------------------------


def _nb(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _a2a_single(a: dict, r: int, w: int) -> float:
    splits = a.get("input_split_sizes")
    inp = a["input"]
    if not splits:
        return _nb(inp) * (w - 1) / w
    row = _nb(inp) // max(1, inp.shape[0]) if inp.dim() > 0 and inp.shape[0] else inp.element_size()
    return (sum(splits) - splits[r]) * row


RULES = {
    "all_reduce": lambda a, r, w: 2 * (w - 1) / w * _nb(a["tensor"]),
    "all_reduce_coalesced": lambda a, r, w: 2 * (w - 1) / w * sum(_nb(t) for t in a["tensors"]),
    "all_gather": lambda a, r, w: (w - 1) * _nb(a["tensor"]),
    "all_gather_into_tensor": lambda a, r, w: (w - 1) * _nb(a["input_tensor"]),
    "_all_gather_base": lambda a, r, w: (w - 1) * _nb(a["input_tensor"]),
    "reduce_scatter_tensor": lambda a, r, w: (w - 1) / w * _nb(a["input"]),
    "_reduce_scatter_base": lambda a, r, w: (w - 1) / w * _nb(a["input"]),
    "reduce_scatter": lambda a, r, w: (w - 1) / w * sum(_nb(t) for t in a["input_list"]),
    "all_to_all_single": _a2a_single,
    "all_to_all": lambda a, r, w: sum(_nb(t) for i, t in enumerate(a["input_tensor_list"]) if i != r),
    "broadcast": lambda a, r, w: (w - 1) * _nb(a["tensor"]) if a.get("src") == dist.get_rank() else 0,
}


class Meter:
    """Bytes, collective wall time and calls, per open window label."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.depth = 0
        self.reset()

    def reset(self) -> None:
        self.bytes: dict[str, float] = {}
        self.comm_s: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.ops: dict[str, dict[str, float]] = {}
        self.ns_s: dict[str, float] = {}  # DeepSpeed muon_update wall time, per window
        self.ns_cpu: dict[str, float] = {}  # ... and its process CPU time
        self.ns_calls = 0  # DeepSpeed muon_update calls (= matrices orthogonalised by this rank)

    def add(self, op: str, nbytes: float, secs: float) -> None:
        for label in self.stack:
            self.bytes[label] = self.bytes.get(label, 0.0) + nbytes
            self.comm_s[label] = self.comm_s.get(label, 0.0) + secs
            self.calls[label] = self.calls.get(label, 0) + 1
            per = self.ops.setdefault(label, {})
            per[op] = per.get(op, 0.0) + nbytes

    def add_ns(self, secs: float, cpu: float) -> None:
        self.ns_calls += 1
        for label in self.stack:
            self.ns_s[label] = self.ns_s.get(label, 0.0) + secs
            self.ns_cpu[label] = self.ns_cpu.get(label, 0.0) + cpu

    @contextmanager
    def window(self, label: str):
        self.stack.append(label)
        try:
            yield
        finally:
            self.stack.pop()


METER = Meter()


def install_comm_meter() -> None:
    for name, rule in RULES.items():
        orig = getattr(c10d, name, None)
        if orig is None:
            continue
        sig = inspect.signature(orig)

        def wrapper(*args, _orig=orig, _sig=sig, _rule=rule, _name=name, **kwargs):
            if not METER.stack or METER.depth:
                return _orig(*args, **kwargs)  # outside any window, or a wrapper calling another
            bound = _sig.bind(*args, **kwargs)
            bound.apply_defaults()
            group = bound.arguments.get("group")
            w, r = dist.get_world_size(group), dist.get_rank(group)
            nbytes = _rule(bound.arguments, r, w) if w > 1 else 0.0
            METER.depth += 1
            t0 = time.perf_counter()
            try:
                return _orig(*args, **kwargs)
            finally:
                METER.depth -= 1
                METER.add(_name, nbytes, time.perf_counter() - t0)

        functools.update_wrapper(wrapper, orig)
        if getattr(dist, name, None) is orig:
            setattr(dist, name, wrapper)
        setattr(c10d, name, wrapper)


install_comm_meter()  # before deepspeed caches torch.distributed.all_gather_into_tensor & co.

import deepspeed  # noqa: E402
from deepspeed.utils import safe_get_full_fp32_param  # noqa: E402

from disco_ds import Scion, scion_param_groups  # noqa: E402
from disco_ds.distributed import Layout, shutdown_and_exit, zero3_layout, zero12_layout  # noqa: E402
from disco_ds.optim.norms import lmo_many, make_norm  # noqa: E402
from disco_ds.optim import SCION_GROUP_DEFAULTS  # noqa: E402


def install_ns_timer() -> None:
    """Time DeepSpeed's ``muon_update`` (imported at call time by ZeRO, so the module attribute is it)."""
    from deepspeed.runtime.zero.muon import original_muon

    orig = original_muon.muon_update

    def timed_muon_update(*args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return orig(*args, **kwargs)
        finally:
            METER.add_ns(time.perf_counter() - t0, time.process_time() - c0)

    original_muon.muon_update = timed_muon_update


# ----------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------


class Block(nn.Module):
    """``up d→h``, ``mix d→d`` (square), ``down h→d``: three hidden matrices of unequal sizes."""

    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d, hidden, bias=False)
        self.mix = nn.Linear(d, d, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mix(x) * 0.5
        return x + self.down(F.gelu(self.up(x)))


class Net(nn.Module):
    """Embedding, ``layers`` blocks of three hidden matrices (no biases), an RMSNorm gain and a head.

    Names contain ``embed`` / ``lm_head`` so that DeepSpeed's Muon leaves exactly those two
    matrices (and the 1-D gain) to its auxiliary Adam, and Scion classifies them as embedding
    and output: the hidden matrices are the same set for every optimizer.
    """

    def __init__(self, vocab: int, d: int, layers: int, mult: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.ModuleList(Block(d, mult * d) for _ in range(layers))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.norm(x))
        return F.cross_entropy(logits.float().reshape(-1, self.vocab), ids.roll(-1, dims=1).reshape(-1))

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


def build_model(cfg: dict) -> Net:
    torch.manual_seed(0)
    return Net(cfg["vocab"], cfg["d_model"], cfg["layers"], cfg["mult"])


# ----------------------------------------------------------------------------------------------
# The naive baseline
# ----------------------------------------------------------------------------------------------


class NaiveAllGatherScion(torch.optim.Optimizer):
    """Scion's update computed by all-gathering everything (the baseline, ZeRO 1/2/3 only).

    Per param group, in ``step()``: momentum (and Nesterov blend) on the local flat fp32
    partition, exactly as Scion; then one ``all_gather_into_tensor`` of that partition in
    ``comm_dtype`` (the local slice is kept at full precision, as Scion keeps local fragments),
    so every rank rebuilds every full parameter of the group; the group's LMO
    (``disco_ds.optim.norms``, i.e. Newton–Schulz for hidden matrices, row / token norms on the full
    matrices) runs on every parameter on every rank; each rank keeps the slice of the update it
    holds and applies ``p ← (1 − lr·wd)·p − lr·ρ·u``. Same mathematics as Scion, W-fold work.
    """

    def __init__(self, param_groups: list[dict[str, Any]], comm_dtype: torch.dtype = torch.bfloat16) -> None:
        super().__init__(param_groups, dict(SCION_GROUP_DEFAULTS))
        self.comm_dtype = comm_dtype
        self._members = [list(g["params"]) for g in self.param_groups]
        for i, g in enumerate(self.param_groups):
            g["naive_gid"] = i
        self._layouts: dict[Any, tuple[Layout, list[torch.Tensor]]] = {}
        self.matrices_orthogonalized = 0

    def _layout(self, flat: torch.Tensor, members: list[torch.Tensor]) -> tuple[Layout, list[torch.Tensor]]:
        key = (id(flat), flat.data_ptr(), flat.numel())
        if key not in self._layouts:
            if getattr(members[0], "_z3_optimizer", None) is not None:
                self._layouts[key] = zero3_layout(flat, members)
            else:
                self._layouts[key] = (zero12_layout(members), members)
        return self._layouts[key]

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = group["params"]
            if not params:
                continue  # ZeRO-3 empties the groups it is not stepping
            members = self._members[group["naive_gid"]]
            flat = params[0]
            if len(params) != 1 or flat.dim() != 1 or any(flat is m for m in members):
                raise RuntimeError("NaiveAllGatherScion only runs under DeepSpeed ZeRO 1/2/3 (one flat partition per group)")
            layout, _ = self._layout(flat, members)
            m = float(group["momentum"])
            state = self.state[flat]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(flat)
            d = state["exp_avg"]
            d.mul_(1.0 - m).add_(flat.grad, alpha=m)
            direction = d.mul(1.0 - m).add_(flat.grad, alpha=m) if group["nesterov"] else d
            world = layout.world_size
            if world > 1:
                wire = torch.empty(world * flat.numel(), dtype=self.comm_dtype)
                dist.all_gather_into_tensor(wire, direction.to(self.comm_dtype), group=layout.group)
                gathered = wire.view(world, -1).to(flat.dtype)
                gathered[layout.rank].copy_(direction)
            else:
                gathered = direction.view(1, -1)
            full = [torch.empty(layout.numel(i), dtype=flat.dtype) for i in range(len(layout.shapes))]
            for r, frags in enumerate(layout.fragments):
                for f in frags:
                    full[f.member][f.start : f.start + f.numel] = gathered[r, f.offset : f.offset + f.numel]
            norm = make_norm(group["norm"], ns_steps=int(group["ns_steps"]), ns_method=group["ns_method"],
                             ns_gram=group["ns_gram"])
            updates = lmo_many(norm, [t.view(s) for t, s in zip(full, layout.shapes)])
            if norm.min_ndim >= 2 and hasattr(norm, "ns_steps"):
                self.matrices_orthogonalized += len(updates)
            update = torch.zeros_like(flat)
            for f in layout.local():
                update[f.offset : f.offset + f.numel] = updates[f.member].reshape(-1)[f.start : f.start + f.numel]
            lr = float(group["lr"])
            decay = 1.0 - lr * float(group["weight_decay"])
            if decay != 1.0:
                flat.mul_(decay)
            flat.add_(update, alpha=-lr * float(group["scale"]))
        return None


# ----------------------------------------------------------------------------------------------
# Engines
# ----------------------------------------------------------------------------------------------


class StepTimer:
    """Replaces ``opt.step`` on the instance: wall and CPU time of the client optimizer's step()."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.orig = opt.step
        self.wall = 0.0
        self.cpu = 0.0
        opt.step = self  # type: ignore[method-assign]

    def __call__(self, *args, **kwargs):
        with METER.window("client"):
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                return self.orig(*args, **kwargs)
            finally:
                self.wall += time.perf_counter() - t0
                self.cpu += time.process_time() - c0

    def pop(self) -> tuple[float, float]:
        out = (self.wall, self.cpu)
        self.wall = self.cpu = 0.0
        return out


def ds_config(cfg: dict, stage: int) -> dict:
    zero: dict[str, Any] = {"stage": stage}
    if stage in (1, 2):
        # What disco_ds's trainer sets without clipping (build._skips_gradient_norm), given to all
        # three engines alike: nothing reads the norm, and DeepSpeed Muon accepts it as well.
        zero["compute_grad_norm"] = False
    if stage == 3 and cfg.get("z3_reduce_scatter") is False:
        zero["reduce_scatter"] = False
    return {
        "train_micro_batch_size_per_gpu": cfg["micro_batch"],
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def muon_config(cfg: dict) -> dict:
    return {
        "type": "Muon",
        "params": {
            "lr": cfg["lr"],
            "momentum": 0.9,  # β = 0.9 ≡ Scion m = 0.1 (muon_update is Nesterov, so Scion runs nesterov=True)
            "weight_decay": 0.0,
            "ns_method": cfg["ds_ns_method"],
            "torch_adam": True,  # the auxiliary Adam (embedding, head, gain): torch's, no JIT-built op
        },
    }


def build_engine(kind: str, cfg: dict, stage: int) -> dict:
    model = build_model(cfg)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = ds_config(cfg, stage)
    comm_dtype = getattr(torch, cfg["comm_dtype"])
    groups = lambda: scion_param_groups(model, lr=cfg["lr"], momentum=0.1, nesterov=True, ns_steps=5,  # noqa: E731
                                        ns_gram=cfg["ns_gram"])
    if kind == "ours":
        opt = Scion(groups(), comm_dtype=comm_dtype)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    elif kind == "naive":
        opt = NaiveAllGatherScion(groups(), comm_dtype=comm_dtype)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=config)
    elif kind == "ds_muon":
        config["optimizer"] = muon_config(cfg)
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
        opt = engine.optimizer.optimizer  # MuonWithAuxAdam inside the ZeRO wrapper
        if stage == 3:
            z3 = engine.optimizer
            orig = z3._apply_muon_to_accumulated_grads

            def timed_apply():
                with METER.window("dsmuon"):
                    return orig()

            z3._apply_muon_to_accumulated_grads = timed_apply
    else:
        raise ValueError(kind)
    timer = StepTimer(engine.optimizer.optimizer if kind == "ds_muon" else opt)
    muon_tagged = sum(1 for p in model.parameters() if getattr(p, "use_muon", False))
    return {"kind": kind, "engine": engine, "opt": opt, "timer": timer, "init": init, "muon_tagged": muon_tagged}


def probe_ds_muon_default(cfg: dict, stage: int) -> str | None:
    """Build DS Muon with the default ZeRO-3 config; return DeepSpeed's refusal, if any."""
    model = build_model(cfg)
    config = ds_config({**cfg, "z3_reduce_scatter": None}, stage)
    config["optimizer"] = muon_config(cfg)
    try:
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    except Exception as exc:  # noqa: BLE001 - we report whatever DeepSpeed raises
        return f"{type(exc).__name__}: {exc}"
    del engine
    return None


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------


def batches(cfg: dict, count: int, rank: int, world: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(count):
        full = torch.randint(0, cfg["vocab"], (cfg["micro_batch"] * world, cfg["seq"]), generator=gen)
        out.append(full[rank * cfg["micro_batch"] : (rank + 1) * cfg["micro_batch"]])
    return out


def iteration(e: dict, batch: torch.Tensor) -> dict:
    engine, timer = e["engine"], e["timer"]
    timer.pop()
    METER.reset()
    bytes_before = e["opt"].stats.bytes_sent if e["kind"] == "ours" else 0
    t0, c0 = time.perf_counter(), time.process_time()
    with METER.window("fb"):
        loss = engine(batch)
        engine.backward(loss)
    t1, c1 = time.perf_counter(), time.process_time()
    with METER.window("step"):
        engine.step()
    t2, c2 = time.perf_counter(), time.process_time()
    client_wall, client_cpu = timer.pop()
    ns_bwd = METER.ns_s.get("fb", 0.0)
    ns_bwd_cpu = METER.ns_cpu.get("fb", 0.0)
    rec = {
        "fb_cpu": (c1 - c0) - ns_bwd_cpu,
        "step_cpu": c2 - c1,
        "opt_cpu": (c2 - c1) + ns_bwd_cpu,
        "fb_raw": t1 - t0,
        "ns_in_bwd": ns_bwd,
        "fb": (t1 - t0) - ns_bwd,
        "step": t2 - t1,
        "opt": (t2 - t1) + ns_bwd,
        "iter": t2 - t0,
        "client": client_wall,
        "client_cpu": client_cpu,
        "client_comm": METER.comm_s.get("client", 0.0),
        "step_comm": METER.comm_s.get("step", 0.0),
        "dsmuon_time_comm": METER.comm_s.get("dsmuon", 0.0),
        "bytes_fb": METER.bytes.get("fb", 0.0),
        "bytes_step": METER.bytes.get("step", 0.0),
        "bytes_client": METER.bytes.get("client", 0.0),
        "bytes_client_a2a": METER.ops.get("client", {}).get("all_to_all_single", 0.0),
        "bytes_client_all_reduce": METER.ops.get("client", {}).get("all_reduce", 0.0),
        "bytes_dsmuon": METER.bytes.get("dsmuon", 0.0),
        "bytes_stats": (e["opt"].stats.bytes_sent - bytes_before) if e["kind"] == "ours" else 0.0,
        "loss": float(loss.detach()),
        "ns_calls": METER.ns_calls,
    }
    rec["bytes_iter"] = rec["bytes_fb"] + rec["bytes_step"]
    if e["kind"] in ("ours", "naive"):
        # Everything inside the client step(): ours' all_to_all (== opt.stats.bytes_sent) plus the
        # all_reduce of the row / token / vector norms; naive's all-gather.
        rec["bytes_opt"] = rec["bytes_client"]
    else:  # ZeRO-3: the Muon update's own collectives; ZeRO-1/2: none beyond the common reduction
        rec["bytes_opt"] = rec["bytes_dsmuon"]
    rec["ops_step"] = METER.ops.get("step", {})
    rec["ops_fb"] = METER.ops.get("fb", {})
    return rec


TIME_KEYS = ("fb_raw", "ns_in_bwd", "fb", "step", "opt", "iter", "client", "client_cpu", "client_comm", "step_comm",
             "fb_cpu", "step_cpu", "opt_cpu")
BYTE_KEYS = ("ns_calls", "bytes_fb", "bytes_step", "bytes_client", "bytes_client_a2a", "bytes_client_all_reduce",
             "bytes_dsmuon", "bytes_stats", "bytes_iter", "bytes_opt")


def update_difference(a: dict, b: dict) -> dict:
    """‖Δa − Δb‖ / ‖Δa‖ over the hidden matrices and over all parameters (Δ = final − initial)."""
    out = {}
    num = {"hidden": 0.0, "all": 0.0}
    den = {"hidden": 0.0, "all": 0.0}
    for (name, pa), (_, pb) in zip(a["engine"].module.named_parameters(), b["engine"].module.named_parameters()):
        fa, fb = safe_get_full_fp32_param(pa), safe_get_full_fp32_param(pb)
        if fa is None or fb is None:
            continue
        da = fa.float().cpu() - a["init"][name]
        db = fb.float().cpu() - b["init"][name]
        kinds = ["all"] + (["hidden"] if name.startswith("blocks.") else [])
        for k in kinds:
            num[k] += float((da - db).square().sum())
            den[k] += float(da.square().sum())
    for k in num:
        out[k] = math.sqrt(num[k] / den[k]) if den[k] > 0 else float("nan")
    return out


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_path = sys.argv[2]
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    stage = cfg["stage"]
    if cfg.get("compile"):
        # What train.compile does: Scion's (and the naive baseline's) Newton–Schulz iteration
        # torch.compile-d, as DeepSpeed ships its muon_update.
        from disco_ds.optim.newton_schulz import compile_iteration

        compile_iteration()
    kinds = cfg["optimizers"]
    install_ns_timer()
    result: dict[str, Any] = {"stage": stage, "world": world, "optimizers": {}, "notes": []}

    refusal = None
    if "ds_muon" in kinds and stage == 3:
        refusal = probe_ds_muon_default(cfg, stage)
        if refusal:
            result["notes"].append(f"DS Muon refused the default ZeRO-3 config: {refusal}; "
                                   "all three engines run with zero_optimization.reduce_scatter=false")
            cfg["z3_reduce_scatter"] = False
    result["ds_muon_default_refusal"] = refusal
    result["z3_reduce_scatter"] = cfg.get("z3_reduce_scatter")

    engines = []
    for kind in kinds:
        try:
            engines.append(build_engine(kind, cfg, stage))
        except Exception as exc:  # noqa: BLE001 - a refused configuration is a result, not a crash
            msg = f"{type(exc).__name__}: {exc}"
            result["optimizers"][kind] = {"error": msg}
            result["notes"].append(f"{kind} failed to build: {msg}")
            if rank == 0:
                traceback.print_exc()
    for e in engines:
        result["optimizers"][e["kind"]] = {"muon_tagged": e["muon_tagged"]}

    total = cfg["warmup"] + cfg["steps"]
    data = batches(cfg, total, rank, world)
    records: dict[str, list[dict]] = {e["kind"]: [] for e in engines}
    failed: set[str] = set()
    for it in range(total):
        order = engines[it % len(engines):] + engines[: it % len(engines)] if engines else []
        for e in order:
            if e["kind"] in failed:
                continue
            dist.barrier()
            try:
                rec = iteration(e, data[it])
            except Exception as exc:  # noqa: BLE001
                failed.add(e["kind"])
                msg = f"{type(exc).__name__}: {exc}"
                result["optimizers"][e["kind"]]["error"] = msg
                result["notes"].append(f"{e['kind']} failed in iteration {it}: {msg}")
                if rank == 0:
                    traceback.print_exc()
                continue
            if it >= cfg["warmup"]:
                records[e["kind"]].append(rec)
            if rank == 0 and cfg.get("verbose"):
                print(f"[stage {stage} W {world}] it {it} {e['kind']}: fb {rec['fb']*1e3:.0f} ms "
                      f"step {rec['step']*1e3:.0f} ms ns_bwd {rec['ns_in_bwd']*1e3:.0f} ms loss {rec['loss']:.3f}",
                      flush=True)

    for e in engines:
        kind = e["kind"]
        recs = records[kind]
        if kind in failed or not recs:
            continue
        med = torch.tensor([statistics.median(r[k] for r in recs) for k in TIME_KEYS], dtype=torch.float64)
        dist.all_reduce(med, op=dist.ReduceOp.MAX)
        byt = torch.tensor([statistics.mean(r[k] for r in recs) for k in BYTE_KEYS], dtype=torch.float64)
        dist.all_reduce(byt, op=dist.ReduceOp.SUM)
        entry = result["optimizers"][kind]
        entry.update({k: float(v) for k, v in zip(TIME_KEYS, med)})
        entry.update({k: float(v) for k, v in zip(BYTE_KEYS, byt)})
        entry["rank0_ops_step"] = recs[-1]["ops_step"]
        entry["rank0_ops_fb"] = recs[-1]["ops_fb"]
        entry["final_loss"] = recs[-1]["loss"]
        entry["samples"] = len(recs)
        # Matrices orthogonalised per step, summed over ranks (ns_calls: DeepSpeed's muon_update calls).
        per_step = e["opt"].stats.matrices_orthogonalized if kind == "ours" else (
            e["opt"].matrices_orthogonalized if kind == "naive" else 0)
        orth = torch.tensor([per_step / total], dtype=torch.float64)
        dist.all_reduce(orth)
        entry["matrices_per_step"] = float(orth.item()) if kind != "ds_muon" else entry["ns_calls"]
        if kind == "ours":
            routed = local = 0
            for value in e["opt"].provider.layouts.values():
                layout = value[0] if isinstance(value, tuple) else value
                if len(layout.shapes) < 2:
                    continue  # the embedding, head and gain groups hold one parameter each
                for m in range(len(layout.shapes)):
                    if len(layout.whole_holders(m)) == 1:
                        local += 1
                    else:
                        routed += 1
            entry["matrices_whole_on_one_rank"] = local
            entry["matrices_split"] = routed

    by_kind = {e["kind"]: e for e in engines if e["kind"] not in failed}
    if "ours" in by_kind and "naive" in by_kind:
        result["ours_vs_naive_update_diff"] = update_difference(by_kind["ours"], by_kind["naive"])

    if rank == 0:
        result["config"] = cfg
        with open(out_path, "w") as fh:
            json.dump(result, fh, indent=1)
    shutdown_and_exit()


if __name__ == "__main__":
    main()
