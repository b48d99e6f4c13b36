"""disco_ds.integrations.export: real DeepSpeed checkpoints (ZeRO 0–3, two ranks) to Hugging Face folders.

``tests/export_worker.py`` trains a tiny NormGPT with disco_ds.Scion for two steps per ZeRO stage
under ``torch.distributed.run`` and saves each in the trainer's checkpoint layout, with the live
model's logits. The exports are then loaded by ``AutoModelForCausalLM.from_pretrained(...,
trust_remote_code=True)`` in a fresh interpreter, outside the repository, where ``disco_ds`` and
``models`` cannot be imported: fp32 exports reproduce the live logits (atol 1e-5; measured 0).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from launching import torchrun

from disco_ds.integrations.export import ExportError, _tie_aliases, add_arguments, clean_state_dict, export_checkpoint, main

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).parent / "export_worker.py"
STAGES = (0, 1, 2, 3)
BF16_ATOL = 1e-2  # bf16 weights round to 2⁻⁸ relative; logits here are O(0.4), measured error 0.003

# Runs in a fresh interpreter: blocks disco_ds and models, loads every export, records its logits.
LOADER = r"""
import importlib.abc, json, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("disco_ds", "models"):
            raise ModuleNotFoundError(f"{name} is blocked for this test")
        return None

sys.meta_path.insert(0, Block())
for name in ("disco_ds", "models"):
    try:
        __import__(name)
    except ImportError:
        continue
    raise SystemExit(f"{name} is importable")

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

results = {}
for job in json.loads(sys.argv[1]):
    model = AutoModelForCausalLM.from_pretrained(job["dir"], trust_remote_code=True)
    with torch.no_grad():
        logits = model(torch.load(job["ref"])["ids"]).logits
    result = {"logits": logits.float(), "dtype": str(model.dtype), "module": type(model).__module__}
    if job.get("text"):
        result["tokens"] = AutoTokenizer.from_pretrained(job["dir"])(job["text"])["input_ids"]
    results[job["name"]] = result
torch.save(results, sys.argv[2])
"""




@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Path:
    """``ROOT/stage<S>/`` checkpoints and ``ROOT/stage<S>_logits.pt`` for every stage, and the bf16
    ZeRO-1 checkpoint ``ROOT/stage1_bf16/`` with its fp32 masters."""
    root = tmp_path_factory.mktemp("checkpoints")
    proc = torchrun(WORKER, 2, json.dumps({"stages": list(STAGES), "bf16_stages": [1], "steps": 2}), str(root), timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return root


def save_tokenizer(directory: Path) -> str:
    """A small word-level tokenizer in Hugging Face format; returns a text it encodes."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "hello", "norm", "everywhere", "scion"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>").save_pretrained(directory)
    return "hello scion norm everywhere"


@pytest.fixture(scope="module")
def exports(checkpoints, tmp_path_factory) -> dict:
    """Exports (fp32 per stage, bf16, small shards), loaded once in a clean interpreter."""
    out = tmp_path_factory.mktemp("exports")
    text = save_tokenizer(checkpoints / "stage2" / "tokenizer")
    jobs = {f"fp32_stage{s}": (s, {"dtype": "float32"}) for s in STAGES}
    jobs["bf16_stage3"] = (3, {"dtype": "bfloat16"})
    jobs["sharded_stage2"] = (2, {"dtype": "float32", "max_shard_size": "100KB"})
    listing = []
    for name, (stage, kwargs) in jobs.items():
        export_checkpoint(checkpoints / f"stage{stage}", out / name, **kwargs)
        listing.append({"name": name, "dir": str(out / name), "ref": str(checkpoints / f"stage{stage}_logits.pt"),
                        "text": text if stage == 2 else None})
    clean = out / "clean"  # cwd outside the repository; no PYTHONPATH
    clean.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(clean / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", LOADER, json.dumps(listing), str(clean / "results.pt")],
                          cwd=clean, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"dir": out, "text": text, "results": torch.load(clean / "results.pt")}


@pytest.mark.parametrize("stage", STAGES)
def test_fp32_export_reproduces_the_live_model(exports, checkpoints, stage):
    result = exports["results"][f"fp32_stage{stage}"]
    live = torch.load(checkpoints / f"stage{stage}_logits.pt")["logits"]
    assert result["module"].startswith("transformers_modules")  # the code shipped in the folder
    assert result["dtype"] == "torch.float32"
    torch.testing.assert_close(result["logits"], live, atol=1e-5, rtol=0)


def test_bf16_zero1_export_holds_the_fp32_masters(checkpoints, tmp_path):
    """A bf16 model at ZeRO-1 with fp32 gradients (the trainer's default) runs on DeepSpeed's
    BF16_Optimizer, whose files zero_to_fp32 cannot read: the export still holds the fp32 masters
    bit for bit, not the bf16 weights."""
    from safetensors.torch import load_file

    ckpt = checkpoints / "stage1_bf16"
    assert list((ckpt / "ds").glob("bf16_zero_pp_rank_*_optim_states.pt"))
    export_checkpoint(ckpt, tmp_path / "out", dtype="float32")
    exported = load_file(tmp_path / "out" / "model.safetensors")
    masters = torch.load(checkpoints / "stage1_bf16_masters.pt")
    assert exported.keys() == masters.keys()
    for name, master in masters.items():
        assert torch.equal(exported[name], master), name
    assert any(not torch.equal(m, m.bfloat16().float()) for m in masters.values())  # not bf16 values


def test_folder_layout(exports):
    folder = exports["dir"] / "fp32_stage0"
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "configuration_norm_gpt.py", "modeling_norm_gpt.py", "model.safetensors",
            "generation_config.json", "README.md"} <= names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_norm_gpt.NormGPTConfig",
                                  "AutoModelForCausalLM": "modeling_norm_gpt.NormGPTForCausalLM"}
    assert config["dtype"] == "float32" and config["tie_word_embeddings"] is False
    readme = (folder / "README.md").read_text()
    assert "trust_remote_code=True" in readme and "2 optimizer steps" in readme


def test_bf16_export_loads(exports, checkpoints):
    result = exports["results"]["bf16_stage3"]
    assert result["dtype"] == "torch.bfloat16"
    assert json.loads((exports["dir"] / "bf16_stage3" / "config.json").read_text())["dtype"] == "bfloat16"
    live = torch.load(checkpoints / "stage3_logits.pt")["logits"]
    torch.testing.assert_close(result["logits"], live, atol=BF16_ATOL, rtol=0)


def test_sharded_export_with_tokenizer(exports, checkpoints):
    folder = exports["dir"] / "sharded_stage2"
    shards = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    result = exports["results"]["sharded_stage2"]
    torch.testing.assert_close(result["logits"], torch.load(checkpoints / "stage2_logits.pt")["logits"], atol=1e-5, rtol=0)
    assert (folder / "tokenizer.json").is_file() and "AutoTokenizer" in (folder / "README.md").read_text()
    assert result["tokens"] == [2, 5, 3, 4]  # hello scion norm everywhere


def copy_checkpoint(checkpoints: Path, stage: int, dest: Path) -> Path:
    shutil.copytree(checkpoints / f"stage{stage}", dest)
    return dest


def test_incomplete_checkpoints_are_refused(checkpoints, tmp_path):
    ckpt = copy_checkpoint(checkpoints, 2, tmp_path / "ckpt")
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(ExportError, match="COMPLETE"):
        export_checkpoint(ckpt, tmp_path / "out")
    (ckpt / "COMPLETE").touch()
    shutil.rmtree(ckpt / "model")
    with pytest.raises(ExportError, match="config.json"):
        export_checkpoint(ckpt, tmp_path / "out")
    shutil.rmtree(ckpt / "ds")
    with pytest.raises(ExportError, match="DeepSpeed directory .*ds"):
        export_checkpoint(ckpt, tmp_path / "out")
    with pytest.raises(ExportError, match="does not exist"):
        export_checkpoint(tmp_path / "nowhere", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("n_layer, problem", [(1, "unexpected \\['model.layers.1"), (3, "missing \\['model.layers.2")])
def test_config_mismatch_names_the_keys(checkpoints, tmp_path, n_layer, problem):
    ckpt = copy_checkpoint(checkpoints, 3, tmp_path / "ckpt")
    config = json.loads((ckpt / "model" / "config.json").read_text())
    (ckpt / "model" / "config.json").write_text(json.dumps({**config, "n_layer": n_layer}))
    with pytest.raises(ExportError, match=problem):
        export_checkpoint(ckpt, tmp_path / "out", dtype="float32")


def test_cli(checkpoints, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    out = tmp_path / "out"
    assert main(parser.parse_args([str(checkpoints / "stage0"), str(out), "--dtype", "float16"])) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "float16"
    assert "trust_remote_code=True" in capsys.readouterr().out
    assert main(parser.parse_args([str(checkpoints / "stage0"), str(out)])) == 1  # not empty
    assert "not empty" in capsys.readouterr().err
    assert main(parser.parse_args([str(checkpoints / "stage0"), str(out), "--force"])) == 0
    # Without --dtype: the run's precision; the worker's config.yaml does not set train.bf16.
    assert json.loads((out / "config.json").read_text())["dtype"] == "float32"
    assert main(parser.parse_args([str(tmp_path / "missing"), str(tmp_path / "out2")])) == 1


def test_clean_state_dict_strips_wrappers():
    t = torch.zeros(1)
    cleaned = clean_state_dict({"module._orig_mod.model.embed_tokens.weight": t, "module.lm_head.weight": t,
                                "model.layers.0._orig_mod.mlp.w1.weight": t})
    assert set(cleaned) == {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.w1.weight"}
    with pytest.raises(ExportError, match="two checkpoint keys"):
        clean_state_dict({"module.w": t, "w": t})


def test_tied_head_is_filled_from_the_embedding():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    weight = torch.randn(5, 3)
    assert set(_tie_aliases(Tied(), {"embed.weight": weight})) == {"embed.weight", "head.weight"}
    assert _tie_aliases(Tied(), {"head.weight": weight})["embed.weight"] is weight


# Runs in a fresh interpreter outside the repository: plain transformers, disco_ds not importable.
GENERATE = r"""
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
eos, calls = tokenizer.eos_token_id, []

def steer(module, args, logits):
    # The model would rather emit the last padded id every step, and emits end of text at the third.
    calls.append(1)
    logits = logits.clone()
    logits[..., -1] = 1e4
    if len(calls) == 3:
        logits[..., eos] = 1e5
    return logits

model.lm_head.register_forward_hook(steer)
prompt = tokenizer("hello scion", return_tensors="pt").input_ids
out = model.generate(prompt, max_new_tokens=10, do_sample=False)
print(json.dumps({"new": out[0, prompt.shape[1]:].tolist(), "eos": eos, "vocab": len(tokenizer),
                  "pad": tokenizer.pad_token_id, "model_vocab": model.config.vocab_size}))
"""


def test_export_generates_until_end_of_text_in_the_training_precision(checkpoints, tmp_path):
    """The default dtype is the run's (config.yaml's train.bf16); eos/pad come from the tokenizer
    into config.json and generation_config.json; generation with plain transformers never emits a
    padded id and stops at end of text."""
    ckpt = copy_checkpoint(checkpoints, 2, tmp_path / "ckpt")
    save_tokenizer(ckpt / "tokenizer")
    export_checkpoint(ckpt, tmp_path / "fp32")  # the worker's config.yaml does not say bf16
    assert json.loads((tmp_path / "fp32" / "config.json").read_text())["dtype"] == "float32"
    (ckpt / "config.yaml").write_text("train:\n  bf16: true\n")
    out = export_checkpoint(ckpt, tmp_path / "bf16")
    config = json.loads((out / "config.json").read_text())
    generation = json.loads((out / "generation_config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["eos_token_id"] == generation["eos_token_id"] == 1  # "<eos>" of save_tokenizer
    assert config["pad_token_id"] == generation["pad_token_id"] == 1  # no pad token: end of text pads
    assert generation["suppress_tokens"] == list(range(6, config["vocab_size"]))

    clean = tmp_path / "clean"
    clean.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(clean / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(out)], cwd=clean, env=env, capture_output=True,
                          text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["pad"] == result["eos"] == 1 and result["vocab"] == 6
    new = result["new"]
    assert len(new) == 3 and new[-1] == result["eos"], new  # stopped at end of text, not after 10 tokens
    assert all(i < result["vocab"] for i in new), new  # no padded id, though the model preferred one
