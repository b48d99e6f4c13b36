"""The optimizer core: Scion's update rule, its geometries and Newton–Schulz.

It imports torch and :mod:`disco_ds.distributed` (plain ``torch.distributed`` plumbing) only: no
DeepSpeed, accelerate or transformers, so ``Scion`` serves any PyTorch loop. The mathematics
(:mod:`.newton_schulz`, :mod:`.norms`) imports no collective at all.
"""

# The mathematics first: disco_ds.distributed imports it while .scion is being imported.
from disco_ds.optim.newton_schulz import orthogonalize
from disco_ds.optim.norms import NORMS, ElementwiseNorm, MatrixNorm, Norm, SeparableNorm, make_norm, register_norm
from disco_ds.optim.param_groups import classify_parameters, scion_param_groups
from disco_ds.optim.scion import SCION_GROUP_DEFAULTS, Scion, ScionLight

__all__ = [
    "orthogonalize",
    "NORMS",
    "Norm",
    "MatrixNorm",
    "SeparableNorm",
    "ElementwiseNorm",
    "make_norm",
    "register_norm",
    "classify_parameters",
    "scion_param_groups",
    "SCION_GROUP_DEFAULTS",
    "Scion",
    "ScionLight",
]
