"""Checks of a DeepSpeed config for use with Scion: every setting under which DeepSpeed would
replace, bypass or silently corrupt the Scion update is refused with the key to change.

Scion's own ``step()`` also refuses the settings it can detect at run time (round-robin
gradients, ScionLight under ZeRO); this module catches the rest before ``deepspeed.initialize``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_deepspeed_config"]


def _get(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = config
    for key in dotted.split("."):
        if not isinstance(node, Mapping) or key not in node:
            return default
        node = node[key]
    return node


def check_deepspeed_config(config: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the key if DeepSpeed would not run Scion as given.

    Refused:

    * an ``optimizer`` section: DeepSpeed (and the Hugging Face Trainer) would build that
      optimizer instead of the Scion object you pass;
    * ``zero_optimization.round_robin_gradients: true``: DeepSpeed's fragment addresses
      (``_hp_mapping``) then disagree with the flat gradient layout, so matrices would be
      rebuilt from the wrong entries;
    * ZeRO without ``zero_allow_untested_optimizer: true``: DeepSpeed refuses a client optimizer;
    * optimizer offload without ``zero_force_ds_cpu_optimizer: false``: DeepSpeed raises, and
      accelerate silently swaps in DeepSpeedCPUAdam.
    """
    if "optimizer" in config:
        kind = _get(config, "optimizer.type", "?")
        raise ValueError(
            f"DeepSpeed config has an 'optimizer' section (type={kind!r}): DeepSpeed would build that optimizer "
            "instead of Scion. Remove the 'optimizer' key and pass disco_ds.Scion(...) as the optimizer."
        )
    stage = int(_get(config, "zero_optimization.stage", 0) or 0)
    if _get(config, "zero_optimization.round_robin_gradients", False):
        raise ValueError(
            "zero_optimization.round_robin_gradients=true is not supported with Scion: DeepSpeed's per-parameter "
            "fragment addresses do not match the reordered flat gradients. Set it to false."
        )
    if stage > 0 and not _get(config, "zero_allow_untested_optimizer", False):
        raise ValueError(
            f"ZeRO stage {stage} with a client optimizer needs zero_allow_untested_optimizer=true in the DeepSpeed "
            "config (Scion is not on DeepSpeed's list of tested optimizers)."
        )
    offload = _get(config, "zero_optimization.offload_optimizer.device", "none")
    if offload not in (None, "none") and _get(config, "zero_force_ds_cpu_optimizer", True) is not False:
        raise ValueError(
            f"zero_optimization.offload_optimizer.device={offload!r} needs zero_force_ds_cpu_optimizer=false: "
            "otherwise DeepSpeed refuses Scion, and accelerate silently replaces it with DeepSpeedCPUAdam."
        )
