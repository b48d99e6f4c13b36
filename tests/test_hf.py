"""disco_ds.Scion as the optimizer of the Hugging Face Trainer and of accelerate, with and without DeepSpeed.

Multi-process cases launch ``tests/hf_worker.py`` (Trainer) or ``tests/accelerate_worker.py`` with
``torchrun`` as 2 CPU ranks (gloo) on the shipped templates ``recipes/deepspeed/zero{1,2,3}.json``,
and compare the parameters after K optimizer steps with single-process Scion on the very batches
the ranks consumed, under the same learning-rate schedule.

Tolerance: the runs use fp32 transport and the exact (fp32 SVD) orthogonalisation, so the only
differences from the single process are fp32 reassociations (the cross-rank gradient average, the
split sums of squares of the row/RMS norms). Measured after 4 steps: ≤ 5e-7 for NormGPT and
≤ 2e-6 for Llama (whose norm gains sit at 1, so an fp32 ulp is 1e-7 there); 1e-5 leaves room
while still catching any real deviation (one wrong step moves parameters by lr·O(1) ≈ 1e-2).
Resuming from a checkpoint replays the same arithmetic on the same layout, so it is compared
exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from launching import free_port, torchrun, worker_env  # noqa: E402
from hf_worker import LR, MICRO_BATCH, PatternDataset, build_model, find_scion, make_trainer, training_arguments  # noqa: E402

from disco_ds import Scion, scion_param_groups  # noqa: E402
from disco_ds.integrations.deepspeed_config import check_deepspeed_config  # noqa: E402
from disco_ds.hf import (  # noqa: E402
    SUPPORTED_ROUTES,
    ScionFactory,
    ScionTrainer,
    ScionTrainingArguments,
    scion_optimizer_cls_and_kwargs,
    split_scion_kwargs,
    watch_for_replacement,
)

REPO = Path(__file__).resolve().parents[1]
HF_WORKER = Path(__file__).parent / "hf_worker.py"
ACCELERATE_WORKER = Path(__file__).parent / "accelerate_worker.py"
TEMPLATES = REPO / "recipes" / "deepspeed"
STEPS = 4
ATOL = 1e-5  # see the module docstring
# Route 2, the optimizer factory, is a transformers 5.x protocol (disco_ds.hf.ScionFactory): on 4.x
# (make test-oldest) it is left out, and jobs that test something else than the route use route 1.
HAS_FACTORY = int(transformers.__version__.split(".")[0]) >= 5
ROUTES = ["cls_kwargs", "factory", "trainer"] if HAS_FACTORY else ["cls_kwargs", "trainer"]
FACTORY = "factory" if HAS_FACTORY else "cls_kwargs"
NORMGPT_GROUPS = 3  # embedding, hidden, output: DeepSpeed calls Scion.step once per group per step


def launch(script: Path, cfg: dict, out: Path, world: int = 2, extra_env: dict | None = None) -> dict:
    env = worker_env(WANDB_MODE="disabled", HF_HUB_OFFLINE="1", **(extra_env or {}))
    proc = torchrun(script, world, json.dumps(cfg), str(out), env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


def trainer_jobs(stage: int) -> list[dict]:
    jobs = [{"name": route, "route": route, "steps": STEPS} for route in ROUTES]
    if stage in (2, 3):
        jobs[ROUTES.index("trainer")]["save_steps"] = 2  # ScionTrainer saves checkpoint-2 for the resume test
        jobs += [
            # A stock Llama through the plain Trainer, classified without any mapping.
            {"name": "llama", "route": "cls_kwargs", "model": "llama", "steps": STEPS},
            {"name": "offload", "route": FACTORY, "steps": STEPS, "config_suffix": "_offload"},
            # Gradient accumulation: one Scion step per optimizer step, never per micro-batch.
            {"name": "accum", "route": FACTORY, "steps": STEPS, "accum": 2},
            {"name": "trainer_optimizers", "route": "trainer_optimizers", "steps": STEPS},
        ]
    if stage == 2:
        jobs += [
            {"name": "optimizer_section", "route": "trainer", "steps": STEPS,
             "config_override": {"optimizer": {"type": "AdamW", "params": {"lr": "auto"}}}},
            # Plain TrainingArguments keep the Trainer's default max_grad_norm=1.0: the template's
            # explicit gradient_clipping 0.0 makes the Trainer refuse instead of clipping silently.
            {"name": "clip_default", "route": "cls_kwargs", "steps": STEPS, "args_override": {"max_grad_norm": 1.0}},
        ]
    # Last: the refused run leaves its engine mid-backward.
    jobs.append({"name": "optimizers", "route": "optimizers", "steps": STEPS})
    return jobs


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict = {}

    def get(kind: str, stage: int) -> dict:
        if (kind, stage) not in cache:
            root = tmp_path_factory.mktemp(f"{kind}_z{stage}")
            if kind == "trainer":
                cache[kind, stage] = launch(HF_WORKER, {"stage": stage, "root": str(root), "jobs": trainer_jobs(stage)},
                                            root / "result.pt")
            elif kind == "resume":
                first = get("trainer", stage)
                ckpt = first["trainer"]["output_dir"] + "/checkpoint-2"
                job = {"name": "trainer", "route": "trainer", "steps": STEPS, "resume_from": ckpt}
                cache[kind, stage] = launch(HF_WORKER, {"stage": stage, "root": str(root), "jobs": [job]}, root / "result.pt")
            elif kind == "accelerate":
                cache[kind, stage] = launch(ACCELERATE_WORKER, {"stage": stage, "steps": STEPS}, root / "result.pt")
        return cache[kind, stage]

    return get


def global_batches(rank_batches: list[list[torch.Tensor]], accum: int = 1) -> list[torch.Tensor]:
    """Step s's global batch: every rank's micro-batches s·accum … s·accum + accum − 1."""
    steps = len(rank_batches[0]) // accum
    return [torch.cat([b for r in rank_batches for b in r[s * accum:(s + 1) * accum]]) for s in range(steps)]


def single_process(init: dict, batches: list[torch.Tensor], kind: str = "normgpt", schedule: str | None = "cosine",
                   num_items: list[torch.Tensor | None] | None = None):
    """Single-process Scion (same groups and settings as the workers) on ``batches``; the
    parameters after the run and the lr of every group at every step. ``num_items``: the
    ``num_items_in_batch`` the Trainer passed with each batch, so the loss is normalised as it was
    (transformers 4.x counts the labels before the shift, 5.x after: the same gradient up to a
    factor, which Scion's scale-invariant LMO only sees through fp32 rounding)."""
    from transformers import get_scheduler

    model = build_model(kind)
    model.load_state_dict(init)
    optimizer = Scion(scion_param_groups(model, LR, ns_method="svd"))
    scheduler = get_scheduler(schedule, optimizer, num_warmup_steps=0, num_training_steps=STEPS) if schedule else None
    lrs = []
    for batch, items in zip(batches, num_items or [None] * len(batches)):
        lrs.append({g["role"]: g["lr"] for g in optimizer.param_groups})
        loss = model(input_ids=batch, labels=batch, **({} if items is None else {"num_items_in_batch": items})).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, lrs


def assert_params_close(got: dict, expected: dict, atol: float = ATOL) -> None:
    assert got.keys() == expected.keys()
    for name, ref in expected.items():
        torch.testing.assert_close(got[name].reshape(ref.shape), ref, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_trained_with_scion(result: dict, stage: int, kind: str = "normgpt", groups: int = NORMGPT_GROUPS,
                              accum: int = 1) -> None:
    assert result["error"] is None
    # ZeRO-3: the model was built after TrainingArguments, so transformers partitioned it at
    # construction (zero.Init, shapes only in ds_shape), as in real use.
    assert result["built_partitioned"] == (stage == 3)
    assert result["global_step"] == STEPS
    assert result["engine_class"] == "DeepSpeedEngine" and result["engine_stage"] == stage
    assert result["basic_optimizer_class"] == "Scion" and result["zero_wraps_scion"]
    # DeepSpeed calls step() once per param group (ZeRO 1/2) or sub-group (ZeRO 3) per optimizer step.
    assert result["rank_scion_steps"] == [STEPS * groups] * 2
    losses = result["losses"]
    assert len(losses) == STEPS and losses[-1] < losses[0] - 0.1, losses
    expected, lrs = single_process(result["init"], global_batches(result["rank_batches"], accum), kind)
    assert_params_close(result["params"], expected)
    # The Trainer's schedule acts on every group with the role ratios kept (1 : 1/8 : 1).
    assert len(result["lrs"]) == STEPS * accum
    for got, ref in zip(result["lrs"][::accum], lrs):
        assert got == pytest.approx(ref, rel=1e-12)
        assert got["hidden"] == pytest.approx(got["embedding"] / 8, rel=1e-12)
        assert got["output"] == pytest.approx(got["embedding"], rel=1e-12)
    assert lrs[-1]["embedding"] < lrs[0]["embedding"] == LR


# ---------------------------------------------------------------------------- Trainer + DeepSpeed


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize("route", ROUTES)
def test_trainer_route_under_deepspeed_equals_single_process(runs, stage: int, route: str) -> None:
    assert_trained_with_scion(runs("trainer", stage)[route], stage)


@pytest.mark.parametrize("stage", [2, 3])
def test_stock_llama_trains_under_trainer_and_deepspeed(runs, stage: int) -> None:
    # Llama has norm gains: a fourth (vector) group.
    assert_trained_with_scion(runs("trainer", stage)["llama"], stage, kind="llama", groups=4)


@pytest.mark.parametrize("stage", [2, 3])
def test_gradient_accumulation_steps_once_per_optimizer_step(runs, stage: int) -> None:
    result = runs("trainer", stage)["accum"]
    assert all(len(b) == 2 * STEPS for b in result["rank_batches"])
    assert_trained_with_scion(result, stage, accum=2)


@pytest.mark.parametrize("stage", [2, 3])
def test_offload_template_keeps_scion(runs, stage: int) -> None:
    result = runs("trainer", stage)["offload"]
    assert result["engine_offload"] is True
    assert_trained_with_scion(result, stage)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_discarded_optimizer_is_refused(runs, stage: int) -> None:
    """Trainer(optimizers=(Scion, None)) under DeepSpeed: the Trainer steps AdamW; disco_ds refuses
    at the first backward, before any optimizer step."""
    result = runs("trainer", stage)["optimizers"]
    assert result["basic_optimizer_class"] == "AdamW"  # what would have trained
    assert result["global_step"] == 0 and result["discarded_steps"] == 0
    for error in result["rank_errors"]:
        assert error.startswith("OptimizerReplacedError: disco_ds.Scion was built for these parameters, but DeepSpeed steps")
        assert "Trainer(optimizers=(Scion(...), ...))" in error
        assert SUPPORTED_ROUTES in error


def test_scion_trainer_refusals_at_construction(runs) -> None:
    results = runs("trainer", 2)
    error = results["trainer_optimizers"]["error"]
    assert error.startswith("OptimizerReplacedError: ScionTrainer got optimizers=(Scion(...), ...) together with DeepSpeed")
    assert results["trainer_optimizers"]["at"] == "construction"
    error = results["optimizer_section"]["error"]
    assert error.startswith("ValueError: DeepSpeed config has an 'optimizer' section")


def test_template_clipping_off_refuses_trainer_default_clipping(runs) -> None:
    error = runs("trainer", 2)["clip_default"]["error"]
    assert "gradient_clipping=0.0 vs hf max_grad_norm=1.0" in error


@pytest.mark.parametrize("stage", [2, 3])
def test_checkpoint_resume_with_scion_state(runs, stage: int) -> None:
    """ScionTrainer saves checkpoint-2 of a 4-step run; new processes resume from it and must end
    exactly where the uninterrupted run ended (momentum, fp32 master weights, schedule, data)."""
    first = runs("trainer", stage)["trainer"]
    files = first["checkpoint_files"]
    for rank in range(2):
        assert f"global_step2/zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in files
    state = torch.load(Path(first["output_dir"]) / "checkpoint-2/global_step2/zero_pp_rank_0_mp_rank_00_optim_states.pt",
                       weights_only=False)["optimizer_state_dict"]
    scion_state = state["base_optimizer_state" if stage < 3 else "optimizer_state_dict"]["state"]
    assert len(scion_state) == NORMGPT_GROUPS
    assert all(set(s) == {"exp_avg"} and s["exp_avg"].abs().sum() > 0 for s in scion_state.values())

    resumed = runs("resume", stage)["trainer"]
    assert resumed["error"] is None and resumed["global_step"] == STEPS
    assert resumed["basic_optimizer_class"] == "Scion"
    assert resumed["rank_scion_steps"] == [2 * NORMGPT_GROUPS] * 2  # only steps 3 and 4 ran
    # The resumed run consumed the uninterrupted run's last two batches at the same rates.
    for got, ref in zip(resumed["rank_batches"], first["rank_batches"]):
        assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, ref[2:]))
    assert resumed["lrs"] == first["lrs"][2:]
    for name, ref in first["params"].items():
        assert torch.equal(resumed["params"][name], ref), name


# ---------------------------------------------------------------------------- accelerate


@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_prepare_trains_with_scion(runs, stage: int) -> None:
    result = runs("accelerate", stage)
    for rank in result["ranks"]:
        assert rank["engine_class"] == "DeepSpeedEngine" and rank["engine_stage"] == stage
        assert rank["built_partitioned"] == (stage == 3)
        assert rank["basic_optimizer_class"] == "Scion" and rank["basic_is_user_scion"]
        assert rank["gradient_clipping"] == 0.0
        assert rank["scion_steps"] == STEPS * NORMGPT_GROUPS
    expected, _ = single_process(result["init"], global_batches([r["batches"] for r in result["ranks"]]), schedule=None)
    assert_params_close(result["params"], expected)


# ---------------------------------------------------------------------------- one process, no DeepSpeed


def in_process_run(route: str, tmp_path: Path, kind: str = "normgpt"):
    args = training_arguments(tmp_path / route, STEPS, scion_args=route == "trainer")
    model = build_model(kind)
    init = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = make_trainer(route, model, args)
    batches: list[tuple[torch.Tensor, torch.Tensor | None]] = []
    model.register_forward_pre_hook(
        lambda m, a, kw: batches.append((kw["input_ids"].clone(), kw.get("num_items_in_batch"))) if m.training else None,
        with_kwargs=True)
    trainer.train()
    return trainer, model, init, batches


@pytest.mark.parametrize("route,kind", [("cls_kwargs", "normgpt"), (FACTORY, "normgpt"), ("trainer", "normgpt"),
                                        ("optimizers", "normgpt"), ("trainer", "llama")])
def test_routes_without_deepspeed(tmp_path: Path, route: str, kind: str) -> None:
    """Without DeepSpeed every route, Trainer(optimizers=(Scion, None)) included, trains with Scion."""
    trainer, model, init, batches = in_process_run(route, tmp_path, kind)
    scion = find_scion(trainer)
    assert isinstance(scion, Scion) and scion.steps == STEPS
    assert len(batches) == STEPS and all(b.shape[0] == MICRO_BATCH for b, _ in batches)
    expected, _ = single_process(init, [b for b, _ in batches], kind, num_items=[n for _, n in batches])
    assert_params_close({n: p.detach() for n, p in model.named_parameters()}, expected)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < losses[0]


def test_route1_trainer_pops_params(tmp_path: Path) -> None:
    """The documented pitfall of route 1: the Trainer pops 'params' from the kwargs dict."""
    model = build_model()
    cls, kwargs = scion_optimizer_cls_and_kwargs(model, LR)
    assert cls is Scion and "params" in kwargs
    from transformers import Trainer

    trainer = Trainer(model=model, args=training_arguments(tmp_path, STEPS, scion_args=False),
                      train_dataset=PatternDataset(), optimizer_cls_and_kwargs=(cls, kwargs))
    trainer.create_optimizer()
    assert isinstance(trainer.optimizer, Scion) and "params" not in kwargs
    assert [g["role"] for g in trainer.optimizer.param_groups] == ["embedding", "hidden", "output"]


def test_llama_is_classified_without_a_mapping() -> None:
    model = build_model("llama")
    groups = {g["role"]: g for g in scion_param_groups(model, lr=1.0)}
    assert set(groups) == {"embedding", "hidden", "output", "vector"}
    assert groups["embedding"]["param_names"] == ["model.embed_tokens.weight"]
    assert groups["embedding"]["norm"] == "token_rms"
    assert groups["output"]["param_names"] == ["lm_head.weight"] and groups["output"]["norm"] == "row_norm"
    hidden = set(groups["hidden"]["param_names"])
    assert groups["hidden"]["norm"] == "spectral"
    assert hidden == {f"model.layers.{i}.{m}.weight" for i in range(2)
                      for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(groups["vector"]["param_names"]) == {"model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")}
    assert groups["vector"]["norm"] == "rms" and groups["vector"]["lr"] == pytest.approx(1 / 8)


# ---------------------------------------------------------------------------- units


def test_scion_arms_the_replacement_watch() -> None:
    """Every Scion watches for being discarded (disco_ds/optim/scion.py arms it in Scion.__init__)."""
    model = build_model()
    optimizer = Scion(scion_param_groups(model, LR))
    assert getattr(optimizer, "_replacement_watch", None) is not None


def test_watch_is_silent_and_disarms_without_deepspeed() -> None:
    model = build_model()
    spare = Scion(scion_param_groups(model, LR))  # built and never used: no DeepSpeed, no error
    watch_for_replacement(spare)
    used = Scion(scion_param_groups(model, LR))
    watch_for_replacement(used)
    watch_for_replacement(used)  # idempotent
    batch = PatternDataset().ids[:2]
    model(input_ids=batch, labels=batch).loss.backward()
    used.step()
    assert used.steps == 1
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # every hook removed


def test_split_scion_kwargs() -> None:
    groups, opt = split_scion_kwargs({"hidden_lr_ratio": 0.25, "momentum": 0.2, "comm_dtype": "float32", "ns_method": "svd"})
    assert groups == {"lr_ratios": (1.0, 0.25, 1.0), "momentum": 0.2, "ns_method": "svd"}
    assert opt == {"comm_dtype": torch.float32}
    with pytest.raises(TypeError, match="unknown Scion argument 'betas'"):
        split_scion_kwargs({"betas": (0.9, 0.95)})


def test_factory_needs_lr_and_keeps_the_dict() -> None:
    model = build_model()
    kwargs = {"lr": 0.05, "lr_ratios": (1.0, 0.5, 2.0)}
    first, second = ScionFactory()(model, **kwargs), ScionFactory()(model, **kwargs)
    assert kwargs == {"lr": 0.05, "lr_ratios": (1.0, 0.5, 2.0)}
    for optimizer in (first, second):
        assert {g["role"]: g["lr"] for g in optimizer.param_groups} == pytest.approx(
            {"embedding": 0.05, "hidden": 0.025, "output": 0.1})
    with pytest.raises(TypeError, match="ScionFactory needs 'lr'"):
        ScionFactory()(model)


def test_scion_trainer_lr_ratios_from_arguments_and_kwargs(tmp_path: Path) -> None:
    model = build_model("llama")
    args = ScionTrainingArguments(output_dir=str(tmp_path), learning_rate=0.04, hidden_lr_ratio=0.25,
                                  vector_lr_ratio=0.5, report_to="none", use_cpu=True)
    assert args.max_grad_norm == 0.0  # clipping off by default
    trainer = ScionTrainer(model=model, args=args, train_dataset=PatternDataset())
    lrs = {g["role"]: g["lr"] for g in trainer.create_optimizer().param_groups}
    assert lrs == pytest.approx({"embedding": 0.04, "hidden": 0.01, "output": 0.04, "vector": 0.02})
    trainer = ScionTrainer(model=model, args=args, train_dataset=PatternDataset(), lr_ratios=(2.0, 0.125, 1.0),
                           scion_kwargs={"momentum": 0.3})
    optimizer = trainer.create_optimizer()
    lrs = {g["role"]: g["lr"] for g in optimizer.param_groups}
    assert lrs == pytest.approx({"embedding": 0.08, "hidden": 0.005, "output": 0.04, "vector": 0.02})
    assert all(g["momentum"] == 0.3 for g in optimizer.param_groups)
    with pytest.raises(ValueError, match="ScionTrainer builds Scion itself"):
        ScionTrainer(model=model, args=args, optimizer_cls_and_kwargs=(Scion, {}))
    with pytest.raises(TypeError, match="unknown Scion argument"):
        ScionTrainer(model=model, args=args, scion_kwargs={"beta2": 0.95})


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero2_offload", "zero3_offload"])
def test_deepspeed_templates(name: str) -> None:
    config = json.loads((TEMPLATES / f"{name}.json").read_text())
    check_deepspeed_config(config)
    assert "optimizer" not in config and "scheduler" not in config
    assert config["zero_allow_untested_optimizer"] is True
    assert config["gradient_clipping"] == 0.0  # explicit: DeepSpeed/accelerate would default to 1.0
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto"
    zero = config["zero_optimization"]
    assert zero["stage"] == int(name[4])
    assert not zero.get("round_robin_gradients", False)
    if "offload" in name:
        assert config["zero_force_ds_cpu_optimizer"] is False
        assert zero["offload_optimizer"]["device"] == "cpu"
    if zero["stage"] == 3:
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


# ---------------------------------------------------------------------------- the example


@pytest.mark.parametrize("template,model,route", [("zero2", "normgpt", "trainer"), ("zero3", "llama", FACTORY)])
def test_example_under_the_deepspeed_launcher(tmp_path: Path, template: str, model: str, route: str) -> None:
    """The README command, on 2 CPU ranks through the ``deepspeed`` launcher."""
    out = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           str(REPO / "examples" / "trainer_scion.py"), "--deepspeed", str(TEMPLATES / f"{template}.json"),
           "--output_dir", str(out), "--model", model, "--route", route, "--seq_len", "64",
           "--per_device_train_batch_size", "4", "--max_steps", "6", "--learning_rate", "0.02", "--logging_steps", "1",
           "--report_to", "none", "--use_cpu", "--max_text_bytes", "200000", "--disable_tqdm", "true",
           "--save_strategy", "no"]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads([line for line in proc.stdout.splitlines() if line.startswith('{"optimizer"')][-1])
    assert summary["optimizer"] == "Scion" and summary["deepspeed"] is True and summary["steps"] == 6
    assert summary["last_loss"] < summary["first_loss"]
    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")  # ZeRO-3: gathered by the template's 16-bit save
    assert all(t.numel() > 0 for t in weights.values())
