"""The norm-everywhere GPT as a Hugging Face model.

    from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM, register_auto_classes
    register_auto_classes()
    model = NormGPTForCausalLM(NormGPTConfig.from_preset("124m"))

`python -m disco_ds.models.norm_gpt` prints every size preset with its exact parameter counts.
"""

from .configuration_norm_gpt import PRESETS, NormGPTConfig, preset_table
from .modeling_norm_gpt import NormGPTForCausalLM, NormGPTModel, NormGPTPreTrainedModel


def register_auto_classes():
    """Make the Auto classes and `save_pretrained` aware of NormGPT. Safe to call repeatedly.

    - `AutoConfig` / `AutoModel` / `AutoModelForCausalLM` resolve model_type "norm_gpt" to these
      classes in this process (no `trust_remote_code` needed while this package is importable);
    - `register_for_auto_class` makes `save_pretrained` write `auto_map` into config.json and copy
      configuration_norm_gpt.py and modeling_norm_gpt.py next to the weights, so the checkpoint
      loads without this package via `trust_remote_code=True`.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    AutoConfig.register(NormGPTConfig.model_type, NormGPTConfig, exist_ok=True)
    AutoModel.register(NormGPTConfig, NormGPTModel, exist_ok=True)
    AutoModelForCausalLM.register(NormGPTConfig, NormGPTForCausalLM, exist_ok=True)
    NormGPTConfig.register_for_auto_class("AutoConfig")
    NormGPTModel.register_for_auto_class("AutoModel")
    NormGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")


__all__ = [
    "PRESETS",
    "NormGPTConfig",
    "NormGPTForCausalLM",
    "NormGPTModel",
    "NormGPTPreTrainedModel",
    "preset_table",
    "register_auto_classes",
]
