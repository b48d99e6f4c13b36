"""Token shards, the training stream, evaluation batches and ``disco_ds prepare``.

Expectations are computed independently of the code under test: shard headers are parsed with
``struct``, windows are enumerated by hand from shards whose tokens encode their own position,
and prepared shards are decoded and compared with the source text.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import struct
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from disco_ds.data import (
    MAGIC_UINT16,
    MAGIC_UINT32,
    ShardError,
    TokenStream,
    eval_batches,
    list_shards,
    read_shard,
    write_shard,
)
from disco_ds.data import prepare as prep

EOT = "<|endoftext|>"


# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def parse_shard(path: Path) -> tuple[tuple[int, int, int], np.ndarray]:
    """Independent reader: header fields and tokens, straight from the bytes."""
    raw = Path(path).read_bytes()
    header = struct.unpack("<256i", raw[:1024])
    assert all(v == 0 for v in header[3:])
    magic, version, count = header[:3]
    dtype = {20240520: "<u2", 20240801: "<u4"}[magic]
    body = np.frombuffer(raw[1024:], dtype=dtype)
    assert body.size == count
    return (magic, version, count), body


def raw_shard(path: Path, magic: int, version: int, count: int, body: bytes) -> Path:
    path.write_bytes(struct.pack("<256i", magic, version, count, *([0] * 253)) + body)
    return path


BASE = 10_000  # shard s holds the tokens s*BASE + position: a token names its shard and offset


def make_corpus(tmp_path: Path, lengths: list[int]) -> list[Path]:
    paths = []
    for s, n in enumerate(lengths):
        paths.append(write_shard(tmp_path / f"shard_{s:02d}.bin", s * BASE + np.arange(n)))
    return paths


def all_windows(lengths: list[int], seq_len: int) -> list[int]:
    """First token of every window (seq_len + 1 tokens, stride seq_len), by hand."""
    out = []
    for s, n in enumerate(lengths):
        start = 0
        while start + seq_len + 1 <= n:
            out.append(s * BASE + start)
            start += seq_len
    return out


def check_rows(x: torch.Tensor, y: torch.Tensor, seq_len: int) -> list[int]:
    """Each row is seq_len consecutive tokens of one shard and targets are inputs shifted by one."""
    assert x.dtype == torch.long and y.dtype == torch.long
    assert x.shape == y.shape and x.shape[1] == seq_len
    ramp = torch.arange(seq_len)
    for row_x, row_y in zip(x, y):
        assert torch.equal(row_x, row_x[0] + ramp)
        assert torch.equal(row_y, row_x + 1)
    return x[:, 0].tolist()


# ------------------------------------------------------------------------------------------
# shards
# ------------------------------------------------------------------------------------------


def test_shard_roundtrip_uint16(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 65536, size=1000)
    tokens[3] = 65535
    path = write_shard(tmp_path / "a.bin", tokens)
    (magic, version, count), body = parse_shard(path)
    assert (magic, version, count) == (20240520, 1, 1000)
    assert path.stat().st_size == 1024 + 2 * 1000
    np.testing.assert_array_equal(body, tokens)
    mm = read_shard(path)
    assert isinstance(mm, np.memmap) and mm.dtype == np.uint16 and mm.shape == (1000,)
    np.testing.assert_array_equal(mm, tokens)
    with pytest.raises(ValueError):
        mm[0] = 1  # read-only
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind


def test_shard_roundtrip_uint32(tmp_path):
    tokens = np.array([0, 65535, 65536, 100_000, 2**32 - 1, 7])
    path = write_shard(tmp_path / "b.bin", tokens)
    (magic, version, count), body = parse_shard(path)
    assert (magic, version, count) == (20240801, 7, 6)
    assert path.stat().st_size == 1024 + 4 * 6
    np.testing.assert_array_equal(body.astype(np.int64), tokens)
    mm = read_shard(path)
    assert mm.dtype == np.uint32
    np.testing.assert_array_equal(mm.astype(np.int64), tokens)


def test_shard_forced_dtype_and_bad_tokens(tmp_path):
    path = write_shard(tmp_path / "c.bin", [1, 2, 3], dtype="uint32")
    assert parse_shard(path)[0] == (MAGIC_UINT32, 7, 3)
    with pytest.raises(ValueError, match="does not fit"):
        write_shard(tmp_path / "d.bin", [70000], dtype="uint16")
    with pytest.raises(ValueError, match="range"):
        write_shard(tmp_path / "e.bin", [-1, 2])
    empty = write_shard(tmp_path / "f.bin", np.array([], dtype=np.int64))
    assert parse_shard(empty)[0] == (MAGIC_UINT16, 1, 0)
    assert read_shard(empty).size == 0


def _bad_missing(p):
    return p


def _bad_short_header(p):
    p.write_bytes(b"\0" * 100)
    return p


def _bad_truncated_body(p):
    return raw_shard(p, 20240520, 1, 10, b"\1\0" * 9)


def _bad_oversized_body(p):
    return raw_shard(p, 20240801, 7, 2, b"\0" * 12)


def _bad_magic(p):
    return raw_shard(p, 12345, 1, 2, b"\0" * 4)


def _bad_version(p):
    return raw_shard(p, 20240520, 7, 2, b"\0" * 4)


@pytest.mark.parametrize(
    "make, phrases",
    [
        (_bad_missing, ["not found"]),
        (_bad_short_header, ["truncated header", "expected at least 1024 bytes", "found 100"]),
        (_bad_truncated_body, ["truncated", f"expected {1024 + 20} bytes", f"found {1024 + 18}"]),
        (_bad_oversized_body, ["expected 1032 bytes", "found 1036"]),
        (_bad_magic, ["wrong magic", "expected 20240520", "20240801", "found 12345"]),
        (_bad_version, ["version", "expected 1", "found 7"]),
    ],
)
def test_bad_shards(tmp_path, make, phrases):
    path = make(tmp_path / "broken_shard_x.bin")
    with pytest.raises(ShardError) as info:
        read_shard(path)
    msg = str(info.value)
    assert "broken_shard_x.bin" in msg
    for phrase in phrases:
        assert phrase in msg, (phrase, msg)
    assert isinstance(info.value, ValueError)
    with pytest.raises((ShardError, FileNotFoundError), match="broken_shard_x.bin"):
        TokenStream([path], 4, 1)  # the stream validates every shard up front


def test_list_shards(tmp_path):
    for name in ["b.bin", "a.bin", "c.txt"]:
        write_shard(tmp_path / name, [1, 2])
    assert [p.name for p in list_shards(tmp_path)] == ["a.bin", "b.bin"]
    assert [p.name for p in list_shards(str(tmp_path / "*.bin"))] == ["a.bin", "b.bin"]
    assert [p.name for p in list_shards([tmp_path / "b.bin", tmp_path / "a.bin"])] == ["b.bin", "a.bin"]
    assert [p.name for p in list_shards(tmp_path, pattern="a*")] == ["a.bin"]
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        list_shards(str(tmp_path / "nothing_here_*.bin"))
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        list_shards(tmp_path / "nothing_here")


# ------------------------------------------------------------------------------------------
# TokenStream
# ------------------------------------------------------------------------------------------

LENGTHS = [101, 57, 8, 240, 33]  # the 8-token shard is too short for seq_len 8 and is skipped
SEQ = 8


@pytest.fixture
def corpus(tmp_path):
    return make_corpus(tmp_path, LENGTHS)


def stream(files, micro_batch=3, rank=0, world=1, seed=0, seq_len=SEQ):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return TokenStream(files, seq_len, micro_batch, rank, world, seed=seed)


def flat_starts(s: TokenStream, steps: int) -> list[int]:
    out = []
    for _ in range(steps):
        out += check_rows(*s.next_batch(), s.seq_len)
    return out


def test_stream_covers_each_window_once_per_epoch(corpus):
    expected = all_windows(LENGTHS, SEQ)
    assert 2 * BASE not in expected and len(expected) == 12 + 7 + 0 + 29 + 4
    with pytest.warns(UserWarning, match="shard_02.bin"):
        s = TokenStream(corpus, SEQ, 1, 0, 1, seed=3)
    assert s.windows_per_epoch == len(expected)
    assert s.tokens_per_epoch == len(expected) * SEQ
    n = len(expected)
    first = flat_starts(s, n)
    assert s.epoch == 1
    second = flat_starts(s, n)
    assert sorted(first) == sorted(expected) and sorted(second) == sorted(expected)
    assert first != second  # re-drawn each epoch
    assert first != sorted(first)  # shuffled


def test_stream_epoch_boundary_inside_a_micro_batch(corpus):
    # 52 windows per epoch; micro-batch 5 (52 % 5 != 0): batches straddle epochs, no window lost.
    expected = sorted(all_windows(LENGTHS, SEQ))
    s = stream(corpus, micro_batch=5, seed=1)
    starts = flat_starts(s, 21)  # 105 windows: two full epochs and one window more
    assert sorted(starts[:52]) == expected and sorted(starts[52:104]) == expected
    assert s.epoch == 2


def test_stream_seed_determinism(corpus):
    a = flat_starts(stream(corpus, seed=7), 10)
    b = flat_starts(stream(corpus, seed=7), 10)
    c = flat_starts(stream(corpus, seed=8), 10)
    assert a == b
    assert a != c


def test_stream_seed_drives_shard_order_and_window_order(tmp_path):
    # one window per shard: the order is the shard permutation alone
    few = make_corpus(tmp_path / "few", [SEQ + 1] * 7)
    orders = [tuple(flat_starts(stream(few, 7, seed=seed), 2)) for seed in range(3)]
    assert len(set(orders)) == 3
    for o in orders:
        assert sorted(o[:7]) == sorted(o[7:]) == [s * BASE for s in range(7)] and o[:7] != o[7:]
    # one shard: the order is the window permutation alone
    one = make_corpus(tmp_path / "one", [20 * SEQ + 1])
    orders = [tuple(flat_starts(stream(one, 20, seed=seed), 2)) for seed in range(3)]
    assert len(set(orders)) == 3
    for o in orders:
        assert sorted(o[:20]) == sorted(o[20:]) == list(range(0, 20 * SEQ, SEQ)) and o[:20] != o[20:]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_stream_ranks_disjoint_and_union_is_single_process_stream(corpus, world):
    micro, steps = 2, 20  # 20 steps * world * 2 windows: more than an epoch (52) for world >= 2
    ranks = [stream(corpus, micro, r, world, seed=5) for r in range(world)]
    single = stream(corpus, micro * world, 0, 1, seed=5)
    seen = []
    for _ in range(steps):
        ref = check_rows(*single.next_batch(), SEQ)
        per_rank = [check_rows(*s.next_batch(), SEQ) for s in ranks]
        for r in range(world):
            assert per_rank[r] == ref[r::world]  # rank r gets global windows i = r (mod world)
        union = sorted(sum(per_rank, []))
        assert union == sorted(ref)
        seen.append(union)
    # disjoint: over the steps of the first epoch no window is served twice, across all ranks
    full = min(steps, 52 // (world * micro))
    flat = sum(seen[:full], [])
    assert len(set(flat)) == len(flat) == full * world * micro
    assert {s.epoch for s in ranks} == {single.epoch}


def test_stream_exact_resume(corpus):
    # world 2, micro-batch 3: 6 global windows per step, 52 per epoch
    for k, m, epochs in [(3, 5, (0, 0)), (8, 4, (0, 1)), (16, 3, (1, 2))]:
        a = stream(corpus, micro_batch=3, rank=1, world=2, seed=11)
        for _ in range(k):
            a.next_batch()
        state = json.loads(json.dumps(a.state_dict()))  # plain, serialisable values
        b = stream(corpus, micro_batch=3, rank=1, world=2, seed=11)
        b.load_state_dict(state)
        assert b.epoch == a.epoch == epochs[0]
        for _ in range(m):
            xa, ya = a.next_batch()
            xb, yb = b.next_batch()
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert b.epoch == a.epoch == epochs[1]


def test_stream_resume_other_world_size(corpus):
    # two ranks with micro-batch 2 stop after 4 steps; one process with micro-batch 4 continues
    ranks = [stream(corpus, 2, r, 2, seed=2) for r in range(2)]
    for _ in range(4):
        for s in ranks:
            s.next_batch()
    assert ranks[0].state_dict()["position"] == ranks[1].state_dict()["position"] == 16
    single = stream(corpus, 4, 0, 1, seed=2)
    single.load_state_dict(ranks[0].state_dict())
    ref = stream(corpus, 4, 0, 1, seed=2)
    for _ in range(4):
        ref.next_batch()
    assert torch.equal(single.next_batch()[0], ref.next_batch()[0])


def test_stream_state_mismatch_and_errors(corpus, tmp_path):
    s = stream(corpus, seed=1)
    with pytest.raises(ValueError, match="seed"):
        stream(corpus, seed=2).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="seq_len"):
        stream(corpus, seq_len=4, seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="different shards"):
        stream(corpus[:2], seed=1).load_state_dict(s.state_dict())
    with pytest.raises(ValueError, match="rank"):
        TokenStream(corpus, SEQ, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="no training window"):
        stream(corpus, seq_len=1000)


def test_stream_reads_lazily(tmp_path):
    big = write_shard(tmp_path / "big.bin", np.arange(3_000_000) % 65_000)
    s = TokenStream(big, 1024, 4)
    assert not isinstance(s._w._open.get(0), np.ndarray)  # nothing mapped before the first batch
    x, y = s.next_batch()
    assert isinstance(s._w._open[0], np.memmap)
    assert torch.equal(y[:, :-1], x[:, 1:])


# ------------------------------------------------------------------------------------------
# eval_batches
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_batches_sequential_and_equal_per_rank(corpus, world):
    # Contract: the windows used are all of them in file order, or, when max_tokens (or whole
    # micro-steps) allow only m of the N, the m at evenly spaced places floor(j*N/m), so a cap
    # still reaches the last shard (it used to take the first m windows: the first shard only).
    expected = all_windows(LENGTHS, SEQ)  # file order
    n = len(expected)
    micro = 2
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for max_tokens, n_windows in [(None, n), (21 * SEQ + 3, 21)]:
            per_rank = [
                [check_rows(x, y, SEQ) for x, y in eval_batches(corpus, SEQ, micro, r, world, max_tokens)]
                for r in range(world)
            ]
            steps = n_windows // (world * micro)
            used = steps * world * micro
            chosen = [expected[j * n // used] for j in range(used)]
            assert len(set(chosen)) == used
            assert [len(b) for b in per_rank] == [steps] * world
            for k in range(steps):
                block = chosen[k * world * micro : (k + 1) * world * micro]
                for r in range(world):
                    assert per_rank[r][k] == block[r::world]
            if max_tokens is not None:  # the cap still reaches the last shard
                assert {w // BASE for w in chosen} == {0, 1, 3, 4}


def test_eval_batches_too_small(corpus):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match="one batch on every rank"):
            eval_batches(corpus[:1], SEQ, 4, 0, 4)  # 12 windows < 16
        with pytest.raises(ValueError, match="max_tokens"):
            eval_batches(corpus, SEQ, 2, 0, 2, max_tokens=3 * SEQ)


# ------------------------------------------------------------------------------------------
# prepare
# ------------------------------------------------------------------------------------------

NON_ASCII = "héllo wörld — 日本語 🙂 ∑x² «ok»\n\ttabs  and\r\nCRLF"


@pytest.fixture
def text_corpus(tmp_path):
    """A directory of .txt files plus a .jsonl file; returns (inputs, documents in input order)."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / ".hidden").mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "data", "token", "shard", "stream", "rank", "epoch", "ünïcode", "λ", "def", "return"]

    def para(n):
        return " ".join(rng.choice(words, size=n)) + ".\n"

    files = {
        "a.txt": "First document.\n" + para(60),
        "sub/b.txt": NON_ASCII + "\n" + para(40),
        "sub/c.txt": para(80),
        "z.txt": "",  # empty: no document
    }
    for name, text in files.items():
        (root / name).write_text(text, encoding="utf-8")
    (root / "skip.md").write_text("not matched by *.txt")
    (root / ".hidden" / "h.txt").write_text("hidden: skipped")
    rows = [para(30), "short", NON_ASCII, para(50)]
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(rows)) + "\n")
    docs = [files["a.txt"], files["sub/b.txt"], files["sub/c.txt"], *rows]
    return [root, jsonl], docs


def read_split(out: Path, split: str) -> np.ndarray:
    parts = [parse_shard(p)[1] for p in sorted(out.glob(f"{split}_*.bin"))]
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def split_docs(tokens: np.ndarray, eot: int) -> list[np.ndarray]:
    assert tokens.size == 0 or tokens[-1] == eot  # every document ends with end-of-text
    cuts = np.flatnonzero(tokens == eot)
    return [tokens[a + 1 : b] for a, b in zip(np.r_[-1, cuts[:-1]], cuts)]


def test_prepare_byte_end_to_end(tmp_path, text_corpus):
    inputs, docs = text_corpus
    out = tmp_path / "out"
    meta = prep.prepare(inputs, out, "byte", val_fraction=0.3, seed=4, shard_tokens=300, progress=False)
    train, val = read_split(out, "train"), read_split(out, "val")
    # byte ids: documents are their UTF-8 bytes, in a seeded permutation of all documents (not the
    # input order, which shuffle=False keeps)
    train_docs = [bytes(d.astype(np.uint8)).decode("utf-8") for d in split_docs(train, 256)]
    val_docs = [bytes(d.astype(np.uint8)).decode("utf-8") for d in split_docs(val, 256)]
    assert sorted(train_docs + val_docs) == sorted(docs)
    assert [d for d in docs if d in train_docs] != train_docs
    # validation: round(0.3 * n) documents of each input, at least one (3 files, 4 jsonl rows)
    assert meta["source_documents"] == {"train": [2, 3], "val": [1, 1]}
    per_input = [docs[:3], docs[3:]]  # the directory's files, the jsonl's rows
    for split, chosen in (("train", train_docs), ("val", val_docs)):
        assert meta["source_tokens"][split] == [sum(len(d.encode()) + 1 for d in chosen if d in group)
                                                for group in per_input]
    # shard sizes: all but the last of a split hold exactly shard_tokens
    sizes = [parse_shard(p)[0] for p in sorted(out.glob("train_*.bin"))]
    assert all(h == (20240520, 1, 300) for h in sizes[:-1]) and 0 < sizes[-1][2] <= 300
    assert len(sizes) == -(-train.size // 300) >= 2
    assert meta.pop("seconds") >= 0 and meta == json.loads((out / "meta.json").read_text())
    assert meta["tokenizer"]["kind"] == "byte" and meta["vocab_size"] == 257 and meta["eot_id"] == 256
    assert meta["dtype"] == "uint16" and meta["seed"] == 4
    assert meta["tokens"] == {"train": train.size, "val": val.size}
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(len(d.encode()) + 1 for d in docs)
    assert meta["documents"] == {"train": len(train_docs), "val": len(val_docs)}
    assert meta["sources"] == [str(p) for p in inputs]
    assert meta["shards"]["train"] == [f"train_{i:06d}.bin" for i in range(len(sizes))]
    # the largest id of every shard, so the trainer checks the vocabulary without reading shards
    assert meta["max_token_id"] == {p.name: int(parse_shard(p)[1].max()) for p in sorted(out.glob("*.bin"))}
    # same seed, same split, byte for byte; the shards load as a training stream
    out2 = tmp_path / "out2"
    prep.prepare(inputs, out2, "byte", val_fraction=0.3, seed=4, shard_tokens=300, progress=False)
    for p in out.glob("*.bin"):
        assert p.read_bytes() == (out2 / p.name).read_bytes()
    x, y = TokenStream(out / "train_*.bin", 16, 2).next_batch()
    assert x.shape == (2, 16) and int(x.max()) <= 256
    # shuffle=False: the input order inside each split; the validation documents are each input's first
    kept = prep.prepare(inputs, tmp_path / "kept", "byte", val_fraction=0.3, shuffle=False, progress=False)
    kept_train = [bytes(d.astype(np.uint8)).decode() for d in split_docs(read_split(tmp_path / "kept", "train"), 256)]
    kept_val = [bytes(d.astype(np.uint8)).decode() for d in split_docs(read_split(tmp_path / "kept", "val"), 256)]
    assert kept_val == [docs[0], docs[3]] and kept_train == docs[1:3] + docs[4:]
    assert kept["shuffle"] is False and meta["shuffle"] is True
    # a rerun into the same directory replaces every shard (fewer shards now: no stale files)
    prep.prepare(inputs, out, "byte", val_fraction=0.3, seed=4, shard_tokens=10_000, progress=False)
    assert sorted(p.name for p in out.glob("*.bin")) == ["train_000000.bin", "val_000000.bin"]


def test_byte_tokenizer_hf_roundtrip(tmp_path):
    from transformers import AutoTokenizer

    tok = prep.ByteTokenizer()
    assert tok.encode(NON_ASCII) == list(NON_ASCII.encode("utf-8"))
    assert tok.decode(tok.encode(NON_ASCII) + [256] + tok.encode("x")) == NON_ASCII + EOT + "x"
    tok.save_hf(tmp_path / "tk")
    hf = AutoTokenizer.from_pretrained(tmp_path / "tk")
    assert len(hf) == 257 and hf.convert_tokens_to_ids(EOT) == 256 and hf.eos_token == EOT
    every_byte_char = "".join(chr(i) for i in range(1, 256)) + "\x00"
    for text in [NON_ASCII, every_byte_char, " leading space", "a\n\n  b"]:
        ids = hf.encode(text)
        assert ids == list(text.encode("utf-8")), text
        assert hf.decode(ids) == text
    assert hf.decode(list(b"ab") + [256] + list(b"c")) == "ab" + EOT + "c"


def test_prepare_bpe_end_to_end(tmp_path, text_corpus):
    from transformers import AutoTokenizer

    inputs, docs = text_corpus
    out = tmp_path / "out"
    meta = prep.prepare(inputs, out, "bpe:320", val_fraction=0.25, seed=0, shard_tokens=10_000, progress=False)
    hf = AutoTokenizer.from_pretrained(out / "tokenizer")
    eot = hf.convert_tokens_to_ids(EOT)
    assert meta["eot_id"] == eot and meta["tokenizer"]["kind"] == "bpe"
    assert 257 < meta["vocab_size"] <= 320 and meta["vocab_size"] == len(hf)
    train, val = read_split(out, "train"), read_split(out, "val")
    segments = split_docs(train, eot) + split_docs(val, eot)
    texts = [hf.decode(seg.tolist()) for seg in segments]
    assert sorted(texts) == sorted(docs)
    for seg, text in zip(segments, texts):
        assert hf.encode(text) == seg.tolist()  # transformers encodes as prepare did
    assert sum(s.size for s in segments) < sum(len(d.encode()) for d in docs)  # merges were learnt
    assert meta["tokens"] == {"train": train.size, "val": val.size}
    # load_tokenizer rebuilds the same tokenizer; a tokenizer.json path tokenizes the same way
    tok = prep.load_tokenizer(out)
    assert tok.eot_id == eot and tok.vocab_size == meta["vocab_size"]
    assert tok.encode(NON_ASCII) == hf.encode(NON_ASCII) and tok.decode(hf.encode(NON_ASCII)) == NON_ASCII
    out2 = tmp_path / "out2"
    meta2 = prep.prepare(inputs, out2, str(out / "tokenizer" / "tokenizer.json"), val_fraction=0.25,
                         progress=False)
    assert meta2["tokenizer"]["kind"] == "json" and meta2["eot_id"] == eot
    assert np.array_equal(read_split(out2, "train"), train) and np.array_equal(read_split(out2, "val"), val)
    assert prep.load_tokenizer(out).encode("the data") == prep.load_tokenizer(out2).encode("the data")


def test_prepare_split_options(tmp_path, text_corpus):
    inputs, docs = text_corpus
    sizes = [len(d.encode()) + 1 for d in docs]
    # a tiny fraction still gives one validation document from every input (the directory, the jsonl)
    meta = prep.prepare(inputs, tmp_path / "a", "byte", val_fraction=1e-9, progress=False)
    assert meta["source_documents"] == {"train": [2, 3], "val": [1, 1]}
    assert meta["documents"] == {"train": len(docs) - 2, "val": 2}
    # --val-tokens: each input's first documents (in the shuffled order) until they hold its share
    # of the tokens, ceil(n * tokens of the input / all tokens); the last one taken crossed it
    n = sizes[0] + 1
    meta = prep.prepare(inputs, tmp_path / "b", "byte", val_tokens=n, seed=1, progress=False)
    val_docs = [bytes(d.astype(np.uint8)).decode() for d in split_docs(read_split(tmp_path / "b", "val"), 256)]
    size = {d: len(d.encode()) + 1 for d in docs}
    for i, group in enumerate([docs[:3], docs[3:]]):
        taken = [d for d in val_docs if d in group]
        share = -(-n * sum(size[d] for d in group) // sum(sizes))
        assert taken and meta["source_tokens"]["val"][i] == sum(size[d] for d in taken)
        assert sum(size[d] for d in taken) >= share > sum(size[d] for d in taken[:-1])
    assert meta["tokens"]["val"] >= n
    # a single-document input gives no validation document (it would leave training without it)
    solo = tmp_path / "solo.txt"
    solo.write_text(docs[0])
    meta = prep.prepare([solo, inputs[1]], tmp_path / "solo", "byte", val_fraction=0.3, progress=False)
    assert meta["source_documents"] == {"train": [1, 3], "val": [0, 1]}
    # no validation split at all
    meta = prep.prepare(inputs, tmp_path / "c", "byte", val_fraction=0.0, progress=False)
    assert meta["tokens"]["val"] == 0 and not list((tmp_path / "c").glob("val_*"))
    # --max-bytes caps the input text
    meta = prep.prepare(inputs, tmp_path / "d", "byte", val_fraction=0.0, max_bytes="100", progress=False)
    assert meta["bytes"] == 100
    assert read_split(tmp_path / "d", "train").tolist() == list(docs[0].encode()[:100]) + [256]
    # different seeds choose different validation documents
    picks = {
        tuple(prep.prepare(inputs, tmp_path / f"s{seed}", "byte", val_fraction=0.5, seed=seed,
                           progress=False)["tokens"].values())
        for seed in range(6)
    }
    assert len(picks) > 1


def test_prepare_input_errors(tmp_path, text_corpus):
    inputs, _ = text_corpus
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2.*'text'"):
        prep.prepare([bad], tmp_path / "o1", progress=False)
    with pytest.raises(FileNotFoundError, match="no file matches"):
        prep.prepare([inputs[0]], tmp_path / "o2", glob="*.rst", progress=False)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prep.prepare(inputs, tmp_path / "o3", "nonsense-tokenizer", progress=False)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    write_shard(foreign / "train_000000.bin", [1, 2, 3])
    with pytest.raises(FileExistsError, match="--overwrite"):
        prep.prepare(inputs, foreign, progress=False)
    if importlib.util.find_spec("pyarrow") is None:
        pq = tmp_path / "x.parquet"
        pq.write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pyarrow"):
            prep.prepare([pq], tmp_path / "o4", progress=False)
    if importlib.util.find_spec("tiktoken") is None:
        with pytest.raises(ImportError, match="tiktoken"):
            prep.make_tokenizer("gpt2")


def test_cli_hooks(tmp_path, text_corpus, capsys):
    inputs, docs = text_corpus
    parser = argparse.ArgumentParser()
    prep.add_arguments(parser)
    out = tmp_path / "cli"
    args = parser.parse_args(["--input", *map(str, inputs), "--out", str(out), "--tokenizer", "byte",
                              "--shard-tokens", "1k", "--val-fraction", "0.2"])
    assert prep.main(args) == 0
    captured = capsys.readouterr()
    assert "prepare:" in captured.out and str(out) in captured.out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["shard_tokens"] == 1000
    assert sum(meta["tokens"].values()) == sum(len(d.encode()) + 1 for d in docs)
    args = parser.parse_args(["--input", str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert prep.main(args) == 1
    assert "missing" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("pyarrow") is None, reason="pyarrow not installed")
def test_prepare_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = ["one document", NON_ASCII, "three"]
    pq.write_table(pa.table({"body": texts, "n": [1, 2, 3]}), tmp_path / "d.parquet")
    meta = prep.prepare([tmp_path / "d.parquet"], tmp_path / "o", text_field="body", val_fraction=0.0,
                        progress=False)
    got = [bytes(d.astype(np.uint8)).decode() for d in split_docs(read_split(tmp_path / "o", "train"), 256)]
    assert got == texts and meta["documents"]["train"] == 3


@pytest.mark.skipif(importlib.util.find_spec("tiktoken") is None, reason="tiktoken not installed")
def test_gpt2_tokenizer_from_local_file(tmp_path):
    import base64

    from transformers import AutoTokenizer

    # a miniature encoding file in tiktoken's format: 256 single bytes, then a few merges
    merges = [b"th", b"the", b" the", b"in", b"ing", b" t", b"er"]
    tokens = [bytes([b]) for b in range(256)] + merges
    vocab_file = tmp_path / "mini.tiktoken"
    vocab_file.write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    tok = prep.make_tokenizer(f"gpt2:{vocab_file}")
    assert tok.eot_id == len(tokens) and tok.vocab_size == len(tokens) + 1
    ids = tok.encode("the thing in the bathing")
    assert tokens.index(b" the") in ids and tokens.index(b"ing") in ids
    assert tok.decode(ids) == "the thing in the bathing"
    tok.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["the thing in the bathing", NON_ASCII]:
        assert hf.encode(text) == tok.encode(text)
    assert hf.convert_tokens_to_ids(EOT) == tok.eot_id
    with pytest.raises(FileNotFoundError, match="gpt2.tiktoken"):
        prep.make_tokenizer(f"gpt2:{tmp_path / 'absent.tiktoken'}")


def test_document_positions_restart_after_end_of_text_and_mask_like_separate_documents():
    from disco_ds.data import document_positions
    from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

    eot = 7
    inputs = torch.tensor([[3, 4, eot, 5, 6, 8, eot, eot, 9], [eot, 1, 2, 3, 4, 5, 6, 1, 2]])
    assert document_positions(inputs, eot).tolist() == [
        [0, 1, 2, 0, 1, 2, 3, 0, 0],
        [0, 0, 1, 2, 3, 4, 5, 6, 7],
    ]
    # The model given these positions treats every document as if it were run alone.
    torch.manual_seed(0)
    model = NormGPTForCausalLM(NormGPTConfig.from_preset("tiny", vocab_size=16)).eval()
    row = inputs[:1]
    with torch.no_grad():
        packed = model(row, position_ids=document_positions(row, eot), use_cache=False).logits
        alone = torch.cat([model(row[:, a:b]).logits for a, b in ((0, 3), (3, 7), (7, 8), (8, 9))], dim=1)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=0)


def test_trainer_loss_with_document_mask_is_the_loss_of_documents_run_alone():
    import torch.nn.functional as F

    from disco_ds.trainer.loop import _loss
    from disco_ds.models.norm_gpt import NormGPTConfig, NormGPTForCausalLM

    eot = 7
    torch.manual_seed(0)
    model = NormGPTForCausalLM(NormGPTConfig.from_preset("tiny", vocab_size=16)).eval()
    window = torch.tensor([[3, 4, eot, 5, 6, 8, eot, 9, 2, 1]])
    inputs, targets = window[:, :-1], window[:, 1:]
    with torch.no_grad():
        masked = _loss(model, inputs, targets, eot)
        plain = _loss(model, inputs, targets, None)
        alone = torch.cat([model(inputs[:, a:b]).logits for a, b in ((0, 3), (3, 7), (7, 9))], dim=1)
    torch.testing.assert_close(masked, F.cross_entropy(alone[0], targets[0]), atol=1e-6, rtol=0)
    assert abs(masked - plain) > 1e-4  # the mask changes what the later documents see
