"""`make demo`: a short single-process Scion pretraining run that needs no download.

Trains the tiny NormGPT preset on the bytes of the Python standard library's own source files
(present on every machine), with Scion's per-role learning rates (1 : 1/8 : 1) and a
warmup–stable–decay schedule, printing one line per log interval (loss, the output layer's
RMS→∞ norm, tokens/s), then prints a sampled continuation. The deepspeed-launched trainer replaces
this as the main job.

    python -m disco_ds.demo --steps 600
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import time
from pathlib import Path

import torch

from disco_ds import Scion, scion_param_groups
from disco_ds.norms import RowNorm


def stdlib_bytes(limit: int) -> torch.Tensor:
    """Up to ``limit`` bytes of ``*.py`` files from the running interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= limit:
            break
    if not chunks:
        raise FileNotFoundError(f"no *.py files under the standard library folder {root}")
    return torch.frombuffer(bytearray(b"".join(chunks)[:limit]), dtype=torch.uint8).long()


def wsd_factor(step: int, total: int, warmup: int, decay_fraction: float) -> float:
    """Warmup–stable–decay: linear warmup, constant, linear decay to 0 over the last fraction."""
    if step < warmup:
        return (step + 1) / warmup
    decay_steps = max(1, int(total * decay_fraction))
    return min(1.0, (total - step) / decay_steps)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.2, help="base η; groups get η·(1, 1/8, 1)")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

    torch.manual_seed(args.seed)
    data = stdlib_bytes(4_000_000)
    split = int(0.95 * len(data))
    train, val = data[:split], data[split:]
    config = NormGPTConfig.from_preset("tiny", vocab_size=256, max_position_embeddings=max(args.seq, 256))
    model = NormGPTForCausalLM(config)
    print(config.describe())
    groups = scion_param_groups(model, lr=args.lr)
    opt = Scion(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: wsd_factor(s, args.steps, args.steps // 20, 0.2))
    head = model.get_output_embeddings().weight

    def sample_batch(source: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(source) - args.seq - 1, (args.batch,), generator=gen)
        return torch.stack([source[s : s + args.seq] for s in starts.tolist()])

    gen = torch.Generator().manual_seed(args.seed)
    tokens_per_step = args.batch * args.seq
    start = time.perf_counter()
    for step in range(args.steps):
        batch = sample_batch(train, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"loss became {loss.item()} at step {step}")
        if step % args.log_every == 0 or step == args.steps - 1:
            elapsed = time.perf_counter() - start
            print(
                f"step {step:4d}/{args.steps} | loss {loss.item():.3f} | "
                f"lr {opt.param_groups[0]['lr']:.4f} | ‖W_out‖_RMS→∞ {RowNorm().norm(head.detach()).item():6.2f} | "
                f"{tokens_per_step * (step + 1) / elapsed:,.0f} tok/s",
                flush=True,
            )

    model.eval()
    with torch.no_grad():
        val_gen = torch.Generator().manual_seed(1)
        val_loss = sum(model(input_ids=b, labels=b).loss.item() for b in (sample_batch(val, val_gen) for _ in range(8))) / 8
        print(f"validation loss {val_loss:.3f} nats/byte ({val_loss / math.log(2):.2f} bits/byte; uniform is 8.00)")
        prompt = torch.tensor([list(b"def ")])
        torch.manual_seed(args.seed)
        out = model.generate(prompt, max_new_tokens=200, do_sample=True, temperature=0.8, top_k=40)
    print("sample:\n" + bytes(out[0].tolist()).decode("utf-8", errors="replace"))


if __name__ == "__main__":
    main()
