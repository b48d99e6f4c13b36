"""Tensor parallelism (Megatron-style, through DeepSpeed AutoTP) for NormGPT and for Scion.

Three pieces, none of them mathematics (that stays in :mod:`disco_ds.optim.norms`):

* **The sharding plan** of NormGPT for DeepSpeed's own AutoTP training
  (``"tensor_parallel": {"autotp_size": T, "partition_config": ...}``). DeepSpeed 0.19.8's
  automatic policy does not recognise NormGPT ("Not able to determine model policy
  automatically"), so :func:`autotp_config` names the layers: Wq, Wk, Wv, W1, W3 column-parallel
  (output split, whole heads per rank), Wo and W2 row-parallel (input split, one all-reduce after
  each), the head column-parallel over the vocabulary with its logits gathered (so the loss and
  every caller see full logits), the embedding replicated. AutoTP's training path has no
  gathering embedding: the partitioned embedding it builds (``_slice_embedding``) splits the
  hidden dimension and returns a plain ``nn.Embedding`` whose output stays split.
  The norms AutoTP cannot know about live in the model itself: the norm before Wo (over
  ``n_head·head_dim``) and before W2 (over the FFN width) see a split input and all-reduce their
  partial sums of squares (``sharded_rms_norm`` in the modeling file, switched on by the
  row-parallel layer it feeds); the per-head q/k/v norms are local because heads are never split.
* **Shard descriptions** read from what AutoTP attaches to each weight
  (``ds_autotp_universal_checkpoint_meta``: partition dim, partition sizes, logical shape).
* **The TP×DP layout** for Scion: :func:`lift_layout` turns the data-parallel layout of a rank's
  shards (ZeRO-1/2/3 fragments or stage-0 replicas) into one :class:`~disco_ds.distributed.Layout`
  over the whole grid whose members are the *logical* (unsharded) matrices. The owner machinery of
  :mod:`disco_ds.distributed` then gives every matrix exactly one owner in the grid, which gathers
  every fragment of every TP shard, orthogonalises the whole matrix once and returns each holder
  its slice (one ``all_to_all_single`` each way). Row and column norms complete their sums over the
  grid with one ``all_reduce``. A rank never applies an LMO to its own shard: the layout refuses to
  build unless the fragments of every logical matrix cover it exactly once (DeepSpeed issue #8437).

Usage (the optimizer must be built from the shards, after AutoTP replaced the weights, so
DeepSpeed gets a factory; ``disco_ds train`` does this for ``train.tp_size > 1``)::

    ds_config["tensor_parallel"] = autotp_config(model.config, tp_size)
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      optimizer=lambda _: Scion(scion_param_groups(model, lr=...)))

Every rank of one TP group must feed the same micro-batch (``groups.get_data_parallel_rank()``
selects the data). Checkpoints hold one file set per TP rank (``mp_rank_XX``);
:func:`disco_ds.integrations.export.load_fp32_state_dict` merges them into unsharded weights.

A row-parallel matrix (split along dim 1) is stored in the layout column block by column block
(``Layout.blocks``); the owner reassembles ``[rows, cols]`` before Newton–Schulz. Replicated
parameters (the embedding) appear once per TP rank; only TP rank 0's copy feeds gathers and sums
(``Layout.sources``) and every copy receives the same update.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from disco_ds.distributed.agreement import RankCheckError, injected_fault
from disco_ds.distributed.layout import Fragment, Layout

__all__ = [
    "COLUMN_PARALLEL",
    "ROW_PARALLEL",
    "autotp_config",
    "check_tensor_parallel_shapes",
    "TPSpec",
    "tp_spec",
    "is_tensor_parallel",
    "tensor_parallel_group",
    "data_parallel_group",
    "lift_layout",
    "partition_dim_of",
    "merge_tp_shards",
    "gather_tp_shards",
    "tp_checkpoint_ranks",
]

COLUMN_PARALLEL = (r".*\.w[qkv]\.weight$", r".*\.w[13]\.weight$")
"""NormGPT weights split along their output dimension (dim 0)."""
ROW_PARALLEL = (r".*\.w[o2]\.weight$",)
"""NormGPT weights split along their input dimension (dim 1)."""
VOCAB_PARALLEL_HEAD = (r"(^|.*\.)lm_head\.weight$",)
"""The head, split over the vocabulary (dim 0) with its logits gathered."""


def check_tensor_parallel_shapes(config: Any, tp_size: int) -> None:
    """Refuse shapes NormGPT cannot shard over ``tp_size`` ranks, naming the fix.

    Heads must divide evenly: the per-head q/k/v norms and grouped-query attention need whole
    heads, and every rank the same ratio of query to key/value heads. The FFN width and the
    vocabulary may split unevenly (AutoTP's partition sizes; the norm before W2 and the gathered
    logits do not depend on the split).
    """
    if tp_size < 1:
        raise ValueError(f"tp_size must be ≥ 1, got {tp_size}")
    if tp_size == 1:
        return
    n_head, n_kv = int(config.n_head), int(config.n_kv_head)
    if n_head % tp_size or n_kv % tp_size:
        raise ValueError(
            f"tensor parallelism over {tp_size} ranks needs n_head ({n_head}) and n_kv_head ({n_kv}) divisible by "
            f"{tp_size}: heads are never split (their q/k/v norms are per head). Choose tp_size among "
            f"{[t for t in range(1, n_kv + 1) if n_head % t == 0 and n_kv % t == 0]}"
        )
    if getattr(config, "tie_word_embeddings", False):
        raise ValueError("tensor parallelism needs an untied head (NormGPT keeps embedding and head untied)")


def autotp_config(config: Any, tp_size: int) -> dict[str, Any]:
    """The ``tensor_parallel`` section of a DeepSpeed config that shards NormGPT over ``tp_size``."""
    check_tensor_parallel_shapes(config, tp_size)
    return {
        "autotp_size": int(tp_size),
        "partition_config": {
            "use_default_specs": False,
            "layer_specs": [
                {"patterns": list(COLUMN_PARALLEL), "partition_type": "column"},
                {"patterns": list(ROW_PARALLEL), "partition_type": "row"},
                {"patterns": list(VOCAB_PARALLEL_HEAD), "partition_type": "column", "gather_output": True},
            ],
        },
    }


def partition_dim_of(name: str) -> int | None:
    """The dimension :func:`autotp_config` splits parameter ``name`` along (None: replicated)."""
    if any(re.match(p, name) for p in COLUMN_PARALLEL + VOCAB_PARALLEL_HEAD):
        return 0
    if any(re.match(p, name) for p in ROW_PARALLEL):
        return 1
    return None


@dataclass(frozen=True)
class TPSpec:
    """How a weight is split over the tensor-parallel group."""

    dim: int  # 0: rows (column-parallel, vocabulary-parallel), 1: columns (row-parallel)
    sizes: tuple[int, ...]  # extent along ``dim`` on each TP rank
    logical_shape: tuple[int, int]

    def shard_shape(self, tp_rank: int) -> tuple[int, int]:
        rows, cols = self.logical_shape
        return (self.sizes[tp_rank], cols) if self.dim == 0 else (rows, self.sizes[tp_rank])

    def block_start(self, tp_rank: int) -> int:
        """Where TP rank ``tp_rank``'s shard begins in the member's flat index space."""
        rows, cols = self.logical_shape
        before = sum(self.sizes[:tp_rank])
        return before * cols if self.dim == 0 else rows * before


def tp_spec(p: torch.Tensor) -> TPSpec | None:
    """The split of an AutoTP weight from ``ds_autotp_universal_checkpoint_meta`` (None: not split)."""
    meta = getattr(p, "ds_autotp_universal_checkpoint_meta", None)
    if meta is None or meta.get("replicated"):
        if getattr(p, "tensor_model_parallel", False) and meta is None:
            raise RuntimeError(
                "Scion: a weight is flagged tensor_model_parallel but carries no ds_autotp_universal_checkpoint_meta "
                "(DeepSpeed < 0.18.9?); its shard layout is unknown, and orthogonalising a shard alone is wrong "
                "(DeepSpeed issue #8437). Use DeepSpeed ≥ 0.18.9."
            )
        return None
    if meta.get("sub_param_sizes") or meta.get("sub_param_shape"):
        raise NotImplementedError("Scion: fused sub-parameter TP layers (packed QKV / gate-up) are not supported; "
                                  "keep q, k, v and gate, up as separate linear layers")
    shape = tuple(int(s) for s in meta["logical_shape"])
    dim = int(meta["partition_dim"])
    if len(shape) != 2 or dim not in (0, 1):
        raise NotImplementedError(f"Scion: TP weight of logical shape {shape} split along dim {dim} is not supported")
    sizes = tuple(int(s) for s in meta["partition_sizes"])
    if sum(sizes) != shape[dim]:
        raise RuntimeError(f"Scion: TP partition sizes {sizes} do not add up to dim {dim} of {shape}")
    return TPSpec(dim=dim, sizes=sizes, logical_shape=(shape[0], shape[1]))


def is_tensor_parallel(members: list[torch.Tensor]) -> bool:
    """Whether any parameter is a tensor-parallel shard."""
    return any(tp_spec(p) is not None for p in members)


def tensor_parallel_group() -> Any:
    """DeepSpeed's tensor-parallel process group (AutoTP sets it up in ``deepspeed.initialize``)."""
    from deepspeed.utils import groups

    return groups.get_tensor_model_parallel_group()


def data_parallel_group() -> Any:
    """DeepSpeed's data-parallel process group (ranks holding the same TP shards)."""
    from deepspeed.utils import groups

    return groups.get_data_parallel_group()


def lift_layout(inner: Layout, members: list[torch.Tensor], tp_group: Any = None, grid_group: Any = None) -> Layout:
    """The layout of the logical matrices over the whole TP×DP grid.

    Args:
        inner: this rank's data-parallel layout of its TP shards (``members`` in the same order;
            the same members on every TP rank, as DeepSpeed builds identical param groups).
        members: the parameters (shards) of ``inner``.
        tp_group: the tensor-parallel group (default: DeepSpeed's).
        grid_group: the group spanning TP×DP (default: the world).

    Collective over ``grid_group`` (one ``all_gather_object``). Raises if the grid's fragments do
    not cover every logical matrix exactly once, so no LMO can ever see a lone shard. The checks
    of this rank's own shards travel in the same gather, so a failure on any rank is raised by
    every rank, with the same message, instead of leaving the others in the next collective.
    """
    tp_group = tp_group if tp_group is not None else tensor_parallel_group()
    tp_rank, tp_world = dist.get_rank(tp_group), dist.get_world_size(tp_group)
    grid_rank, grid_world = dist.get_rank(grid_group), dist.get_world_size(grid_group)
    local: list[tuple[int, int, int, int, bool]] = []
    specs: list[TPSpec | None] = []
    try:
        specs = _shard_specs(inner, members, tp_rank, tp_world, grid_world)
        local = _grid_fragments(inner, specs, tp_rank)
        error = "(injected by the test hook)" if injected_fault("tp-layout") else None
    except (RuntimeError, NotImplementedError) as e:
        error = str(e)
    tables: list[Any] = [None] * grid_world
    dist.all_gather_object(tables, (local, error), group=grid_group)
    failed = [(r, e) for r, (_, e) in enumerate(tables) if e is not None]
    if failed:
        raise RankCheckError(f"Scion: the tensor-parallel layout check failed on {len(failed)} of {grid_world} ranks ("
                             + "; ".join(f"rank {r}: {e}" for r, e in failed) + ")")
    tables = [table for table, _ in tables]
    fragments = [sorted((Fragment(*t[:4]) for t in table), key=lambda f: (f.member, f.start)) for table in tables]
    sources = [sorted((Fragment(*t[:4]) for t in table if t[4]), key=lambda f: (f.member, f.start)) for table in tables]
    shapes = [spec.logical_shape if spec is not None else tuple(inner.shapes[i]) for i, spec in enumerate(specs)]
    blocks = {i: spec.sizes for i, spec in enumerate(specs) if spec is not None and spec.dim == 1}
    layout = Layout(shapes=shapes, fragments=fragments, group=grid_group, rank=grid_rank, blocks=blocks, sources=sources)
    _check_cover(layout)
    return layout


def _shard_specs(inner: Layout, members: list[torch.Tensor], tp_rank: int, tp_world: int,
                 grid_world: int) -> list[TPSpec | None]:
    """This rank's shard descriptions, checked against the TP group (raises RuntimeError)."""
    if grid_world != tp_world * inner.world_size:
        raise RuntimeError(f"Scion: the grid has {grid_world} ranks but TP × DP = {tp_world} × {inner.world_size}; "
                           "pipeline parallelism with tensor parallelism is not supported")
    specs = [tp_spec(p) for p in members]
    for i, spec in enumerate(specs):
        if spec is None:
            continue
        if len(spec.sizes) != tp_world:
            raise RuntimeError(f"Scion: member {i} is split {len(spec.sizes)} ways but the TP group has {tp_world} ranks")
        if tuple(inner.shapes[i]) != spec.shard_shape(tp_rank):
            raise RuntimeError(f"Scion: TP rank {tp_rank} holds a shard of shape {tuple(inner.shapes[i])} of member {i}, "
                               f"expected {spec.shard_shape(tp_rank)} from its partition sizes {spec.sizes}")
    return specs


def _grid_fragments(inner: Layout, specs: list[TPSpec | None], tp_rank: int) -> list[tuple[int, int, int, int, bool]]:
    """This rank's fragments in the logical members' index spaces: ``(member, start, numel, offset,
    contributes)``; a replicated member counts from TP rank 0's copy only."""
    if inner.replicated:
        inner_sources = set(inner.local()) if inner.rank == 0 else set()
    else:
        inner_sources = set(inner.contributes(inner.rank))
    local = []
    for f in inner.local():
        spec = specs[f.member]
        if spec is None:  # replicated over TP: TP rank 0's copy counts
            start, source = f.start, f in inner_sources and tp_rank == 0
        else:
            start, source = spec.block_start(tp_rank) + f.start, f in inner_sources
        local.append((f.member, start, f.numel, f.offset, source))
    return local


def _check_cover(layout: Layout) -> None:
    """Every entry of every logical member is contributed by exactly one rank of the grid."""
    for m in range(len(layout.shapes)):
        spans = sorted((f.start, f.start + f.numel) for r in range(layout.world_size) for f in layout.contributes(r)
                       if f.member == m)
        pos = 0
        for start, end in spans:
            if start != pos:
                raise RuntimeError(f"Scion: the TP×DP grid's fragments of member {m} (shape {layout.shapes[m]}) "
                                   f"{'overlap' if start < pos else 'leave a gap'} at entry {min(start, pos)}; "
                                   "refusing to orthogonalise anything but whole matrices")
            pos = end
        if pos != layout.numel(m):
            raise RuntimeError(f"Scion: the TP×DP grid holds {pos} of the {layout.numel(m)} entries of member {m}")


# ---------------------------------------------------------------------------- whole weights


def merge_tp_shards(shards: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One unsharded state dict from the TP ranks' state dicts (in TP rank order), splitting
    dimensions as :func:`autotp_config` does; replicated weights must agree across ranks."""
    merged: dict[str, torch.Tensor] = {}
    for name in shards[0]:
        parts = [s[name] for s in shards]
        dim = partition_dim_of(name)
        if dim is None or len(parts) == 1:
            if any(p.shape != parts[0].shape or not torch.equal(p, parts[0]) for p in parts[1:]):
                raise ValueError(f"{name}: replicated weight differs across tensor-parallel ranks")
            merged[name] = parts[0]
        else:
            merged[name] = torch.cat(parts, dim=dim)
    return merged


def gather_tp_shards(shard: torch.Tensor, spec: TPSpec, tp_group: Any) -> torch.Tensor:
    """The whole matrix from every TP rank's shard (uneven shards padded to the largest on the wire)."""
    world = dist.get_world_size(tp_group)
    width = max(spec.sizes)
    rows, cols = spec.logical_shape
    padded = torch.zeros((width, cols) if spec.dim == 0 else (rows, width), dtype=shard.dtype, device=shard.device)
    padded.narrow(spec.dim, 0, shard.shape[spec.dim]).copy_(shard)
    shards = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(shards, padded, group=tp_group)
    return torch.cat([s.narrow(spec.dim, 0, spec.sizes[r]) for r, s in enumerate(shards)], dim=spec.dim)


def tp_checkpoint_ranks(ds_dir: os.PathLike) -> int:
    """How many tensor-parallel ranks wrote a DeepSpeed checkpoint directory (``mp_rank_XX`` files)."""
    ranks = set()
    for path in os.listdir(ds_dir):
        match = re.search(r"mp_rank_(\d+)_", path)
        if match:
            ranks.add(int(match.group(1)))
    return max(ranks) + 1 if ranks else 1
