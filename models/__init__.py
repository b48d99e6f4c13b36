"""Model definitions shipped with disco_ds, installed as ``disco_ds.models`` (the repository keeps
them in the top-level ``models/`` folder; ``pyproject.toml`` maps it).

Importing this package registers NormGPT (``model_type="norm_gpt"``) with transformers'
``AutoConfig``, ``AutoModel`` and ``AutoModelForCausalLM``. The model files themselves import only
each other, torch and transformers, so a saved checkpoint loads without disco_ds
(``trust_remote_code=True``).
"""

from .norm_gpt import register_auto_classes

register_auto_classes()
