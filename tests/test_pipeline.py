"""Pipeline parallelism (``train.pp_size``): NormGPT as DeepSpeed pipeline stages, Scion exact
within every stage.

Oracles: the same global batches through ``pp_size: 1`` on 2 data-parallel ranks and through
single-process Scion (no DeepSpeed) in this process; the trainer's own runs for resume, export and
resharding between pp_size 1 and 2. Real launches throughout (``torchrun`` for the worker, the
``deepspeed`` launcher for the trainer), CPU and gloo.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from launching import free_port, torchrun
from test_train import REPO, data_dir, launcher, losses, run, two_simulated_nodes, val_loss  # noqa: F401 -- data_dir is a fixture

import pipeline_worker
from disco_ds.trainer.build import _build_optimizer, build_model, build_model_config
from disco_ds.trainer.config import ConfigError, load_config
from disco_ds.trainer.memory import largest_stage
from disco_ds.trainer.scaling import plan_run

WORKER = Path(__file__).with_name("pipeline_worker.py")
STEPS, SEQUENCES = 3, 8


# ---------------------------------------------------------------------------- what is refused


@pytest.mark.parametrize("extra, key", [
    (["train.zero_stage=2"], "train.zero_stage"),
    (["train.zero_stage=3"], "train.zero_stage"),
    (["train.zero_stage=1", "train.tp_size=2"], "train.tp_size"),
    (["train.zero_stage=1", "model.gradient_checkpointing=true"], "model.gradient_checkpointing"),
    (["train.zero_stage=1", "eval.sample_tokens=16"], "eval.sample_tokens"),
    (["train.zero_stage=1", "train.compile=true"], "train.compile"),
    (["train.zero_stage=1", "pipeline.partition_method=by_luck"], "pipeline.partition_method"),
])
def test_what_the_pipeline_engine_cannot_run_is_refused_naming_the_keys(extra: list[str], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(REPO / "recipes/tiny.yaml", ["train.pp_size=2", *extra])
    message = str(err.value)
    assert message.startswith(key) and "train.pp_size=2" in message or "by_luck" in message
    if key != "pipeline.partition_method":
        assert "Supported:" in message and "train.zero_stage 0 or 1" in message


def test_disco_ds_plan_refuses_a_pipeline() -> None:
    from disco_ds.trainer.cluster_plan import Cluster, plan_cluster

    with pytest.raises(ConfigError, match=r"^train.pp_size=2: disco_ds plan models data and tensor parallelism"):
        plan_cluster(REPO / "recipes/tiny.yaml", Cluster(world_size=4), overrides=["train.pp_size=2", "train.zero_stage=1"])


def test_pipeline_keys_without_a_pipeline_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"^pipeline.activation_checkpoint_interval: 2 has no effect with train.pp_size=1"):
        load_config(REPO / "recipes/tiny.yaml", ["pipeline.activation_checkpoint_interval=2"])


def test_more_stages_than_parts_and_uneven_worlds_are_refused(data_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    from disco_ds.trainer.loop import _validate
    from disco_ds.trainer.scaling import data_parallel_size

    cfg = load_config(REPO / "recipes/tiny.yaml", [f"data.path={data_dir}", f"train.run_dir={tmp_path}", "train.zero_stage=1",
                                                   "train.pp_size=5"])
    with pytest.raises(ConfigError, match=r"^train.pp_size=5 exceeds the model's 4 pipeline parts \(embedding, 2 blocks, "
                                          r"head\); accepted: 1 to 4"):
        _validate(cfg, 5)
    with pytest.raises(ConfigError, match=r"^train.pp_size=2 does not divide the 3 launched ranks"):
        data_parallel_size(load_config(REPO / "recipes/tiny.yaml", ["train.pp_size=2", "train.zero_stage=1"]), 3)


# ---------------------------------------------------------------------------- exactness


def _launch(tmp_path: Path, name: str, world: int, **spec: object) -> dict:
    out = tmp_path / name
    out.mkdir()
    spec = {"global_sequences": SEQUENCES, "steps": STEPS, **spec}
    proc = torchrun(WORKER, world, json.dumps(spec), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    ranks = [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]
    portable = torch.load(out / "portable.pt", weights_only=True)
    return {"ranks": ranks, "params": portable["params"], "momentum": portable["exp_avg"]}


def _single_process_scion(**spec: object) -> tuple[list[float], dict[str, torch.Tensor]]:
    """The oracle: the same model, weights, groups and global batches, one process, no DeepSpeed;
    each step's gradient is the mean over the global batch's micro-batches."""
    spec = {"pp_size": 1, "zero_stage": 1, "global_sequences": SEQUENCES, **spec}
    cfg = load_config(REPO / "recipes/tiny.yaml", pipeline_worker.overrides(spec))
    plan = plan_run(cfg, 1)
    model = build_model(cfg, build_model_config(cfg, {"vocab_size": pipeline_worker.VOCAB}), {}, torch.device("cpu"))
    optimizer = _build_optimizer(cfg, model, plan)
    micro = plan.micro_batch
    curve = []
    for batch in pipeline_worker.global_batches(STEPS, SEQUENCES):
        chunks = batch.split(micro)
        total = 0.0
        for rows in chunks:
            loss = model(input_ids=rows[:, :-1], labels=rows[:, 1:], shift_labels=rows[:, 1:], return_logits=False).loss
            (loss / len(chunks)).backward()
            total += loss.item() / len(chunks)
        optimizer.step()
        optimizer.zero_grad()
        curve.append(total)
    return curve, {n: p.detach().clone() for n, p in model.named_parameters()}


def _hidden_matrices() -> list[str]:
    return [f"model.layers.{i}.{m}.weight" for i in range(2)
            for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.w1", "mlp.w2", "mlp.w3")]


def _assert_relative(a: list[float], b: list[float], tolerance: float) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert abs(x - y) <= tolerance * abs(y), (a, b)


def test_pp2_dp2_equals_dp2_and_single_process_scion(tmp_path: Path) -> None:
    """4 ranks (PP=2 × DP=2, ZeRO-1; fp32 transport, SVD): the losses equal pp_size 1 on 2
    data-parallel ranks, the weights single-process Scion's, every hidden matrix is orthogonalised
    exactly once per step in the whole job, and the monitored norms (combined over the stages)
    equal the one-stage run's."""
    piped = _launch(tmp_path, "pp2_dp2", 4, pp_size=2, zero_stage=1)
    flat = _launch(tmp_path, "pp1_dp2", 2, pp_size=1, zero_stage=1)
    oracle_curve, oracle_params = _single_process_scion()

    assert all(r["wrapper"] == "DeepSpeedZeroOptimizer" for r in piped["ranks"])
    # `disco_ds recipe`'s memory estimate cuts the stages as DeepSpeed did.
    cfg = load_config(REPO / "recipes/tiny.yaml", pipeline_worker.overrides({"pp_size": 2, "zero_stage": 1, "global_sequences": 8}))
    model_config = build_model_config(cfg, {"vocab_size": pipeline_worker.VOCAB})
    assert largest_stage(cfg, model_config) == (max(r["parameters"] for r in piped["ranks"]), 1)
    assert sum(r["parameters"] for r in piped["ranks"][::2]) == model_config.parameter_counts()["total"]
    assert [r["stage"] for r in piped["ranks"]] == [0, 0, 1, 1]  # the data axis is the fastest
    _assert_relative(piped["ranks"][0]["losses"], flat["ranks"][0]["losses"], 1e-4)
    _assert_relative(piped["ranks"][0]["losses"], oracle_curve, 1e-4)
    assert all(r["losses"] == piped["ranks"][0]["losses"] for r in piped["ranks"])  # reported once, the same everywhere

    assert sorted(piped["params"]) == sorted(oracle_params)  # the portable file merges the stages under HF names
    for name, expected in oracle_params.items():
        torch.testing.assert_close(piped["params"][name], expected, rtol=0, atol=1e-5, msg=name)
        torch.testing.assert_close(piped["momentum"][name], flat["momentum"][name], rtol=0, atol=1e-5, msg=name)

    counts: dict[str, int] = {}
    for rank in piped["ranks"]:
        for name, n in rank["orthogonalized"].items():
            counts[name] = counts.get(name, 0) + n
    assert counts == {name: STEPS for name in _hidden_matrices()}
    stage_of = {name: r["stage"] for r in piped["ranks"] for name in r["orthogonalized"]}
    assert {stage_of[n] for n in _hidden_matrices()[:7]} == {0} and {stage_of[n] for n in _hidden_matrices()[7:]} == {1}

    piped_norms, flat_norms = piped["ranks"][0]["norms"], flat["ranks"][0]["norms"]
    assert len(piped_norms) == STEPS and set(piped_norms[0]) == set(flat_norms[0])
    assert {"norm/embedding/weight", "norm/hidden/weight", "norm/output/weight"} <= set(piped_norms[0])
    for ours, theirs in zip(piped_norms, flat_norms):
        for key, value in theirs.items():
            assert math.isclose(ours[key], value, rel_tol=1e-5, abs_tol=1e-7), (key, ours[key], value)
    assert piped["ranks"][3]["norms"] == piped_norms  # every stage holds the combined norms


def test_pp2_at_zero0_and_with_the_bf16_optimizer(tmp_path: Path) -> None:
    """ZeRO-0 (whole parameters, Scion agrees over the stage's replicas, not the world) is exact,
    and a portable file that does not fit one stage is refused on every rank;
    a bf16 model at ZeRO-1 with fp32 gradients runs DeepSpeed's BF16_Optimizer under the pipeline,
    stays within bf16 rounding of the fp32 oracle (bf16 weights and Newton–Schulz: ~1e-3 here), and
    neither the pipeline nor Scion (monitoring every group) syncs the host with the device."""
    oracle_curve, oracle_params = _single_process_scion()
    zero0 = _launch(tmp_path, "zero0", 2, pp_size=2, zero_stage=0)
    _assert_relative(zero0["ranks"][0]["losses"], oracle_curve, 1e-4)
    for name, expected in oracle_params.items():
        torch.testing.assert_close(zero0["params"][name], expected, rtol=0, atol=1e-5, msg=name)

    # A portable file that does not fit one stage (the head's weight missing) is refused on every
    # rank, naming the stage's rank, instead of leaving stage 0 waiting in the load's collectives.
    record = torch.load(tmp_path / "zero0" / "portable.pt", weights_only=True)
    del record["params"]["lm_head.weight"]
    torch.save(record, tmp_path / "no_head.pt")
    out = tmp_path / "refused"
    out.mkdir()
    spec = {"pp_size": 2, "zero_stage": 0, "global_sequences": SEQUENCES, "steps": 0, "load": str(tmp_path / "no_head.pt")}
    proc = torchrun(WORKER, 2, json.dumps(spec), str(out), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    raised = [json.loads((out / f"rank_{r}.json").read_text())["raised"] for r in range(2)]
    assert raised[0] == raised[1] and "failed on 1 of 2 ranks (rank 1:" in raised[0]
    assert "missing: ['lm_head.weight']" in raised[0]

    bf16 = _launch(tmp_path, "bf16", 2, pp_size=2, zero_stage=1, bf16=True, ns_method="quintic", comm_dtype="bfloat16",
                   count_syncs=True)
    assert {r["wrapper"] for r in bf16["ranks"]} == {"BF16_Optimizer"}
    # The step's only host syncs are the BF16_Optimizer's own (its global gradient norm and the
    # check that it is finite; the same at pp_size 1): the pipeline and Scion add none.
    assert [r["syncs"] for r in bf16["ranks"]] == [2, 2]
    _assert_relative(bf16["ranks"][0]["losses"], oracle_curve, 5e-3)
    assert sorted(bf16["momentum"]) == sorted(oracle_params)


# ---------------------------------------------------------------------------- the trainer's runs


def _train_args(data: Path, run_dir: Path, pp_size: int, **extra: object) -> list[str]:
    args = {"data.path": data, "data.seq_len": 64, "data.document_mask": True, "train.run_dir": run_dir,
            "train.zero_stage": 1, "train.pp_size": pp_size, "train.micro_batch": 4, "train.tokens": 2e5,
            "train.global_batch_tokens": 2 * 4 * 64, "train.max_steps": 4, "optimizer.lr": 0.1, "schedule.warmup": 0.0,
            "checkpoint.interval": 1, "checkpoint.keep": 10, "eval.interval": 0, "eval.tokens": 4096, "logging.interval": 1,
            **extra}
    return [f"{k}={v}" for k, v in args.items()]


def _train(data: Path, run_dir: Path, pp_size: int, **extra: object) -> subprocess.CompletedProcess:
    args_list = _train_args(data, run_dir, pp_size, **extra)
    if pp_size == 1:
        cmd = [sys.executable, "-m", "disco_ds", "train", str(REPO / "recipes/tiny.yaml"), *args_list]
    else:
        cmd = launcher(args_list, free_port())
    proc = run(cmd)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return proc


def _resume_copy(source: Path, step: int, run_dir: Path) -> None:
    (run_dir / "checkpoints").mkdir(parents=True)
    name = f"step_{step:08d}"
    shutil.copytree(source / "checkpoints" / name, run_dir / "checkpoints" / name)


def _portable(run_dir: Path, step: int) -> dict:
    return torch.load(run_dir / "checkpoints" / f"step_{step:08d}" / "portable.pt", weights_only=True)


@pytest.fixture(scope="module")
def pipeline_run(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:  # noqa: F811
    """The trainer at pp_size 2 on one node (2 ranks), and its console."""
    run_dir = tmp_path_factory.mktemp("pipeline") / "pp2"
    return run_dir, _train(data_dir, run_dir, 2).stdout


def test_pipeline_runs_resume_bit_identically_move_between_pp_sizes_and_export(data_dir: Path,  # noqa: F811
                                                                                pipeline_run: tuple[Path, str],
                                                                                tmp_path: Path) -> None:
    """The trainer at pp_size 2 (one replica of two stages, documents masked): a resume from its
    step-2 checkpoint repeats steps 3–4 bit for bit; the same checkpoint continues at pp_size 1
    (through its portable file) and a pp_size-1 checkpoint continues at pp_size 2, with the same
    losses; the export merges the stages, loads in plain transformers and reproduces the logged
    validation loss and the one-stage run's logits."""
    first, console = pipeline_run
    assert sum(line.startswith("step 4/4 |") for line in console.splitlines()) == 1  # reported once
    assert "parallel    2 ranks = 1 data-parallel replicas × 2 pipeline stages" in console
    curve = losses(first)

    again = tmp_path / "pp2_resumed"
    _resume_copy(first, 2, again)
    _train(data_dir, again, 2)
    assert [losses(again)[s] for s in (3, 4)] == [curve[3], curve[4]]
    for key in ("params", "exp_avg"):
        for name, value in _portable(first, 4)[key].items():
            assert torch.equal(_portable(again, 4)[key][name], value), (key, name)

    to_one = tmp_path / "pp1_from_pp2"
    _resume_copy(first, 2, to_one)
    proc = _train(data_dir, to_one, 1, **{"checkpoint.allow_change": True})
    assert "train.pp_size: 2 → 1" in proc.stdout and "through its portable.pt" in proc.stdout
    _assert_relative([losses(to_one)[s] for s in (3, 4)], [curve[3], curve[4]], 1e-5)

    to_two = tmp_path / "pp2_from_pp1"
    _resume_copy(to_one, 3, to_two)
    proc = _train(data_dir, to_two, 2, **{"checkpoint.allow_change": True})
    assert "train.pp_size: 1 → 2" in proc.stdout
    _assert_relative([losses(to_two)[4]], [curve[4]], 1e-5)

    from transformers import AutoModelForCausalLM

    from disco_ds.data import document_positions, eval_batches

    exports = {}
    for name, run_dir in (("pp2", first), ("pp1", to_one)):
        out = tmp_path / f"hf_{name}"
        subprocess.run([sys.executable, "-m", "disco_ds", "export", str(run_dir / "checkpoints" / "step_00000004"), str(out),
                        "--dtype", "float32"], check=True, cwd=REPO, capture_output=True)
        exports[name] = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    meta = json.loads((data_dir / "meta.json").read_text())
    total = count = 0.0
    with torch.no_grad():
        for inputs, targets in eval_batches(sorted(data_dir.glob("val_*.bin")), 64, 4, 0, 1, 4096):
            positions = document_positions(inputs, int(meta["eot_id"]))
            piped = exports["pp2"](input_ids=inputs, position_ids=positions)
            flat = exports["pp1"](input_ids=inputs, position_ids=positions)
            torch.testing.assert_close(piped.logits, flat.logits, rtol=0, atol=1e-4)
            loss = torch.nn.functional.cross_entropy(piped.logits.flatten(0, 1), targets.flatten(), reduction="sum")
            total += loss.item()
            count += targets.numel()
    assert math.isclose(total / count, val_loss(first), rel_tol=1e-5)


def test_one_stage_per_node_matches_one_node(data_dir: Path, pipeline_run: tuple[Path, str],  # noqa: F811
                                             tmp_path: Path) -> None:
    """The README's multi-node launch: two simulated nodes (loopback, ``--no_ssh --node_rank``),
    one stage each, give exactly the losses of both stages on one node."""
    run_dir = tmp_path / "two_nodes"
    two_simulated_nodes(_train_args(data_dir, run_dir, 2), tmp_path)
    assert losses(run_dir) == losses(pipeline_run[0])
