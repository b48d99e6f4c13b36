"""The run configuration: typed dataclasses, loaded from a YAML recipe plus dotted overrides.

    cfg = load_config("recipes/gpt-124m.yaml", ["train.micro_batch=16", "optimizer.name=adamw"])

Every key is checked: an unknown key, a value of the wrong type or an impossible combination is a
:class:`ConfigError` that names the key (and the accepted keys or values). :func:`to_dict` gives
the resolved configuration that the trainer prints at start and saves with every checkpoint.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "ConfigError",
    "ModelConfig",
    "DataConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "ScalingConfig",
    "TrainConfig",
    "PipelineConfig",
    "EvalConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "RunConfig",
    "load_config",
    "from_dict",
    "to_dict",
    "apply_overrides",
]

OPTIMIZERS = ("scion", "adamw")
DECAY_SHAPES = ("linear", "sqrt", "cosine")
NS_METHODS = ("quintic", "polar_express", "svd")
COMM_DTYPES = ("bfloat16", "float32")
GRAD_DTYPES = ("float32", "bfloat16")
PARTITION_METHODS = ("parameters", "uniform", "type:BlockPart")
"""``pipeline.partition_method``: balance the stages' parameters, their parts (embedding, blocks,
head), or their blocks only (DeepSpeed's ``PipelineModule`` methods)."""


class ConfigError(ValueError):
    """A configuration key that is unknown, mistyped or inconsistent (the message names it)."""


@dataclass
class ModelConfig:
    """NormGPT: a size preset plus any :class:`~disco_ds.models.norm_gpt.NormGPTConfig` field."""

    preset: str = "tiny"
    """One of ``disco_ds.models.norm_gpt.PRESETS``: tiny, 124m, 350m, 760m, 1.3b, paper-proxy, paper-w4, paper-w12, paper-d8, paper-d32."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """NormGPTConfig fields that replace the preset's (e.g. ``n_layer: 4``). ``vocab_size`` defaults
    to the data's tokenizer rounded up to a multiple of 64."""
    gradient_checkpointing: bool = False


@dataclass
class DataConfig:
    """Token shards written by ``disco_ds prepare`` (``train_*.bin``, ``val_*.bin``, ``meta.json``)."""

    path: str = "data/stdlib-bytes"
    seq_len: int = 256
    seed: int = 0
    document_mask: bool = False
    """Attend only within each document of a training window (documents end with the shards'
    end-of-text token): positions restart after every end-of-text, which NormGPT reads as a
    document boundary. Off: the window is one causal sequence across documents (GPT-2 style)."""


@dataclass
class OptimizerConfig:
    """Scion (the product) or AdamW (the paper's baseline), with the same per-role learning rates."""

    name: str = "scion"
    lr: float | None = None
    """η of the input and output layers; hidden layers get η·lr_ratios[1]. ``null``: derived from
    the token budget by the scaling rules (see :class:`ScalingConfig`)."""
    lr_ratios: list[float] = field(default_factory=lambda: [1.0, 0.125, 1.0])
    """input : hidden : output (SPEC 3: 1 : 1/8 : 1)."""
    vector_lr_ratio: float | None = None
    """Learning-rate ratio of vectors (norm gains, biases); ``null``: the hidden ratio."""
    momentum: float = 0.1
    weight_decay: float = 0.0
    ns_steps: int = 5
    ns_method: str = "quintic"
    ns_gram: bool = True
    """Evaluate Newton–Schulz in the Gram form where it needs fewer FLOPs (wide matrices, n > 1.5·m
    at 5 steps: the MLP's); the same polynomial, restarted every 2 steps in bf16."""
    comm_dtype: str = "bfloat16"
    adamw_betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    adamw_eps: float = 1e-8


@dataclass
class ScheduleConfig:
    """Warmup–stable–decay: linear warmup, constant, then decay to ``min_lr_ratio``·lr."""

    warmup: float = 0.02
    """Fraction of the steps spent warming up."""
    decay: float = 0.2
    """Fraction of the steps (at the end) spent decaying."""
    decay_shape: str = "linear"
    min_lr_ratio: float = 0.0


@dataclass
class ScalingConfig:
    """The η*/B* scaling rules (SPEC 3) and the anchor they are applied from.

    ``B*(D) = anchor_batch_tokens · (D / anchor_tokens)^batch_exponent`` and
    ``η*(B, D) = anchor_lr · (B / anchor_batch_tokens)^lr_batch_exponent · (D / anchor_tokens)^lr_tokens_exponent``.
    Re-anchor a recipe by changing ``anchor_lr`` (one number) after a sweep at your own setting.
    """

    anchor_lr: float = 1e-2
    anchor_batch_tokens: int = 131072
    anchor_tokens: float = 8589934592.0
    anchor_source: str = ""
    batch_exponent: float = 0.45
    lr_batch_exponent: float = 0.62
    lr_tokens_exponent: float = -0.56
    target_output_norm: float = 128.0
    """The optimal ‖W_out‖_RMS→∞ the trainer's norm guidance measures the run against (the paper:
    2^(7.0±0.2) ≈ 128 across horizons, ≈ 170 across widths and depths); 0 turns guidance off."""


@dataclass
class TrainConfig:
    tokens: float = 5e6
    """Token budget D of the run; steps = D / B."""
    global_batch_tokens: int | None = None
    """Tokens per optimizer step B. ``null``: B*(D) from the scaling rules, rounded to whole
    micro-batches on every rank."""
    micro_batch: int = 8
    """Sequences per rank per micro-step."""
    max_steps: int | None = None
    """Stop after this many steps (the schedule still spans the whole budget)."""
    max_loss: float | None = None
    """A training loss above this stops the run as diverged (exit code 3), like NaN/Inf. ``null``:
    1.5·ln(V) + 1 for the model's vocabulary V. A uniform prediction scores ln(V) and an
    initialised model starts there; a loss far above it means confident wrong predictions, which
    only a blow-up produces (the margin keeps the first steps' noise, a few tenths, well clear)."""
    rise_window: int = 0
    """Steps of the optional rising-loss rule; 0: off. The run also stops as diverged when the mean
    loss over the last ``rise_window`` steps exceeds the lowest such mean so far by more than
    ``max_rise`` (a loss climbing back up below ``max_loss``)."""
    max_rise: float = 1.0
    """Nats of rise the ``rise_window`` rule tolerates."""
    zero_stage: int = 2
    tp_size: int = 1
    """Tensor-parallel ranks per model replica (DeepSpeed AutoTP); the data-parallel size is the
    world size divided by it. 1: no tensor parallelism."""
    pp_size: int = 1
    """Pipeline stages per model replica (DeepSpeed's pipeline engine, :mod:`disco_ds.integrations.pipeline`);
    the data-parallel size is the world size divided by it, the micro-batches of a step are the
    plan's accumulation. Needs ``zero_stage`` 0 or 1 and ``tp_size`` 1. 1: no pipeline."""
    bf16: bool = True
    grad_dtype: str = "float32"
    """dtype in which DeepSpeed accumulates micro-batch gradients and reduces them over ranks:
    ``float32`` (Megatron's fp32 main gradient) or ``bfloat16`` (half the gradient memory and
    traffic). Only matters with ``bf16: true``; without ZeRO (``zero_stage: 0``) DeepSpeed
    accumulates in the model's dtype, so a bf16 model there needs ``bfloat16``."""
    compile: bool = False
    """``torch.compile`` the model (through the DeepSpeed engine, with the accelerator's default
    backend) and Scion's Newton–Schulz iteration. The first steps pay the compilation; a CPU run
    needs a C++ compiler."""
    seed: int = 0
    reference_world_size: int = 8
    """Data-parallel size the recipe is sized for (what ``disco_ds recipe`` prints)."""
    deepspeed: str | None = None
    """A DeepSpeed JSON whose keys override the generated config."""
    run_dir: str = "runs/{name}"
    name: str = "run"


@dataclass
class PipelineConfig:
    """How ``train.pp_size > 1`` cuts the model (:class:`~disco_ds.integrations.pipeline.NormGPTPipeline`)."""

    partition_method: str = "parameters"
    """One of ``PARTITION_METHODS``: ``parameters`` (the default: the embedding and the output layer
    weigh as much as blocks of the same size), ``uniform`` or ``type:BlockPart`` (blocks only)."""
    activation_checkpoint_interval: int = 0
    """Recompute activations in backward, keeping only every this many parts' inputs; 0: keep
    them all (``model.gradient_checkpointing`` does this for ``pp_size: 1``)."""


@dataclass
class EvalConfig:
    interval: int = 0
    """Steps between validation passes; 0: only at the end."""
    tokens: int = 262144
    sample_tokens: int = 0
    """Tokens of a greedy sample generated and logged at each evaluation; 0: no sample."""
    sample_prompt: str = ""
    """Text the sample continues; empty: the start of a document (the end-of-text token)."""


@dataclass
class CheckpointConfig:
    interval: int = 0
    """Steps between checkpoints; 0: only at the end."""
    keep: int = 3
    resume: str = "auto"
    """``auto`` (newest complete checkpoint of the run that verifies, if any), ``none``, or a checkpoint path."""
    allow_change: bool = False
    """Resume even when the run differs from the checkpoint's (world size, batch, lr, steps,
    schedule, optimizer hyperparameters), logging every change; false: such a resume is refused."""
    portable: bool = True
    """Also save Scion's full weights and momentum (``portable.pt``, :mod:`disco_ds.integrations.reshard`) in every
    checkpoint, so that it can resume at another world size or ZeRO stage (Scion without tensor
    parallelism only). Costs one gather to rank 0 and a file of 8 bytes per parameter."""


@dataclass
class LoggingConfig:
    interval: int = 10
    norms_interval: int | None = None
    """Steps between measurements of every group's SPEC 4 norms; null: ``logging.interval``. The
    output layer's norm (the paper's instrument, cheap: no power iteration) is measured every step."""
    wandb: bool = False
    wandb_project: str = "disco_ds"
    wandb_mode: str = "offline"
    peak_tflops: float = 989.0
    """Per-device peak for MFU (H100 SXM dense bf16)."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    @property
    def run_path(self) -> Path:
        return Path(self.train.run_dir.format(name=self.train.name))


def _check_type(value: Any, annotation: Any, key: str) -> Any:
    """``value`` converted to ``annotation`` where that is lossless (int → float), else an error."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_type(value, arg, key)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_check_type(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if annotation is Any:
        return value
    if annotation is float and isinstance(value, str):
        # PyYAML reads exponent literals without a sign ("2.5e9") as strings.
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
        raise ConfigError(f"{key}: expected {annotation.__name__}, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass ``cls`` from nested dicts, refusing unknown keys and wrong types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown key {dotted!r}; accepted keys: {', '.join(prefix + n for n in names)}")
        if dataclasses.is_dataclass(hints[key]):
            kwargs[key] = from_dict(hints[key], value or {}, f"{dotted}.")
        else:
            kwargs[key] = _check_type(value, hints[key], dotted)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict[str, Any]:
    """The resolved configuration as plain YAML-able dicts."""
    return dataclasses.asdict(cfg)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) to nested dicts."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        dotted, raw = item.split("=", 1)
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        value = yaml.safe_load(raw) if raw != "" else None
        if parts[-1] == "overrides" and isinstance(value, dict) and isinstance(node.get("overrides"), dict):
            value = {**node["overrides"], **value}
        node[parts[-1]] = value
    return data


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{key}: {message}")


# NormGPTConfig fields whose default is None (derived from others): the type a value must have.
_DERIVED_OVERRIDE_TYPES: dict[str, Any] = {
    "n_head": int | None, "n_kv_head": int | None, "ffn_hidden_size": int | None, "init_residual_out": float | None,
    "bos_token_id": int | None, "eos_token_id": int | None, "pad_token_id": int | None,
}
# Shape fields: a model with zero of any of them cannot be built.
_POSITIVE_OVERRIDES = ("vocab_size", "d_model", "n_layer", "n_head", "n_kv_head", "head_dim", "ffn_hidden_size",
                       "ffn_multiple_of", "max_position_embeddings")


def _check_override(key: str, value: Any, default: Any) -> Any:
    """``model.overrides.<key>`` checked like a recipe key: the type of NormGPTConfig's default (or
    of :data:`_DERIVED_OVERRIDE_TYPES` where that default is None), and positive for shapes."""
    dotted = f"model.overrides.{key}"
    annotation = _DERIVED_OVERRIDE_TYPES.get(key, Any if default is None else type(default))
    value = _check_type(value, annotation, dotted)
    _require(key not in _POSITIVE_OVERRIDES or value is None or value >= 1, dotted, f"must be at least 1, got {value}")
    return value


def validate(cfg: RunConfig) -> RunConfig:
    """Value ranges and combinations that cannot run (each error names its key)."""
    o, s, t = cfg.optimizer, cfg.schedule, cfg.train
    _require(o.name in OPTIMIZERS, "optimizer.name", f"{o.name!r} is not one of {list(OPTIMIZERS)}")
    _require(o.ns_method in NS_METHODS, "optimizer.ns_method", f"{o.ns_method!r} is not one of {list(NS_METHODS)}")
    _require(o.comm_dtype in COMM_DTYPES, "optimizer.comm_dtype", f"{o.comm_dtype!r} is not one of {list(COMM_DTYPES)}")
    _require(len(o.lr_ratios) == 3 and all(r > 0 for r in o.lr_ratios), "optimizer.lr_ratios",
             f"needs three positive numbers (input, hidden, output), got {o.lr_ratios}")
    _require(o.lr is None or o.lr > 0, "optimizer.lr", f"must be positive or null, got {o.lr}")
    _require(0 < o.momentum <= 1, "optimizer.momentum", f"must be in (0, 1] (Scion's m = 1 − β), got {o.momentum}")
    _require(len(o.adamw_betas) == 2, "optimizer.adamw_betas", f"needs two numbers, got {o.adamw_betas}")
    _require(s.decay_shape in DECAY_SHAPES, "schedule.decay_shape", f"{s.decay_shape!r} is not one of {list(DECAY_SHAPES)}")
    _require(0 <= s.warmup < 1 and 0 <= s.decay <= 1, "schedule.warmup", "warmup and decay are fractions of the run in [0, 1]")
    _require(s.warmup + s.decay <= 1, "schedule.decay", f"warmup ({s.warmup}) + decay ({s.decay}) exceed the whole run")
    _require(t.zero_stage in (0, 1, 2, 3), "train.zero_stage", f"must be 0, 1, 2 or 3, got {t.zero_stage}")
    _require(t.tp_size >= 1, "train.tp_size", f"must be at least 1, got {t.tp_size}")
    _require(t.pp_size >= 1, "train.pp_size", f"must be at least 1, got {t.pp_size}")
    if t.pp_size > 1:
        _check_pipeline(cfg)
    else:
        for key, value in dataclasses.asdict(cfg.pipeline).items():
            _require(value == getattr(PipelineConfig(), key), f"pipeline.{key}",
                     f"{value!r} has no effect with train.pp_size=1 (pipeline.* keys configure pipeline stages)")
    _require(t.grad_dtype in GRAD_DTYPES, "train.grad_dtype", f"{t.grad_dtype!r} is not one of {list(GRAD_DTYPES)}")
    _require(t.bf16 or t.grad_dtype == "float32", "train.grad_dtype",
             "bfloat16 needs train.bf16=true (an fp32 model has fp32 gradients)")
    # DeepSpeed 0.19.8 raises NotImplementedError for a bf16 model with fp32 accumulation outside ZeRO.
    _require(not (t.bf16 and t.zero_stage == 0 and t.grad_dtype == "float32"), "train.grad_dtype",
             "float32 with train.bf16=true needs train.zero_stage 1, 2 or 3: without ZeRO DeepSpeed accumulates "
             "gradients in the model's bf16. Use train.zero_stage=1 (no extra memory on one rank) or train.grad_dtype=bfloat16")
    _require(cfg.scaling.target_output_norm >= 0, "scaling.target_output_norm",
             f"must be positive (or 0: no norm guidance), got {cfg.scaling.target_output_norm}")
    _require(t.tokens > 0, "train.tokens", "the token budget must be positive")
    _require(t.micro_batch >= 1, "train.micro_batch", "must be at least 1")
    _require(t.max_steps is None or t.max_steps >= 1, "train.max_steps",
             f"must be at least 1 (or null: the whole budget), got {t.max_steps}")
    _require(cfg.data.seq_len >= 2, "data.seq_len", "must be at least 2")
    _require(cfg.eval.sample_tokens >= 0, "eval.sample_tokens", f"must be 0 (no sample) or positive, got {cfg.eval.sample_tokens}")
    _require(cfg.checkpoint.keep >= 1, "checkpoint.keep", "keep at least one checkpoint")
    _require(t.max_loss is None or t.max_loss > 0, "train.max_loss", f"must be positive or null (1.5·ln(vocab) + 1), got {t.max_loss}")
    _require(t.rise_window >= 0, "train.rise_window", f"must be 0 (off) or a number of steps, got {t.rise_window}")
    _require(t.max_rise > 0, "train.max_rise", f"must be positive, got {t.max_rise}")
    _require(cfg.logging.interval >= 1, "logging.interval", f"must be at least 1, got {cfg.logging.interval}")
    _require(cfg.logging.norms_interval is None or cfg.logging.norms_interval >= 1, "logging.norms_interval",
             f"must be at least 1 (or null: logging.interval), got {cfg.logging.norms_interval}")
    _require(cfg.logging.wandb_mode in ("offline", "online", "disabled"), "logging.wandb_mode",
             f"{cfg.logging.wandb_mode!r} is not one of ['offline', 'online', 'disabled']")
    from disco_ds.models.norm_gpt.configuration_norm_gpt import PRESETS, NormGPTConfig

    _require(cfg.model.preset in PRESETS, "model.preset", f"{cfg.model.preset!r} is not one of {sorted(PRESETS)}")
    accepted = NormGPTConfig().to_dict()
    for key, value in cfg.model.overrides.items():
        _require(key in accepted, f"model.overrides.{key}", "is not a NormGPTConfig field")
        cfg.model.overrides[key] = _check_override(key, value, accepted[key])
    try:
        NormGPTConfig.from_preset(cfg.model.preset, **cfg.model.overrides)
    except (ValueError, TypeError, KeyError) as err:
        raise ConfigError(f"model.overrides: the preset {cfg.model.preset!r} with {cfg.model.overrides} "
                          f"is not a valid NormGPT: {err}") from None
    positions = {**PRESETS[cfg.model.preset], **cfg.model.overrides}.get("max_position_embeddings")
    _require(positions is None or cfg.data.seq_len <= positions, "data.seq_len",
             f"{cfg.data.seq_len} exceeds the model's max_position_embeddings ({positions})")
    return cfg


PIPELINE_COMBINATIONS = ("train.pp_size > 1 runs with train.zero_stage 0 or 1, train.tp_size 1, "
                         "pipeline.activation_checkpoint_interval instead of model.gradient_checkpointing, "
                         "eval.sample_tokens 0 and train.compile false")
"""What composes with pipeline parallelism (DeepSpeed's pipeline engine has no ZeRO-2/3 and no AutoTP)."""


def _check_pipeline(cfg: RunConfig) -> None:
    """Refuse what DeepSpeed's pipeline engine cannot run, naming the keys and what is supported."""
    t, p = cfg.train, cfg.pipeline
    _require(t.zero_stage in (0, 1), "train.zero_stage",
             f"{t.zero_stage} with train.pp_size={t.pp_size}: DeepSpeed's pipeline engine partitions neither "
             f"gradients nor weights (ZeRO-2/3). Supported: {PIPELINE_COMBINATIONS}")
    _require(t.tp_size == 1, "train.tp_size",
             f"{t.tp_size} with train.pp_size={t.pp_size}: AutoTP does not compose with DeepSpeed's pipeline "
             f"engine. Supported: {PIPELINE_COMBINATIONS}")
    _require(not cfg.model.gradient_checkpointing, "model.gradient_checkpointing",
             f"true with train.pp_size={t.pp_size}: set pipeline.activation_checkpoint_interval (e.g. 1) instead. "
             f"Supported: {PIPELINE_COMBINATIONS}")
    _require(cfg.eval.sample_tokens == 0, "eval.sample_tokens",
             f"{cfg.eval.sample_tokens} with train.pp_size={t.pp_size}: generation needs the whole model on one rank; "
             f"sample from the exported checkpoint (disco_ds export, then generate). Supported: {PIPELINE_COMBINATIONS}")
    _require(not t.compile, "train.compile",
             f"true with train.pp_size={t.pp_size}: the pipeline engine's parts are not compiled. "
             f"Supported: {PIPELINE_COMBINATIONS}")
    _require(p.partition_method in PARTITION_METHODS, "pipeline.partition_method",
             f"{p.partition_method!r} is not one of {list(PARTITION_METHODS)}")
    _require(p.activation_checkpoint_interval >= 0, "pipeline.activation_checkpoint_interval",
             f"must be 0 (off) or a number of parts, got {p.activation_checkpoint_interval}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start from the defaults when ``path`` is None), apply the dotted
    overrides, check every key and return the typed configuration."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"recipe {str(path)!r} does not exist")
        data = yaml.safe_load(path.read_text()) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"recipe {str(path)!r} must be a YAML mapping of sections")
    data = apply_overrides(data, list(overrides or []))
    return validate(from_dict(RunConfig, data))
