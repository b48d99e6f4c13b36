"""Training throughput of NormGPT against transformers' GPT-2 and Llama at the same shape.

    python benchmarks/bench_norm_gpt.py                     # CPU default: d 256, 4 layers, seq 256, batch 4
    python benchmarks/bench_norm_gpt.py --d-model 512 --n-layer 8 --seq-len 512 --batch-size 8

All three models get the same width, depth, head width, vocabulary and (untied) embeddings; the
MLPs have the same parameter count (SwiGLU 8d/3 rounded up to 64 for NormGPT and Llama, GELU 4d for
GPT-2), dropout is off and every model uses SDPA attention. Configs are built locally; nothing is
downloaded.

Every model runs in its own subprocess, so the peak resident memory (`ru_maxrss`) of one run is not
mixed with another's; the models take turns for `--repeats` rounds and the table shows the median
throughput, so a load change on a shared machine hits all of them alike. A step is forward + backward of the next-token loss (no optimizer). The table
reports tokens/s, the ratio to NormGPT, the process's peak RSS and how much that peak grew while
building and training the model (the imports of torch and transformers are excluded). On CUDA it
runs in bf16 autocast, additionally with `torch.compile`, and reports peak allocated GPU memory and
MFU = (6 N + 12 L d_attn T) tokens/s / peak FLOP/s, with N the parameters that do matmuls (all but
the input embeddings).
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("normgpt", "gpt2", "llama")
# Dense bf16 peak FLOP/s by GPU name, for MFU. Override with --peak-tflops.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


def maxrss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def swiglu_width(d):
    return 64 * -(-int(8 * d / 3) // 64)


def build(name, a):
    """The model `name` at the shape given on the command line."""
    n_head = a.d_model // a.head_dim
    if name == "normgpt":
        sys.path.insert(0, str(ROOT))
        from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

        cfg = NormGPTConfig(
            vocab_size=a.vocab_size, d_model=a.d_model, n_layer=a.n_layer, n_head=n_head, head_dim=a.head_dim
        )
        return NormGPTForCausalLM(cfg)
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=a.vocab_size, n_positions=a.seq_len, n_embd=a.d_model, n_layer=a.n_layer, n_head=n_head,
            n_inner=4 * a.d_model, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=False,
            attn_implementation="sdpa",
        )  # fmt: skip
        return GPT2LMHeadModel(cfg)
    if name == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=a.vocab_size, hidden_size=a.d_model, intermediate_size=swiglu_width(a.d_model),
            num_hidden_layers=a.n_layer, num_attention_heads=n_head, num_key_value_heads=n_head,
            head_dim=a.head_dim, max_position_embeddings=a.seq_len, tie_word_embeddings=False,
            attn_implementation="sdpa",
        )  # fmt: skip
        return LlamaForCausalLM(cfg)
    raise ValueError(name)


def worker(a):
    """Measure one model; print one JSON line."""
    import torch

    import transformers  # noqa: F401  (imported before the baseline so its memory is excluded)

    rss_after_imports = maxrss_mib()
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    model = build(a.worker, a).to(device).train()
    input_embeddings = sum(p.numel() for n, p in model.named_parameters() if n.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight")))
    params = sum(p.numel() for p in model.parameters())
    step_model = torch.compile(model) if a.compile else model
    ids = torch.randint(0, a.vocab_size, (a.batch_size, a.seq_len), device=device)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            loss = step_model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    for _ in range(a.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(a.steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    tokens_per_s = a.steps * a.batch_size * a.seq_len / seconds
    result = {
        "model": a.worker,
        "compile": a.compile,
        "params": params,
        "tokens_per_s": tokens_per_s,
        "peak_rss_mib": maxrss_mib(),
        "rss_growth_mib": maxrss_mib() - rss_after_imports,
    }
    if cuda:
        name = torch.cuda.get_device_name()
        peak = a.peak_tflops or next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        attn_width = (a.d_model // a.head_dim) * a.head_dim
        flops_per_token = 6 * (params - input_embeddings) + 12 * a.n_layer * attn_width * a.seq_len
        result["gpu"] = name
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["mfu"] = flops_per_token * tokens_per_s / (peak * 1e12) if peak else None
    print(json.dumps(result))


def run_one(a, name, compile_):
    cmd = [sys.executable, __file__, "--worker", name] + (["--compile"] if compile_ else [])
    for flag in ("d_model", "n_layer", "head_dim", "vocab_size", "seq_len", "batch_size", "steps", "warmup"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(a, flag))]
    if a.peak_tflops:
        cmd += ["--peak-tflops", str(a.peak_tflops)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-layer", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="timed steps per run")
    p.add_argument("--repeats", type=int, default=3, help="runs per model, interleaved; the median is reported")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated subset of " + ",".join(MODELS))
    p.add_argument("--peak-tflops", type=float, default=None, help="GPU peak for MFU (default: by GPU name)")
    p.add_argument("--compile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=MODELS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return worker(a)

    import torch

    cuda = torch.cuda.is_available()
    names = [n.strip() for n in a.models.split(",") if n.strip()]
    runs = [(n, False) for n in names] + ([(n, True) for n in names] if cuda else [])
    rounds = [[run_one(a, n, c) for n, c in runs] for _ in range(a.repeats)]
    results = []
    for i in range(len(runs)):
        per_run = sorted((r[i] for r in rounds), key=lambda r: r["tokens_per_s"])
        median = dict(per_run[len(per_run) // 2])
        median["peak_rss_mib"] = max(r["peak_rss_mib"] for r in per_run)
        median["rss_growth_mib"] = max(r["rss_growth_mib"] for r in per_run)
        results.append(median)

    device = torch.cuda.get_device_name() if cuda else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"forward+backward, d_model={a.d_model} n_layer={a.n_layer} head_dim={a.head_dim} vocab={a.vocab_size} "
        f"seq={a.seq_len} batch={a.batch_size}, median of {a.repeats} runs of {a.steps} timed steps after "
        f"{a.warmup} warmup, "
        f"{device}, torch {torch.__version__}\n"
    )
    head = "| model | compile | params | tokens/s | vs NormGPT | peak RSS MiB | RSS growth MiB |"
    rule = "|---|---|---:|---:|---:|---:|---:|"
    if cuda:
        head += " peak GPU MiB | MFU |"
        rule += "---:|---:|"
    print(head + "\n" + rule)
    for r in results:
        base = next((b for b in results if b["model"] == "normgpt" and b["compile"] == r["compile"]), None)
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}" if base else "-"
        row = (
            f"| {r['model']} | {'yes' if r['compile'] else 'no'} | {r['params'] / 1e6:.2f}M | {r['tokens_per_s']:,.0f} "
            f"| {ratio} | {r['peak_rss_mib']:,.0f} | {r['rss_growth_mib']:,.0f} |"
        )
        if cuda:
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (pass --peak-tflops)"
            row += f" {r['peak_gpu_mib']:,.0f} | {mfu} |"
        print(row)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
