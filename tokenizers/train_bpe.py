"""Train a ByteLevel BPE tokenizer (HuggingFace tokenizers) and save tokenizer.json.

    python tokenizers/train_bpe.py                                  # KJV train split, 8192 tokens
    python tokenizers/train_bpe.py --input corpus.txt --vocab-size 16000 --out runs/bpe

The default corpus is the King James Bible (train split of unimodal.data.kjv). The result
loads with unimodal.codecs.TextCodec.from_file(out). It reports bytes per token and checks
that the held-out text round-trips exactly.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unimodal.config import int_at_least  # noqa: E402
from unimodal.codecs import EOT, TextCodec, train_bpe  # noqa: E402
from unimodal.data import Skipped, build_dataset  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", default=None,
                   help="a .txt (a line each) or .jsonl ({'text': ...}) corpus; default: the KJV text")
    p.add_argument("--vocab-size", type=int_at_least(1), default=8192, help="final vocabulary size including special tokens")
    p.add_argument("--min-frequency", type=int_at_least(1), default=2, help="a merge must occur at least this often")
    p.add_argument("--special", nargs="*", default=[EOT, "<boi>", "<eoi>"],
                   help="special tokens, given the first ids in this order")
    p.add_argument("--out", default="runs/bpe-kjv", help="output directory (tokenizer.json + stats.json)")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="bad corpus lines (empty, not UTF-8): stop with an error, or skip and count them")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    skipped = Skipped()  # each split load reads the whole file: the train load's count is the file's
    name = "kjv" if args.input is None else args.input
    train = build_dataset(name, "train", on_error=args.on_error, skipped=skipped)
    test = build_dataset(name, "test", on_error=args.on_error, skipped=Skipped())
    texts = [str(t) for t in train[:]["text"]]
    print(f"training on {len(texts)} lines ({sum(map(len, texts)):,} characters) from {name}"
          + (f"; {skipped.count} bad lines skipped" if skipped.count else ""))
    t0 = time.time()
    tok = train_bpe(texts, args.vocab_size, args.special, args.min_frequency, length=len(texts))
    codec = TextCodec(tok)
    held = [str(t) for t in test[:]["text"]]
    ids = codec.encode_batch(held)
    exact = all(codec.decode(i) == t for i, t in zip(ids, held))
    n_bytes, n_tok = sum(len(t.encode()) for t in held), sum(map(len, ids))
    stats = {"corpus": name, "vocab_size": codec.vocab_size, "train_lines": len(texts), "test_lines": len(held),
             "test_bytes_per_token": n_bytes / max(n_tok, 1), "test_roundtrip_exact": exact,
             "special_tokens": {s: codec.token_id(s) for s in args.special}, "seconds": time.time() - t0,
             "skipped": skipped.count}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    codec.save(out / "tokenizer.json")
    (out / "stats.json").write_text(json.dumps(stats, indent=2))
    print(f"saved {out / 'tokenizer.json'}: vocab {codec.vocab_size}, held-out {n_bytes / max(n_tok, 1):.2f} "
          f"bytes/token, round trip {'exact' if exact else 'NOT exact'}")
    return stats


if __name__ == "__main__":
    try:
        main()
    except ValueError as e:  # DataError, CodecError, a bad --dataset-kw: one line, no traceback
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
