"""The public name of the Hugging Face integration, :mod:`disco_ds.integrations.hf`: the Trainer
routes (``scion_optimizer_cls_and_kwargs``, ``ScionFactory``, ``ScionTrainer``) and the
discarded-optimizer check."""

from disco_ds.integrations.hf import *  # noqa: F401,F403
from disco_ds.integrations.hf import __all__  # noqa: F401
