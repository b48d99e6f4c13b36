"""One rank of Hugging Face Trainer runs with disco_ds.Scion under DeepSpeed; launched by tests/test_hf.py.

    torchrun --nproc_per_node 2 tests/hf_worker.py '{"stage": 2, "jobs": [...]}' OUT.pt

Each job trains a fresh model with one way of handing Scion to the Trainer (``route``):
``cls_kwargs`` (``optimizer_cls_and_kwargs=(Scion, {"params": groups})``), ``factory``
(``ScionFactory``), ``trainer`` (``ScionTrainer``) or ``optimizers`` (``Trainer(optimizers=(Scion,
None))``, which DeepSpeed discards and disco_ds must refuse). The DeepSpeed config is the shipped
template ``recipes/deepspeed/zero{stage}.json``. Rank 0 writes, per job: the initial and final full
fp32 parameters, the micro-batches every rank consumed, the learning rate of every Scion group at
every step, the logged losses, and what the engine steps.
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
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from disco_ds import Scion, scion_param_groups
from disco_ds.distributed import shutdown_and_exit
from disco_ds.hf import OptimizerReplacedError, ScionFactory, ScionTrainer, ScionTrainingArguments
from disco_ds.models.norm_gpt import NormGPTConfig

REPO = Path(__file__).resolve().parents[1]

VOCAB, SEQ, MICRO_BATCH, LR = 96, 32, 2, 0.1
SCION_EXACT = {"ns_method": "svd", "comm_dtype": torch.float32}
"""fp32 transport and the exact SVD orthogonalisation: the distributed step then differs from the
single-process one only by fp32 reassociation (see tests/test_zero.py)."""


def model_config(kind: str):
    if kind == "normgpt":
        return NormGPTConfig.from_preset("tiny", vocab_size=VOCAB, d_model=64, n_head=2, head_dim=32)
    if kind == "llama":
        return LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                           tie_word_embeddings=False)
    raise ValueError(kind)


def build_model(kind: str = "normgpt", seed: int = 0) -> torch.nn.Module:
    """A tiny causal LM. ``from_config`` runs under ``deepspeed.zero.Init`` when a ZeRO-3
    ``TrainingArguments`` is alive, as a user's model would."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(model_config(kind))


class PatternDataset(torch.utils.data.Dataset):
    """Arithmetic progressions mod VOCAB: x_t = (a + b·t) mod V, learnable from two tokens."""

    def __init__(self, n: int = 64, seed: int = 7) -> None:
        gen = torch.Generator().manual_seed(seed)
        a = torch.randint(0, VOCAB, (n, 1), generator=gen)
        b = torch.randint(1, 3, (n, 1), generator=gen)
        self.ids = (a + b * torch.arange(SEQ)) % VOCAB

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def training_arguments(out_dir: Path, steps: int, deepspeed: dict | None = None, save_steps: int | None = None,
                       scion_args: bool = True, accum: int = 1, **overrides) -> TrainingArguments:
    """ScionTrainingArguments (clipping off by default) or plain TrainingArguments with clipping
    switched off explicitly, as the docs tell users of routes 1 and 2."""
    cls, extra = (ScionTrainingArguments, {}) if scion_args else (TrainingArguments, {"max_grad_norm": 0.0})
    return cls(
        output_dir=str(out_dir), per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=accum,
        max_steps=steps, learning_rate=LR, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        logging_steps=1, save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        report_to="none", dataloader_num_workers=0, disable_tqdm=True, seed=0, use_cpu=True,
        deepspeed=deepspeed, **{**extra, **overrides},
    )


def find_scion(trainer: Trainer) -> Scion | None:
    """The Scion the Trainer steps: the DeepSpeed engine's basic optimizer, or the one accelerate wraps."""
    engine = trainer.model_wrapped
    for candidate in (getattr(engine, "basic_optimizer", None), getattr(trainer.optimizer, "optimizer", None),
                      trainer.optimizer):
        if isinstance(candidate, Scion):
            return candidate
    return None


def record_lrs(trainer: Trainer) -> dict[str, float]:
    scion = find_scion(trainer)
    return {g["role"]: float(g["lr"]) for g in scion.param_groups} if scion is not None else {}


def make_trainer(route: str, model: torch.nn.Module, args: ScionTrainingArguments, **kwargs) -> Trainer:
    """The four ways of handing Scion to the Trainer, all with the same Scion settings."""
    kwargs = dict(model=model, args=args, train_dataset=PatternDataset(), **kwargs)
    lr = args.learning_rate
    if route == "cls_kwargs":
        return Trainer(optimizer_cls_and_kwargs=(Scion, {"params": scion_param_groups(model, lr, ns_method="svd"),
                                                         "comm_dtype": torch.float32}), **kwargs)
    if route == "factory":
        return Trainer(optimizer_cls_and_kwargs=(ScionFactory, {"lr": lr, **SCION_EXACT}), **kwargs)
    if route == "trainer":
        return ScionTrainer(scion_kwargs=SCION_EXACT, **kwargs)
    if route == "optimizers":
        optimizer = Scion(scion_param_groups(model, lr, ns_method="svd"), comm_dtype=torch.float32)
        # No explicit watch: Scion.__init__ arms it, and that is what this route proves.
        trainer = Trainer(optimizers=(optimizer, None), **kwargs)
        trainer.discarded = optimizer
        return trainer
    if route == "trainer_optimizers":
        optimizer = Scion(scion_param_groups(model, lr))
        return ScionTrainer(optimizers=(optimizer, None), **kwargs)
    raise ValueError(route)


class Recorder:
    """Per training micro-batch: the input ids and the lr of every Scion group about to be used."""

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.batches: list[torch.Tensor] = []
        self.lrs: list[dict[str, float]] = []

    def attach(self, trainer: Trainer) -> "Recorder":
        self.trainer = trainer
        trainer.model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        return self

    def _before_forward(self, module, args, kwargs) -> None:
        if module.training:
            self.batches.append(kwargs["input_ids"].detach().clone())
            self.lrs.append(record_lrs(self.trainer))


def full_params(model: torch.nn.Module, engine_managed: bool) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in model.named_parameters():
        full = safe_get_full_fp32_param(p) if engine_managed else None  # collective at ZeRO-3
        out[name] = (full if full is not None else p).detach().float().clone().cpu()
    return out


def initial_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    params = list(model.parameters())
    if any(hasattr(p, "ds_id") for p in params):  # built under zero.Init: gather to read
        with deepspeed.zero.GatheredParameters(params):
            return {n: p.detach().float().clone() for n, p in model.named_parameters()}
    return {n: p.detach().float().clone() for n, p in model.named_parameters()}


def run_job(job: dict, stage: int, root: Path) -> dict:
    out_dir = root / job["name"]
    config = json.loads((REPO / "recipes" / "deepspeed" / f"zero{stage}{job.get('config_suffix', '')}.json").read_text())
    config.update(job.get("config_override", {}))
    args = training_arguments(out_dir, job["steps"], deepspeed=config, save_steps=job.get("save_steps"),
                              scion_args=job["route"].startswith("trainer"), accum=job.get("accum", 1),
                              **job.get("args_override", {}))
    model = build_model(job.get("model", "normgpt"))  # under zero.Init at ZeRO-3
    built_partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    init = initial_params(model)
    error = None
    try:
        trainer = make_trainer(job["route"], model, args, **job.get("trainer_kwargs", {}))
    except (OptimizerReplacedError, ValueError) as exc:  # refusals at construction
        return {"error": f"{type(exc).__name__}: {exc}", "at": "construction", "batches": [], "lrs": [], "scion_steps": None}
    recorder = Recorder().attach(trainer)
    try:
        trainer.train(resume_from_checkpoint=job.get("resume_from"))
    except (OptimizerReplacedError, ValueError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    engine = trainer.model_wrapped
    basic = getattr(engine, "basic_optimizer", None)
    scion = find_scion(trainer)
    result = {
        "error": error,
        "engine_class": type(engine).__name__,
        "basic_optimizer_class": type(basic).__name__,
        "zero_wraps_scion": isinstance(getattr(getattr(engine, "optimizer", None), "optimizer", None), Scion),
        "engine_offload": bool(engine.zero_cpu_offload()) if hasattr(engine, "zero_cpu_offload") else None,
        "engine_stage": engine.zero_optimization_stage() if hasattr(engine, "zero_optimization_stage") else None,
        "scion_steps": scion.steps if scion is not None else None,
        "batches": recorder.batches,
        "lrs": recorder.lrs,
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "global_step": trainer.state.global_step,
        "output_dir": str(out_dir),
        "built_partitioned": built_partitioned,
        "discarded_steps": trainer.discarded.steps if hasattr(trainer, "discarded") else None,
        "init": init,
    }
    if error is None:
        result["params"] = full_params(model, engine_managed=True)
        if job.get("save_steps"):
            ckpt = out_dir / f"checkpoint-{job['save_steps']}"
            result["checkpoint_files"] = sorted(str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file())
    return result


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out_path = Path(sys.argv[2])
    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for job in cfg["jobs"]:
        result = run_job(job, cfg["stage"], Path(cfg["root"]))
        gathered: list = [None] * world
        dist.all_gather_object(gathered, {"batches": result.pop("batches"), "lrs": result["lrs"],
                                          "error": result["error"], "scion_steps": result["scion_steps"]})
        result["rank_batches"] = [g["batches"] for g in gathered]
        result["rank_errors"] = [g["error"] for g in gathered]
        result["rank_scion_steps"] = [g["scion_steps"] for g in gathered]
        results[job["name"]] = result
    if rank == 0:
        torch.save(results, out_path)
    shutdown_and_exit()


if __name__ == "__main__":
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    main()
