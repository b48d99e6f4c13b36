"""disco_ds: Scion for DeepSpeed ZeRO pretraining, with a Hugging Face norm-everywhere GPT.

Public API:

* :func:`orthogonalize` — Newton–Schulz (quintic, Polar Express) and the exact SVD oracle.
* :mod:`disco_ds.norms` — the LMO library, one class per geometry.
* :class:`Scion`, :class:`ScionLight` — the optimizers.
* :func:`scion_param_groups` — embedding / hidden / output / vector groups with per-role lr.

Importing disco_ds registers the norm-everywhere GPT (``model_type="norm_gpt"``, in
:mod:`models.norm_gpt`) with transformers' ``AutoConfig``, ``AutoModel`` and
``AutoModelForCausalLM``.
"""

from disco_ds.newton_schulz import orthogonalize
from disco_ds.norms import NORMS, Norm, make_norm, register_norm
from disco_ds.optim import Scion, ScionLight
from disco_ds.param_groups import classify_parameters, scion_param_groups

from models.norm_gpt import register_auto_classes as _register_norm_gpt

_register_norm_gpt()

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
