"""disco_ds: Scion for DeepSpeed ZeRO pretraining, with a Hugging Face norm-everywhere GPT.

Public API (the optimizer core, :mod:`disco_ds.optim`; importing it needs torch only):

* :func:`orthogonalize` — Newton–Schulz (quintic, Polar Express) and the exact SVD oracle.
* :data:`NORMS`, :class:`Norm`, :func:`register_norm` — the LMO library, one class per geometry.
* :class:`Scion`, :class:`ScionLight` — the optimizers.
* :func:`scion_param_groups` — embedding / hidden / output / vector groups with per-role lr.

The rest is imported where it is used: :mod:`disco_ds.models` (the norm-everywhere GPT; importing
it registers ``model_type="norm_gpt"`` with transformers' Auto classes), :mod:`disco_ds.hf` (the
Hugging Face Trainer routes), :mod:`disco_ds.trainer` (the ``disco_ds train`` stack),
:mod:`disco_ds.data`, :mod:`disco_ds.distributed` and :mod:`disco_ds.integrations`.
"""

from disco_ds.optim import (
    NORMS,
    Norm,
    Scion,
    ScionLight,
    classify_parameters,
    make_norm,
    orthogonalize,
    register_norm,
    scion_param_groups,
)

__version__ = "0.1.0"

__all__ = [
    "orthogonalize",
    "NORMS",
    "Norm",
    "make_norm",
    "register_norm",
    "Scion",
    "ScionLight",
    "scion_param_groups",
    "classify_parameters",
]
