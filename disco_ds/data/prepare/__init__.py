"""``disco_ds prepare``: tokenize local text into training and validation token shards.

Inputs are text files (one document each), directories (searched recursively for ``--glob``,
default ``*.txt``, in sorted order; hidden entries and those matching ``--exclude`` are skipped),
``.jsonl`` files (one document per line, the string field ``--text-field``), ``.parquet`` files
(that column; needs ``pyarrow``) and Hugging Face ``datasets`` directories written by
``save_to_disk`` (needs ``datasets``; the ``train`` split of a ``DatasetDict``). Every document is
followed by the end-of-text token; empty documents are dropped. Document text is tokenized as plain
text: a literal ``<|endoftext|>`` inside a document is not turned into the special token.

Tokenizers (``--tokenizer``):

* ``byte`` — UTF-8 bytes, ids 0..255, end-of-text 256 (vocabulary 257); needs no files.
* ``bpe:N`` — a byte-level BPE of vocabulary ``N`` trained here on the input text with
  ``tokenizers`` (special token ``<|endoftext|>``).
* a path to a ``tokenizer.json`` (or a directory holding one), with ``--eot-token`` naming its
  end-of-text token when it is not one of the usual names.
* ``gpt2`` / ``gpt2:FILE`` — GPT-2's BPE through ``tiktoken``; offline it needs the encoding file
  ``gpt2.tiktoken`` (= ``r50k_base.tiktoken``), given as ``FILE`` or found in
  ``$TIKTOKEN_CACHE_DIR``.

The output directory holds ``train_000000.bin, ...`` and ``val_000000.bin, ...`` (the shard format
of :mod:`disco_ds.data.shards`), ``meta.json`` (written last: its presence marks a complete run) and
``tokenizer/`` with Hugging Face tokenizer files (``tokenizer.json``, ``tokenizer_config.json``,
``special_tokens_map.json``) that ``transformers.AutoTokenizer.from_pretrained`` loads offline.
:func:`load_tokenizer` rebuilds the tokenizer from such a directory.

Order: the documents are written in a permutation of all of them drawn from ``--seed``, so the
documents of every input are spread over every shard (sources given one after another would
otherwise train one at a time, for as long as each lasts); ``--no-shuffle`` keeps the input order.
To permute them all, ``prepare`` first writes every document's tokens to a temporary file in
``--out`` (the directory needs room for the tokens twice meanwhile) and keeps an index of the
documents in memory (24 bytes each), then writes the shards from that file.

Scale: ``--workers N`` processes tokenize (default: the usable CPU cores; 1 for the byte
tokenizer, whose encoding costs less than sending text to a worker) batches of text whose results
are taken in input order, so the shards and ``meta.json`` are byte for byte those of
``--workers 1`` (which tokenizes in this process, no pool). Nothing is held whole: at most a few
batches per worker are in flight, and a text file is read a megabyte at a time and, for tokenizers
with GPT-2's pre-tokenization (byte, ``bpe:N``, ``gpt2``, ``tokenizer.json`` files of that kind),
tokenized in pieces cut before a space or newline that follows a non-space, where that
pre-tokenization splits anyway, so its tokens are those of the whole file (other
``tokenizer.json`` files get each text file whole). The progress display and the summary line
give the throughput, MB/s of text and tokens/s.

Validation split, from every input (each ``--input`` item: a file, a directory or a dataset):
each input with at least two documents gives its first documents in the written order (so a
seeded sample, which does not depend on the tokenizer's ids), never all of them: with
``--val-fraction f`` ``round(f · n)`` of its ``n`` documents, at least one; with ``--val-tokens
n`` documents until they hold its share of ``n`` tokens (``n`` times its share of all tokens,
rounded up). If no input has two documents, the first document is the validation split.
``meta.json`` records the documents and tokens of every input in each split
(``source_documents``, ``source_tokens``, in the order of ``sources``).
"""

from __future__ import annotations

import argparse
import sys

from disco_ds.data.prepare.tokenizers import ByteTokenizer, load_tokenizer, make_tokenizer
from disco_ds.data.prepare.writer import prepare

__all__ = [
    "ByteTokenizer",
    "make_tokenizer",
    "load_tokenizer",
    "prepare",
    "add_arguments",
    "main",
]


# =============================================================================================
# CLI
# =============================================================================================


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``prepare`` options to ``parser``."""
    parser.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                        help="text/.jsonl/.parquet files, directories (searched with --glob), or "
                             "Hugging Face save_to_disk directories")
    parser.add_argument("--out", "-o", required=True, metavar="DIR", help="output directory")
    parser.add_argument("--tokenizer", default="byte",
                        help="byte | bpe:N | gpt2[:FILE.tiktoken] | path/to/tokenizer.json (default: byte)")
    parser.add_argument("--glob", default="*.txt", help="file pattern inside input directories (default: *.txt)")
    parser.add_argument("--exclude", nargs="+", default=[], metavar="PATTERN",
                        help="skip directory entries whose name or relative path matches (e.g. site-packages test)")
    parser.add_argument("--text-field", default="text", help="text field of .jsonl/.parquet/datasets (default: text)")
    parser.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of every input's documents for validation, at least one (default: 0.01)")
    parser.add_argument("--val-tokens", default=None,
                        help="instead: about this many validation tokens (e.g. 1M), every input giving its share")
    parser.add_argument("--shard-tokens", default="100M", help="tokens per shard (default: 100M)")
    parser.add_argument("--max-bytes", default=None, help="stop after this much input text (e.g. 20MB)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the document order and the validation split (default: 0)")
    parser.add_argument("--no-shuffle", dest="shuffle", action="store_false",
                        help="write the documents in input order (default: a permutation drawn from --seed)")
    parser.add_argument("--eot-token", default=None, help="end-of-text token of a tokenizer.json")
    parser.add_argument("--bpe-min-frequency", type=int, default=2, help="bpe:N training min pair frequency")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace train_/val_ shards in --out that prepare did not write")
    parser.add_argument("--workers", "-j", type=int, default=None, metavar="N",
                        help="tokenizing processes (default: the usable CPU cores, 1 for --tokenizer byte; "
                             "1: no worker processes)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress and no summary line")


def main(args: argparse.Namespace) -> int:
    """Run ``prepare`` from parsed arguments; returns the exit code (1 on a reported error)."""
    try:
        prepare(
            args.input,
            args.out,
            args.tokenizer,
            glob=args.glob,
            exclude=args.exclude,
            text_field=args.text_field,
            val_fraction=args.val_fraction,
            val_tokens=args.val_tokens,
            shard_tokens=args.shard_tokens,
            max_bytes=args.max_bytes,
            seed=args.seed,
            eot_token=args.eot_token,
            bpe_min_frequency=args.bpe_min_frequency,
            overwrite=args.overwrite,
            progress=not args.quiet,
            workers=args.workers,
            shuffle=args.shuffle,
        )
    except (ValueError, OSError, ImportError) as e:
        print(f"disco_ds prepare: error: {e}", file=sys.stderr)
        return 1
    return 0
