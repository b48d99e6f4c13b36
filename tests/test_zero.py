"""disco_ds.Scion inside the real DeepSpeed engine (CPU, gloo), against single-process Scion.

Each case launches ``tests/zero_worker.py`` with ``torchrun`` as W real processes and compares the
parameters after K optimizer steps with single-process Scion on the same global batches.
Tolerances: with fp32 transport and the exact (fp32 SVD) orthogonalisation, the only differences
are fp32 reassociations (gradient all-reduce order, the split sums of squares), so 1e-5 holds:
that isolates the plumbing. Newton–Schulz itself iterates in bf16, where an fp32 reassociation
of its input can flip a rounding, so quintic runs are compared at bf16 resolution. With bf16 transport the gathered
momentum is rounded to bf16 (relative 2⁻⁸) before Frobenius normalisation, and the update
returns in bf16; Newton–Schulz runs in bf16 anyway, so the step differs in the last bf16 bits:
parameters move by lr·O(1) per step, hence the 2e-3·steps bound. A bf16 *model* additionally
rounds weights, activations and gradients to bf16 (relative 2⁻⁸ ≈ 0.004 on weights of size ~1):
the largest deviation measured over the bf16 cases is 0.013 after 3 steps, bounded at 3e-2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from launching import torchrun  # noqa: E402
from zero_worker import build_model, global_batches  # noqa: E402

from disco_ds import Scion, scion_param_groups  # noqa: E402
from disco_ds.distributed.exchange import matrix_plan  # noqa: E402
from disco_ds.distributed.layout import Layout  # noqa: E402

WORKER = Path(__file__).parent / "zero_worker.py"
BF16_MODEL_ATOL = 3e-2


def launch(tmp_path: Path, world: int, cfg: dict) -> subprocess.CompletedProcess:
    return torchrun(WORKER, world, json.dumps(cfg), str(tmp_path / "result.pt"))


def run_workers(tmp_path: Path, world: int, **cfg) -> dict:
    cfg = {"micro_batch": 3, "accum": 1, "steps": 3, "lr": 0.05, **cfg}
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = launch(tmp_path, world, cfg)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = torch.load(tmp_path / "result.pt", weights_only=False)
    result["cfg"] = cfg
    return result


def single_process(cfg: dict, world: int) -> tuple[dict[str, torch.Tensor], list[dict[str, float]]]:
    """Parameters after the run, and the monitored norms of every step."""
    model = build_model()
    opt = Scion(scion_param_groups(model, lr=cfg["lr"], momentum=cfg.get("momentum", 0.1),
                                   ns_method=cfg.get("ns_method", "quintic")))
    opt.track_norms = cfg.get("track_norms", False)
    metrics = []
    for batch in global_batches(cfg["steps"], cfg["micro_batch"] * cfg["accum"] * world):
        loss = model(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if opt.track_norms:
            metrics.append({k: v for k, v in opt.pop_metrics().items() if not k.startswith("optimizer/")})
    return {n: p.detach().clone() for n, p in model.named_parameters()}, metrics


def assert_matches_single_process(result: dict, world: int, atol: float) -> None:
    expected, metrics = single_process(result["cfg"], world)
    if result["cfg"].get("track_norms"):
        # The norms measured from fragments (SPEC 4, per group, every step) equal the single
        # process's, and every rank holds the same numbers.
        for rank in result["ranks"]:
            assert len(rank["metrics"]) == len(metrics)
            for got, ref in zip(rank["metrics"], metrics):
                assert got.keys() == ref.keys()
                for key in ref:
                    assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-7), key
    for name, ref in expected.items():
        got = result["params"][name]
        assert got is not None, name
        torch.testing.assert_close(got.float().reshape(ref.shape), ref, atol=atol, rtol=0, msg=lambda m: f"{name}: {m}")


def assert_gathered_equals_deepspeed_full_grad(result: dict, atol: float) -> None:
    """The matrices the owners rebuilt from flat fragments are DeepSpeed's own full gradients."""
    compared = {name: diff for rank in result["ranks"] for name, diff in rank["gathered_vs_deepspeed"].items()}
    assert set(compared) == {"up.weight", "mid.weight", "down.weight"}, compared
    assert max(compared.values()) <= atol, compared


def assert_exactly_once(result: dict) -> None:
    """Every hidden matrix orthogonalised exactly once per optimizer step in the whole job."""
    steps = result["cfg"]["steps"]
    totals: dict[str, int] = {}
    for rank in result["ranks"]:
        for name, count in rank["per_member"].items():
            totals[name] = totals.get(name, 0) + count
    assert totals == {"up.weight": steps, "mid.weight": steps, "down.weight": steps}, totals


OFFLOAD = {"zero": {"offload_optimizer": {"device": "cpu"}}, "ds": {"zero_force_ds_cpu_optimizer": False}}
CASES = [
    # (name, stage, world, accum, extra worker config). Names starting with "ds" reproduce a known
    # failure of DeepSpeed's own Muon (issue number) as a case that passes here.
    ("z1-w2", 1, 2, 1, {}),
    ("ds7807-partition-boundary-reduce-scatter", 2, 2, 1, {"zero": {"reduce_scatter": True}}),
    ("z3-w2", 3, 2, 1, {}),
    ("z2-w3-odd-partitions", 2, 3, 1, {}),
    ("z3-w3-odd-partitions", 3, 3, 1, {}),
    ("ds8600-once-per-step-not-per-microbatch-z1", 1, 3, 4, {}),
    ("z2-allreduce-ga4", 2, 2, 4, {"zero": {"reduce_scatter": False}}),
    ("z2-overlap-small-buckets", 2, 3, 1, {"zero": {"overlap_comm": True, "contiguous_gradients": False, "reduce_bucket_size": 50}}),
    ("ds8438-zero-init-hides-shapes", 3, 2, 4, {"zero_init": True}),
    ("z3-subgroups-allreduce", 3, 3, 1, {"zero": {"reduce_scatter": False, "sub_group_size": 300}}),
    ("ds8441-stage0-not-sgd", 0, 2, 1, {}),
    ("z2-w1", 2, 1, 1, {}),
    ("ds8443-z3-accumulation", 3, 1, 2, {}),
    # Chunked rounds: owners gather at most 250 entries at a time (matrices have 240-400), so the
    # owner of two matrices takes them in separate rounds.
    ("z3-chunked-rounds", 3, 2, 1, {"max_gather_numel": 250}),
    # ZeRO-Offload (DeepSpeed #8463 was its own Muon going wrong there): partitions, gradients and
    # exp_avg in host memory, the LMO's input staged onto the accelerator and the update copied back.
    ("ds8463-offload-z2", 2, 2, 1, OFFLOAD),
    ("offload-z3-w3-odd-partitions", 3, 3, 1, OFFLOAD),
]


PROVIDER_OF_STAGE = {0: "ReplicatedProvider", 1: "Zero12Provider", 2: "Zero12Provider", 3: "Zero3Provider"}


@pytest.mark.parametrize("name,stage,world,accum,extra", CASES, ids=[c[0] for c in CASES])
def test_fp32_transport_equals_single_process(tmp_path: Path, name: str, stage: int, world: int, accum: int, extra: dict) -> None:
    result = run_workers(tmp_path, world, stage=stage, accum=accum, comm_dtype="float32", ns_method="svd",
                         track_norms=True, **extra)
    assert_matches_single_process(result, world, atol=1e-5)
    assert_gathered_equals_deepspeed_full_grad(result, atol=1e-6)
    # The step's time is split into communication and Newton–Schulz (instrumentation counters).
    assert sum(rank["ns_seconds"] for rank in result["ranks"]) > 0
    if world > 1:
        assert all(rank["comm_seconds"] > 0 for rank in result["ranks"])
    if "max_gather_numel" in extra:
        assert min(rank["rounds"] for rank in result["ranks"]) >= 2 * result["cfg"]["steps"]
    assert all((rank["staged_partitions"] > 0) == (extra is OFFLOAD) for rank in result["ranks"])
    # Scion chose the layout provider for how this stage hands it the groups.
    assert {rank["provider"] for rank in result["ranks"]} == {PROVIDER_OF_STAGE[stage]}
    assert_exactly_once(result)


@pytest.mark.parametrize("stage,world", [(1, 2), (2, 3), (3, 2)])
def test_bf16_transport_close_to_single_process(tmp_path: Path, stage: int, world: int) -> None:
    result = run_workers(tmp_path, world, stage=stage, comm_dtype="bfloat16")
    assert_matches_single_process(result, world, atol=2e-3 * result["cfg"]["steps"])
    assert_exactly_once(result)


BF16_CASES = [
    # (name, stage, world, extra): stage 0 uses per-parameter fp32 masters, stage 1 with fp32
    # gradient accumulation DeepSpeed's BF16_Optimizer, 1-3 the ZeRO optimizers.
    ("z0-master-copies", 0, 2, {}),
    ("z1", 1, 2, {}),
    ("ds8461-bf16-optimizer-path", 1, 2, {"ds": {"data_types": {"grad_accum_dtype": "fp32"}}}),
    ("z2-w3", 2, 3, {}),
    ("z3", 3, 2, {}),
    # The self-test compares the host fp32 master with the bf16 weights: rounded, on their device.
    ("z2-offload", 2, 2, OFFLOAD),
]


@pytest.mark.parametrize("name,stage,world,extra", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_model_close_to_single_process(tmp_path: Path, name: str, stage: int, world: int, extra: dict) -> None:
    result = run_workers(tmp_path, world, stage=stage, bf16=True, **extra)
    assert_matches_single_process(result, world, atol=BF16_MODEL_ATOL)
    assert_exactly_once(result)


def test_stage0_replicas_stay_bit_identical(tmp_path: Path) -> None:
    """DeepSpeed #8441 was stage 0 silently running SGD; here every matrix is orthogonalised once
    on its owner and every replica applies the very same (bf16-transported) update."""
    result = run_workers(tmp_path, 3, stage=0, steps=3, comm_dtype="bfloat16")
    weights = [rank["local_weights"] for rank in result["ranks"]]
    assert weights[0] == weights[1] == weights[2]
    assert_exactly_once(result)
    assert_matches_single_process(result, 3, atol=2e-3 * result["cfg"]["steps"])


@pytest.mark.parametrize("stage,world,bf16", [(0, 2, False), (1, 2, False), (2, 2, True), (3, 2, False), (3, 2, True)])
def test_checkpoint_resume_is_bit_identical(tmp_path: Path, stage: int, world: int, bf16: bool) -> None:
    """Save after 2 steps, stop the processes, start new ones, load, continue: same as uninterrupted."""
    cfg = dict(stage=stage, bf16=bf16, steps=4, ckpt=str(tmp_path / "ckpt"))
    uninterrupted = run_workers(tmp_path / "a", world, **cfg)
    run_workers(tmp_path / "b", world, save_after=2, **cfg)
    resumed = run_workers(tmp_path / "c", world, resume=True, **cfg)
    for name, ref in uninterrupted["params"].items():
        assert torch.equal(resumed["params"][name], ref), name


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_optimizer_state_is_sharded(tmp_path: Path, stage: int) -> None:
    """Momentum lives on the local flat partition: per-rank state at W=2 is ≤ 0.55× that at W=1."""
    one = run_workers(tmp_path / "w1", 1, stage=stage, steps=1)["ranks"][0]["state_numel"]
    two = max(r["state_numel"] for r in run_workers(tmp_path / "w2", 2, stage=stage, steps=1)["ranks"])
    assert two <= 0.55 * one, (one, two)


def test_ds8439_clipping_never_touches_the_update(tmp_path: Path) -> None:
    """DeepSpeed #8439 clipped Muon's orthogonalised update. Here clipping acts on the raw gradient
    before the (scale-invariant) LMO: with no momentum, clip 1.0 and clip off give the same step."""
    clipped = run_workers(tmp_path / "clip", 2, stage=2, momentum=1.0, clip=1.0, comm_dtype="float32", ns_method="svd")
    free = run_workers(tmp_path / "free", 2, stage=2, momentum=1.0, clip=0.0, comm_dtype="float32", ns_method="svd")
    for name, ref in free["params"].items():
        torch.testing.assert_close(clipped["params"][name], ref, atol=1e-5, rtol=0, msg=lambda m: f"{name}: {m}")


def test_round_robin_gradients_is_refused(tmp_path: Path) -> None:
    proc = launch(tmp_path, 2, {"stage": 2, "micro_batch": 3, "accum": 1, "steps": 1, "lr": 0.05,
                                "zero": {"round_robin_gradients": True}, "capture_reference": False})
    assert proc.returncode != 0
    assert "zero_optimization.round_robin_gradients=true, which is not supported with Scion" in proc.stdout + proc.stderr


def test_scion_light_under_zero_is_refused(tmp_path: Path) -> None:
    proc = launch(tmp_path, 2, {"stage": 2, "micro_batch": 3, "accum": 1, "steps": 1, "lr": 0.05, "optimizer": "ScionLight"})
    assert proc.returncode != 0
    assert "ScionLight cannot run under DeepSpeed ZeRO" in proc.stdout + proc.stderr


def test_no_host_syncs_in_the_step(tmp_path: Path) -> None:
    """A host–device sync (``aten::_local_scalar_dense``: every ``.item()``, ``float(t)``, ``bool(t)``)
    stalls a GPU's launch queue. After the first step (whose layout self-tests are agreed on purpose),
    ``step()`` makes none, with the norm monitor off or on (its numbers stay on the device), and
    reading them back is one sync per ``pop_metrics()``. ZeRO-2, two ranks, the profiler's count."""
    for track_norms in (False, True):
        result = run_workers(tmp_path / str(track_norms), 2, stage=2, steps=4, count_syncs=True, track_norms=track_norms)
        for rank in result["ranks"]:
            calls_per_step = len(rank["syncs"]["step"]) // 4  # DeepSpeed calls step() once per param group
            after_first = rank["syncs"]["step"][calls_per_step:]
            assert after_first and not any(after_first), rank["syncs"]
            reads = rank["syncs"]["pop_metrics"]  # (a CPU tensor's .tolist() is not even counted)
            assert len(reads) == (4 if track_norms else 0) and all(r <= 1 for r in reads), reads


@pytest.mark.parametrize("stage,world", [(2, 2), (3, 3)])
def test_exchange_plan_is_cached_and_identical_on_every_rank(tmp_path: Path, stage: int, world: int) -> None:
    """Owners, rounds and routes are planned once per layout (the first step), never again, and
    every rank computes the same plan without communication."""
    result = run_workers(tmp_path, world, stage=stage, steps=3, max_gather_numel=250)
    for rank in result["ranks"]:
        first, *later = rank["plannings"]
        assert first > 0 and later == [0] * len(later), rank["plannings"]
    plans = [rank["plans"] for rank in result["ranks"]]
    assert plans[0] and all(p == plans[0] for p in plans), plans
    # Each rank's plan, index tensors included, is what planning its layout from shapes alone gives
    # (what ``disco_ds plan`` does for a hypothetical cluster): nothing in it came from communication.
    checked = 0
    for rank in result["ranks"]:
        for seen in rank["plan_indices"]:
            layout = Layout(shapes=seen["shapes"], fragments=seen["fragments"], group=None, rank=seen["rank"],
                            replicated=seen["replicated"], blocks=seen["blocks"], sources=seen["sources"])
            norm_class, ns_steps, ns_gram, bound, comm_bytes, work_bytes, overlap = seen["key"]
            plan = matrix_plan(layout, norm_class(ns_steps=ns_steps, ns_gram=ns_gram), bound, comm_bytes=comm_bytes,
                               work_bytes=work_bytes, overlap=overlap)
            for where, index in seen["indices"].items():
                device, packed = eval(where)  # noqa: S307 - a (str, bool) tuple this test's worker wrote
                rebuilt = [[t.tolist() for t in (i.send, i.gather, i.back)]
                           for i in plan.indices(layout, torch.device(device), packed)]
                assert rebuilt == index
                checked += 1
    assert checked > 0
