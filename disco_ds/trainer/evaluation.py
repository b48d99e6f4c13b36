"""What an evaluation reports beyond the mean loss: perplexity, bits, and a short sample.

* :func:`readable_metrics`: the validation loss (nats per token) as perplexity, bits per token and
  bits per byte of the text the shards were made from (``meta.json`` counts its bytes and tokens,
  so any tokenizer is comparable; for the byte tokenizer the two differ only by the end-of-text
  tokens).
* :func:`greedy_sample`: ``eval.sample_tokens`` tokens continuing ``eval.sample_prompt``, decoded
  with the data's tokenizer. Every rank runs the same forwards (ZeRO-3 and tensor parallelism need
  all ranks in each forward); greedy decoding keeps them on the same tokens without a broadcast.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

__all__ = ["readable_metrics", "greedy_sample", "eval_sample"]


def readable_metrics(loss: float, meta: dict[str, Any]) -> dict[str, float]:
    """``loss`` (mean nats per token) with ``perplexity``, ``bits_per_token`` and, when ``meta``
    (the data's ``meta.json``) counts the source bytes, ``bits_per_byte``."""
    bits_per_token = loss / math.log(2)
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)), "bits_per_token": bits_per_token}
    tokens = meta.get("tokens")
    total_bytes = meta.get("bytes")
    if isinstance(tokens, dict) and isinstance(total_bytes, (int, float)) and total_bytes > 0:
        out["bits_per_byte"] = bits_per_token * sum(tokens.values()) / total_bytes
    return out


@torch.no_grad()
def greedy_sample(engine: Any, prompt: list[int], new_tokens: int, vocab_size: int, context: int,
                  device: torch.device) -> list[int]:
    """``new_tokens`` ids continuing ``prompt`` by greedy decoding through ``engine`` (called on
    every rank), choosing among the tokenizer's ``vocab_size`` ids only (never a padded row), with
    at most ``context`` tokens of context. Returns the new ids."""
    ids = list(prompt)
    engine.eval()
    for _ in range(new_tokens):
        window = torch.tensor([ids[-context:]], dtype=torch.long, device=device)
        logits = engine(input_ids=window, use_cache=False).logits[0, -1, :vocab_size]
        ids.append(int(logits.argmax()))
    engine.train()
    return ids[len(prompt):]


def eval_sample(engine: Any, data_dir: Path, meta: dict[str, Any], prompt: str, new_tokens: int, context: int,
                device: torch.device) -> str:
    """The text of :func:`greedy_sample` from ``prompt`` (the end-of-text token when empty: the start
    of a document), decoded with the tokenizer of ``data_dir``."""
    from disco_ds.data.prepare import load_tokenizer

    tokenizer = load_tokenizer(data_dir)
    prompt_ids = tokenizer.encode(prompt) if prompt else [int(meta["eot_id"])]
    new = greedy_sample(engine, prompt_ids, new_tokens, int(meta["vocab_size"]), context, device)
    return prompt + tokenizer.decode(new)
