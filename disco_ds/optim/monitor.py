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

import torch

from disco_ds.distributed import ExchangeStats, Fragment, Layout, matrix_products, matrix_view_shape
from disco_ds.optim.norms import MatrixNorm, Norm

__all__ = ["NORM_KINDS", "ROLE_NORM_KIND", "TOTALS", "norm_kind", "operator_norm", "exact_operator_norm", "NormMonitor"]

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


def operator_norm(kind: str, fan: tuple[int, int], row_squares: torch.Tensor, sigma: torch.Tensor | float) -> torch.Tensor:
    """SPEC 4 norm of a matrix from its row sums of squares (rows of the ``[rows, cols]`` view) and
    its largest singular value, as a 0-dim tensor on ``row_squares``' device (nothing is read back)."""
    fan_out, fan_in = fan
    if kind == "rms_to_rms":
        return torch.as_tensor(sigma, dtype=row_squares.dtype, device=row_squares.device) * math.sqrt(fan_in / fan_out)
    cols = fan_in if len(row_squares) == fan_out else fan_out
    if kind == "l1_to_rms":
        return (row_squares.max() / cols).sqrt()
    if kind == "rms_to_inf":
        return (row_squares.max() * cols).sqrt()
    if kind == "rms":
        return (row_squares.sum() / (fan_out * fan_in)).sqrt()
    raise ValueError(f"unknown monitored norm {kind!r}; accepted values: {list(NORM_KINDS)}")


def exact_operator_norm(kind: str, fan: tuple[int, int], matrix: torch.Tensor) -> float:
    """The same norm of a whole ``[rows, cols]`` matrix with an exact SVD (the test oracle)."""
    m = matrix.double().reshape(matrix.shape[0] if matrix.dim() > 1 else 1, -1)
    sigma = torch.linalg.matrix_norm(m, ord=2) if kind == "rms_to_rms" else 0.0
    return float(operator_norm(kind, fan, m.square().sum(dim=1), sigma))


TOTALS = ("weight_norm", "update_norm", "weight_squares", "update_squares")
"""What :class:`NormMonitor` accumulates per group, in this order: the largest weight and update
norm over the group's matrices, and Σ ‖W‖_F², Σ ‖ΔW‖_F² over the group."""


@dataclass
class NormMonitor:
    """Accumulates the norms of one optimizer step (DeepSpeed may call ``step()`` once per group or
    ZeRO-3 sub-group) until :meth:`pop` hands them over.

    Every number stays on the device: per group one tensor of :data:`TOTALS`, updated in place, so
    measuring costs no host–device sync; :meth:`pop` returns them as device tensors and
    :meth:`read` turns a popped set into floats with one copy.

    Args:
        power_iterations: power-iteration rounds per measured step (two small all-reduces each).
    """

    power_iterations: int = 1
    _vectors: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    _totals: dict[str, torch.Tensor] = field(default_factory=dict)

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
        zero = torch.zeros((), device=device)
        sigmas: list[dict[int, torch.Tensor]] = [{m: zero for m in members} for _ in names]
        if kind == "rms_to_rms":
            for it in range(self.power_iterations):
                images = [{m: forward[k][m][0] for m in members} for k in range(len(names))]
                for k in range(len(names)):
                    for m in members:
                        sigmas[k][m] = images[k][m].norm()
                back = matrix_products(layout, list(sets), images, transpose=True, stats=stats, device=device)
                for k, which in enumerate(names):
                    for m in members:
                        # A zero image (e.g. a zero update) keeps the carried vector, decided on
                        # the device rather than by reading the norm back.
                        v, length = back[k][m], back[k][m].norm()
                        kept = self._vectors[(keys[m], which)]
                        self._vectors[(keys[m], which)] = torch.where(length > 0, v / torch.where(length > 0, length, 1.0), kept)
                if it + 1 < self.power_iterations:
                    probes = [{m: self._vectors[(keys[m], which)] for m in members} for which in names]
                    forward = matrix_products(layout, list(sets), probes, transpose=False, stats=stats, device=device)
        if not members:
            return
        weight_norms = torch.stack([operator_norm(kind, fans(norm, layout.shapes[m]), forward[0][m][1], sigmas[0][m])
                                    for m in members])
        update_norms = torch.stack([operator_norm(kind, fans(norm, layout.shapes[m]), forward[1][m][1], sigmas[1][m])
                                    for m in members])
        squares = torch.stack([torch.stack([forward[k][m][1].sum() for m in members]).sum() for k in range(len(names))])
        step = torch.cat([torch.stack([weight_norms.max(), update_norms.max()]), squares]).float()
        totals = self._totals.get(label)
        if totals is None:
            self._totals[label] = step
        else:
            totals[:2] = torch.maximum(totals[:2], step[:2])
            totals[2:] += step[2:]

    def pop(self) -> dict[str, torch.Tensor]:
        """Per group label, the :data:`TOTALS` tensor since the last call (on the device, unread);
        then start afresh."""
        totals, self._totals = self._totals, {}
        return totals

    @staticmethod
    def read(totals: dict[str, torch.Tensor]) -> dict[str, float]:
        """The metrics of popped totals (:meth:`metrics`), with one device-to-host copy."""
        if not totals:
            return {}
        values = torch.stack(list(totals.values())).tolist()
        return {k: v for label, row in zip(totals, values) for k, v in NormMonitor.metrics(label, row).items()}

    @staticmethod
    def metrics(label: str, totals: list[float]) -> dict[str, float]:
        """``norm/<label>/weight``, ``norm/<label>/update`` (max over the group's matrices) and
        ``effective_lr/<label>`` = ‖ΔW‖_F / ‖W‖_F from one group's :data:`TOTALS`, read back."""
        weight, update, weight_squares, update_squares = totals
        return {f"norm/{label}/weight": weight, f"norm/{label}/update": update,
                f"effective_lr/{label}": math.sqrt(update_squares / weight_squares) if weight_squares > 0 else 0.0}
