"""NormGPT as DeepSpeed pipeline stages (``train.pp_size > 1``).

The model is cut into the sequence DeepSpeed's :class:`~deepspeed.pipe.PipelineModule` runs:
the embedding, one part per block, and the final norm with the output layer; the loss is taken on
the last stage from the final hidden states, a chunk of tokens at a time
(:func:`~disco_ds.models.norm_gpt.modeling_norm_gpt.linear_cross_entropy`, as ``pp_size: 1``
computes it). Between stages travel the hidden states and the position ids (integers: no
gradient flows back for them); every block reads the documents of a packed window from the
position ids, as :class:`~disco_ds.models.norm_gpt.NormGPTModel` does.

Each part wraps the very module of a :class:`~disco_ds.models.norm_gpt.NormGPTForCausalLM` built on
the meta device, so a stage allocates only its own parts; the trainer's initialisation then walks
the whole model in the order ``pp_size: 1`` does, drawing (and dropping) the other stages' weights,
so every stage starts with the weights a one-stage run would have, bit for bit.

Parameter names follow DeepSpeed (``"<layer index>.<name inside the part>"``);
:meth:`NormGPTPipeline.hf_name` maps them to the Hugging Face names that exports and portable
checkpoints use, so those files do not depend on the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch
from deepspeed.pipe import PipelineModule
from deepspeed.runtime.pipe.topology import PipeDataParallelTopology
from deepspeed.runtime.activation_checkpointing.checkpointing import non_reentrant_checkpoint
from torch import nn

from disco_ds.models.norm_gpt.configuration_norm_gpt import NormGPTConfig
from disco_ds.models.norm_gpt.modeling_norm_gpt import (AttentionMask, NormGPTForCausalLM, document_ids,
                                                        linear_cross_entropy, rms_norm, rope_cos_sin)

__all__ = ["EmbeddingPart", "BlockPart", "HeadPart", "NormGPTPipeline", "build_pipeline", "hf_name", "is_pipeline_checkpoint",
           "merge_stage_files"]

LAYER_FILES = "layer_*-model_states.pt"
"""DeepSpeed's per-part weight files of a pipeline checkpoint (``layer_03-model_states.pt``), in its tag folder."""


def hf_name(part: int, local: str, n_layer: int) -> str:
    """The Hugging Face name of parameter ``local`` of pipeline part ``part`` (0: the embedding,
    1…n_layer: the blocks, n_layer + 1: the head): ``hf_name(3, "block.attn.q_proj.weight", 12)``
    is ``"model.layers.2.attn.q_proj.weight"``."""
    if part == 0:
        return "model." + local
    if part <= n_layer:
        return f"model.layers.{part - 1}." + local.removeprefix("block.")
    return local


Activations = tuple[torch.Tensor, torch.Tensor]
"""What one part hands the next: hidden states [B, T, d] and position ids [B, T]."""


class EmbeddingPart(nn.Module):
    """The first part: token ids and position ids in, embeddings and the same position ids out."""

    def __init__(self, embed_tokens: nn.Embedding) -> None:
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, inputs: Activations) -> Activations:
        input_ids, position_ids = inputs
        return self.embed_tokens(input_ids), position_ids


class BlockPart(nn.Module):
    """One transformer block. Rotary angles and the document mask come from the position ids here,
    once per block (``B·T·head_dim/2`` angles: cheaper than sending them between stages)."""

    def __init__(self, block: nn.Module, config: NormGPTConfig, documents: bool) -> None:
        super().__init__()
        self.block = block
        self.head_dim, self.rope_theta, self.documents = config.head_dim, config.rope_theta, documents

    def forward(self, inputs: Activations) -> Activations:
        x, position_ids = inputs
        cos, sin = rope_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)
        # Without document masking the window is one causal sequence: SDPA's fused causal path.
        mask = AttentionMask(documents=document_ids(position_ids) if self.documents else None)
        return self.block(x, cos=cos, sin=sin, mask=mask)[0], position_ids


class HeadPart(nn.Module):
    """The last part: the final norm, and the output layer whose weight the loss reads (the logits
    are made inside the loss, a chunk at a time). Returns the final hidden states."""

    def __init__(self, lm_head: nn.Linear, eps: float) -> None:
        super().__init__()
        self.lm_head, self.eps = lm_head, eps

    def forward(self, inputs: Activations) -> torch.Tensor:
        return rms_norm(inputs[0], self.eps)

    def loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss (``targets`` are the next tokens: nothing is shifted or ignored)."""
        return linear_cross_entropy(hidden, self.lm_head.weight, targets) / targets.numel()


class NormGPTPipeline(PipelineModule):
    """A :class:`NormGPTForCausalLM` cut into pipeline parts; this rank's stage holds some of them.

    Args:
        model: the whole model, built on the meta device (its modules become the parts).
        topology: DeepSpeed's pipe × data topology of the job.
        device: where this stage's parts are allocated.
        document_mask: every block attends only within the documents the position ids mark.
        partition_method: one of :data:`~disco_ds.trainer.config.PARTITION_METHODS`.
        activation_checkpoint_interval: parts per activation checkpoint (0: none).
    """

    def __init__(self, model: NormGPTForCausalLM, topology: PipeDataParallelTopology, device: torch.device, *,
                 document_mask: bool, partition_method: str, activation_checkpoint_interval: int) -> None:
        config = model.config
        parts: list[nn.Module] = [EmbeddingPart(model.model.embed_tokens)]
        parts += [BlockPart(block, config, document_mask) for block in model.model.layers]
        parts.append(HeadPart(model.lm_head, config.norm_eps))
        self._device = device
        # The non-reentrant checkpoint: the embedding's input needs no gradient, and a reentrant
        # checkpoint around it would drop the embedding's own.
        super().__init__(parts, topology=topology, loss_fn=self._stage_loss, partition_method=partition_method,
                         activation_checkpoint_interval=activation_checkpoint_interval,
                         activation_checkpoint_func=non_reentrant_checkpoint)
        self.config = config

    def _build(self) -> None:
        # DeepSpeed registers this stage's parts here and then moves the module to the accelerator,
        # which meta tensors cannot do: the stage's parts (only they) get memory first.
        for part in self._layer_specs[self._local_start:self._local_stop]:
            part.to_empty(device=self._device)
        super()._build()

    def _stage_loss(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.forward_funcs[-1].loss(hidden, targets)

    def hf_name(self, name: str) -> str:
        """The Hugging Face name of this stage's parameter ``name`` (``"3.block.attn.q_proj.weight"``
        → ``"model.layers.2.attn.q_proj.weight"``)."""
        part, local = name.split(".", 1)
        return hf_name(int(part), local, self.config.n_layer)

    def hf_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This stage's parameters under their Hugging Face names."""
        return [(self.hf_name(n), p) for n, p in self.named_parameters()]


def build_pipeline(model: NormGPTForCausalLM, *, pp_size: int, world_size: int, device: torch.device, document_mask: bool,
                   partition_method: str, activation_checkpoint_interval: int) -> NormGPTPipeline:
    """The pipeline module a ``train.pp_size > 1`` run trains, from ``model`` built on the meta
    device: ``pp_size`` stages, each replicated over ``world_size / pp_size`` data-parallel ranks
    (the data axis is the fastest: ranks ``s·dp … s·dp + dp − 1`` hold stage ``s``, so a node of
    ``dp`` ranks holds one stage and only the activations cross nodes). This rank's parts are
    allocated on ``device``, uninitialised: the caller initialises the whole ``model`` in module
    order (another stage's weights are still on the meta device). Collective: every rank calls it."""
    topology = PipeDataParallelTopology(num_pp=pp_size, num_dp=world_size // pp_size)
    return NormGPTPipeline(model, topology, device, document_mask=document_mask, partition_method=partition_method,
                           activation_checkpoint_interval=activation_checkpoint_interval)


def is_pipeline_checkpoint(ds_dir: Path) -> bool:
    """Whether a DeepSpeed checkpoint folder was written by a pipeline engine (per-part files)."""
    return any(ds_dir.glob(LAYER_FILES))


def merge_stage_files(ds_dir: Path, n_layer: int) -> dict[str, torch.Tensor]:
    """The whole model's weights from a pipeline checkpoint's per-part files, under Hugging Face
    names, as the stages held them (the model's dtype: with a bf16 model, bf16).

    Raises:
        ValueError: a part's file is missing (naming it) or a part was saved twice.
    """
    state: dict[str, torch.Tensor] = {}
    for part in range(n_layer + 2):
        files = sorted(ds_dir.glob(f"layer_{part:02d}-*model_states.pt"))
        if len(files) != 1:
            found = ", ".join(f.name for f in files) or "none"
            raise ValueError(f"{ds_dir}: pipeline part {part} of {n_layer + 2} needs one layer_{part:02d}-*model_states.pt "
                             f"file, found {found}")
        # DeepSpeed's own files: plain tensors, written by torch.save.
        for local, tensor in torch.load(files[0], map_location="cpu", weights_only=True).items():
            state[hf_name(part, local, n_layer)] = tensor
    return state
