"""One NormGPT training step, lean against the paths it replaced: saved activations, peak memory,
tokens/s, and the loss after N steps (which must agree).

    python benchmarks/bench_model_step.py                              # tiny, 124m-shaped, its head alone
    python benchmarks/bench_model_step.py --models tiny --steps 20 --precisions fp32 bf16

Paths (the reference exists only here, not in the package):

* ``lean``: the package as it is. ``rms_norm`` keeps for backward x in its own dtype and one
  float32 number per row; the loss is what the trainer's ``_loss`` calls,
  ``model(labels=..., shift_labels=..., return_logits=False)``: a chunked linear + cross-entropy
  that recomputes each chunk's logits in backward.
* ``reference``: the RMSNorm before, autograd through ``F.rms_norm(x.float()).type_as(x)`` (a
  float32 copy of every normalised activation kept), and the trainer's loss before, full logits
  then ``F.cross_entropy(logits.float())`` (float32 [tokens, vocab] kept).

Models: the tiny preset, the 124m preset (width 768, 12 layers, vocabulary 50304) at one short
sequence (what a CPU steps through in seconds), and ``124m-head``: the 124m output layer and loss
alone at 4096 tokens, fed fixed embeddings of the tokens (the loss's memory at a realistic
micro-batch, without the blocks a CPU could not step through at that size).

Precisions: ``fp32`` (float32 weights), ``autocast`` (float32 weights, bf16 autocast), ``bf16``
(bf16 weights, what the DeepSpeed engine trains with ``train.bf16``).

Every (model, precision, path) runs in its own subprocess from the same seed on the same batches
(a learnable synthetic source: each token is followed by a fixed successor 90% of the time), with
AdamW. Per step: forward, loss, backward (timed: the model step; the optimizer step is not), then
the optimizer step. Reported:

* saved activations: bytes autograd saves during forward and loss (``saved_tensors_hooks``), each
  storage once, parameters excluded;
* peak tensor memory: the most bytes tensors held during one step above what they held at its
  start, from the allocation events of the PyTorch profiler (the CPU allocator's running total;
  on CUDA ``torch.cuda.max_memory_allocated``);
* peak RSS: the process's resident high-water mark during the timed steps above the RSS at their
  start (reset through ``/proc/self/clear_refs``; large allocations are returned to the OS at
  once, ``MALLOC_MMAP_THRESHOLD_``, so RSS follows the live tensors);
* tokens/s: tokens per timed step over its median time (the first two steps are excluded), the
  median over ``--repeats`` rounds in which the variants take turns;
* loss after N steps: the last step's training loss.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("reference", "lean")
PRECISIONS = ("fp32", "autocast", "bf16")
# name -> (preset, overrides, batch, sequence length): the tiny preset, and the 124m shapes (width
# 768, 12 layers, GPT-2's padded vocabulary) at a batch a CPU steps through in seconds.
MODELS: dict[str, tuple[str, dict[str, Any], int, int]] = {
    "tiny": ("tiny", {}, 8, 128),
    "124m": ("124m", {}, 1, 512),
    "124m-head": ("124m", {}, 1, 4096),
}
"""The ``-head`` entry is the output layer and loss alone (:func:`head_only`) at a micro-batch of
realistic size, where the loss's share of the step's memory shows."""
MIB = 2.0**20


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> bool:
    """Reset the resident high-water mark (Linux); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _profiled_peak(step: Any) -> int:
    """Most bytes CPU tensors held during ``step()`` above what they held when it began."""
    from torch.profiler import ProfilerActivity, profile

    from disco_ds.trainer.memory import profiled_peak_bytes

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return profiled_peak_bytes(prof)


def head_only(config: Any) -> Any:
    """The output layer of ``config``'s NormGPT fed by a fixed random, RMS-normalised embedding of
    each input token (not trained): what the last block hands the head, at no cost of its own.
    ``forward(input_ids)`` returns the final hidden states [B, T, d]; ``lm_head`` is the model's."""
    import torch
    from torch import nn

    class HeadOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.nn.functional.rms_norm(torch.randn(config.vocab_size, config.d_model),
                                                                       (config.d_model,)))
            self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            return self.table[input_ids]

    return HeadOnly()


def run_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One (model, precision, path): trains ``spec["steps"]`` steps and measures them."""
    import torch
    import torch.nn.functional as F

    from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM
    from disco_ds.models.norm_gpt import modeling_norm_gpt as modeling

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    preset, overrides, batch, seq = MODELS[spec["model"]]
    config = NormGPTConfig.from_preset(preset, **overrides)
    torch.manual_seed(0)
    head = spec["model"].endswith("-head")
    model = (head_only(config) if head else NormGPTForCausalLM(config)).to(device).train()
    if spec["precision"] == "bf16":
        model.to(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=spec["lr"])
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if spec["precision"] == "autocast" else nullcontext())

    if head:
        def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            hidden = model(inputs)
            if spec["path"] == "reference":
                logits = model.lm_head(hidden)
                return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
            return modeling.linear_cross_entropy(hidden, model.lm_head.weight, targets) / targets.numel()
    elif spec["path"] == "reference":
        def reference_norm(x: torch.Tensor, eps: float, width: int | None = None, group: Any = None) -> torch.Tensor:
            return F.rms_norm(x.float(), (x.size(-1),), eps=eps).type_as(x)

        modeling.sharded_rms_norm = reference_norm  # rms_norm calls it too

        def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=inputs, use_cache=False).logits
            return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    else:
        def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # disco_ds.trainer.loop._loss
            return model(input_ids=inputs, use_cache=False, labels=targets, shift_labels=targets, return_logits=False).loss

    gen = torch.Generator().manual_seed(1)
    successor = torch.randperm(config.vocab_size, generator=gen)

    def next_window() -> torch.Tensor:
        window = torch.empty(batch, seq + 1, dtype=torch.long)
        window[:, 0] = torch.randint(0, config.vocab_size, (batch,), generator=gen)
        noise = torch.randint(0, config.vocab_size, (batch, seq), generator=gen)
        keep = torch.rand(batch, seq, generator=gen) < 0.9
        for t in range(seq):
            window[:, t + 1] = torch.where(keep[:, t], successor[window[:, t]], noise[:, t])
        return window.to(device)

    windows = [next_window() for _ in range(spec["steps"])]
    saved: dict[int, int] = {}
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    losses, seconds = [], []
    peak_tensors = peak_rss = 0
    for i, window in enumerate(windows):
        inputs, targets = window[:, :-1], window[:, 1:]

        def model_step() -> torch.Tensor:
            optimizer.zero_grad(set_to_none=True)
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if i == 0 else nullcontext()
            with hooks, autocast:
                loss = loss_of(inputs, targets)
            loss.backward()
            return loss.detach()

        if i == 1:  # measured once, outside the timed steps: the profiler slows the step down
            if device.type == "cuda":
                torch.cuda.synchronize()
                start = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                loss = model_step()
                peak_tensors = torch.cuda.max_memory_allocated() - start
            else:
                result = {}
                peak_tensors = _profiled_peak(lambda: result.setdefault("loss", model_step()))
                loss = result["loss"]
        else:
            if i == 2:
                sync()
                rss_start, rss_reset = _rss_bytes(), _reset_peak_rss()
            sync()
            begin = time.perf_counter()
            loss = model_step()
            sync()
            if i >= 2:
                seconds.append(time.perf_counter() - begin)
        optimizer.step()
        losses.append(float(loss))
    if len(windows) > 2:
        peak_rss = _peak_rss_bytes() - rss_start if rss_reset else -1
    return {**spec, "tokens": batch * seq, "saved": sum(saved.values()), "peak_tensors": peak_tensors,
            "peak_rss": peak_rss, "tokens_per_s": batch * seq / statistics.median(seconds), "losses": losses}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    parser.add_argument("--steps", type=int, default=6, help="training steps per run (at least 3; the first two are not timed)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all variants; tokens/s is their median")
    parser.add_argument("--json", type=Path, help="also write every run's numbers here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(run_variant(json.loads(args.worker))))
        return
    if args.steps < 3:
        parser.error("--steps must be at least 3")

    env = {**os.environ, "PYTHONPATH": str(ROOT), "MALLOC_MMAP_THRESHOLD_": "65536"}
    specs = [{"model": model, "precision": precision, "path": path, "steps": args.steps, "lr": args.lr,
              "device": args.device, "threads": args.threads}
             for model in args.models for precision in args.precisions for path in PATHS]
    # The variants take turns, round after round: a load change on a shared machine hits them alike.
    runs: list[list[dict[str, Any]]] = [[] for _ in specs]
    for round_ in range(args.repeats):
        for spec, done in zip(specs, runs):
            proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], env=env,
                                  capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"{spec['model']} {spec['precision']} {spec['path']} failed:\n{proc.stderr[-3000:]}")
            done.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            print(f"round {round_ + 1}: {spec['model']} {spec['precision']} {spec['path']}", file=sys.stderr, flush=True)
    # Memory and losses are the same in every round; tokens/s is the median over the rounds.
    rows = [{**done[0], "tokens_per_s": statistics.median(r["tokens_per_s"] for r in done)} for done in runs]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))

    print(f"NormGPT model step, {args.device}, {args.threads} threads, AdamW lr {args.lr:g}, {args.steps} steps, "
          f"tokens/s: median of {args.repeats} rounds\n")
    print("| model | tokens/step | precision | path | saved activations (MiB) | peak tensors above start (MiB) "
          "| peak RSS above start (MiB) | tokens/s | loss after N steps |")
    print("|---|---:|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rss = f"{r['peak_rss'] / MIB:.1f}" if r["peak_rss"] >= 0 else "n/a"
        print(f"| {r['model']} | {r['tokens']} | {r['precision']} | {r['path']} | {r['saved'] / MIB:.1f} "
              f"| {r['peak_tensors'] / MIB:.1f} | {rss} | {r['tokens_per_s']:,.0f} | {r['losses'][-1]:.4f} |")
    print("\nlean / reference:\n")
    print("| model | precision | saved activations | peak tensors | tokens/s | loss difference after N steps |")
    print("|---|---|---:|---:|---:|---:|")
    for old, new in zip(rows[::2], rows[1::2]):
        print(f"| {old['model']} | {old['precision']} | {new['saved'] / old['saved']:.2f} "
              f"| {new['peak_tensors'] / old['peak_tensors']:.2f} | {new['tokens_per_s'] / old['tokens_per_s']:.2f} "
              f"| {new['losses'][-1] - old['losses'][-1]:+.2e} |")


if __name__ == "__main__":
    main()
