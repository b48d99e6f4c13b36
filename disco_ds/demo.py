"""The last step of ``make demo``: load an exported model with plain ``transformers`` and sample.

    python -m disco_ds.demo runs/demo/hf --prompt "def "

``make demo`` first writes byte-level shards of the Python standard library's source
(``disco_ds prepare``), trains the tiny recipe on 2 ranks under the ``deepspeed`` launcher with
ZeRO-2, and exports the last checkpoint (``disco_ds export``); this loads that folder the way any
user of the model would — ``AutoModelForCausalLM`` / ``AutoTokenizer`` with ``trust_remote_code``
— and prints a sampled continuation of the prompt.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("--prompt", default="def ")
    parser.add_argument("--max-new-tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir, trust_remote_code=True).eval()
    # trust_remote_code: transformers 5 reads config.json (NormGPT's code) before the tokenizer's files.
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=True)
    print(f"loaded {type(model).__name__} from {args.model_dir}: {sum(p.numel() for p in model.parameters()):,} parameters")
    ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    torch.manual_seed(args.seed)
    with torch.no_grad():
        # The export's generation_config.json stops at end of text and suppresses the padded ids.
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=True, temperature=0.8, top_k=40)
    print("sample:\n" + tokenizer.decode(out[0], skip_special_tokens=True))


if __name__ == "__main__":
    main()
