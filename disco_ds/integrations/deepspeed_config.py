"""DeepSpeed configs for Scion: the checks, the gradient-precision keys and the templates.

* :func:`check_deepspeed_config`: every setting under which DeepSpeed would replace, bypass or
  silently corrupt the Scion update is refused with the key to change. Scion's own ``step()``
  also refuses the settings it can detect at run time (round-robin gradients, ScionLight under
  ZeRO); this function catches the rest before ``deepspeed.initialize``.
* :func:`gradient_dtype_keys`: the keys that make DeepSpeed accumulate and reduce gradients in
  a chosen dtype (the trainer's ``train.grad_dtype``).
* :func:`resolve_auto`: a user config written for the Hugging Face Trainer (the templates in
  ``recipes/deepspeed/``, whose batch sizes, precision and buckets are ``"auto"``) made concrete
  for the disco_ds trainer.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["check_deepspeed_config", "gradient_dtype_keys", "lookup", "resolve_auto", "AUTO", "GRAD_DTYPES"]

AUTO = "auto"
GRAD_DTYPES = {"float32": "fp32", "bfloat16": "bf16"}
"""torch dtype name -> DeepSpeed's name, for ``data_types.grad_accum_dtype`` and ``communication_data_type``."""


def lookup(config: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    """``config["a"]["b"]`` for ``dotted = "a.b"``, or ``default`` where a level is missing."""
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
        kind = lookup(config, "optimizer.type", "?")
        raise ValueError(
            f"DeepSpeed config has an 'optimizer' section (type={kind!r}): DeepSpeed would build that optimizer "
            "instead of Scion. Remove the 'optimizer' key and pass disco_ds.Scion(...) as the optimizer."
        )
    stage = int(lookup(config, "zero_optimization.stage", 0) or 0)
    if lookup(config, "zero_optimization.round_robin_gradients", False):
        raise ValueError(
            "zero_optimization.round_robin_gradients=true is not supported with Scion: DeepSpeed's per-parameter "
            "fragment addresses do not match the reordered flat gradients. Set it to false."
        )
    if stage > 0 and not lookup(config, "zero_allow_untested_optimizer", False):
        raise ValueError(
            f"ZeRO stage {stage} with a client optimizer needs zero_allow_untested_optimizer=true in the DeepSpeed "
            "config (Scion is not on DeepSpeed's list of tested optimizers)."
        )
    offload = lookup(config, "zero_optimization.offload_optimizer.device", "none")
    if offload not in (None, "none") and lookup(config, "zero_force_ds_cpu_optimizer", True) is not False:
        raise ValueError(
            f"zero_optimization.offload_optimizer.device={offload!r} needs zero_force_ds_cpu_optimizer=false: "
            "otherwise DeepSpeed refuses Scion, and accelerate silently replaces it with DeepSpeedCPUAdam."
        )


def gradient_dtype_keys(grad_dtype: str) -> dict[str, Any]:
    """The DeepSpeed 0.19.8 keys that accumulate and reduce gradients in ``grad_dtype``
    (``"float32"`` or ``"bfloat16"``), at every ZeRO stage.

    Both are needed because each defaults to the model's dtype (bf16 with ``bf16.enabled``):

    * ``data_types.grad_accum_dtype``: the dtype of the gradient buffers micro-batches accumulate
      into. ZeRO-1 then uses DeepSpeed's ``BF16_Optimizer`` (fp32 gradient buffers) or, with
      offload, per-parameter fp32 ``grad_accum``; ZeRO-2 an fp32 gradient partition; ZeRO-3 an fp32
      ``grad_partitions_flat_buffer``. Without ZeRO a bf16 model only runs with ``bf16`` here
      (DeepSpeed raises otherwise; the trainer's config check says so first).
    * ``communication_data_type``: the dtype of the gradient all-reduce / reduce-scatter (ZeRO-1/2,
      ``BF16_Optimizer``, stage 0) and of ZeRO-3's reduce-scatter. Left to the model's dtype, an
      fp32 accumulation buffer would still be reduced in bf16.

    Raises:
        ValueError: ``grad_dtype`` is not one of ``GRAD_DTYPES``, naming the accepted values.
    """
    if grad_dtype not in GRAD_DTYPES:
        raise ValueError(f"grad_dtype={grad_dtype!r} is not one of {list(GRAD_DTYPES)}")
    name = GRAD_DTYPES[grad_dtype]
    return {"data_types": {"grad_accum_dtype": name}, "communication_data_type": name}


def resolve_auto(user: Mapping[str, Any], generated: Mapping[str, Any]) -> dict[str, Any]:
    """``user`` with every ``"auto"`` value replaced by ``generated``'s value of the same key, or
    removed where ``generated`` has none (DeepSpeed's default then applies).

    This is what ``"auto"`` means in the Hugging Face Trainer's templates ("let the integration
    choose"), made concrete for a config generated from a recipe: batch sizes, accumulation and
    ``bf16.enabled`` come from the recipe; ``fp16.enabled`` and bucket sizes such as
    ``reduce_bucket_size`` or ``stage3_prefetch_bucket_size`` get DeepSpeed's defaults (DeepSpeed
    itself refuses the string ``"auto"``).
    """
    out: dict[str, Any] = {}
    for key, value in user.items():
        mine = generated.get(key)
        if isinstance(value, Mapping):
            section = resolve_auto(value, mine if isinstance(mine, Mapping) else {})
            if section or not value:  # a section that held only "auto"s DeepSpeed fills itself is dropped
                out[key] = section
        elif value == AUTO:
            if mine is not None:
                out[key] = mine
        else:
            out[key] = value
    return out
