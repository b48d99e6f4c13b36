"""The cost model behind ``disco_ds plan``: Scion's exchange and the cost of a step on a cluster
that is not there.

From a recipe's shapes alone (the model is built on the meta device, nothing is allocated) this
module rebuilds, for every rank of a world of W ranks, exactly the layouts the live optimizer
builds from DeepSpeed's bookkeeping, by DeepSpeed 0.19.8's own partitioning rules:

* ZeRO-1/2 (``DeepSpeedZeroOptimizer`` and ``BF16_Optimizer``): each param group's trainable
  parameters are flattened in group order, padded to a multiple of ``2·W``
  (``nccl_start_alignment_factor · dp`` in ``stage_1_and_2.py`` and ``bf16_optimizer.py``), and
  cut into W equal contiguous partitions;
* ZeRO-3: every parameter is split on its own into ``ceil(numel / W)`` entries per rank (the last
  ranks padded), and a param group is cut into sub-groups of about ``sub_group_size`` partition
  entries (``stage3.py::_create_fp16_sub_groups``);
* stage 0: every rank holds every parameter;
* tensor parallelism (AutoTP): each rank's data-parallel layout of its shards (AutoTP's own
  ``get_shard_size_list`` split; TP groups are consecutive ranks) lifted to the logical matrices
  as :func:`disco_ds.distributed.tensor_parallel.lift_layout` does.

Each layout is a :class:`~disco_ds.distributed.layout.Layout` with ``group=None`` and the rank it
describes, planned by :func:`disco_ds.distributed.exchange.matrix_plan`, the same function the
live optimizer calls; ``tests/test_cluster_plan.py`` checks that the layouts and plans equal the
live ones, rank by rank, on real DeepSpeed engines.

The time model (every constant is a default the command line can change):

* Newton–Schulz: the owner's FLOPs (:func:`~disco_ds.distributed.exchange.matrix_cost`) at the GPU's
  dense bf16 peak times an assumed MFU;
* the exchange: each round is one ``all_to_all_single`` forward, the owners' Newton–Schulz, one
  back. A round lasts as long as its slowest rank; a rank's transfer takes the larger of its
  intra-node bytes over NVLink and its inter-node bytes over InfiniBand (the two links work in
  parallel, sending and receiving full duplex). Latency is not modelled.
* row/column norms: one fp32 ring all-reduce of the sums of squares per group;
* the training step: ``flops_per_token`` (the trainer's MFU formula) times the tokens of one
  GPU at the same MFU, plus the gradient and parameter collectives DeepSpeed issues at the chosen
  ZeRO stage (ring volumes, at the slowest link), minus what ``overlap_comm`` hides under the
  backward pass.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from disco_ds.distributed.exchange import RoundPlan, matrix_cost, matrix_plan, separable_sums_span_ranks
from disco_ds.distributed.layout import Fragment, Layout, shape_numel
from disco_ds.distributed.tensor_parallel import TPSpec, partition_dim_of
from disco_ds.optim.norms import MatrixNorm, Norm, SeparableNorm, make_norm
from disco_ds.trainer.config import ConfigError, RunConfig, load_config
from disco_ds.trainer.scaling import Plan, data_parallel_size, plan_run

__all__ = [
    "GPU",
    "GPUS",
    "NVLINK_GBPS",
    "INFINIBAND_GBPS",
    "DEFAULT_MFU",
    "Cluster",
    "GroupShapes",
    "PlannedLayout",
    "RankLoad",
    "StageOption",
    "ClusterPlan",
    "resolve_recipe",
    "optimizer_groups",
    "cluster_layouts",
    "rank_loads",
    "representative_ranks",
    "plan_cluster",
    "format_plan",
    "format_summary_table",
]


@dataclass(frozen=True)
class GPU:
    """What the time and memory model needs of one accelerator."""

    name: str
    bf16_tflops: float
    """Dense bf16 tensor-core peak, TFLOP/s."""
    memory_gb: float
    """HBM capacity, GB (10⁹ bytes, as the datasheets count)."""
    source: str


GPUS: dict[str, GPU] = {
    "h100": GPU("H100 SXM", 989.0, 80.0, "NVIDIA H100 datasheet: 989 TFLOP/s bf16 dense (1,979 with sparsity), 80 GB HBM3"),
    "h200": GPU("H200 SXM", 989.0, 141.0, "NVIDIA H200 datasheet: the H100's compute (989 TFLOP/s bf16 dense), 141 GB HBM3e"),
}
NVLINK_GBPS = 450.0
"""GB/s per GPU per direction inside a node: NVLink 4 on H100/H200 SXM moves 900 GB/s per GPU,
both directions together (NVIDIA H100 datasheet)."""
INFINIBAND_GBPS = 50.0
"""GB/s per GPU per direction between nodes: one ConnectX-7 NDR InfiniBand port of 400 Gb/s per
GPU, as in a DGX H100 (8 ports for 8 GPUs)."""
DEFAULT_MFU = 0.4
"""Assumed fraction of the bf16 peak that both the model's matmuls and Newton–Schulz reach
(a well-tuned dense transformer on H100s reaches 0.35–0.5; bf16 Newton–Schulz is large matmuls)."""
OVERLAP_SM_SHARE = 0.15
"""Compute lost per second of communication hidden under the backward pass: NCCL runs one thread
block per channel, 16–32 channels on NVLink/InfiniBand, on an H100/H200's 132 SMs (12–24%), so an
overlapped collective is not free. :attr:`StageOption.cost_s` charges it."""
TIE_SHARE = 0.01
"""ZeRO settings whose added time differs by less than this share of the step's compute count as
equal; the recommendation then takes the lowest stage."""
GPUS_PER_NODE = 8
_GB = 1e9
_CONTEXT_BYTES = 2**30  # CUDA context and allocator slack the memory estimate leaves out (memory.py)


@dataclass(frozen=True)
class Cluster:
    """The machine a plan is made for."""

    world_size: int
    """Launched ranks (GPUs); data parallel = world / tp."""
    tp_size: int = 1
    gpu: GPU = GPUS["h100"]
    gpus_per_node: int = GPUS_PER_NODE
    intra_gbps: float = NVLINK_GBPS
    inter_gbps: float = INFINIBAND_GBPS
    mfu: float = DEFAULT_MFU

    @property
    def flops(self) -> float:
        """Sustained FLOP/s of one GPU: peak · MFU."""
        return self.gpu.bf16_tflops * 1e12 * self.mfu

    def same_node(self, a: int, b: int) -> bool:
        return a // self.gpus_per_node == b // self.gpus_per_node

    def ring_gbps(self) -> float:
        """Bandwidth of a ring collective over all ranks: its slowest link."""
        return self.inter_gbps if self.world_size > self.gpus_per_node else self.intra_gbps


def resolve_recipe(name: str | Path) -> Path:
    """A recipe file from a path or a short name (``tiny``, ``gpt-1.3b``, ``1.3b``), looked up in
    ``recipes/`` here and in this checkout.

    Raises:
        ConfigError: nothing matches, naming the recipes found.
    """
    path = Path(name)
    if path.is_file():
        return path
    folders = [Path("recipes"), Path(__file__).resolve().parents[2] / "recipes"]
    for folder in folders:
        for candidate in (folder / f"{name}.yaml", folder / f"gpt-{name}.yaml", folder / str(name)):
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})
    raise ConfigError(f"recipe {str(name)!r} does not exist; accepted: a YAML path or one of {known}")


# ---------------------------------------------------------------------------- shapes


@dataclass(frozen=True)
class GroupShapes:
    """One Scion param group as the optimizer sees it: its index (``scion_gid``), geometry and
    parameters in group order, with each one's tensor-parallel split (None: not split)."""

    gid: int
    role: str
    norm: Norm
    names: list[str]
    shapes: list[tuple[int, ...]]
    """Logical (unsharded) shapes."""
    specs: list[TPSpec | None]

    def shard_shapes(self, tp_rank: int) -> list[tuple[int, ...]]:
        """The shapes TP rank ``tp_rank`` holds."""
        return [shape if spec is None else spec.shard_shape(tp_rank) for shape, spec in zip(self.shapes, self.specs)]


def optimizer_groups(cfg: RunConfig, model_config: Any, tp_size: int = 1) -> list[GroupShapes]:
    """The param groups the trainer hands Scion, in order, from the model built on the meta device.

    Grouping depends only on the geometry keys, so the learning rate is a placeholder. Empty
    groups are dropped (DeepSpeed drops them); ``gid`` keeps Scion's own index. Under tensor
    parallelism each weight AutoTP splits gets DeepSpeed's own split sizes
    (``get_shard_size_list``, which :class:`~disco_ds.distributed.tensor_parallel.TPSpec` then
    describes as the live weights' metadata does).
    """
    from disco_ds.models.norm_gpt.modeling_norm_gpt import NormGPTForCausalLM
    from disco_ds.optim.param_groups import scion_param_groups

    o = cfg.optimizer
    with torch.device("meta"):
        model = NormGPTForCausalLM(model_config)
    groups = scion_param_groups(model, lr=1.0, lr_ratios=tuple(o.lr_ratios), vector_lr_ratio=o.vector_lr_ratio,
                                momentum=o.momentum, weight_decay=o.weight_decay, ns_steps=o.ns_steps, ns_method=o.ns_method,
                                ns_gram=o.ns_gram)
    out = []
    for gid, group in enumerate(groups):
        kept = [(name, p) for name, p in zip(group["param_names"], group["params"]) if p.requires_grad and p.numel() > 0]
        if not kept:
            continue
        shapes = [tuple(int(s) for s in p.shape) for _, p in kept]
        specs = [_tp_spec(name, shape, model_config, tp_size) for (name, _), shape in zip(kept, shapes)]
        out.append(GroupShapes(gid, group["role"], make_norm(group["norm"], ns_steps=group["ns_steps"], ns_method=group["ns_method"],
                                                                     ns_gram=group["ns_gram"]),
                               [name for name, _ in kept], shapes, specs))
    return out


def _tp_spec(name: str, shape: tuple[int, ...], model_config: Any, tp_size: int) -> TPSpec | None:
    """How AutoTP splits parameter ``name`` over ``tp_size`` ranks (the trainer's AutoTP plan)."""
    dim = partition_dim_of(name)
    if tp_size == 1 or dim is None:
        return None
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list
    from deepspeed.runtime.tensor_parallel.config import TPConfig

    meta = AutoTPMeta.from_model_config(model_config, TPConfig().tp_grain_size)
    # AutoTP names each replaced layer by its module path, which drives its split rule.
    sizes = tuple(int(s) for s in get_shard_size_list(shape[dim], tp_size, meta, name.removesuffix(".weight")))
    return TPSpec(dim=dim, sizes=sizes, logical_shape=(shape[0], shape[1]))


# ---------------------------------------------------------------------------- layouts


def zero12_fragments(shapes: Sequence[tuple[int, ...]], world: int) -> list[list[Fragment]]:
    """Per rank, its fragments of one ZeRO-1/2 flat group: flattened in order, padded to a
    multiple of ``2·world`` and split into equal partitions (DeepSpeed 0.19.8 without
    ``parameter_alignment``), each fragment at its offset in the rank's partition."""
    numels = [shape_numel(s) for s in shapes]
    alignment = 2 * world
    partition = math.ceil(sum(numels) / alignment) * alignment // world
    fragments: list[list[Fragment]] = [[] for _ in range(world)]
    start = 0
    for i, n in enumerate(numels):
        end = start + n
        for r in range(start // partition, min(world, math.ceil(end / partition))):
            lo, hi = max(start, r * partition), min(end, (r + 1) * partition)
            if hi > lo:
                fragments[r].append(Fragment(i, lo - start, hi - lo, lo - r * partition))
        start = end
    return fragments


def zero3_fragments(shapes: Sequence[tuple[int, ...]], world: int) -> list[list[Fragment]]:
    """Per rank, its fragments of one ZeRO-3 sub-group: ``ceil(numel / world)`` entries of every
    member, the members' partitions concatenated in order."""
    fragments: list[list[Fragment]] = [[] for _ in range(world)]
    offset = 0
    for i, shape in enumerate(shapes):
        numel = shape_numel(shape)
        pn = math.ceil(numel / world)
        for r in range(world):
            n = max(0, min(pn, numel - r * pn))
            if n > 0:
                fragments[r].append(Fragment(i, r * pn, n, offset))
        offset += pn
    return fragments


def _zero3_sub_groups(shapes: Sequence[tuple[int, ...]], world: int, sub_group_size: int) -> list[list[int]]:
    """Member indices of each ZeRO-3 sub-group: consecutive members until their partitions reach
    ``sub_group_size`` entries (``stage3.py::_create_fp16_sub_groups``)."""
    partitions = [math.ceil(shape_numel(s) / world) for s in shapes]
    if sub_group_size >= sum(partitions):
        return [list(range(len(shapes)))]
    groups, current, size = [], [], 0
    for i, pn in enumerate(partitions):
        current.append(i)
        size += pn
        if size >= sub_group_size or i == len(shapes) - 1:
            groups.append(current)
            current, size = [], 0
    return groups


@dataclass
class PlannedLayout:
    """One layout the live optimizer builds (one param group, or one ZeRO-3 sub-group of it)."""

    key: tuple[int, int]
    """``(scion_gid, ZeRO-3 sub-group or 0)``; ZeRO-3 numbers sub-groups across all param groups."""
    group: GroupShapes
    members: list[int]
    """The group's parameters in the layout, in layout order."""
    layout: Layout
    """The layout as rank 0 sees it (:meth:`for_rank` gives the others)."""

    def for_rank(self, rank: int) -> Layout:
        """The same layout as ``rank`` sees it. Everything a :class:`Layout` derives from its
        fragments is the same on every rank, so the copy shares it; only ``rank`` and the plan
        cache (whose keys do not include the rank) are its own."""
        layout = copy.copy(self.layout)
        layout.rank = rank
        layout.plans = {}
        return layout


def cluster_layouts(groups: Sequence[GroupShapes], world: int, tp_size: int, stage: int,
                    sub_group_size: int) -> list[PlannedLayout]:
    """Every layout of the run on ``world`` ranks (``world / tp_size`` data-parallel replicas) at ZeRO
    ``stage``, built from shapes by DeepSpeed's partitioning rules (module docstring)."""
    if world % tp_size:
        raise ValueError(f"tp_size={tp_size} does not divide the world size {world}")
    dp = world // tp_size
    out = []
    first_sub_group = 0  # ZeRO-3 numbers its sub-groups across all param groups
    for g in groups:
        shard_shapes = [g.shard_shapes(t) for t in range(tp_size)]
        if stage == 3:
            splits = {tuple(map(tuple, _zero3_sub_groups(s, dp, sub_group_size))) for s in shard_shapes}
            if len(splits) > 1:
                raise ValueError(f"param group {g.gid} ({g.role}) splits into different ZeRO-3 sub-groups on different "
                                 "TP ranks; raise zero_optimization.sub_group_size")
            sub_groups = _zero3_sub_groups(shard_shapes[0], dp, sub_group_size)
        else:
            sub_groups = [list(range(len(g.shapes)))]
        for sg, members in enumerate(sub_groups, start=first_sub_group if stage == 3 else 0):
            inner = []  # per TP rank, per DP rank: fragments of that rank's shards
            for t in range(tp_size):
                shapes = [shard_shapes[t][i] for i in members]
                if stage == 0:
                    inner.append([[Fragment(i, 0, shape_numel(s), 0) for i, s in enumerate(shapes)] for _ in range(dp)])
                elif stage == 3:
                    inner.append(zero3_fragments(shapes, dp))
                else:
                    inner.append(zero12_fragments(shapes, dp))
            shapes = [g.shapes[i] for i in members]
            if tp_size == 1:
                layout = Layout(shapes=shapes, fragments=inner[0], group=None, rank=0, replicated=stage == 0)
            else:
                layout = _lifted(shapes, [g.specs[i] for i in members], inner, stage == 0)
            out.append(PlannedLayout((g.gid, sg), g, members, layout))
        first_sub_group += len(sub_groups)
    return out


def _lifted(shapes: list[tuple[int, ...]], specs: list[TPSpec | None], inner: list[list[list[Fragment]]],
            replicated: bool) -> Layout:
    """The TP×DP layout of the logical matrices (grid rank = dp rank · tp + tp rank): each shard's
    fragments moved to the shard's place in its matrix; a weight not split over TP contributes
    from TP rank 0's copy only, and a replicated (stage-0) one from DP rank 0 only."""
    tp, dp = len(inner), len(inner[0])
    fragments, sources = [], []
    for grid in range(tp * dp):
        d, t = divmod(grid, tp)
        mine, contributing = [], []
        for f in inner[t][d]:
            spec = specs[f.member]
            start = f.start if spec is None else spec.block_start(t) + f.start
            lifted = Fragment(f.member, start, f.numel, f.offset)
            mine.append(lifted)
            if (d == 0 or not replicated) and (spec is not None or t == 0):
                contributing.append(lifted)
        fragments.append(sorted(mine, key=lambda f: (f.member, f.start)))
        sources.append(sorted(contributing, key=lambda f: (f.member, f.start)))
    blocks = {i: spec.sizes for i, spec in enumerate(specs) if spec is not None and spec.dim == 1}
    return Layout(shapes=shapes, fragments=fragments, group=None, rank=0, blocks=blocks, sources=sources)


# ---------------------------------------------------------------------------- per-rank loads


@dataclass
class RankLoad:
    """One rank's share of one optimizer step."""

    rank: int
    matrices: int = 0
    """Matrices it orthogonalises."""
    ns_flops: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    rounds: int = 0
    """Rounds of the matrix exchange: a forward ``all_to_all_single`` where fragments move to owners,
    and the reverse that returns the updates (an ``all_to_all_single``; at stage 0 one
    ``all_gather_into_tensor`` or a ``broadcast`` per owner)."""
    owner_peak_bytes: int = 0
    """Largest transient owner memory of any round (gathered matrices and their updates)."""
    per_round: list[tuple[int, int, int, int, int]] = field(default_factory=list, repr=False)
    """Per round: NS FLOPs, and the forward and reverse transfers' intra- and inter-node bytes
    (each the larger of sent and received)."""


def _per_link(cluster: Cluster, me: int, sent: list[int], received: list[int]) -> tuple[int, int, int, int]:
    """``(sent, received, intra-node bytes, inter-node bytes)`` of one collective from the bytes
    sent to and received from each peer; the per-link bytes are the larger direction (links are
    full duplex)."""
    intra = [0, 0]
    inter = [0, 0]
    for peer, (s, r) in enumerate(zip(sent, received)):
        link = intra if cluster.same_node(me, peer) else inter
        link[0] += s
        link[1] += r
    return sum(sent), sum(received), max(intra), max(inter)


def _transfer(cluster: Cluster, me: int, sends: list[list[Fragment]], receives: list[list[Fragment]],
              item: int) -> tuple[int, int, int, int]:
    """:func:`_per_link` of one ``all_to_all_single`` moving these fragments."""
    return _per_link(cluster, me, [sum(f.numel for f in frags) * item for frags in sends],
                     [sum(f.numel for f in frags) * item for frags in receives])


def _replicated_transfer(cluster: Cluster, me: int, step: RoundPlan, item: int) -> tuple[int, int, int, int]:
    """:func:`_per_link` of a stage-0 round's reverse, by the exchange's own accounting: an
    all-gather sends every peer this rank's share padded to the largest (``step.owner_numel``),
    broadcasts send each owner's exact share to every peer."""
    peers = range(len(step.owner_numel))
    if step.reverse == "all_gather":
        sent = received = [0 if r == me else max(step.owner_numel) * item for r in peers]
    else:
        sent = [0 if r == me else step.owner_numel[me] * item for r in peers]
        received = [0 if r == me else step.owner_numel[r] * item for r in peers]
    return _per_link(cluster, me, sent, received)


def rank_loads(planned: PlannedLayout, cluster: Cluster, ranks: Sequence[int], max_numel_per_rank: int,
               comm_bytes: int) -> list[RankLoad]:
    """Each of ``ranks``' share of one matrix layout's exchange, from
    :func:`~disco_ds.distributed.exchange.matrix_plan` run for that rank (``comm_bytes``: bytes per
    entry on the wire, 2 for bf16)."""
    norm = planned.group.norm
    assert isinstance(norm, MatrixNorm)
    out = []
    for rank in ranks:
        layout = planned.for_rank(rank)
        plan = matrix_plan(layout, norm, max_numel_per_rank)
        load = RankLoad(rank)
        load.owner_peak_bytes = plan.owner_peak_bytes
        for step in plan.rounds:
            flops = sum(matrix_cost(norm, layout.shapes[m]) for m in step.mine)
            sent, received, intra_f, inter_f = _transfer(cluster, rank, step.to_owners, step.from_holders, comm_bytes)
            if step.reverse in ("all_gather", "broadcast"):
                sent_r, received_r, intra_r, inter_r = _replicated_transfer(cluster, rank, step, comm_bytes)
            else:
                sent_r, received_r, intra_r, inter_r = _transfer(cluster, rank, step.to_holders, step.from_owners, comm_bytes)
            load.matrices += len(step.mine)
            load.ns_flops += flops
            load.bytes_sent += sent + sent_r
            load.bytes_received += received + received_r
            load.per_round.append((flops, intra_f, inter_f, intra_r, inter_r))
        load.rounds = len(plan.rounds)
        out.append(load)
    return out


PLAN_EVERY_RANK_BELOW = 4_000_000
"""Planning one rank walks every fragment of the layout, so planning all of them costs about
W × (all fragments). Above this many fragment visits (ZeRO-0/3 at hundreds of ranks) only the
representative ranks are planned (:func:`representative_ranks`)."""


def representative_ranks(layouts: Sequence[PlannedLayout], max_numel_per_rank: int) -> list[int]:
    """The ranks worth planning when planning all is too slow: rank 0, the last rank (the padded
    partitions), the rank with the least Newton–Schulz work, the one with the most, and the one
    that owns the most entries (it receives and sends back the most and holds the largest gathered
    matrices). Owners are the same in every rank's plan, so rank 0's plan tells them all."""
    world = layouts[0].layout.world_size
    cost, owned = [0] * world, [0] * world
    for planned in layouts:
        norm = planned.group.norm
        if isinstance(norm, MatrixNorm):
            for m, owner in matrix_plan(planned.for_rank(0), norm, max_numel_per_rank).owners.items():
                cost[owner] += matrix_cost(norm, planned.layout.shapes[m])
                owned[owner] += planned.layout.numel(m)
    ranks = range(world)
    return sorted({0, world - 1, min(ranks, key=lambda r: (cost[r], r)), max(ranks, key=lambda r: (cost[r], -r)),
                   max(ranks, key=lambda r: (owned[r], -r))})


def _separable_bytes(planned: PlannedLayout, world: int) -> int:
    """Bytes one rank sends in the fp32 ring all-reduce that completes a row/column/tensor norm's
    sums of squares (none when every rank holds every member whole, or every summed slice lies on
    one rank: the exchange then skips it)."""
    norm = planned.group.norm
    if (not isinstance(norm, SeparableNorm) or world == 1 or planned.layout.replicated
            or not separable_sums_span_ranks(planned.layout, norm)):
        return 0
    rows_cols = {"row": lambda s: shape_numel(s[:-1]), "col": lambda s: s[-1], "all": lambda s: 1}[norm.axis]
    stats = sum(max(1, rows_cols(s)) for s in planned.layout.shapes)
    return 2 * (world - 1) * stats * 4 // world


# ---------------------------------------------------------------------------- the step


@dataclass(frozen=True)
class StageOption:
    """A ZeRO stage and ``overlap_comm`` setting: DeepSpeed's gradient and parameter traffic per
    training step and the memory one GPU needs."""

    stage: int
    overlap_comm: bool
    wrapper: str
    """DeepSpeed's optimizer wrapper at this stage and precision."""
    reductions: int
    """Gradient reductions per step (ZeRO-2 and 3 reduce every micro-batch, ZeRO-0/1 once)."""
    comm_bytes: float
    """Bytes one GPU sends per step in DeepSpeed's gradient and parameter collectives."""
    comm_s: float
    exposed_s: float
    """The part of ``comm_s`` not hidden under the backward pass."""
    cost_s: float
    """What the setting adds to a step: ``exposed_s`` plus ``OVERLAP_SM_SHARE`` of the hidden part."""
    memory_bytes: float
    fits: bool
    grad_norm: str
    """Whether DeepSpeed computes a gradient norm Scion never uses, and how to switch it off."""


@dataclass
class ClusterPlan:
    """The plan ``disco_ds plan`` prints: per-rank exchange loads and the step's time model."""

    recipe: str
    cluster: Cluster
    stage: int
    overlap_comm: bool
    """The recipe's ``overlap_comm`` (DeepSpeed's default for its stage unless ``train.deepspeed`` sets it)."""
    run: Plan
    parameters: int
    layouts: list[PlannedLayout]
    loads: dict[int, RankLoad]
    """Per rank, summed over the matrix layouts."""
    exchange_s: float
    """Scion's matrix exchange: every round's forward transfer, Newton–Schulz and reverse transfer."""
    ns_s: float
    """The Newton–Schulz part of ``exchange_s`` (the busiest owner of each round)."""
    separable_s: float
    compute_s: float
    """Forward and backward of one GPU's tokens."""
    options: list[StageOption]
    recommended: StageOption | None

    @property
    def optimizer_s(self) -> float:
        return self.exchange_s + self.separable_s

    def option(self, stage: int, overlap: bool) -> StageOption | None:
        return next((o for o in self.options if o.stage == stage and o.overlap_comm == overlap), None)


def _default_max_gather_numel() -> int:
    """Scion's default ``max_gather_numel``: the trainer builds Scion without setting it."""
    from disco_ds.optim.scion import Scion

    return int(inspect.signature(Scion.__init__).parameters["max_gather_numel"].default)


def _stage_options(cfg: RunConfig, run: Plan, model_config: Any, cluster: Cluster, compute_s: float,
                   parameters: int) -> list[StageOption]:
    """Each ZeRO stage the recipe's precision allows, with and without ``overlap_comm``."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from disco_ds.trainer.build import engine_config
    from disco_ds.trainer.config import validate
    from disco_ds.trainer.memory import estimate_memory

    t = cfg.train
    dp = run.world_size
    psi = parameters / cluster.tp_size
    grad = 4 if t.grad_dtype == "float32" else 2
    weight = 2 if t.bf16 else 4
    ring = cluster.ring_gbps() * _GB
    allreduce = 2 * (dp - 1) / dp * psi * grad
    gather = (dp - 1) / dp * psi * weight
    reduce_scatter = (dp - 1) / dp * psi * grad
    micro_s = compute_s / run.accumulation
    backward_s = micro_s * 2 / 3  # backward ≈ 2× the forward's FLOPs
    out = []
    for stage in (0, 1, 2, 3):
        try:
            staged = validate(dataclasses.replace(cfg, train=dataclasses.replace(t, zero_stage=stage)))
        except ConfigError:
            continue  # a combination the trainer refuses (a bf16 model with fp32 gradients at stage 0)
        bf16_optimizer = stage == 1 and t.bf16 and t.grad_dtype == "float32"
        for overlap in (False, True):
            if (stage == 0 or bf16_optimizer) and overlap:
                continue  # one all-reduce after the last backward (the engine's, or BF16_Optimizer's): nothing to overlap
            ds_config = engine_config(staged, run, model_config)
            ds_config["zero_optimization"]["overlap_comm"] = overlap
            zero = DeepSpeedZeroConfig(**ds_config["zero_optimization"])
            hidden = backward_s if overlap else 0.0
            if stage == 0 or bf16_optimizer:
                reductions, volume = 1, allreduce + (gather if stage else 0)
                exposed = volume / ring
            elif stage == 1:
                # Reduced once, at the boundary; with overlap_comm inside the last backward.
                reductions, volume = 1, allreduce + gather
                exposed = max(0.0, allreduce / ring - hidden) + gather / ring
            elif stage == 2:
                # Reduced every micro-batch (DeepSpeed's "reduce_scatter" is a bucket all-reduce).
                reductions, volume = run.accumulation, run.accumulation * allreduce + gather
                exposed = run.accumulation * max(0.0, allreduce / ring - hidden) + gather / ring
            else:
                # Every micro-batch gathers the parameters for forward and backward and reduce-scatters
                # the gradients; overlapped, they hide under the whole micro-batch.
                reductions, volume = run.accumulation, run.accumulation * (2 * gather + reduce_scatter)
                exposed = run.accumulation * max(0.0, (2 * gather + reduce_scatter) / ring - (micro_s if overlap else 0.0))
            comm_s = volume / ring
            memory = estimate_memory(staged, run, model_config, ds_config).total(cfg.model.gradient_checkpointing)
            if not zero.compute_grad_norm:
                norm = "skipped (the trainer sets zero_optimization.compute_grad_norm=false)"
            elif stage == 3 or bf16_optimizer:
                norm = "computed; cannot be switched off here (DeepSpeed refuses compute_grad_norm=false)"
            else:
                norm = "computed by the engine"
            out.append(StageOption(stage, bool(zero.overlap_comm), "BF16_Optimizer" if bf16_optimizer else
                                   {0: "engine", 1: "DeepSpeedZeroOptimizer", 2: "DeepSpeedZeroOptimizer",
                                    3: "DeepSpeedZeroOptimizer_Stage3"}[stage],
                                   reductions, volume, comm_s, exposed,
                                   exposed + OVERLAP_SM_SHARE * (comm_s - exposed if overlap else 0.0), memory,
                                   memory + _CONTEXT_BYTES <= cluster.gpu.memory_gb * _GB, norm))
    return out


def plan_cluster(recipe: str | Path, cluster: Cluster, *, zero_stage: int | None = None, overrides: Sequence[str] = (),
                 max_gather_numel: int | None = None, ranks: Sequence[int] | None = None) -> ClusterPlan:
    """The plan of ``recipe`` on ``cluster`` at ``zero_stage`` (default: the recipe's).

    ``ranks``: the ranks whose exchange is planned (default: all of them, or only
    :func:`representative_ranks` when that would visit more than ``PLAN_EVERY_RANK_BELOW``
    fragments). Each planned rank's numbers are exact; the per-round maxima of the time model are
    then taken over the planned ranks.

    Raises:
        ConfigError: a bad recipe, override, stage, or TP size, naming the key and accepted values.
    """
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    from disco_ds.trainer.build import engine_config
    from disco_ds.trainer.memory import recipe_model
    from disco_ds.trainer.metrics import flops_per_token

    path = resolve_recipe(recipe)
    extra = list(overrides) + [f"train.tp_size={cluster.tp_size}"]
    if zero_stage is not None:
        extra.append(f"train.zero_stage={zero_stage}")
    cfg = load_config(path, extra)
    if cfg.optimizer.name != "scion":
        raise ConfigError(f"optimizer.name={cfg.optimizer.name!r}: disco_ds plan models Scion's exchange; accepted: 'scion'")
    if cfg.train.pp_size > 1:
        raise ConfigError(f"train.pp_size={cfg.train.pp_size}: disco_ds plan models data and tensor parallelism; "
                          "accepted: 1 (a pipeline stage's exchange is that of its blocks over the stage's data-parallel ranks)")
    run = plan_run(cfg, data_parallel_size(cfg, cluster.world_size))
    model_config = recipe_model(cfg)
    try:
        ds_config = engine_config(cfg, run, model_config)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"train: {err}") from None
    zero = DeepSpeedZeroConfig(**ds_config["zero_optimization"])
    groups = optimizer_groups(cfg, model_config, cluster.tp_size)
    layouts = cluster_layouts(groups, cluster.world_size, cluster.tp_size, cfg.train.zero_stage, int(zero.sub_group_size))
    max_numel = max_gather_numel if max_gather_numel is not None else _default_max_gather_numel()
    comm_bytes = torch.empty((), dtype=getattr(torch, cfg.optimizer.comm_dtype)).element_size()
    if ranks is None:
        visits = cluster.world_size * sum(len(f) for p in layouts for f in p.layout.fragments)
        ranks = range(cluster.world_size) if visits < PLAN_EVERY_RANK_BELOW else representative_ranks(layouts, max_numel)
    chosen = sorted(set(ranks))
    loads = {r: RankLoad(r) for r in chosen}
    exchange_s = ns_s = separable_s = 0.0
    for planned in layouts:
        if isinstance(planned.group.norm, MatrixNorm):
            per_rank = rank_loads(planned, cluster, chosen, max_numel, comm_bytes)
            for load in per_rank:
                total = loads[load.rank]
                total.matrices += load.matrices
                total.ns_flops += load.ns_flops
                total.bytes_sent += load.bytes_sent
                total.bytes_received += load.bytes_received
                total.rounds += load.rounds
                total.owner_peak_bytes = max(total.owner_peak_bytes, load.owner_peak_bytes)
                total.per_round.extend(load.per_round)
            for k in range(len(per_rank[0].per_round)):
                rounds = [load.per_round[k] for load in per_rank]
                ns = max(r[0] for r in rounds) / cluster.flops
                forward = max(max(r[1] / (cluster.intra_gbps * _GB), r[2] / (cluster.inter_gbps * _GB)) for r in rounds)
                reverse = max(max(r[3] / (cluster.intra_gbps * _GB), r[4] / (cluster.inter_gbps * _GB)) for r in rounds)
                exchange_s += forward + ns + reverse
                ns_s += ns
        else:
            separable_s += _separable_bytes(planned, cluster.world_size) / (cluster.ring_gbps() * _GB)
    counts = model_config.parameter_counts()
    flops = flops_per_token(counts["non_embedding"] + counts["head"], model_config.n_layer, model_config.d_model, run.seq_len)
    compute_s = flops * run.batch_tokens / cluster.world_size / cluster.flops
    options = _stage_options(cfg, run, model_config, cluster, compute_s, counts["total"])
    fitting = [o for o in options if o.fits]
    recommended = None
    if fitting:
        # The model counts bandwidth only (not the latency of ZeRO-3's many per-layer collectives):
        # settings within TIE_SHARE of the step of the cheapest are taken as equal, and the lowest
        # stage among them wins.
        best = min(o.cost_s for o in fitting)
        recommended = min((o for o in fitting if o.cost_s <= best + TIE_SHARE * compute_s), key=lambda o: (o.stage, o.cost_s))
    return ClusterPlan(path.stem, cluster, cfg.train.zero_stage, bool(zero.overlap_comm), run, counts["total"], layouts, loads, exchange_s, ns_s,
                       separable_s, compute_s, options, recommended)


# ---------------------------------------------------------------------------- output


def _num(x: float) -> str:
    """Three significant digits below 10, one decimal above (a tiny recipe's numbers stay visible)."""
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:.3g}"


def _mb(n: float) -> str:
    return _num(n / 1e6)


def _ms(s: float) -> str:
    return _num(s * 1e3)


def _training_step_s(plan: ClusterPlan) -> float:
    """Compute, what DeepSpeed's collectives add at the planned setting, and Scion's step."""
    option = plan.option(plan.stage, plan.overlap_comm)
    return plan.compute_s + (option.cost_s if option else 0.0) + plan.optimizer_s


def format_plan(plan: ClusterPlan, table_ranks: int = 16) -> str:
    """The report ``disco_ds plan`` prints for one world size: a per-rank table (or, above
    ``table_ranks`` ranks, min/median/max and the busiest ranks), the step's time model and
    the ZeRO stage comparison with its recommendation."""
    c, run = plan.cluster, plan.run
    loads = [plan.loads[r] for r in sorted(plan.loads)]
    lines = [
        f"plan        {plan.recipe}: {c.world_size} ranks = {run.world_size} data-parallel × tensor parallel {c.tp_size}, "
        f"ZeRO-{plan.stage}, overlap_comm {str(plan.overlap_comm).lower()}; {c.gpu.name} ({c.gpu.bf16_tflops:g} TFLOP/s "
        f"bf16 at MFU {c.mfu:g}, {c.gpu.memory_gb:g} GB), {c.gpus_per_node} per node, NVLink {c.intra_gbps:g} GB/s, "
        f"InfiniBand {c.inter_gbps:g} GB/s",
        f"model       {plan.parameters:,} parameters; batch {run.batch_tokens:,} tokens = {run.world_size} × "
        f"{run.micro_batch} seq × {run.accumulation} accumulation × {run.seq_len}",
        f"layouts     {len(plan.layouts)} (" + ", ".join(
            f"{p.group.role}: {len(p.members)} × {p.group.norm.name}"
            for p in plan.layouts) + ")",
        "",
        "| rank | matrices | NS GFLOP | sent MB | received MB | rounds | owner peak MB |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(label: str, load: RankLoad) -> str:
        return (f"| {label} | {load.matrices} | {_num(load.ns_flops / 1e9)} | {_mb(load.bytes_sent)} | "
                f"{_mb(load.bytes_received)} | {load.rounds} | {_mb(load.owner_peak_bytes)} |")

    if len(loads) <= table_ranks:
        lines += [row(str(load.rank), load) for load in loads]
    else:
        fields = ("matrices", "ns_flops", "bytes_sent", "bytes_received", "rounds", "owner_peak_bytes")
        for name, pick in (("min", min), ("median", statistics.median_low), ("max", max)):
            lines.append(row(name, RankLoad(-1, **{f: pick(getattr(load, f) for load in loads) for f in fields})))
        busiest = {max(loads, key=lambda load: (load.ns_flops, -load.rank)).rank,
                   max(loads, key=lambda load: (load.bytes_sent, -load.rank)).rank,
                   max(loads, key=lambda load: (load.owner_peak_bytes, -load.rank)).rank}
        lines += [row(f"busiest: {r}", plan.loads[r]) for r in sorted(busiest)]
        if len(loads) < c.world_size:
            lines.append(f"(planned {len(loads)} representative ranks of {c.world_size}: {[x.rank for x in loads]}; "
                         "see cluster_plan.representative_ranks)")
    step = _training_step_s(plan)
    lines += [
        "",
        f"optimizer   est. {_ms(plan.optimizer_s)} ms per step: matrix exchange {_ms(plan.exchange_s)} ms "
        f"(of which Newton–Schulz {_ms(plan.ns_s)} ms on each round's busiest owner), norm all-reduces "
        f"{_ms(plan.separable_s)} ms",
        f"step        est. {_ms(step)} ms = compute {_ms(plan.compute_s)} ms + DeepSpeed's collectives "
        f"{_ms(step - plan.compute_s - plan.optimizer_s)} ms + optimizer: the optimizer is "
        f"{100 * plan.optimizer_s / step:.2f}% of the step",
        "",
        "| ZeRO | overlap_comm | DeepSpeed wrapper | reductions/step | sent GB/step | comm ms | exposed ms | added ms | "
        "memory GiB | fits |",
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for o in plan.options:
        lines.append(f"| {o.stage} | {str(o.overlap_comm).lower()} | {o.wrapper} | {o.reductions} | "
                     f"{_num(o.comm_bytes / 1e9)} | {_ms(o.comm_s)} | {_ms(o.exposed_s)} | {_ms(o.cost_s)} | "
                     f"{_num(o.memory_bytes / 2**30)} | {'yes' if o.fits else 'no'} |")
    r = plan.recommended
    if r is None:
        lines.append(f"recommend   nothing fits in {c.gpu.memory_gb:g} GB: turn on model.gradient_checkpointing or lower "
                     "train.micro_batch")
    else:
        lines.append(
            f"recommend   ZeRO-{r.stage}, overlap_comm {str(r.overlap_comm).lower()}: the lowest stage within "
            f"{100 * TIE_SHARE:g}% of the step of the least added time ({_ms(r.cost_s)} ms; {r.reductions} gradient "
            f"reduction(s) per step, {_ms(r.exposed_s)} ms exposed) among the settings that fit ({_num(r.memory_bytes / 2**30)} GiB + ~1 GiB context ≤ {c.gpu.memory_gb:g} GB). "
            f"Gradient norm (unused by Scion): {r.grad_norm}")
    return "\n".join(lines)


def format_summary_table(plans: Sequence[ClusterPlan]) -> str:
    """One markdown row per plan (e.g. one recipe at several world sizes): the README's tables."""
    lines = [
        "| recipe | W | ZeRO | matrices (max rank) | NS GFLOP (max rank) | sent MB (max rank) | rounds | owner peak MB | "
        "optimizer ms | share of step | recommended |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for p in plans:
        loads = list(p.loads.values())
        r = p.recommended
        lines.append(
            f"| {p.recipe} | {p.cluster.world_size} | {p.stage} | {max(x.matrices for x in loads)} | "
            f"{_num(max(x.ns_flops for x in loads) / 1e9)} | {_mb(max(x.bytes_sent for x in loads))} | "
            f"{max(x.rounds for x in loads)} | {_mb(max(x.owner_peak_bytes for x in loads))} | {_ms(p.optimizer_s)} | "
            f"{100 * p.optimizer_s / _training_step_s(p):.2f}% | "
            + (f"ZeRO-{r.stage}, overlap_comm {str(r.overlap_comm).lower()} |" if r else "nothing fits |"))
    return "\n".join(lines)
