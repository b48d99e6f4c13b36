"""Integrations that import the core, never the reverse: the Hugging Face ``Trainer`` and accelerate
(:mod:`.hf`, public as :mod:`disco_ds.hf`), DeepSpeed config guards (:mod:`.deepspeed_config`),
checkpoints portable across world sizes (:mod:`.reshard`) and the export to a ``transformers``
folder (:mod:`.export`)."""
