"""Pretrain (or fine-tune) NormGPT or a stock transformers Llama with the Hugging Face Trainer and
disco_ds.Scion, with or without DeepSpeed.

Two GPUs, ZeRO-2 (any template in recipes/deepspeed/ works the same way):

    deepspeed --num_gpus 2 examples/trainer_scion.py --deepspeed recipes/deepspeed/zero2.json \\
        --output_dir runs/normgpt-tiny --model normgpt --preset tiny --seq_len 256 \\
        --per_device_train_batch_size 16 --max_steps 500 --learning_rate 0.01 \\
        --lr_scheduler_type warmup_stable_decay --lr_scheduler_kwargs '{"num_decay_steps": 100}' \\
        --warmup_steps 25 --bf16 --logging_steps 10 --report_to none

A stock Llama instead: ``--model llama``; fine-tuning a local checkpoint: ``--model_name_or_path DIR``
(its tokenizer is used when DIR has one). The same command without ``deepspeed ... --deepspeed``
(``python`` or ``torchrun``) trains with Scion under plain data parallelism. On a machine without
GPUs prefix ``DS_ACCELERATOR=cpu`` and add ``--use_cpu``.

Data: local files only (``--text_files``), default the Python standard library's own ``*.py``
sources, as raw bytes (vocabulary 256), cut into ``--seq_len`` blocks. Nothing is downloaded.

How Scion reaches the Trainer (``--route``): ``trainer`` (``disco_ds.hf.ScionTrainer``), ``factory``
(``Trainer(optimizer_cls_and_kwargs=(ScionFactory, {...}))``) or ``cls_kwargs``
(``Trainer(optimizer_cls_and_kwargs=(Scion, {"params": groups, ...}))``); all three give the same
training. The per-role learning-rate ratios are flags of ``ScionTrainingArguments``
(``--embedding_lr_ratio 1 --hidden_lr_ratio 0.125 --output_lr_ratio 1``); ``--learning_rate`` is
the base rate. Gradient clipping is off (``max_grad_norm=0``; the templates say
``gradient_clipping: 0.0``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, HfArgumentParser, LlamaConfig, Trainer, default_data_collator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from disco_ds.hf import (  # noqa: E402
    ScionFactory,
    ScionTrainer,
    ScionTrainingArguments,
    scion_optimizer_cls_and_kwargs,
)
from disco_ds.models.norm_gpt import NormGPTConfig  # noqa: E402

BYTE_VOCAB = 256


@dataclass
class ExampleArguments:
    model: str = field(default="normgpt", metadata={"help": "normgpt or llama (built from scratch)", "choices": ["normgpt", "llama"]})
    preset: str = field(default="tiny", metadata={"help": "NormGPT size preset (tiny, 124m, 350m, 760m, 1.3b)"})
    model_name_or_path: str | None = field(default=None, metadata={"help": "local checkpoint to fine-tune instead"})
    route: str = field(default="trainer", metadata={"help": "how Scion reaches the Trainer",
                                                    "choices": ["trainer", "factory", "cls_kwargs"]})
    text_files: list[str] = field(default_factory=list, metadata={"help": "local text files (default: stdlib sources)"})
    max_text_bytes: int = field(default=4_000_000, metadata={"help": "read at most this many bytes of text"})
    seq_len: int = field(default=256, metadata={"help": "tokens per training sequence"})


class BlockDataset(torch.utils.data.Dataset):
    """Consecutive ``seq_len`` blocks of a token stream; labels are the inputs (the model shifts)."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        n = len(tokens) // seq_len
        if n == 0:
            raise ValueError(f"only {len(tokens)} tokens of text, fewer than one sequence of {seq_len}")
        self.blocks = tokens[: n * seq_len].view(n, seq_len)

    def __len__(self) -> int:
        return len(self.blocks)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.blocks[i], "labels": self.blocks[i]}


def read_text(example: ExampleArguments) -> bytes:
    files = [Path(f) for f in example.text_files] or sorted(Path(os.__file__).parent.glob("*.py"))
    chunks, total = [], 0
    for path in files:
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= example.max_text_bytes:
            break
    return b"\n".join(chunks)[: example.max_text_bytes]


def tokenize(example: ExampleArguments, text: bytes) -> torch.Tensor:
    if example.model_name_or_path and (Path(example.model_name_or_path) / "tokenizer_config.json").exists():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(example.model_name_or_path, local_files_only=True)
        return torch.tensor(tokenizer(text.decode("utf-8", "replace"))["input_ids"], dtype=torch.long)
    return torch.frombuffer(bytearray(text), dtype=torch.uint8).long()


def build_model(example: ExampleArguments) -> torch.nn.Module:
    """Built after TrainingArguments, so that a ZeRO-3 config partitions it at construction."""
    if example.model_name_or_path:
        return AutoModelForCausalLM.from_pretrained(example.model_name_or_path, local_files_only=True)
    if example.model == "normgpt":
        config = NormGPTConfig.from_preset(example.preset, vocab_size=BYTE_VOCAB,
                                           max_position_embeddings=max(example.seq_len, 256))
    else:
        config = LlamaConfig(vocab_size=BYTE_VOCAB, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max(example.seq_len, 256),
                             tie_word_embeddings=False)
    return AutoModelForCausalLM.from_config(config)


def make_trainer(example: ExampleArguments, args: ScionTrainingArguments, model, dataset) -> Trainer:
    common = dict(model=model, args=args, train_dataset=dataset, data_collator=default_data_collator)
    if example.route == "trainer":
        return ScionTrainer(**common)
    scion_kwargs = args.scion_kwargs()  # the lr ratios and momentum from the command line
    if example.route == "factory":
        return Trainer(optimizer_cls_and_kwargs=(ScionFactory, {"lr": args.learning_rate, **scion_kwargs}), **common)
    # The Trainer pops "params" from this dict: build it for this Trainer only.
    return Trainer(optimizer_cls_and_kwargs=scion_optimizer_cls_and_kwargs(model, args.learning_rate, **scion_kwargs),
                   **common)


def main() -> None:
    example, args = HfArgumentParser((ExampleArguments, ScionTrainingArguments)).parse_args_into_dataclasses()
    if args.deepspeed:
        import deepspeed

        # A no-op where TrainingArguments already started DeepSpeed's communication (GPUs); with
        # --use_cpu only torch.distributed is up, and ZeRO-3's zero.Init needs DeepSpeed's view of it.
        deepspeed.init_distributed()
    dataset = BlockDataset(tokenize(example, read_text(example)), example.seq_len)
    model = build_model(example)
    trainer = make_trainer(example, args, model, dataset)
    trainer.train()
    trainer.save_model()  # ZeRO-3: the templates gather the 16-bit weights for this

    engine = trainer.model_wrapped
    stepped = getattr(engine, "basic_optimizer", None) or getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if trainer.is_world_process_zero():
        print(json.dumps({"optimizer": type(stepped).__name__, "deepspeed": trainer.is_deepspeed_enabled,
                          "steps": trainer.state.global_step, "first_loss": losses[0] if losses else None,
                          "last_loss": losses[-1] if losses else None}), flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
