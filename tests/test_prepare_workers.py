"""``disco_ds prepare`` at corpus scale: ``--workers`` processes give the shards and ``meta.json``
of one process byte for byte, a text file is read and tokenized in bounded pieces with the tokens
of the whole file, and errors name the flag or the file whatever the number of workers.

The pool runs only for an input of more than one batch, so the tests pass a small ``batch_bytes``
(and a small ``read_bytes``, so that text files come in many pieces); each pool start costs a few
seconds (every spawned worker imports the package), so only the tests that need one start one.
"""

from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from disco_ds.data import prepare as prep
from disco_ds.data.prepare.readers import Source, iter_pieces

WORDS = ["the", "data", "token", "shard", "stream", "rank", "epoch", "ünïcode", "λ", "def", "return",
         "don't", "it's", "42", "3.14", "(x)", "日本語", "🙂", "—", "x²"]
SPACES = [" ", " ", " ", " ", "  ", "\n", "\n\n", "\r\n", "\t", "    ", " \n", "\u00a0", "\u2003"]
# A training split of several shards, a validation split of more than one document.
SMALL = dict(shard_tokens=2_000, val_fraction=0.3, seed=3, batch_bytes=4_096, read_bytes=1_000)


def words(rng: np.random.Generator, n: int) -> str:
    """``n`` words with varied whitespace between them: runs, newlines, CRLF, tabs, no-break and
    em spaces, the cases where a careless cut would change what a BPE sees."""
    return "".join(rng.choice(WORDS) + rng.choice(SPACES) for _ in range(n))


@pytest.fixture
def corpus(tmp_path: Path) -> list[Path]:
    """Several text files (two larger than ``read_bytes``, one with invalid UTF-8) and a .jsonl."""
    rng = np.random.default_rng(0)
    root = tmp_path / "corpus"
    root.mkdir()
    for i in range(8):
        (root / f"doc{i}.txt").write_text(words(rng, 40 + 60 * i), encoding="utf-8")
    (root / "big.txt").write_bytes(words(rng, 3_000).encode() + b"\xff\xfe broken \xe6\x97" + words(rng, 50).encode())
    rows = [words(rng, int(n)) for n in rng.integers(5, 80, size=30)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in rows))
    return [root, jsonl]


def output_files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def read_split(out: Path, split: str) -> np.ndarray:
    """The tokens of a split, straight from the shard bytes."""
    parts = []
    for p in sorted(out.glob(f"{split}_*.bin")):
        raw = p.read_bytes()
        magic, _, count = struct.unpack("<3i", raw[:12])
        parts.append(np.frombuffer(raw[1024:], dtype={20240520: "<u2", 20240801: "<u4"}[magic])[:count])
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_two_workers_write_the_files_of_one(tmp_path, corpus, tokenizer, capsys):
    one = prep.prepare(corpus, tmp_path / "one", tokenizer, workers=1, progress=False, **SMALL)
    two = prep.prepare(corpus, tmp_path / "two", tokenizer, workers=2, progress=True, **SMALL)
    captured = capsys.readouterr()
    # the pool ran, and the progress display and the summary line give the throughput
    assert "with 2 worker(s)" in captured.err and "MB/s" in captured.err and "tokens/s" in captured.err
    assert "with 2 worker(s)" in captured.out and "MB/s" in captured.out and "tokens/s" in captured.out
    # shards, meta.json (it holds no timing) and tokenizer files: byte for byte
    files = output_files(tmp_path / "one")
    assert files == output_files(tmp_path / "two")
    assert "seconds" not in json.loads(files["meta.json"])
    one.pop("seconds"), two.pop("seconds")
    assert one == two
    assert len(one["shards"]["train"]) >= 3 and one["documents"]["val"] >= 2


@pytest.mark.parametrize("tokenizer", ["byte", "bpe:400"])
def test_text_file_in_pieces_is_tokenized_as_a_whole(tmp_path, corpus, tokenizer):
    big = corpus[0] / "big.txt"
    text = big.read_bytes().decode("utf-8", errors="replace")
    # the file comes in many bounded pieces that join to the whole decoded text
    pieces = list(iter_pieces(Source(big, "text", big.stat().st_size), read_bytes=257))
    assert len(pieces) > 20 and "".join(t for _, t, _ in pieces) == text
    assert [last for _, _, last in pieces] == [False] * (len(pieces) - 1) + [True]
    assert max(len(t.encode()) for _, t, _ in pieces) < 2 * 257
    whole = dict(val_fraction=0.0, workers=1, progress=False)
    prep.prepare([big], tmp_path / "ref", tokenizer, read_bytes=1 << 30, **whole)
    prep.prepare([big], tmp_path / "cut", tokenizer, read_bytes=257, **whole)
    assert output_files(tmp_path / "ref") == output_files(tmp_path / "cut")  # bpe: same training too
    tok = prep.load_tokenizer(tmp_path / "ref")
    assert read_split(tmp_path / "cut", "train").tolist() == tok.encode(text) + [tok.eot_id]
    # --max-bytes ends the document inside a piece: still the tokens of the cut text as a whole
    capped = dict(whole, max_bytes=len(text.encode()) // 2 + 1)
    prep.prepare([big], tmp_path / "ref_cap", tokenizer, read_bytes=1 << 30, **capped)
    prep.prepare([big], tmp_path / "cut_cap", tokenizer, read_bytes=257, **capped)
    assert output_files(tmp_path / "ref_cap") == output_files(tmp_path / "cut_cap")


def test_tokens_wait_in_a_temporary_file_in_the_output_directory(tmp_path, corpus, monkeypatch):
    # The documents are shuffled only once all are tokenized: until then their tokens go to one
    # anonymous temporary file in --out (not memory), which is gone afterwards.
    import disco_ds.data.prepare.writer as writer

    spools = []
    temporary_file = writer.tempfile.TemporaryFile
    monkeypatch.setattr(writer.tempfile, "TemporaryFile", lambda **kw: spools.append(kw) or temporary_file(**kw))
    meta = prep.prepare(corpus, tmp_path / "out", "byte", val_fraction=0.1, workers=1, progress=False,
                        read_bytes=300, shard_tokens=5_000)
    assert spools == [{"dir": tmp_path / "out"}]
    names = sorted(output_files(tmp_path / "out"))
    assert names == sorted(["meta.json", *(f"tokenizer/{n}" for n in ("special_tokens_map.json", "tokenizer.json",
                            "tokenizer_config.json")), *meta["shards"]["train"], *meta["shards"]["val"]])
    # every input in both splits: the directory (9 files) and the jsonl (30 rows), 10% of each
    assert meta["source_documents"] == {"train": [8, 27], "val": [1, 3]}


@pytest.mark.parametrize("bad", [0, -2])
def test_bad_workers_value_names_the_flag(tmp_path, corpus, bad, capsys):
    with pytest.raises(ValueError, match="--workers"):
        prep.prepare(corpus, tmp_path / "o", workers=bad, progress=False)
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    args = parser.parse_args(["--input", str(corpus[1]), "--out", str(tmp_path / "cli"), "--workers", str(bad)])
    assert prep.main(args) == 1
    assert "--workers" in capsys.readouterr().err
    assert not (tmp_path / "cli").exists()  # refused before any work


@pytest.mark.timeout(120)
def test_invalid_jsonl_line_mid_corpus_is_the_same_error_with_workers(tmp_path, corpus):
    bad = tmp_path / "later.jsonl"
    lines = [json.dumps({"text": words(np.random.default_rng(i), 60)}) for i in range(40)]
    lines[25] = '{"text": "unterminated'
    bad.write_text("\n".join(lines) + "\n")
    inputs = [*corpus, bad]
    with pytest.raises(ValueError, match=r"later\.jsonl:26: invalid JSON") as one:
        prep.prepare(inputs, tmp_path / "one", "byte", workers=1, progress=False, **SMALL)
    with pytest.raises(ValueError) as two:
        prep.prepare(inputs, tmp_path / "two", "byte", workers=2, progress=False, **SMALL)
    assert str(two.value) == str(one.value)
    # The CLI, its default batches of 2 MiB: 5 MB of text before the bad line start the pool. The
    # same message, exit code 1, no meta.json, and no hang.
    filler = tmp_path / "filler.txt"
    filler.write_text(words(np.random.default_rng(7), 2_000) * 400)
    assert filler.stat().st_size > 5_000_000
    cmd = [sys.executable, "-m", "disco_ds.data.prepare", "--input", str(filler), *map(str, inputs),
           "--out", str(tmp_path / "cli"), "--workers", "2", "--quiet"]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert run.returncode == 1
    assert run.stderr.strip() == f"disco_ds prepare: error: {one.value}"
    assert not (tmp_path / "cli" / "meta.json").exists()


@pytest.mark.timeout(120)
def test_tokenizer_failure_in_a_worker_names_the_file(tmp_path, corpus):
    # A WordPiece whose unknown token is missing from its vocabulary fails on an unknown word.
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"[SEP]": 0, **{w: i + 1 for i, w in enumerate(["the", "data", "token", "shard", "stream"])}}
    tk = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[MISSING]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.save(str(tmp_path / "wordpiece.json"))
    known = tmp_path / "known"
    known.mkdir()
    for i in range(12):
        (known / f"k{i:02d}.txt").write_text("the data token shard stream " * 300)
    (known / "k05.txt").write_text("the data unheard-of shard")
    opts = dict(workers=1, progress=False, val_fraction=0.0, batch_bytes=4_096)
    with pytest.raises(ValueError, match=r"k05\.txt: the .*wordpiece\.json tokenizer failed: .*\[UNK\]") as one:
        prep.prepare([known], tmp_path / "one", str(tmp_path / "wordpiece.json"), **opts)
    with pytest.raises(ValueError) as two:
        prep.prepare([known], tmp_path / "two", str(tmp_path / "wordpiece.json"), **{**opts, "workers": 2})
    assert str(two.value) == str(one.value)
