"""`python -m disco_ds.models.norm_gpt`: print the size presets with exact parameter counts."""

from .configuration_norm_gpt import preset_table

print(preset_table())
