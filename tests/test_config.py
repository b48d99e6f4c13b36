"""Recipes, configuration errors, the scaling-rule derivation, the WSD schedule and the generated
DeepSpeed config."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from disco_ds.trainer.config import ConfigError, load_config
from disco_ds.trainer.scaling import plan_run
from disco_ds.trainer.schedule import wsd_factor
from disco_ds.trainer.build import deepspeed_config

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))


def test_every_recipe_is_shipped() -> None:
    names = {p.name for p in RECIPES}
    assert {"tiny.yaml", "gpt-124m.yaml", "gpt-350m.yaml", "gpt-760m.yaml", "gpt-1.3b.yaml", "paper-proxy.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_loads_and_carries_the_papers_settings(recipe: Path) -> None:
    cfg = load_config(recipe)
    assert cfg.optimizer.name == "scion"
    if recipe.stem == "paper-proxy":  # the paper's protocol: no momentum, one lr for every group
        assert (cfg.optimizer.momentum, cfg.optimizer.lr_ratios) == (1.0, [1.0, 1.0, 1.0])
        assert (cfg.schedule.warmup, cfg.schedule.decay) == (0.0, 0.0)
    else:
        assert cfg.optimizer.momentum == 0.1
        assert cfg.optimizer.lr_ratios == [1.0, 0.125, 1.0]
    assert cfg.optimizer.weight_decay == 0.0
    assert (cfg.scaling.batch_exponent, cfg.scaling.lr_batch_exponent, cfg.scaling.lr_tokens_exponent) == (0.45, 0.62, -0.56)
    # Every recipe is anchored on the paper's own optimum (v1 text): 2^-4.5 at 524,288 tokens and 2^33.
    assert (cfg.scaling.anchor_lr, cfg.scaling.anchor_batch_tokens, cfg.scaling.anchor_tokens) == (2**-4.5, 524288, 2**33)
    assert cfg.scaling.target_output_norm == 128.0
    assert "2^-4.5" in cfg.scaling.anchor_source and "no momentum" in cfg.scaling.anchor_source
    assert "WITHOUT" in recipe.read_text()  # the recipe says in which setting the anchor was measured
    ds = deepspeed_config(cfg, plan_run(cfg, cfg.train.reference_world_size))
    assert ds["gradient_clipping"] == 0.0 and "optimizer" not in ds
    # The AdamW baseline is the same recipe with one switch.
    assert load_config(recipe, ["optimizer.name=adamw"]).optimizer.name == "adamw"


def test_plan_follows_the_scaling_rules() -> None:
    cfg = load_config(REPO / "recipes/gpt-124m.yaml")
    s, d = cfg.scaling, cfg.train.tokens
    plan = plan_run(cfg, 8)
    b_star = s.anchor_batch_tokens * (d / s.anchor_tokens) ** 0.45
    assert plan.batch_tokens_optimal == pytest.approx(b_star)
    per_micro = 8 * cfg.train.micro_batch * cfg.data.seq_len
    assert plan.batch_tokens % per_micro == 0
    assert plan.accumulation == max(1, round(b_star / per_micro))
    lr = s.anchor_lr * (plan.batch_tokens / s.anchor_batch_tokens) ** 0.62 * (d / s.anchor_tokens) ** -0.56
    assert plan.lr == pytest.approx(lr)
    assert plan.group_lrs == pytest.approx({"embedding": lr, "hidden": lr / 8, "output": lr, "vector": lr / 8})
    assert plan.steps == math.ceil(d / plan.batch_tokens)
    # Re-anchoring is one number: the whole ladder scales with it.
    assert plan_run(load_config(REPO / "recipes/gpt-124m.yaml", [f"scaling.anchor_lr={2 * s.anchor_lr!r}"]), 8).lr == pytest.approx(2 * lr)
    # More data: larger batch, smaller lr (η* ∝ D^-0.28 along B*).
    bigger = plan_run(load_config(REPO / "recipes/gpt-124m.yaml", ["train.tokens=2.5e10"]), 8)
    assert bigger.batch_tokens > plan.batch_tokens and bigger.lr < plan.lr
    # A forced batch gets the lr of that batch.
    forced = plan_run(load_config(REPO / "recipes/gpt-124m.yaml", ["train.global_batch_tokens=524288"]), 8)
    assert forced.batch_tokens == 524288
    assert forced.lr == pytest.approx(s.anchor_lr * (524288 / s.anchor_batch_tokens) ** 0.62 * (d / s.anchor_tokens) ** -0.56)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("train.micro_bach=4", "unknown key 'train.micro_bach'; accepted keys: train.tokens"),
        ("trian.zero_stage=1", "unknown key 'trian'"),
        ("train.micro_batch=four", "train.micro_batch: expected int"),
        ("optimizer.name=sgd", "optimizer.name: 'sgd' is not one of ['scion', 'adamw']"),
        ("schedule.decay_shape=exp", "schedule.decay_shape"),
        ("schedule.decay=0.99", "schedule.decay: warmup (0.05) + decay (0.99) exceed the whole run"),
        ("train.zero_stage=4", "train.zero_stage: must be 0, 1, 2 or 3"),
        ("data.seq_len=4096", "data.seq_len: 4096 exceeds the model's max_position_embeddings (256)"),
        ("model.overrides={n_layers: 3}", "model.overrides.n_layers: is not a NormGPTConfig field"),
        ("optimizer.lr_ratios=[1, 0.5]", "optimizer.lr_ratios: needs three positive numbers"),
        ("optimizer.momentum=0", "optimizer.momentum: must be in (0, 1]"),
        ("train.tokens=lots", "train.tokens: expected a number"),
        ("model.overrides={n_layer: three}", "model.overrides.n_layer: expected int, got 'three'"),
        ("model.overrides={qkv_norm: 1}", "model.overrides.qkv_norm: expected bool"),
        ("model.overrides={n_head: 0}", "model.overrides.n_head: must be at least 1"),
        ("train.max_steps=-3", "train.max_steps: must be at least 1 (or null: the whole budget), got -3"),
        ("eval.sample_tokens=-1", "eval.sample_tokens: must be 0 (no sample) or positive"),
    ],
)
def test_bad_configuration_names_the_key(override: str, needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "recipes/tiny.yaml", [override])
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["train.grad_dtype=fp16"], "train.grad_dtype: 'fp16' is not one of ['float32', 'bfloat16']"),
        (["train.bf16=false", "train.grad_dtype=bfloat16"], "train.grad_dtype: bfloat16 needs train.bf16=true"),
        (["train.bf16=true", "train.zero_stage=0"], "train.grad_dtype: float32 with train.bf16=true needs train.zero_stage 1, 2 or 3"),
    ],
)
def test_bad_gradient_dtype_names_the_key(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "recipes/tiny.yaml", overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_gradients_are_accumulated_and_reduced_in_fp32_by_default(stage: int) -> None:
    cfg = load_config(REPO / "recipes/gpt-124m.yaml", [f"train.zero_stage={stage}"])
    assert cfg.train.bf16 and cfg.train.grad_dtype == "float32"
    ds = deepspeed_config(cfg, plan_run(cfg, 8))
    assert ds["bf16"] == {"enabled": True}
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    cfg = load_config(REPO / "recipes/gpt-124m.yaml", [f"train.zero_stage={stage}", "train.grad_dtype=bfloat16"])
    ds = deepspeed_config(cfg, plan_run(cfg, 8))
    assert ds["data_types"] == {"grad_accum_dtype": "bf16"} and ds["communication_data_type"] == "bf16"
    # Without ZeRO a bf16 model runs with bf16 gradients only (DeepSpeed 0.19.8), when asked for.
    cfg = load_config(REPO / "recipes/gpt-124m.yaml", ["train.zero_stage=0", "train.grad_dtype=bfloat16"])
    assert deepspeed_config(cfg, plan_run(cfg, 8))["data_types"] == {"grad_accum_dtype": "bf16"}


def test_overrides_and_exponent_literals() -> None:
    cfg = load_config(REPO / "recipes/tiny.yaml", ["train.tokens=3e6", "model.overrides={n_layer: 3}", "optimizer.lr=0.05"])
    assert cfg.train.tokens == 3e6 and cfg.model.overrides == {"n_layer": 3} and cfg.optimizer.lr == 0.05
    assert plan_run(cfg, 2).lr == 0.05


def test_wsd_schedule() -> None:
    total, factors = 100, [wsd_factor(s, 100, 0.1, 0.2) for s in range(100)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(f == 1.0 for f in factors[10:80])
    assert factors[80:] == pytest.approx([1 - (k + 1) / 21 for k in range(20)])
    assert min(factors) > 0  # no step is spent at lr 0
    for shape in ("sqrt", "cosine"):
        tail = [wsd_factor(s, total, 0.0, 0.2, shape) for s in range(80, 100)]
        assert all(a > b for a, b in zip(tail, tail[1:])) and 0 < tail[-1] < 0.25
    assert wsd_factor(99, 100, 0.0, 0.2, "linear", min_ratio=0.1) == pytest.approx(0.1 + 0.9 / 21)
    with pytest.raises(ValueError, match="accepted values"):
        wsd_factor(90, 100, 0.0, 0.2, "exp")


def test_user_deepspeed_json_overrides_but_cannot_contradict_the_plan(tmp_path: Path) -> None:
    cfg = load_config(REPO / "recipes/tiny.yaml", [f"train.deepspeed={tmp_path / 'ds.json'}"])
    plan = plan_run(cfg, 2)
    (tmp_path / "ds.json").write_text(json.dumps({"zero_optimization": {"stage": 2, "overlap_comm": True}}))
    ds = deepspeed_config(cfg, plan)
    assert ds["zero_optimization"] == {"stage": 2, "overlap_comm": True, "compute_grad_norm": False}
    (tmp_path / "ds.json").write_text(json.dumps({"gradient_accumulation_steps": 7}))
    with pytest.raises(ValueError, match="gradient_accumulation_steps=7 contradicts"):
        deepspeed_config(cfg, plan)
    (tmp_path / "ds.json").write_text(json.dumps({"optimizer": {"type": "AdamW"}}))
    with pytest.raises(ValueError, match="'optimizer' section"):
        deepspeed_config(cfg, plan)
    for key, value, owner in [
        ("zero_optimization", {"stage": 3}, "zero_optimization.stage=3 contradicts the recipe's plan \\(2\\); set train.zero_stage"),
        ("bf16", {"enabled": True}, "bf16.enabled=True contradicts .* set train.bf16"),
        ("fp16", {"enabled": True}, "fp16.enabled=True contradicts"),
        ("communication_data_type", "bf16", "communication_data_type='bf16' contradicts .* set train.grad_dtype"),
        ("data_types", {"grad_accum_dtype": "bf16"}, "data_types.grad_accum_dtype='bf16' contradicts"),
    ]:
        (tmp_path / "ds.json").write_text(json.dumps({key: value}))
        with pytest.raises(ValueError, match=owner):
            deepspeed_config(cfg, plan)


@pytest.mark.parametrize("overrides, skipped", [
    (["train.zero_stage=2"], True),
    (["train.zero_stage=1", "train.bf16=false"], True),
    (["train.zero_stage=1", "train.bf16=true", "train.grad_dtype=bfloat16"], True),
    (["train.zero_stage=1", "train.bf16=true", "train.grad_dtype=float32"], False),  # BF16_Optimizer refuses it
    (["train.zero_stage=3"], False),  # DeepSpeed accepts it at stages 1 and 2 only
    (["train.zero_stage=0", "train.bf16=false"], False),
    (["train.zero_stage=2", "optimizer.name=adamw"], False),
])
def test_unused_gradient_norm_pass_is_switched_off_where_deepspeed_allows(overrides: list[str], skipped: bool) -> None:
    """Without clipping nothing reads DeepSpeed's gradient norm; where DeepSpeed 0.19.8 accepts
    ``compute_grad_norm: false`` the config sets it (a real ZeRO-2 run in tests/test_train.py
    starts with it)."""
    cfg = load_config(REPO / "recipes/tiny.yaml", overrides)
    ds = deepspeed_config(cfg, plan_run(cfg, 2))
    assert ds["gradient_clipping"] == 0.0
    assert ("compute_grad_norm" in ds["zero_optimization"]) is skipped
    if skipped:
        assert ds["zero_optimization"]["compute_grad_norm"] is False


TEMPLATES = sorted((REPO / "recipes/deepspeed").glob("*.json"))


@pytest.mark.parametrize("template", TEMPLATES, ids=[p.stem for p in TEMPLATES])
def test_shipped_deepspeed_templates_work_with_the_trainer(template: Path) -> None:
    """The Hugging Face templates' "auto" values take the recipe's (batch sizes, bf16) or
    DeepSpeed's defaults (buckets); everything else in them is kept."""
    user = json.loads(template.read_text())
    stage = user["zero_optimization"]["stage"]
    for bf16 in (True, False):
        cfg = load_config(REPO / "recipes/gpt-124m.yaml",
                          [f"train.deepspeed={template}", f"train.zero_stage={stage}", f"train.bf16={str(bf16).lower()}"])
        plan = plan_run(cfg, 8)
        ds = deepspeed_config(cfg, plan)

        def autos(node: object) -> list[str]:
            if isinstance(node, dict):
                return [k for k, v in node.items() if v == "auto"] + [a for v in node.values() for a in autos(v)]
            return []

        assert not autos(ds), autos(ds)
        assert ds["train_micro_batch_size_per_gpu"] == plan.micro_batch
        assert ds["gradient_accumulation_steps"] == plan.accumulation
        assert ds["train_batch_size"] == plan.micro_batch * plan.accumulation * 8
        assert ds["bf16"] == {"enabled": bf16} and ds["fp16"] == {"enabled": False}
        assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
        zero = ds["zero_optimization"]
        assert "reduce_bucket_size" not in zero  # "auto": DeepSpeed's default
        kept = {k: v for k, v in user["zero_optimization"].items() if v != "auto"}
        assert kept.items() <= zero.items()
        assert user.get("zero_force_ds_cpu_optimizer", True) == ds.get("zero_force_ds_cpu_optimizer", True)
    wrong = 1 if stage != 1 else 2
    cfg = load_config(REPO / "recipes/gpt-124m.yaml", [f"train.deepspeed={template}", f"train.zero_stage={wrong}"])
    with pytest.raises(ValueError, match=f"zero_optimization.stage={stage} contradicts .* set train.zero_stage"):
        deepspeed_config(cfg, plan_run(cfg, 8))


def test_recipe_command_prints_the_derivation() -> None:
    out = subprocess.run([sys.executable, "-m", "disco_ds", "recipe", str(REPO / "recipes/gpt-1.3b.yaml")],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    for needle in ("anchor      η_ref = 0.0441942 at B_ref = 524,288 tokens", "budget      D = 26,000,000,000 tokens", "8 ranks × 8 seq", "hidden", "steps"):
        assert needle in out
    bad = subprocess.run([sys.executable, "-m", "disco_ds", "recipe", str(REPO / "recipes/tiny.yaml"), "train.bogus=1"],
                         capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and "unknown key 'train.bogus'" in bad.stderr


def test_recipe_command_shows_the_papers_anchor_point_for_paper_proxy() -> None:
    proc = subprocess.run([sys.executable, "-m", "disco_ds", "recipe", str(REPO / "recipes/paper-proxy.yaml")],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "D = 8,589,934,592 tokens" in proc.stdout
    assert "524,288 = 8 ranks × 4 seq × 4 accumulation × 4096 tokens" in proc.stdout
    assert "η* = 0.04419  (input 0.04419, hidden 0.04419, output 0.04419" in proc.stdout
    assert "16,384 optimizer steps" in proc.stdout
    assert "paper-proxy" in proc.stdout and "momentum 1" in proc.stdout


def test_recipe_takes_overrides_after_options_and_warns_far_from_the_optimal_batch() -> None:
    """Overrides may follow ``--world-size``; a world size that forces B outside ½–2× B* is flagged
    with what it does to η; the preview includes the parameter counts and the memory estimate."""
    out = subprocess.run([sys.executable, "-m", "disco_ds", "recipe", str(REPO / "recipes/gpt-1.3b.yaml"), "--world-size",
                          "1000", "train.micro_batch=8"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    warning = next(line for line in out.stdout.splitlines() if line.startswith("warning"))
    assert "× B* =" in warning and "η follows the batch used" in warning and "× η* at B*" in warning
    for needle in ("parameters (", "memory      per GPU, ZeRO-", "activations at micro_batch 8 × 1024", "peak ≈"):
        assert needle in out.stdout, needle
    near = subprocess.run([sys.executable, "-m", "disco_ds", "recipe", str(REPO / "recipes/gpt-1.3b.yaml")],
                          capture_output=True, text=True, cwd=REPO)
    assert near.returncode == 0 and "warning" not in near.stdout
