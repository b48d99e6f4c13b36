"""Portable Scion checkpoints: resume a DeepSpeed run at a different world size or ZeRO stage.

When to use it:

* **resume at a different world size or ZeRO stage**: :func:`save_portable` from the running job,
  :func:`load_portable` into a freshly initialised engine with any number of data-parallel ranks
  and any ZeRO stage (0, 1, 2, 3);
* **in ``disco_ds train``**: nothing to call. Every checkpoint holds a portable file
  (``checkpoint.portable``), and a resume at another world size or ZeRO stage loads it when
  ``checkpoint.allow_change=true`` (:mod:`disco_ds.trainer.resume`);
* **same world size (and stage)**: use ``engine.save_checkpoint`` / ``engine.load_checkpoint``.
  They are bit-identical, keep DeepSpeed's own bookkeeping (loss scaler, data sampler, client
  state) and do not gather full tensors on rank 0.

DeepSpeed's own answer to resharding, the universal checkpoint (``ds_to_universal``), cannot read
a run that uses a client optimizer: it needs Megatron's ``universal_checkpoint_info`` client state
and only converts Adam's ``exp_avg`` / ``exp_avg_sq``.

The portable file is one ``torch.save`` dictionary written by rank 0 (atomically: a temporary file
in the same folder, then ``os.replace``). It holds, keyed by the model's parameter names, full
unsharded tensors, so its content does not depend on how the saving job was sharded:

* ``params``: the fp32 master weight of every trainable parameter (the model weight itself at stage
  0 in fp32), and the current value of every frozen parameter;
* ``exp_avg``: Scion's full momentum of every parameter that has one (none before the first step,
  none in a group with ``momentum = 1``);
* ``param_groups``: each Scion group's hyperparameters (``lr``, ``momentum``, ``norm``, ...) with
  the names of its parameters, which is how groups are matched on load;
* ``global_steps``, ``global_samples``, ``skipped_steps`` of the engine, Scion's ``steps`` counter
  (it counts ``step()`` calls, which DeepSpeed makes once per group or sub-group under ZeRO, so
  only "has stepped" carries meaning across stages), and the engine's LR scheduler state (when it
  has one; the file is read with ``torch.load(weights_only=True)``, so that state must hold plain
  values).

How it works at each stage (every call is collective: all ranks of the job must call it):

* ZeRO-1/2 (and DeepSpeed's ``BF16_Optimizer``): DeepSpeed links every model parameter to its
  fragment of the flat fp32 partition (``_hp_mapping``). Saving uses
  ``safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` (one ``all_reduce`` each).
  Loading creates ``exp_avg = zeros_like(flat partition)`` in Scion's state, re-links the
  optimizer-state fragments, writes each rank's fragments with ``safe_set_full_fp32_param`` /
  ``safe_set_full_optimizer_state`` and refreshes the (bf16 or fp32) model weights from the fp32
  masters with the wrapper's ``update_lp_params`` (an all-gather).
* ZeRO-3: saving uses the same two ``safe_get_full_*`` helpers (an all-gather each). Loading
  writes each rank's padded slice with ``safe_set_local_fp32_param`` /
  ``safe_set_local_optimizer_state`` into the sub-group's flat fp32 partition, copies the fp32
  partitions into the model's parameter partitions and re-gathers the persistent parameters, as
  ``engine.load_checkpoint`` does.
* Stage 0 (data parallel, whole parameters): Scion's state is keyed by the parameter (or, with a
  bf16 model, by DeepSpeed's per-parameter fp32 master); tensors are read and written directly.

Two DeepSpeed 0.19.8 quirks are worked around here (see the functions' comments):

* ZeRO-1/2 link the optimizer-state fragments once, right after the *first* param group's first
  ``step()``, when the later groups have no state yet: for every parameter outside the first group
  ``safe_get_full_optimizer_state(p, "exp_avg")`` raises ``ValueError: exp_avg not found`` on the
  ranks that hold a fragment, while the others enter the ``all_reduce`` (a hang). The fragments
  are re-linked here before every use.
* ZeRO-3 ``safe_set_full_fp32_param`` / ``safe_set_full_optimizer_state`` fail on the last rank
  (``start + length exceeds dimension size``) for every parameter whose size is not a multiple of
  the world size, because they cut the unpadded full tensor at padded offsets. The local
  ``safe_set_local_*`` helpers are used with a zero-padded slice instead.

Usage (every rank)::

    save_portable(engine, optimizer, "run/step1000.portable")      # W=64, ZeRO-3
    ...                                                              # new job, W=48, ZeRO-2
    engine, *_ = deepspeed.initialize(model=model, optimizer=Scion(groups), config=cfg)
    load_portable(engine, engine.optimizer, "run/step1000.portable")
    # continue from engine.global_steps with the same global batch size

Not covered: tensor, pipeline or sequence parallelism (refused), fp16 dynamic loss-scaler state (bf16 and fp32 have none), data-loader / sampler
state, client state, NVMe-offloaded optimizer state (ZeRO-Infinity swapping).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from disco_ds.distributed import accelerator_device, logical_shape, raise_if_any_failed
from disco_ds.integrations.pipeline import NormGPTPipeline
from disco_ds.optim import Scion

__all__ = ["save_portable", "load_portable", "named_parameters", "PORTABLE_FORMAT"]

PORTABLE_FORMAT = "disco_ds.portable_scion/1"
"""Value of the file's ``format`` key; :func:`load_portable` refuses anything else."""

MOMENTUM_KEY = "exp_avg"
_GROUP_KEYS_NOT_RESTORED = ("params", "scion_gid", "param_names")


# --------------------------------------------------------------------------- how the engine is sharded


class _Layout:
    """Where Scion's fp32 masters and momentum live in one engine (built identically on every rank)."""

    def __init__(self, engine: Any, optimizer: Any) -> None:
        self.pipeline = engine.module if isinstance(engine.module, NormGPTPipeline) else None
        """This stage of a NormGPT pipeline (its parameters are whole; they go by Hugging Face names)."""
        if (getattr(engine, "mpu", None) is not None and self.pipeline is None) or int(getattr(engine, "sequence_parallel_size", 1) or 1) > 1:
            raise NotImplementedError("disco_ds.integrations.reshard: data parallelism and NormGPT pipelines only (no tensor "
                                      "or sequence parallelism: their shards are not full tensors)")
        self.engine = engine
        self.scion = _find_scion(optimizer if optimizer is not None else engine.optimizer)
        self.wrapper = engine.optimizer
        self.named = named_parameters(engine)
        self.names: dict[int, str] = {id(p): n for n, p in self.named}
        # Ranks that hold the same parameters (all of them, without a pipeline).
        self.replica_group = self.pipeline._grid.get_data_parallel_group() if self.pipeline is not None else None
        self.group_of: dict[int, int] = {}  # id(model parameter) -> index in scion.param_groups
        self.group_names: list[list[str]] = []
        for i, group in enumerate(self.scion.param_groups):
            members = self.scion._members[group["scion_gid"]]
            names = []
            for p in members:
                if id(p) not in self.names:
                    raise ValueError("disco_ds.integrations.reshard: a Scion parameter is not a parameter of engine.module")
                self.group_of[id(p)] = i
                names.append(self.names[id(p)])
            self.group_names.append(names)
        if hasattr(self.wrapper, "fp32_partitioned_groups_flat"):
            self.mode = "zero3"
            if getattr(self.wrapper, "swap_optimizer", False):
                raise NotImplementedError("disco_ds.integrations.reshard: ZeRO-3 with NVMe-swapped optimizer state is not supported")
            # id(model parameter) -> ZeRO-3 sub-group (one flat fp32 partition each)
            self.sub_group_of = {id(p): sg for sg, params in enumerate(self.wrapper.fp16_groups) for p in params}
        elif any(hasattr(p, "_hp_mapping") for m in self.scion._members for p in m):
            self.mode = "flat"  # ZeRO-1/2 or BF16_Optimizer: one flat fp32 partition per group
        else:
            self.mode = "replicated"  # stage 0: whole parameters (or per-parameter fp32 masters)
            self.master_of: dict[int, torch.Tensor] = {}
            for group in self.scion.param_groups:
                members = self.scion._members[group["scion_gid"]]
                params = group["params"]
                if [tuple(p.shape) for p in params] != [tuple(m.shape) for m in members]:
                    raise NotImplementedError(
                        f"disco_ds.integrations.reshard: optimizer wrapper {type(self.wrapper).__name__} at stage 0 does not hand "
                        "Scion one tensor per parameter; not supported")
                for master, member in zip(params, members):
                    self.master_of[id(member)] = master

    def flat_of_group(self, i: int) -> torch.Tensor:
        """ZeRO-1/2: the flat fp32 partition of Scion group ``i`` (between steps DeepSpeed leaves it there)."""
        params = self.scion.param_groups[i]["params"]
        if len(params) != 1 or params[0].dim() != 1:
            raise RuntimeError("disco_ds.integrations.reshard: expected one flat ZeRO partition per Scion param group")
        return params[0]

    def state_tensor_of(self, p: torch.Tensor) -> torch.Tensor | None:
        """The tensor Scion keys ``p``'s state by: flat partition, ZeRO-3 sub-group flat, or master."""
        if id(p) not in self.group_of:
            return None
        if self.mode == "zero3":
            return self.wrapper.fp32_partitioned_groups_flat[self.sub_group_of[id(p)]]
        if self.mode == "flat":
            return self.flat_of_group(self.group_of[id(p)])
        return self.master_of[id(p)]

    def has_momentum(self, p: torch.Tensor) -> bool:
        t = self.state_tensor_of(p)
        return t is not None and MOMENTUM_KEY in self.scion.state.get(t, {})

    def relink_momentum_fragments(self) -> None:
        """ZeRO-1/2: point every parameter's ``_hp_mapping.optim_fragment`` at the current state.

        DeepSpeed does this once, after the first group's first step (``_lazy_init_hp_params_
        optimizer_state``), so later groups stay unlinked. ``lazy_init_hp_params_optimizer_state``
        only narrows views of the state tensors, so calling it again is harmless.
        """
        if self.mode != "flat":
            return
        from deepspeed.utils import lazy_init_hp_params_optimizer_state

        for i, group in enumerate(self.scion.param_groups):
            members = self.scion._members[group["scion_gid"]]
            lazy_init_hp_params_optimizer_state(members, self.flat_of_group(i), self.scion.state)


def named_parameters(engine: Any) -> list[tuple[str, torch.Tensor]]:
    """The engine's parameters under the names the portable file uses: the module's own, or for a
    NormGPT pipeline stage the Hugging Face names of its parts' parameters (a pipelined run's file
    is then the file the one-stage run writes)."""
    if isinstance(engine.module, NormGPTPipeline):
        return engine.module.hf_named_parameters()
    return list(engine.module.named_parameters())


def _find_scion(optimizer: Any) -> Scion:
    """``optimizer`` itself or the Scion inside DeepSpeed's wrapper(s) (``.optimizer`` chain)."""
    seen = 0
    while not isinstance(optimizer, Scion):
        optimizer = getattr(optimizer, "optimizer", None)
        seen += 1
        if optimizer is None or seen > 8:
            raise TypeError("disco_ds.integrations.reshard: no disco_ds.Scion optimizer found (pass the Scion object or engine.optimizer)")
    return optimizer


def _collective() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


# --------------------------------------------------------------------------- save


@torch.no_grad()
def save_portable(engine: Any, optimizer: Any, path: str | os.PathLike[str]) -> None:
    """Write a world-size-independent checkpoint of model weights, Scion momentum and step counters.

    Call it on every rank (it gathers full tensors with collectives), between optimizer steps
    (after ``engine.step()``, not in the middle of gradient accumulation). Rank 0 writes ``path``
    atomically; the call returns on every rank after the file is in place.

    Args:
        engine: the ``deepspeed.DeepSpeedEngine`` (ZeRO stage 0, 1, 2 or 3; fp32 or bf16 model).
        optimizer: the :class:`disco_ds.Scion` passed to ``deepspeed.initialize`` (or
            ``engine.optimizer``, or ``None`` for ``engine.optimizer``).
        path: the file to write (its folder must exist, on a file system rank 0 can write to).

    Raises:
        TypeError: if the engine's optimizer is not (a DeepSpeed wrapper around) Scion.
        disco_ds.distributed.RankCheckError: on every rank, when rank 0 could not write ``path``
            (naming it and the cause).
        NotImplementedError: for an optimizer layout this module does not know (see the module docstring).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    layout = _Layout(engine, optimizer)
    named = layout.named
    # The rank that writes what this rank's replicas hold: rank 0, or each stage's first
    # data-parallel rank, whose parts then travel to rank 0.
    rank = dist.get_rank(layout.replica_group) if _collective() else 0
    layout.relink_momentum_fragments()

    # Which parameters have momentum must be decided identically on every rank that holds them
    # (each one is a collective below): the minimum over those ranks of the local answer, on the
    # communication device.
    has_momentum = torch.tensor([1.0 if layout.has_momentum(p) else 0.0 for _, p in named], dtype=torch.float32,
                                device=accelerator_device())
    if _collective():
        dist.all_reduce(has_momentum, op=dist.ReduceOp.MIN, group=layout.replica_group)

    params: dict[str, torch.Tensor] = {}
    momentum: dict[str, torch.Tensor] = {}
    error: str | None = None
    for (name, p), with_momentum in zip(named, has_momentum.tolist()):
        if id(p) not in layout.group_of:
            params[name] = _frozen_value(layout, p)
            continue
        if layout.mode == "replicated":
            weight = layout.master_of[id(p)].detach()
            exp_avg = layout.scion.state[layout.master_of[id(p)]][MOMENTUM_KEY] if with_momentum else None
        else:
            weight = safe_get_full_fp32_param(p)
            exp_avg = safe_get_full_optimizer_state(p, MOMENTUM_KEY) if with_momentum else None
        if rank == 0:
            params[name] = _for_file(weight, p)
            if exp_avg is not None:
                momentum[name] = _for_file(exp_avg, p)

    groups = []
    if rank == 0:
        for i, group in enumerate(layout.scion.param_groups):
            hyper = {k: v for k, v in group.items() if k != "params"}
            groups.append({"names": layout.group_names[i], "hyperparameters": hyper})
    if layout.pipeline is not None and rank == 0:
        params, momentum, groups = _gather_stages(layout.pipeline, params, momentum, groups)
    if rank == 0 and (layout.pipeline is None or dist.get_rank() == 0):
        scheduler = getattr(engine, "lr_scheduler", None)
        record = {
            "format": PORTABLE_FORMAT,
            "params": params,
            MOMENTUM_KEY: momentum,
            "param_groups": groups,
            "global_steps": int(engine.global_steps),
            "global_samples": int(engine.global_samples),
            "skipped_steps": int(getattr(engine, "skipped_steps", 0)),
            "scion_steps": int(layout.scion.steps),
            "lr_scheduler": scheduler.state_dict() if scheduler is not None and hasattr(scheduler, "state_dict") else None,
            "saved_world_size": dist.get_world_size() if _collective() else 1,
            "saved_zero_stage": int(engine.zero_optimization_stage()),
            "saved_pp_size": layout.pipeline.num_stages if layout.pipeline is not None else 1,
        }
        try:
            _atomic_save(record, Path(path))
        except Exception as err:  # noqa: BLE001 -- the other ranks must hear of it, not wait in a barrier
            error = f"{path}: {type(err).__name__}: {err}"
    # Instead of a barrier: rank 0's verdict, the same error on every rank when the write failed.
    raise_if_any_failed(error, None, accelerator_device(), f"writing the portable checkpoint {path}")


def _gather_stages(pipeline: NormGPTPipeline, params: dict[str, torch.Tensor], momentum: dict[str, torch.Tensor],
                   groups: list[dict[str, Any]]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], list[dict[str, Any]]]:
    """On the first data-parallel rank of every stage: every stage's tensors and groups at rank 0
    (an object gather over that column of stages; the tensors are in host memory already). A
    role's groups on several stages become one group, names in stage order, as a one-stage run
    has it. Others than rank 0 get empty results."""
    column = pipeline._grid.get_pipe_parallel_group()
    stages: list[Any] = [None] * pipeline.num_stages if dist.get_rank() == 0 else None
    dist.gather_object((params, momentum, groups), stages, dst=0, group=column)
    if dist.get_rank() != 0:
        return {}, {}, []
    merged_params: dict[str, torch.Tensor] = {}
    merged_momentum: dict[str, torch.Tensor] = {}
    merged_groups: dict[str, dict[str, Any]] = {}
    for stage_params, stage_momentum, stage_groups in stages:
        merged_params.update(stage_params)
        merged_momentum.update(stage_momentum)
        for group in stage_groups:
            label = str(group["hyperparameters"].get("role", len(merged_groups)))
            if label in merged_groups:
                merged_groups[label]["names"] = merged_groups[label]["names"] + group["names"]
            else:
                merged_groups[label] = group
    # Hugging Face order (the embedding, the blocks, the head), as a one-stage file lists them.
    return merged_params, merged_momentum, list(merged_groups.values())


def _for_file(t: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """A gathered full tensor as the file stores it: fp32, in ``p``'s logical shape, in host memory
    (it has left the collectives: only ``torch.save`` reads it)."""
    return t.detach().float().reshape(logical_shape(p)).cpu().clone()


def _frozen_value(layout: _Layout, p: torch.Tensor) -> torch.Tensor:
    """A parameter outside the optimizer: its current full value (a collective at ZeRO-3)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().cpu().clone()
    return p.detach().float().cpu().clone()


def _atomic_save(record: dict[str, Any], path: Path) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(record, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


# --------------------------------------------------------------------------- load


@torch.no_grad()
def load_portable(engine: Any, optimizer: Any, path: str | os.PathLike[str], *, strict: bool = True) -> dict[str, Any]:
    """Restore a :func:`save_portable` file into a freshly initialised engine, at any world size or stage.

    Call it on every rank, after ``deepspeed.initialize`` and before the first training step (every
    rank reads ``path``, so it must be visible to all of them). The data-parallel world size and
    the ZeRO stage may differ from the saving job's; keep the global batch size (micro-batch ·
    accumulation · world size) for the run to continue as it would have.

    It sets the fp32 master weights and the model's own (bf16 or fp32) weights, Scion's
    ``exp_avg`` momentum (zeros for a parameter saved without one, which is what Scion's first
    step would create), every Scion group's hyperparameters, Scion's step counter, the engine's
    ``global_steps`` / ``global_samples`` / ``skipped_steps`` and the LR scheduler state. The next
    ``engine.step()`` continues the saved run.

    Args:
        engine: the new ``deepspeed.DeepSpeedEngine`` (same model and Scion param groups as the saver).
        optimizer: its :class:`disco_ds.Scion` (or ``engine.optimizer``, or ``None``).
        path: the file written by :func:`save_portable`.
        strict: refuse a file whose parameter names differ from the model's (otherwise missing
            parameters keep their current values and extra ones are ignored).

    Returns:
        The file's metadata: ``global_steps``, ``global_samples``, ``saved_world_size``,
        ``saved_zero_stage``.

    Raises:
        ValueError: for a file that is not a portable Scion checkpoint, or whose parameter names,
            shapes or param groups do not match the model and optimizer.
        disco_ds.distributed.RankCheckError: under a NormGPT pipeline, on every rank, when they do
            not match on some stage (naming the ranks and why).
    """
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    layout = _Layout(engine, optimizer)
    record = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(record, dict) or record.get("format") != PORTABLE_FORMAT:
        raise ValueError(f"disco_ds.integrations.reshard: {path} is not a portable Scion checkpoint (format {PORTABLE_FORMAT!r})")
    saved_params: dict[str, torch.Tensor] = record["params"]
    saved_momentum: dict[str, torch.Tensor] = record[MOMENTUM_KEY]
    named = layout.named
    error = _names_and_shapes_error(named, saved_params, strict, layout.pipeline)
    group_map: dict[int, dict[str, Any]] = {}
    if error is None:
        try:
            group_map = _match_groups(layout, record["param_groups"])
        except ValueError as err:
            error = str(err)
    if layout.pipeline is not None and _collective():
        # Each stage checks its own parameters: a stage that refused alone would leave the others
        # waiting in the collectives below.
        raise_if_any_failed(error, None, accelerator_device(), f"loading the portable checkpoint {path}")
    elif error is not None:
        raise ValueError(error)

    z3 = layout.wrapper if layout.mode == "zero3" else None
    if z3 is not None:
        z3.checkpoint_event_prologue()  # release gathered (persistent) parameters, as load_checkpoint does

    # 1. Scion's momentum state must exist, in the flat-partition shape, before it can be written:
    # zeros (what Scion's first step would create) for every group that uses momentum or has
    # saved momentum; at stage 0 only for the parameters saved with one.
    momentum_groups = {i for i, g in enumerate(layout.scion.param_groups) if float(g["momentum"]) < 1.0}
    momentum_groups |= {layout.group_of[id(p)] for n, p in named if n in saved_momentum and id(p) in layout.group_of}
    for name, p in named:
        if id(p) not in layout.group_of:
            continue
        wanted = name in saved_momentum if layout.mode == "replicated" else layout.group_of[id(p)] in momentum_groups
        t = layout.state_tensor_of(p)
        if wanted and MOMENTUM_KEY not in layout.scion.state.get(t, {}):
            layout.scion.state[t][MOMENTUM_KEY] = torch.zeros_like(t, memory_format=torch.preserve_format)
    layout.relink_momentum_fragments()

    # 2. Each rank writes its own slices (no communication).
    for name, p in named:
        if name not in saved_params:
            continue
        weight = saved_params[name]
        if id(p) not in layout.group_of:
            _set_frozen(p, weight)
            continue
        exp_avg = saved_momentum.get(name)
        if layout.mode == "replicated":
            master = layout.master_of[id(p)]
            master.copy_(weight.to(device=master.device, dtype=master.dtype))
            if master is not p:
                p.data.copy_(master.data.to(p.dtype))
            if exp_avg is not None:
                layout.scion.state[master][MOMENTUM_KEY].copy_(exp_avg.to(master.device))
        elif layout.mode == "flat":
            device = layout.flat_of_group(layout.group_of[id(p)]).device
            safe_set_full_fp32_param(p, weight.to(device))
            if MOMENTUM_KEY in layout.scion.state.get(layout.state_tensor_of(p), {}):
                value = exp_avg if exp_avg is not None else torch.zeros_like(weight)
                safe_set_full_optimizer_state(p, value.to(device), MOMENTUM_KEY)
        else:
            _set_zero3_local(layout, p, weight, None)
            if MOMENTUM_KEY in layout.scion.state.get(layout.state_tensor_of(p), {}):
                _set_zero3_local(layout, p, exp_avg if exp_avg is not None else torch.zeros_like(weight), MOMENTUM_KEY)

    # 3. The model's own weights follow the fp32 masters (DeepSpeed does this only inside step()).
    if layout.mode == "flat":
        layout.wrapper.update_lp_params()
    elif z3 is not None:
        for sub_group in range(len(z3.fp16_groups)):
            z3._reassign_or_swap_out_partitioned_parameters(sub_group)
        z3.checkpoint_event_epilogue()  # re-gather persistent parameters from the new partitions

    # 4. Hyperparameters and counters.
    for i, saved in group_map.items():
        group = layout.scion.param_groups[i]
        for key, value in saved["hyperparameters"].items():
            if key not in _GROUP_KEYS_NOT_RESTORED:
                group[key] = value
    scheduler = getattr(engine, "lr_scheduler", None)
    if scheduler is not None and record.get("lr_scheduler") is not None and hasattr(scheduler, "load_state_dict"):
        scheduler.load_state_dict(record["lr_scheduler"])
    engine.global_steps = int(record["global_steps"])
    engine.global_samples = int(record["global_samples"])
    engine.skipped_steps = int(record.get("skipped_steps", 0))
    layout.scion.steps = int(record.get("scion_steps", 0))
    if _collective():
        dist.barrier()
    return {k: record[k] for k in ("global_steps", "global_samples", "saved_world_size", "saved_zero_stage")}


def _names_and_shapes_error(named: list[tuple[str, torch.Tensor]], saved: dict[str, torch.Tensor], strict: bool,
                            pipeline: NormGPTPipeline | None) -> str | None:
    """Why the file's parameters do not fit the model's (None when they do). Under a pipeline the
    names of every stage together must be the file's (one object all-gather over the stages), and
    each stage finds its own there."""
    names = {n for n, _ in named}
    if pipeline is not None and _collective():
        column = pipeline._grid.get_pipe_parallel_group()
        stages: list[Any] = [None] * pipeline.num_stages
        dist.all_gather_object(stages, sorted(names), group=column)
        every = set().union(*map(set, stages))
        missing, unexpected = sorted(names - set(saved)), sorted(set(saved) - every)
    else:
        missing, unexpected = sorted(names - set(saved)), sorted(set(saved) - names)
    if strict and (missing or unexpected):
        return (f"disco_ds.integrations.reshard: parameter names differ from the checkpoint; missing: {missing}, "
                f"unexpected: {unexpected} (pass strict=False to load the common ones)")
    for name, p in named:
        if name in saved and tuple(saved[name].shape) != logical_shape(p):
            return (f"disco_ds.integrations.reshard: {name} has shape {logical_shape(p)} in the model but "
                    f"{tuple(saved[name].shape)} in the checkpoint")
    return None


def _match_groups(layout: _Layout, saved_groups: list[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """Scion group index -> saved group, matched by the names of their parameters."""
    by_names = {tuple(g["names"]): g for g in saved_groups}
    matched = {}
    for i, names in enumerate(layout.group_names):
        saved = by_names.get(tuple(names))
        if saved is None and layout.pipeline is not None:
            # A stage holds a run of a group's parameters (its blocks' share of the hidden group).
            saved = next((g for g in saved_groups if set(names) <= set(g["names"])), None)
        if saved is None:
            raise ValueError(f"disco_ds.integrations.reshard: Scion param group {i} ({names}) has no saved group with the same "
                             f"parameters; saved groups: {[g['names'] for g in saved_groups]}")
        matched[i] = saved
    return matched


def _set_zero3_local(layout: _Layout, p: torch.Tensor, full: torch.Tensor, key: str | None) -> None:
    """ZeRO-3: write this rank's (zero-padded) slice of ``full`` into the fp32 partition or state.

    ``safe_set_full_fp32_param`` would cut the unpadded tensor at ``rank · partition_numel`` and
    fail on the last rank whenever ``numel`` is not a multiple of the world size (DeepSpeed 0.19.8).
    """
    from deepspeed import comm as ds_comm
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    pn = int(p.partition_numel())
    rank = ds_comm.get_rank(group=p.ds_process_group)
    flat = full.reshape(-1).float()
    local = torch.zeros(pn, dtype=torch.float32, device=layout.state_tensor_of(p).device)
    start = rank * pn
    n = max(0, min(pn, flat.numel() - start))
    if n > 0:
        local[:n] = flat[start : start + n]
    if key is None:
        safe_set_local_fp32_param(p, local)
    else:
        safe_set_local_optimizer_state(p, local, key)


def _set_frozen(p: torch.Tensor, value: torch.Tensor) -> None:
    """A parameter outside the optimizer: set its full value (a collective at ZeRO-3)."""
    if hasattr(p, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if dist.get_rank() == 0:
                p.data.copy_(value.reshape(p.shape).to(device=p.device, dtype=p.dtype))
        return
    p.data.copy_(value.reshape(p.shape).to(device=p.device, dtype=p.dtype))
