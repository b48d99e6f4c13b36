"""Training checkpoints: the DeepSpeed engine's own checkpoint plus the trainer's state, written so
that a crash, a full disk or a damaged file never costs more than the newest checkpoint.

Layout of one checkpoint (``RUN_DIR/checkpoints/step_00000100``)::

    latest                 DeepSpeed's tag file ("ds")
    ds/                    engine.save_checkpoint(…, tag="ds"): model, sharded optimizer state
    portable.pt            Scion's full weights and momentum (disco_ds.integrations.reshard), when saved: what a
                           resume at another world size or ZeRO stage loads
    model/config.json      the model configuration (what ``disco_ds export`` rebuilds the model from)
    tokenizer/             the data's Hugging Face tokenizer files, when the data has them
    trainer_state.json     step, tokens, data position, the run's plan and hyperparameters
    rng/rank_<r>.pt        every rank's random generators
    config.yaml            the resolved run configuration
    COMPLETE               written last: the manifest (JSON), every other file with its size and sha256

Every rank writes into ``.tmp_step_…`` and hashes the files it wrote itself (no rank reads
another's files back); once every rank reported, rank 0 writes ``COMPLETE`` and renames the
directory into place (a rename within one file system is atomic). A run killed while saving leaves
only a ``.tmp_`` directory, which :func:`latest_checkpoint` ignores and the next save removes. A
save that fails on any rank (disk full, permissions) fails on every rank with the same message,
naming the file and the cause; the partial directory is removed and the previous checkpoint kept.

:func:`verify_checkpoint` re-hashes a checkpoint against its manifest; :func:`select_checkpoint`
picks the checkpoint a run resumes from, the newest one that verifies. The run directory must be
on storage every node sees.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import yaml

from disco_ds.distributed import FAULT_ENV, injected_fault
from disco_ds.integrations.export import COMPLETE_MARKER, DEFAULT_TAG, PORTABLE_FILE

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoint_dir", "complete_checkpoints",
           "verify_checkpoint", "select_checkpoint", "read_manifest", "CheckpointError", "CheckpointReport",
           "COMPLETE", "PORTABLE", "MANIFEST_FORMAT"]

COMPLETE = COMPLETE_MARKER
PORTABLE = PORTABLE_FILE
TAG = DEFAULT_TAG
MANIFEST_FORMAT = "disco_ds.trainer.checkpoint/2"
"""``format`` of the JSON manifest in ``COMPLETE``. Checkpoints saved before manifests existed hold
only their step number there: they load, unverified."""
# Test hooks of FAULT_ENV (DISCO_DS_FAULT) read here: ``kill-during-save@STEP`` makes rank 0
# SIGKILL itself after the engine files of step STEP are written and before the checkpoint is
# completed (the resume tests use it); ``save-enospc@RANK`` makes every file write of that rank
# fail as a full disk would.
_CHUNK = 1 << 24
_LOW_SPACE_BYTES = 1 << 26
"""Below this many free bytes, a write error without an errno (torch's C++ writer reports a full
disk as ``basic_ios::clear: iostream error``) is reported as a full disk."""


class CheckpointError(RuntimeError):
    """A checkpoint that could not be saved, verified or loaded; the message names the file and the cause."""


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` lives in a run directory."""
    return Path(run_dir) / "checkpoints" / f"step_{step:08d}"


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank_and_world() -> tuple[int, int]:
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def _all_ranks(value: Any) -> list[Any]:
    """``value`` of every rank, in rank order, on every rank (one object all-gather; DeepSpeed set
    the current device, which is where the collective's buffers go)."""
    if not _distributed():
        return [value]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _hash_file(path: Path, sync: bool = False) -> dict[str, Any]:
    """Size and sha256 of one file (sha256: checkable with ``sha256sum``, and OpenSSL's runs at
    GB/s); ``sync`` also flushes it to the storage from the same open file."""
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
        if sync:
            os.fsync(f.fileno())
        return {"size": os.fstat(f.fileno()).st_size, "sha256": digest}


def _describe_write_error(path: Path, err: BaseException) -> str:
    """``PATH: cause``, with the cause a person can act on."""
    if isinstance(err, OSError) and err.errno is not None:
        where = err.filename or path  # the file itself when ``path`` is a folder being written
        return f"{where}: {os.strerror(err.errno)} ({errno.errorcode.get(err.errno, err.errno)})"
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(probe).free
        if free < _LOW_SPACE_BYTES:
            return f"{path}: no space left on device ({free:,} bytes free; {type(err).__name__}: {err})"
    return f"{path}: {type(err).__name__}: {err}"


class _Writes:
    """The files this rank wrote, their hashes, and its first write error."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.files: dict[str, dict[str, Any]] = {}
        self.error: str | None = None

    def attempt(self, path: Path, write: Callable[[], Any], record: bool = True) -> None:
        """Run ``write`` (which creates ``path``, a file or a folder of files) unless this rank
        already failed; record the hashes of the files it wrote (``record``), or the error."""
        if self.error is not None:
            return
        try:
            if record and injected_fault("save-enospc"):  # on the files, where a full disk shows
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            write()
            for file in (sorted(path.rglob("*")) if path.is_dir() else [path]) if record else []:
                if file.is_file():
                    self.files[file.relative_to(self.root).as_posix()] = _hash_file(file, sync=True)
        except Exception as err:  # noqa: BLE001 -- any failure must reach the other ranks, not strand them in a collective
            self.error = _describe_write_error(path, err)

    @contextlib.contextmanager
    def engine_files(self, engine: Any) -> Iterator[None]:
        """Route the engine's file writes through :meth:`attempt` while it saves.

        A rank whose write raised inside ``engine.save_checkpoint`` would leave the other ranks
        waiting in DeepSpeed's closing barrier; recorded instead, the save goes on to that barrier
        and the error is shared after it.
        """
        ce = engine.checkpoint_engine
        ce.save = lambda state_dict, path: self.attempt(Path(path), lambda: type(ce).save(ce, state_dict, path))
        ce.makedirs = lambda path, exist_ok=False: self.attempt(
            Path(path), lambda: type(ce).makedirs(ce, path, exist_ok=exist_ok), record=False)
        try:
            yield
        finally:
            del ce.save, ce.makedirs


def _fail_together(error: str | None, tmp: Path, what: str) -> None:
    """Share every rank's error; if any failed, remove the partial checkpoint and raise on all ranks."""
    errors = _all_ranks(error)
    failed = [f"rank {r}: {e}" if len(errors) > 1 else e for r, e in enumerate(errors) if e]
    if not failed:
        return
    rank, _ = _rank_and_world()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    if _distributed():
        dist.barrier()
    raise CheckpointError(f"{what} failed ({'; '.join(failed)}); the partial checkpoint {tmp} was removed and "
                          "the previous checkpoints were kept")


def save_checkpoint(
    engine: Any,
    run_dir: Path,
    step: int,
    trainer_state: dict[str, Any],
    run_config: dict[str, Any],
    model_config: Any,
    tokenizer_dir: Path | None,
    keep: int,
    portable: Callable[[Path], None] | None = None,
) -> Path:
    """Save a complete, checksummed checkpoint of step ``step`` (collective: every rank calls it),
    then keep only the newest ``keep`` complete checkpoints. Returns the checkpoint directory.

    ``portable(path)``, when given, is called on every rank to write :data:`PORTABLE` (rank 0
    writes it, e.g. with :func:`disco_ds.integrations.reshard.save_portable`).

    Raises:
        CheckpointError: on every rank, when writing failed on any rank (naming the rank, the file
            and the cause, e.g. "No space left on device (ENOSPC)"); the partial folder is removed.
    """
    final = checkpoint_dir(run_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    rank, _ = _rank_and_world()
    writes = _Writes(tmp)
    what = f"saving the checkpoint of step {step} to {final}"
    if rank == 0:
        def prepare() -> None:
            final.parent.mkdir(parents=True, exist_ok=True)
            for stale in final.parent.glob(".tmp_*"):
                shutil.rmtree(stale, ignore_errors=True)
            if final.exists():  # the same step saved by a run that is being repeated
                shutil.rmtree(final)
            tmp.mkdir()
        writes.attempt(final.parent, prepare, record=False)
    _fail_together(writes.error, tmp, what)
    with writes.engine_files(engine):
        # save_latest=False: DeepSpeed writes that file outside its checkpoint engine, where a
        # failure would strand the other ranks; rank 0 writes it below instead.
        engine.save_checkpoint(str(tmp), tag=TAG, save_latest=False)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    rng_file = tmp / "rng" / f"rank_{rank}.pt"
    writes.attempt(rng_file, lambda: (rng_file.parent.mkdir(parents=True, exist_ok=True), torch.save(rng, rng_file)))
    if rank == 0:
        writes.attempt(tmp / "latest", lambda: (tmp / "latest").write_text(TAG))
        writes.attempt(tmp / "model", lambda: model_config.save_pretrained(tmp / "model"))
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir():
            writes.attempt(tmp / "tokenizer", lambda: shutil.copytree(tokenizer_dir, tmp / "tokenizer"))
        writes.attempt(tmp / "trainer_state.json", lambda: (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2)))
        writes.attempt(tmp / "config.yaml", lambda: (tmp / "config.yaml").write_text(yaml.safe_dump(run_config, sort_keys=False)))
    _fail_together(writes.error, tmp, what)
    if portable is not None:
        try:
            portable(tmp / PORTABLE)
        except Exception as err:  # noqa: BLE001 -- save_portable fails on every rank alike (its own agreement)
            _fail_together(_describe_write_error(tmp / PORTABLE, err) if rank == 0 else None, tmp, what)
        if rank == 0:
            writes.attempt(tmp / PORTABLE, lambda: None)  # written by rank 0: hashed here
        _fail_together(writes.error, tmp, what)
    manifests = _all_ranks(writes.files)
    error = None
    if rank == 0:
        if os.environ.get(FAULT_ENV) == f"kill-during-save@{step}":
            os.kill(os.getpid(), 9)
        try:
            files: dict[str, dict[str, Any]] = {}
            for part in manifests:
                files.update(part)
            # DeepSpeed copies its zero_to_fp32 scripts in without its checkpoint engine: hashed here.
            for path in sorted(tmp.rglob("*")):
                name = path.relative_to(tmp).as_posix()
                if path.is_file() and name not in files:
                    files[name] = _hash_file(path, sync=True)
            manifest = {"format": MANIFEST_FORMAT, "step": step, "world_size": len(manifests),
                        "files": dict(sorted(files.items()))}
            with open(tmp / COMPLETE, "w") as f:
                f.write(json.dumps(manifest, indent=1) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except OSError as err:
            error = _describe_write_error(tmp, err)
    _fail_together(error, tmp, what)
    if rank == 0:
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if _distributed():
        dist.barrier()
    return final


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """A run's checkpoints that finished saving (``COMPLETE`` present), oldest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted(p for p in root.glob("step_*") if (p / COMPLETE).is_file()) if root.is_dir() else []


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (partial saves are ignored, files are not
    verified: see :func:`select_checkpoint`), or None."""
    complete = complete_checkpoints(run_dir)
    return complete[-1] if complete else None


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of checkpoint ``path``, or None for a checkpoint saved before manifests.

    Raises:
        CheckpointError: ``COMPLETE`` is missing or unreadable.
    """
    marker = Path(path) / COMPLETE
    try:
        text = marker.read_text()
    except OSError as err:
        raise CheckpointError(f"checkpoint {path}: {marker.name} is missing or unreadable ({err.strerror or err}): "
                              "the save never finished") from None
    try:
        manifest = json.loads(text)
    except ValueError:
        manifest = None
    if isinstance(manifest, dict) and manifest.get("format") == MANIFEST_FORMAT:
        return manifest
    if text.strip().isdigit():  # the step number: the format before manifests
        return None
    raise CheckpointError(f"checkpoint {path}: {marker.name} is not a manifest of format {MANIFEST_FORMAT!r}")


def _share(files: dict[str, dict[str, Any]], rank: int, world: int) -> list[str]:
    """The files ``rank`` verifies: largest first, each to the least-loaded rank (the same split
    on every rank, since every rank reads the same manifest)."""
    load = [0] * world
    mine = []
    for name, entry in sorted(files.items(), key=lambda kv: (-int(kv[1]["size"]), kv[0])):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += int(entry["size"])
        if owner == rank:
            mine.append(name)
    return mine


def _check_file(root: Path, name: str, entry: dict[str, Any]) -> str | None:
    path = root / name
    try:
        size = path.stat().st_size
        if size != entry["size"]:
            return f"{name}: {size:,} bytes, the manifest says {entry['size']:,} (truncated or overwritten)"
        if _hash_file(path)["sha256"] != entry["sha256"]:
            return f"{name}: sha256 differs from the manifest (the file changed after it was saved)"
    except FileNotFoundError:
        return f"{name}: missing"
    except OSError as err:
        return f"{name}: unreadable ({err.strerror or err})"
    return None


@dataclass
class CheckpointReport:
    """What :func:`verify_checkpoint` found in one checkpoint."""

    path: Path
    problems: list[str] = field(default_factory=list)
    """``FILE: what is wrong``, one per damaged file; empty when the checkpoint verifies."""
    verified: bool = False
    """The files were checked against a manifest (False for a checkpoint saved before manifests)."""
    files: int = 0
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_checkpoint(path: Path, rank: int = 0, world: int = 1) -> CheckpointReport:
    """Check this rank's share of a checkpoint's files against its manifest (all files when
    ``world`` is 1): each must exist with the listed size and sha256. Never raises: an
    unreadable manifest is a problem too."""
    path = Path(path)
    report = CheckpointReport(path)
    try:
        manifest = read_manifest(path)
    except CheckpointError as err:
        report.problems.append(str(err).removeprefix(f"checkpoint {path}: "))
        return report
    if manifest is None:
        return report
    files = manifest["files"]
    report.verified, report.files = True, len(files)
    report.bytes = sum(int(e["size"]) for e in files.values())
    for name in _share(files, rank, world):
        problem = _check_file(path, name, files[name])
        if problem is not None:
            report.problems.append(problem)
    return report


def _verify_together(path: Path) -> CheckpointReport:
    """:func:`verify_checkpoint` with the files split over the ranks; every rank gets the whole
    report (the same verdict everywhere)."""
    rank, world = _rank_and_world()
    local = verify_checkpoint(path, rank, world)
    report = CheckpointReport(path, verified=local.verified, files=local.files, bytes=local.bytes)
    for problems in _all_ranks(local.problems):
        report.problems.extend(p for p in problems if p not in report.problems)
    return report


def select_checkpoint(resume: str, run_dir: Path, log: Callable[[str], None]) -> Path | None:
    """The checkpoint a run resumes from (collective: every rank calls it and gets the same answer).

    ``resume="auto"``: the newest complete checkpoint of ``run_dir`` that verifies; a damaged one
    is logged (which file of which checkpoint, and why) and the next older one tried. None when the
    run has no checkpoint. ``"none"``: None. Otherwise a checkpoint path, which must verify.

    Raises:
        CheckpointError: the named checkpoint does not verify (naming the file), or none of the
            run's checkpoints does.
    """
    if resume == "none":
        return None
    if resume != "auto":
        report = _verify_together(Path(resume))
        if not report.ok:
            raise CheckpointError(f"checkpoint.resume={resume}: the checkpoint is damaged: {'; '.join(report.problems)}")
        if not report.verified:
            log(f"resume      {resume} has no checksums (saved before manifests): loading it unverified")
        return Path(resume)
    # Rank 0's listing for all: a rank that saw another one (a lagging network file system) would
    # take part in the verifications below in another order.
    candidates: list[Path] = _all_ranks(complete_checkpoints(run_dir))[0]
    for candidate in reversed(candidates):
        report = _verify_together(candidate)
        if report.ok:
            if not report.verified:
                log(f"resume      {candidate} has no checksums (saved before manifests): loading it unverified")
            return candidate
        log(f"resume      checkpoint {candidate} is damaged, skipping it: {'; '.join(report.problems)}")
    if candidates:
        raise CheckpointError(f"none of the {len(candidates)} checkpoints of {run_dir} verifies (see above); "
                              "set checkpoint.resume=none to start over")
    return None


def load_checkpoint(engine: Any, path: Path, engine_state: bool = True) -> dict[str, Any]:
    """Restore the engine (weights, Scion's sharded state) and this rank's generators; returns the
    trainer state. ``engine_state=False`` restores only the generators and the trainer state (the
    weights then come from :data:`PORTABLE`).

    Raises:
        CheckpointError: a file is missing or cannot be read, naming the checkpoint and the cause.
    """
    path = Path(path)
    for required in (COMPLETE, "trainer_state.json", TAG):
        if not (path / required).exists():
            raise CheckpointError(f"checkpoint {path} is incomplete: {required} is missing")
    if engine_state:
        try:
            load_path, _ = engine.load_checkpoint(str(path), tag=TAG)
        except Exception as err:  # noqa: BLE001 -- torch's reader names neither the file nor the checkpoint
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load {path / TAG}: {type(err).__name__}: {err}") from err
        if load_path is None:
            raise CheckpointError(f"checkpoint {path}: DeepSpeed could not load {path / TAG}")
    rng_file = path / "rng" / f"rank_{_rank_and_world()[0]}.pt"
    if engine_state and rng_file.is_file():  # not when resuming at a different layout: other ranks drew them
        rng = torch.load(rng_file, weights_only=False)
        random.setstate(rng["python"])
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return json.loads((path / "trainer_state.json").read_text())
