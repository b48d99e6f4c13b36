"""The paper's instrument (SPEC 4): operator norms of weights and of the actual update per layer
group, and the effective learning rate ‖ΔW‖_F / ‖W‖_F, measured inside Scion's ``step()``.

For ``W`` of shape ``[fan_out, fan_in]``:

* ``rms_to_rms`` (hidden): ``σ_max(W)·√(fan_in / fan_out)``; ``σ_max`` by power iteration whose
  vector is carried from step to step, so one iteration per step tracks a slowly moving matrix
  (an estimate from below; exact SVD only in tests);
* ``l1_to_rms`` (embedding): the largest RMS of a token vector (a row of the table);
* ``rms_to_inf`` (output): ``√fan_in · max_i ‖W[i, :]‖₂``;
* ``rms`` (vectors such as norm gains): the root mean square.

Everything is computed from row sums of squares and matrix-vector products of whole matrices, which
:func:`disco_ds.distributed.matrix_products` completes from each rank's fragments with one small
``all_reduce`` — no matrix is gathered for monitoring. Every rank ends with the same numbers; the
training loop logs them on rank 0.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass, field
from typing import Any

import torch

from disco_ds.distributed import ExchangeStats, Fragment, Layout, matrix_products, matrix_view_shape
from disco_ds.optim.norms import MatrixNorm, Norm

__all__ = ["NORM_KINDS", "ROLE_NORM_KIND", "norm_kind", "operator_norm", "exact_operator_norm", "NormMonitor"]

NORM_KINDS: tuple[str, ...] = ("rms_to_rms", "l1_to_rms", "rms_to_inf", "rms")
ROLE_NORM_KIND: dict[str, str] = {"hidden": "rms_to_rms", "embedding": "l1_to_rms", "output": "rms_to_inf", "vector": "rms"}
"""The norm SPEC 4 monitors for each role of :func:`disco_ds.scion_param_groups`."""


def norm_kind(role: str | None, norm: Norm) -> str:
    """The monitored norm of a group: by its role, else by its geometry."""
    if role in ROLE_NORM_KIND:
        return ROLE_NORM_KIND[role]
    if isinstance(norm, MatrixNorm):
        return "rms_to_rms"
    return "rms_to_inf"


def fans(norm: Norm, shape: tuple[int, ...]) -> tuple[int, int]:
    """``(fan_out, fan_in)`` of a parameter as its geometry sees it (e.g. GPT-2 ``Conv1D`` is transposed)."""
    if isinstance(norm, MatrixNorm) and len(shape) >= norm.min_ndim:
        fan_out, fan_in = norm.to_matrix(torch.empty(shape, device="meta")).shape[-2:]
        return int(fan_out), int(fan_in)
    return matrix_view_shape(shape)


def operator_norm(kind: str, fan: tuple[int, int], row_squares: torch.Tensor, sigma: float) -> float:
    """SPEC 4 norm of a matrix from its row sums of squares (rows of the ``[rows, cols]`` view) and
    its largest singular value."""
    fan_out, fan_in = fan
    if kind == "rms_to_rms":
        return sigma * math.sqrt(fan_in / fan_out)
    rows_max = float(row_squares.max())
    cols = fan_in if len(row_squares) == fan_out else fan_out
    if kind == "l1_to_rms":
        return math.sqrt(rows_max / cols)
    if kind == "rms_to_inf":
        return math.sqrt(cols * rows_max)
    if kind == "rms":
        return math.sqrt(float(row_squares.sum()) / (fan_out * fan_in))
    raise ValueError(f"unknown monitored norm {kind!r}; accepted values: {list(NORM_KINDS)}")


def exact_operator_norm(kind: str, fan: tuple[int, int], matrix: torch.Tensor) -> float:
    """The same norm of a whole ``[rows, cols]`` matrix with an exact SVD (the test oracle)."""
    m = matrix.double().reshape(matrix.shape[0] if matrix.dim() > 1 else 1, -1)
    sigma = float(torch.linalg.matrix_norm(m, ord=2)) if kind == "rms_to_rms" else 0.0
    return operator_norm(kind, fan, m.square().sum(dim=1), sigma)


@dataclass
class _GroupTotals:
    weight_norm: float = 0.0  # max over the group's matrices
    update_norm: float = 0.0
    weight_squares: float = 0.0  # Σ ‖W‖_F² over the group
    update_squares: float = 0.0


@dataclass
class NormMonitor:
    """Accumulates the norms of one optimizer step (DeepSpeed may call ``step()`` once per group or
    ZeRO-3 sub-group) until :meth:`pop` hands them to the logger.

    Args:
        power_iterations: power-iteration rounds per measured step (two small all-reduces each).
    """

    power_iterations: int = 1
    _vectors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _totals: dict[str, _GroupTotals] = field(default_factory=dict)

    def _probe(self, key: str, which: str, size: int, device: torch.device) -> torch.Tensor:
        """The carried power-iteration vector; its seed is the parameter's name, so every rank agrees."""
        if (key, which) not in self._vectors:
            # Drawn on the host from a name-seeded generator so every rank and every device type
            # starts from the same vector, then moved to the communication device once.
            gen = torch.Generator().manual_seed(zlib.crc32(f"{key}/{which}".encode()))
            v = torch.randn(size, generator=gen, dtype=torch.float32)
            self._vectors[(key, which)] = (v / v.norm()).to(device)
        return self._vectors[(key, which)]

    def measure(
        self,
        label: str,
        kind: str,
        norm: Norm,
        layout: Layout,
        keys: list[str],
        weights: dict[Fragment, torch.Tensor],
        updates: dict[Fragment, torch.Tensor],
        stats: ExchangeStats,
        *,
        device: torch.device,
    ) -> None:
        """Add one call's members: ``weights`` (after the step) and ``updates`` (the step ΔW) are
        this rank's fragments of every member of ``layout``, on ``device``, the communication
        device (passed explicitly: a rank may hold no fragment). Collective over ``layout.group``."""
        members = range(len(layout.shapes))
        sets = (weights, updates)
        names = ("weight", "update")
        probes = [{m: self._probe(keys[m], which, matrix_view_shape(layout.shapes[m])[1], device) for m in members}
                  for which in names]
        forward = matrix_products(layout, list(sets), probes, transpose=False, stats=stats, device=device)
        sigmas: list[dict[int, float]] = [{m: 0.0 for m in members} for _ in names]
        if kind == "rms_to_rms":
            for it in range(self.power_iterations):
                images = [{m: forward[k][m][0] for m in members} for k in range(len(names))]
                for k in range(len(names)):
                    for m in members:
                        sigmas[k][m] = float(images[k][m].norm())
                back = matrix_products(layout, list(sets), images, transpose=True, stats=stats, device=device)
                for k, which in enumerate(names):
                    for m in members:
                        v = back[k][m]
                        if float(v.norm()) > 0:
                            self._vectors[(keys[m], which)] = v / v.norm()
                if it + 1 < self.power_iterations:
                    probes = [{m: self._vectors[(keys[m], which)] for m in members} for which in names]
                    forward = matrix_products(layout, list(sets), probes, transpose=False, stats=stats, device=device)
        totals = self._totals.setdefault(label, _GroupTotals())
        for m in members:
            fan = fans(norm, layout.shapes[m])
            w_rows, dw_rows = forward[0][m][1], forward[1][m][1]
            totals.weight_norm = max(totals.weight_norm, operator_norm(kind, fan, w_rows, sigmas[0][m]))
            totals.update_norm = max(totals.update_norm, operator_norm(kind, fan, dw_rows, sigmas[1][m]))
            totals.weight_squares += float(w_rows.sum())
            totals.update_squares += float(dw_rows.sum())

    def pop(self) -> dict[str, float]:
        """``norm/<group>/weight``, ``norm/<group>/update`` (max over the group's matrices) and
        ``effective_lr/<group>`` since the last call; then start afresh."""
        metrics: dict[str, Any] = {}
        for label, t in self._totals.items():
            metrics[f"norm/{label}/weight"] = t.weight_norm
            metrics[f"norm/{label}/update"] = t.update_norm
            metrics[f"effective_lr/{label}"] = math.sqrt(t.update_squares / t.weight_squares) if t.weight_squares > 0 else 0.0
        self._totals = {}
        return metrics
