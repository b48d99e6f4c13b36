"""Model definitions shipped with disco_ds (Hugging Face compatible)."""
