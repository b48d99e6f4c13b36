"""Will it fit: parameter counts and the memory one GPU needs for a recipe (``disco_ds recipe``).

Per rank, with Ψ = parameters / ``train.tp_size`` (under a pipeline: the parameters of its largest
stage, :func:`largest_stage`) and ``dp`` data-parallel replicas:

* weights: Ψ in the model's dtype (bf16: 2 bytes, fp32: 4); ZeRO-3 keeps Ψ/dp of them.
* fp32 master weights: DeepSpeed's ZeRO optimizers (stages 1–3) keep an fp32 partition Ψ/dp
  whatever the model's dtype; at stage 0 a bf16 model keeps all Ψ in fp32, an fp32 model none.
* gradients, in ``train.grad_dtype``: all Ψ at stages 0 and 1 (ZeRO-1 partitions only the
  optimizer), Ψ/dp at stages 2 and 3; plus DeepSpeed's reduction bucket of
  ``reduce_bucket_size`` elements at stages 1 and 2 (doubled with ``overlap_comm``; none under
  the ``BF16_Optimizer`` DeepSpeed runs for ZeRO-1 with a bf16 model and fp32 gradients).
* optimizer state: Scion keeps one fp32 momentum buffer ``exp_avg`` per (partitioned) parameter,
  4·Ψ/dp bytes (stage 0: 4·Ψ); AdamW keeps two.
* activations of one micro-batch: the tensors autograd saves for the backward, counted exactly by
  running the model's forward on the meta device (no memory, no compute) at
  ``train.micro_batch`` × ``data.seq_len``, in the model's dtype, plus the fp32 logits and their
  gradient that the loss materialises. With activation checkpointing: what the checkpointed
  forward saves plus one block's activations, recomputed during its backward.

Not counted: the CUDA context and allocator fragmentation (typically 0.5–2 GiB on a GPU), the
optimizer step's gather workspace (bounded by ``Scion.max_gather_numel``), ZeRO-3's prefetch
buffers, and the activation savings of tensor parallelism (activations are counted whole: an
upper bound). ``tests/test_memory.py`` compares the estimate with the peak the PyTorch profiler
measures for the tiny model on the CPU (41.8 MiB measured, 43.7 MiB estimated).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from disco_ds.trainer.config import ConfigError, RunConfig
from disco_ds.trainer.scaling import Plan

__all__ = ["MemoryEstimate", "estimate_memory", "largest_stage", "activation_bytes", "recipe_model", "format_memory", "gib"]

_GIB = 2**30
_DEFAULT_REDUCE_BUCKET = 500_000_000  # DeepSpeed 0.19's zero_optimization.reduce_bucket_size default


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one rank holds at its peak, by kind (see the module docstring)."""

    parameters: dict[str, int]
    weights: float
    master_weights: float
    gradients: float
    optimizer_state: float
    buffers: float
    activations: float
    activations_checkpointed: float

    @property
    def static(self) -> float:
        """Everything but activations: held for the whole run."""
        return self.weights + self.master_weights + self.gradients + self.optimizer_state + self.buffers

    def total(self, checkpointing: bool) -> float:
        """The peak: static memory plus one micro-batch's activations."""
        return self.static + (self.activations_checkpointed if checkpointing else self.activations)


def _saved_bytes(model: torch.nn.Module, micro_batch: int, seq_len: int) -> float:
    """Bytes of the tensors autograd saves in one forward and loss of ``model`` (on the meta device),
    each storage once (views share their base's), the parameters excluded (counted as weights)."""
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in params and id(tensor) not in params:
            saved[id(base)] = base.numel() * base.element_size()
        return tensor

    from disco_ds.models.norm_gpt.modeling_norm_gpt import LOSS_CHUNK_LOGITS

    ids = torch.zeros(micro_batch, seq_len, dtype=torch.long, device="meta")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model.model(input_ids=ids, use_cache=False)
    # The trainer's loss (loop._loss) is the chunked linear cross-entropy: it keeps the final hidden
    # states (saved above) and one float32 log-sum-exp per token, and while it runs one chunk's
    # float32 logits with, in backward, their gradient beside them.
    tokens = micro_batch * seq_len
    vocab = model.get_output_embeddings().weight.shape[0]
    chunk = min(tokens, max(1, LOSS_CHUNK_LOGITS // vocab))
    return float(sum(saved.values()) + tokens * 4 + 2 * chunk * vocab * 4)


def activation_bytes(model_config: Any, micro_batch: int, seq_len: int, dtype: torch.dtype) -> tuple[float, float]:
    """``(without, with activation checkpointing)``: activation bytes of one micro-batch of
    ``micro_batch`` × ``seq_len`` tokens through the NormGPT of ``model_config`` in ``dtype``."""
    from disco_ds.models.norm_gpt.modeling_norm_gpt import NormGPTForCausalLM

    def build(n_layer: int, checkpointing: bool) -> torch.nn.Module:
        config = type(model_config).from_dict({**model_config.to_dict(), "n_layer": n_layer})
        with torch.device("meta"):
            model = NormGPTForCausalLM(config).to(dtype)
        if checkpointing:
            with warnings.catch_warnings():  # transformers 5 renames the method; the trainer calls this one
                warnings.simplefilter("ignore", FutureWarning)
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model.train()

    layers = model_config.n_layer
    full = _saved_bytes(build(layers, False), micro_batch, seq_len)
    one_block = full - _saved_bytes(build(max(layers - 1, 0), False), micro_batch, seq_len) if layers > 1 else full
    checkpointed = _saved_bytes(build(layers, True), micro_batch, seq_len) + one_block
    return full, min(full, checkpointed)


def _bucket_elements(ds_config: dict[str, Any]) -> tuple[int, int]:
    """``(reduce_bucket_size, number of buckets)`` of DeepSpeed's ZeRO-1/2 gradient reduction."""
    zero = ds_config.get("zero_optimization", {})
    size = zero.get("reduce_bucket_size", _DEFAULT_REDUCE_BUCKET)
    size = _DEFAULT_REDUCE_BUCKET if size == "auto" else int(size)
    return size, 2 if zero.get("overlap_comm", False) else 1


def largest_stage(cfg: RunConfig, model_config: Any) -> tuple[int, int]:
    """``(parameters, blocks)`` of the pipeline stage holding the most parameters, cut as
    DeepSpeed's ``PipelineModule`` cuts the parts (embedding, blocks, head) by
    ``pipeline.partition_method``; the whole model when ``train.pp_size`` is 1."""
    from deepspeed.runtime.utils import partition_balanced, partition_uniform

    counts, layers, stages = model_config.parameter_counts(), model_config.n_layer, cfg.train.pp_size
    if stages == 1:
        return counts["total"], layers
    block = (counts["total"] - counts["embedding"] - counts["head"]) // layers
    sizes = [counts["embedding"], *[block] * layers, counts["head"]]
    method = cfg.pipeline.partition_method
    if method == "uniform":
        bounds = partition_uniform(num_items=len(sizes), num_parts=stages)
    else:
        weights = sizes if method == "parameters" else [0, *[1] * layers, 0]
        bounds = partition_balanced(weights=weights, num_parts=stages)
    cuts = [(sum(sizes[a:b]), sum(1 for i in range(a, b) if 0 < i <= layers)) for a, b in zip(bounds, bounds[1:])]
    return max(cuts)


def estimate_memory(cfg: RunConfig, plan: Plan, model_config: Any, ds_config: dict[str, Any]) -> MemoryEstimate:
    """The per-rank memory of the run ``plan`` describes (``ds_config``: the engine's config).

    Under a pipeline, of the stage with the most parameters: its share of the weights, and the
    activations of its blocks for each micro-batch the 1F1B schedule keeps in flight there (up to
    ``pp_size``)."""
    counts = model_config.parameter_counts()
    stage_params, stage_blocks = largest_stage(cfg, model_config)
    shard_params = stage_params / cfg.train.tp_size
    t = cfg.train
    stage, dp = t.zero_stage, plan.world_size
    model_bytes = 2 if t.bf16 else 4
    grad_bytes = 4 if t.grad_dtype == "float32" else 2
    partition = shard_params / dp if stage >= 1 else shard_params
    weights = model_bytes * (shard_params / dp if stage == 3 else shard_params)
    master = 4 * partition if (stage >= 1 or t.bf16) else 0.0
    gradients = grad_bytes * (shard_params / dp if stage >= 2 else shard_params)
    states = 1 if cfg.optimizer.name == "scion" else 2
    optimizer_state = 4 * states * partition
    buffers = 0.0
    # ZeRO-1 with a bf16 model and fp32 gradients runs DeepSpeed's BF16_Optimizer: no reduction bucket.
    bf16_optimizer = stage == 1 and t.bf16 and t.grad_dtype == "float32"
    if stage in (1, 2) and not bf16_optimizer and ds_config.get("zero_optimization", {}).get("contiguous_gradients", True):
        size, count = _bucket_elements(ds_config)
        buffers = float(size * count * grad_bytes)
    full, checkpointed = activation_bytes(model_config, t.micro_batch, cfg.data.seq_len,
                                          torch.bfloat16 if t.bf16 else torch.float32)
    if t.pp_size > 1:
        in_flight = min(t.pp_size, plan.accumulation) * stage_blocks / model_config.n_layer
        full, checkpointed = full * in_flight, checkpointed * in_flight
    return MemoryEstimate(counts, weights, master, gradients, optimizer_state, buffers, full, checkpointed)


def recipe_model(cfg: RunConfig) -> Any:
    """The NormGPT config ``train`` would build: the data's vocabulary when ``data.path`` holds a
    ``meta.json`` here, else the preset's (``model.overrides.vocab_size`` wins either way)."""
    from disco_ds.trainer.build import build_model_config
    from disco_ds.models.norm_gpt.configuration_norm_gpt import PRESETS

    meta_path = Path(cfg.data.path) / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
    else:
        meta = {"vocab_size": cfg.model.overrides.get("vocab_size", PRESETS[cfg.model.preset].get("vocab_size", 1))}
    try:
        return build_model_config(cfg, meta)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def profiled_peak_bytes(prof: Any) -> int:
    """The most bytes CPU tensors held during a ``torch.profiler.profile(profile_memory=True)``,
    above what they held before its first allocation: every allocation event carries the CPU
    allocator's running total (the measured counterpart of the estimates above; on CUDA,
    ``torch.cuda.max_memory_allocated``)."""
    from torch._C._profiler import _EventType

    totals, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            totals.append((event.start_time_ns, event.extra_fields.total_allocated, event.extra_fields.alloc_size))
    if not totals:
        return 0
    totals.sort()
    return max(total for _, total, _ in totals) - (totals[0][1] - totals[0][2])


def gib(size: float) -> str:
    """``size`` bytes in GiB, or in MiB below one GiB (a tiny model would otherwise show 0.00)."""
    return f"{size / _GIB:.2f} GiB" if size >= _GIB else f"{size / 2**20:.1f} MiB"


def format_memory(cfg: RunConfig, plan: Plan, world: int) -> str:
    """The parameter counts and the per-GPU estimate as ``disco_ds recipe`` prints them."""
    from disco_ds.trainer.build import engine_config

    model_config = recipe_model(cfg)
    try:
        ds_config = engine_config(cfg, plan, model_config)
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(str(err) if str(err).startswith("train.deepspeed") else f"train.deepspeed: {err}") from None
    m = estimate_memory(cfg, plan, model_config, ds_config)
    c = m.parameters
    ckpt = cfg.model.gradient_checkpointing or cfg.pipeline.activation_checkpoint_interval > 0
    ckpt_key = "pipeline.activation_checkpoint_interval" if cfg.train.pp_size > 1 else "model.gradient_checkpointing"
    return "\n".join([
        f"model       {c['total']:,} parameters ({c['non_embedding']:,} non-embedding, {c['embedding']:,} embedding, "
        f"{c['head']:,} head)",
        f"memory      per GPU, ZeRO-{cfg.train.zero_stage} over {plan.world_size} replicas"
        + (f", tensor parallel {cfg.train.tp_size}" if cfg.train.tp_size > 1 else "")
        + (f", the largest of {cfg.train.pp_size} pipeline stages" if cfg.train.pp_size > 1 else "")
        + f", {'bf16' if cfg.train.bf16 else 'fp32'} model, {cfg.train.grad_dtype} gradients:",
        f"            weights {gib(m.weights)} + fp32 masters {gib(m.master_weights)} + gradients {gib(m.gradients)} + "
        f"{cfg.optimizer.name} state {gib(m.optimizer_state)} + DeepSpeed buckets {gib(m.buffers)} = {gib(m.static)}",
        f"            activations at micro_batch {cfg.train.micro_batch} × {cfg.data.seq_len}: {gib(m.activations)} "
        f"(with activation checkpointing {gib(m.activations_checkpointed)})",
        f"            peak ≈ {gib(m.total(ckpt))} {'with' if ckpt else 'without'} activation checkpointing, "
        f"{gib(m.total(not ckpt))} {'without' if ckpt else 'with'} ({ckpt_key}); "
        "plus the CUDA context, ~1 GiB",
    ])
