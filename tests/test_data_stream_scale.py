"""The data stream at scale: a corpus of two sources, prepared by ``disco_ds prepare`` (the real
command line), trains on both at every stretch of steps, validates on both, resumes exactly, and
the device prefetcher hands out the batches the plain stream would.

The two sources are told apart by their bytes: source A's documents hold only the letters a–m
and spaces, source B's only digits and ``+``; with the byte tokenizer a token names its source.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from disco_ds.cli import main as cli_main
from disco_ds.data import TokenStream, eval_batches, read_shard
from disco_ds.data.prefetch import DevicePrefetcher
from disco_ds.data.stream import window_order

A_TOKENS = np.array([ord(c) for c in "abcdefghijklm "])
B_TOKENS = np.array([ord(c) for c in "0123456789+"])
SEQ = 32


def _documents(rng: np.random.Generator, alphabet: str, count: int) -> list[str]:
    return ["".join(rng.choice(list(alphabet), size=int(n))) for n in rng.integers(100, 400, size=count)]


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Source A: a .jsonl of 150 documents; source B: a directory of 150 text files. Prepared in
    one call, A given first, into shards of 4,000 tokens (about 14 training shards)."""
    root = tmp_path_factory.mktemp("two_sources")
    rng = np.random.default_rng(0)
    a = root / "a.jsonl"
    a.write_text("".join(json.dumps({"text": t}) + "\n" for t in _documents(rng, "abcdefghijklm ", 150)))
    b = root / "b"
    b.mkdir()
    for i, text in enumerate(_documents(rng, "0123456789+", 150)):
        (b / f"{i:03d}.txt").write_text(text)
    out = root / "data"
    assert cli_main(["prepare", "--input", str(a), str(b), "--out", str(out), "--tokenizer", "byte",
                     "--shard-tokens", "4000", "--val-fraction", "0.05", "--quiet"]) == 0
    return out


def sources_of(rows: torch.Tensor) -> set[str]:
    """Which sources the tokens of ``rows`` come from."""
    tokens = rows.numpy()
    return {name for name, alphabet in (("A", A_TOKENS), ("B", B_TOKENS)) if np.isin(tokens, alphabet).any()}


def test_prepare_interleaves_the_sources_in_every_shard(two_sources):
    meta = json.loads((two_sources / "meta.json").read_text())
    assert meta["shuffle"] is True and len(meta["shards"]["train"]) >= 10
    for name in meta["shards"]["train"][:-1]:  # the last holds the remainder: maybe a document or two
        assert sources_of(torch.from_numpy(read_shard(two_sources / name).astype(np.int64))) == {"A", "B"}, name


def test_validation_holds_every_source(two_sources):
    meta = json.loads((two_sources / "meta.json").read_text())
    # round(0.05 * 150) = 8 documents of each source (it used to be the draws over the input order)
    assert meta["source_documents"]["val"] == [8, 8]
    val = np.concatenate([read_shard(two_sources / n) for n in meta["shards"]["val"]]).astype(np.int64)
    assert sources_of(torch.from_numpy(val)) == {"A", "B"}
    # and the batches the trainer evaluates, also when eval.tokens allows only a few windows
    for max_tokens in (None, 4 * SEQ):
        seen = set()
        for x, _ in eval_batches(two_sources / "val_*.bin", SEQ, 2, max_tokens=max_tokens):
            seen |= sources_of(x)
        assert seen == {"A", "B"}


@pytest.mark.parametrize("world", [1, 2])
def test_every_hundred_steps_draw_from_both_sources(two_sources, world):
    streams = [TokenStream(two_sources / "train_*.bin", SEQ, 2, r, world, seed=3) for r in range(world)]
    assert streams[0].windows_per_epoch > 1_500 and len(streams[0].files) >= 10
    steps = 1_200  # more than an epoch at world 2
    for s in streams:
        per_step = [sources_of(s.next_batch()[0]) for _ in range(steps)]
        for start in range(steps - 100 + 1):
            assert set().union(*per_step[start : start + 100]) == {"A", "B"}, (s.rank, start)
        # and each source's share of the steps is about its share of the data (half)
        share_a = sum("A" in p for p in per_step) / steps
        assert 0.5 < share_a < 0.9  # a window often holds both: "A in" is above one half


def test_the_global_order_mixes_shards_from_the_first_step(two_sources):
    s = TokenStream(two_sources / "train_*.bin", SEQ, 16, seed=0)
    shards, _ = s.locate(s.global_indices())
    assert len(set(shards.tolist())) >= 8  # 16 windows of one step from at least 8 of the shards


def test_window_order_is_a_permutation():
    for n in (1, 2, 3, 7, 64, 65, 1000, 4097):
        for epoch in (0, 1):
            order = window_order(np.arange(n), n, seed=5, epoch=epoch)
            assert sorted(order.tolist()) == list(range(n))
    a, b = window_order(np.arange(1000), 1000, 5, 0), window_order(np.arange(1000), 1000, 5, 1)
    assert not np.array_equal(a, b) and not np.array_equal(a, window_order(np.arange(1000), 1000, 6, 0))
    # pointwise: any slice of the permutation without the rest
    assert np.array_equal(window_order(np.arange(400, 420), 1000, 5, 0), a[400:420])


@pytest.mark.parametrize("k", [1, 37, 950])
def test_resume_from_a_prefetching_run_gives_the_uninterrupted_batches(two_sources, k):
    # world 2: rank 1 trains k micro-steps through the prefetcher (which has read one more), the
    # checkpoint's state is taken between steps, and a new stream resumed from it continues with
    # exactly the batches of an uninterrupted run, the prefetched one included.
    files = two_sources / "train_*.bin"
    reference = TokenStream(files, SEQ, 3, 1, 2, seed=9)
    expected = [reference.next_batch() for _ in range(k + 5)]
    stream = TokenStream(files, SEQ, 3, 1, 2, seed=9)
    batches = DevicePrefetcher(stream, "cpu")
    for i in range(k):
        x, y = batches.next_batch()
        assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1])
    state = json.loads(json.dumps(stream.state_dict()))
    assert state["position"] == k * 2 * 3 and state["version"] == 2
    resumed = TokenStream(files, SEQ, 3, 1, 2, seed=9)
    resumed.load_state_dict(state)
    for i in range(k, k + 5):
        x, y = resumed.next_batch()
        assert torch.equal(x, expected[i][0]) and torch.equal(y, expected[i][1])


def test_an_old_position_is_migrated_with_a_warning(two_sources):
    files = two_sources / "train_*.bin"
    s = TokenStream(files, SEQ, 2, seed=1)
    old = {**s.state_dict(), "version": 1, "position": 40}
    with pytest.warns(UserWarning, match="older disco_ds that read one shard at a time"):
        s.load_state_dict(old)
    assert s.position == 40
    with pytest.raises(ValueError, match="newer disco_ds"):
        s.load_state_dict({**old, "version": 3})
    # at an epoch boundary nothing of the old order is left: no warning
    at_boundary = {**old, "position": s.windows_per_epoch * 2}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s.load_state_dict(at_boundary)


def test_prefetcher_yields_the_plain_stream_batches_on_cpu(two_sources):
    files = two_sources / "train_*.bin"
    plain = TokenStream(files, SEQ, 4, seed=2)
    for depth in (1, 3):
        stream = TokenStream(files, SEQ, 4, seed=2)
        batches = DevicePrefetcher(stream, torch.device("cpu"), depth=depth)
        plain.position = 0
        for step in range(60):
            x, y = batches.next_batch()
            px, py = plain.next_batch()
            assert torch.equal(x, px) and torch.equal(y, py)
            assert stream.position == plain.position  # the position counts what was handed out
    with pytest.raises(ValueError, match="depth"):
        DevicePrefetcher(plain, "cpu", depth=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_prefetcher_on_cuda_copies_on_a_side_stream_with_the_plain_values(two_sources):
    files = two_sources / "train_*.bin"
    plain = TokenStream(files, SEQ, 4, seed=2)
    batches = DevicePrefetcher(TokenStream(files, SEQ, 4, seed=2), torch.device("cuda"), depth=2)
    busy = torch.randn(2048, 2048, device="cuda")
    outs = []
    for _ in range(50):
        x, y = batches.next_batch()
        assert x.is_cuda and y.is_cuda
        busy = busy @ busy / busy.norm()  # the consumer's stream is busy while the next copies run
        outs.append((x + 0, y + 0))  # used on the consumer's stream, as the model would
    torch.cuda.synchronize()
    for x, y in outs:
        px, py = plain.next_batch()
        assert torch.equal(x.cpu(), px) and torch.equal(y.cpu(), py)
