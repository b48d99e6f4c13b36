"""disco_ds.integrations.reshard: resume a DeepSpeed + Scion run at a different world size and ZeRO stage.

Six runs of tests/reshard_worker.py under ``torchrun`` (each one new set of processes), all on the
same global batches (micro-batch 3 at W=2, 2 at W=3: global batch 6), 4 optimizer steps in all:

    z2w2             ZeRO-2, W=2, uninterrupted; saves portable files after steps 2 and 3
    z3w3             ZeRO-3, W=3, uninterrupted; saves after step 2
    z2w3 < z2w2@2    ZeRO-2, W=3, loads z2w2's step-2 file, trains steps 3-4
    z1w2 < z3w3@2    ZeRO-1, W=2, loads z3w3's step-2 file
    z0w3 < z2w2@2    stage 0, W=3, loads z2w2's step-2 file, saves again after step 3
    z2w2 < z0w3@3    ZeRO-2, W=2, loads that stage-0 file, trains step 4

Every resumed run must end where the uninterrupted z2w2 run did. Tolerance: Scion runs with fp32
transport and the exact (SVD) orthogonalisation, so what differs between shardings is fp32
reassociation only (gradient all-reduce over 2 vs 3 ranks, split sums of squares), as in
tests/test_zero.py: 1e-5. Measured once by hand, loading a file without its momentum, or with its
lrs doubled, moves the parameters after step 4 by up to 1e-1, and skipping the refresh of the
model's weights from the fp32 masters moves the probe loss by 5e-3, so 1e-5 tells them apart.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from launching import torchrun

WORKER = Path(__file__).parent / "reshard_worker.py"
ATOL = 1e-5
LR, STEPS, GLOBAL_BATCH = 0.05, 4, 6
MICRO = {2: 3, 3: 2}  # micro-batch per world size: global batch 6 either way

# run name -> (ZeRO stage, world size, file it loads or None, {step: file it saves})
RUNS: dict[str, tuple[int, int, str | None, dict[int, str]]] = {
    "z2w2": (2, 2, None, {2: "z2w2@2", 3: "z2w2@3"}),
    "z3w3": (3, 3, None, {2: "z3w3@2"}),
    "z2w3<z2w2@2": (2, 3, "z2w2@2", {}),
    "z1w2<z3w3@2": (1, 2, "z3w3@2", {}),
    "z0w3<z2w2@2": (0, 3, "z2w2@2", {3: "z0w3@3"}),
    "z2w2<z0w3@3": (2, 2, "z0w3@3", {}),
}
PRODUCER = {file: name for name, (_, _, _, saves) in RUNS.items() for file in saves.values()}
LOADERS = [name for name, (_, _, loads, _) in RUNS.items() if loads]
REFERENCE = "z2w2"


def _launch(out: Path, world: int, cfg: dict[str, Any]) -> dict[str, Any]:
    proc = torchrun(WORKER, world, json.dumps(cfg), str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return torch.load(out, weights_only=False)


class Runs:
    """Launches each run of ``RUNS`` once per module, producers before the runs loading their files."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results: dict[str, dict[str, Any]] = {}

    def file(self, name: str) -> Path:
        self[PRODUCER[name]]
        return self.root / f"{name}.portable"

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self.results:
            stage, world, loads, saves = RUNS[name]
            cfg: dict[str, Any] = {"stage": stage, "micro_batch": MICRO[world], "steps": STEPS, "lr": LR,
                                   "save": {str(k): str(self.root / f"{f}.portable") for k, f in saves.items()}}
            if loads:
                cfg["load"] = str(self.file(loads))
            self.results[name] = _launch(self.root / f"{name.replace('<', '_from_').replace('@', '_')}.pt", world, cfg)
        return self.results[name]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return Runs(tmp_path_factory.mktemp("reshard"))


def _assert_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], what: str) -> None:
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for name, expected in ref.items():
        torch.testing.assert_close(got[name], expected, atol=ATOL, rtol=0, msg=lambda m: f"{what}, {name}: {m}")


@pytest.mark.parametrize("name", LOADERS)
def test_resume_at_other_world_size_and_stage(runs: Runs, name: str) -> None:
    resumed, reference = runs[name], runs[REFERENCE]
    loaded = RUNS[name][2]
    producer = runs[PRODUCER[loaded]]
    step = int(loaded.split("@")[1])
    at_save = producer["saves"][step]
    # Counters and hyperparameters. Every run halves its lrs before step 2 (index 1): a resumed
    # run must take them from the file, not start from the lrs it was built with.
    assert resumed["global_steps_after_load"] == step
    assert resumed["global_samples_after_load"] == step * GLOBAL_BATCH
    assert resumed["loaded"]["saved_world_size"] == RUNS[PRODUCER[loaded]][1]
    assert resumed["loaded"]["saved_zero_stage"] == RUNS[PRODUCER[loaded]][0]
    assert resumed["lrs_after_load"] == at_save["lrs"]
    assert all(lr < LR for lr in resumed["lrs_after_load"])
    # The model's own weights (what forward uses), right after loading.
    assert abs(resumed["probe_loss_after_load"] - at_save["probe_loss"]) <= ATOL, (resumed["probe_loss_after_load"], at_save)
    # The remaining steps at the new sharding land where the uninterrupted run did.
    assert resumed["global_steps"] == reference["global_steps"] == STEPS
    _assert_close(resumed["params"], reference["params"], name)


@pytest.mark.parametrize("files", [("z2w2@2", "z3w3@2"), ("z2w2@3", "z0w3@3")], ids=["zero2-vs-zero3", "zero2-vs-stage0"])
def test_portable_file_does_not_depend_on_sharding(runs: Runs, files: tuple[str, str]) -> None:
    """Files saved at the same step by differently sharded runs hold the same tensors."""
    reference, other = (torch.load(runs.file(f), weights_only=True) for f in files)
    names = {"embed.weight", "up.weight", "up.bias", "mid.weight", "down.weight", "head.weight"}
    assert set(reference["params"]) == set(reference["exp_avg"]) == names
    for name, tensor in reference["exp_avg"].items():
        assert tensor.abs().max() > 0, name
    step = int(files[0].split("@")[1])
    for file, record in zip(files, (reference, other)):
        stage, world = RUNS[PRODUCER[file]][:2]
        assert (record["saved_zero_stage"], record["saved_world_size"]) == (stage, world)
        assert record["global_steps"] == step and record["global_samples"] == step * GLOBAL_BATCH
    assert [g["names"] for g in other["param_groups"]] == [g["names"] for g in reference["param_groups"]]
    assert [g["hyperparameters"]["lr"] for g in other["param_groups"]] == \
           [g["hyperparameters"]["lr"] for g in reference["param_groups"]]
    for key in ("params", "exp_avg"):
        _assert_close(other[key], reference[key], f"{key} of {files[1]} vs {files[0]}")
