"""hybrax-tokenizer train --config quickstart.yaml --vocab-size 4096 --out tokenizer.json [key=value ...]

Trains a byte-level BPE tokenizer on the training documents of the config's corpus (its validation
documents are never seen), saves it, and prints its bytes per token on both splits and a round-trip
check. Train with it: `hybrax-train --config ... data.tokenizer=tokenizer.json` (model.vocab_size
follows the tokenizer).
"""

import argparse
import pathlib
import sys
import time

import numpy as np


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrax-tokenizer", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-level BPE tokenizer on the config's training documents")
    train.add_argument("--config", required=True, help="YAML preset whose data section names the corpus")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens, the 3 specials included")
    train.add_argument("--out", required=True, help="where to write tokenizer.json")
    train.add_argument("--min-frequency", type=int, default=2, help="pairs seen fewer times are not merged")
    train.add_argument("overrides", nargs="*", help="dotted overrides of the config, e.g. data.path=corpus/")
    args = p.parse_args(argv)

    from hybrax.train.config import ConfigError, load_config
    from hybrax.train.corpus import DataError
    from hybrax.train.data import documents
    from hybrax.train.tokenizer import BPETokenizer

    try:
        config = load_config(args.config, args.overrides)
        train_text, val_text = documents(config.data, config.train.seed)
        t0 = time.perf_counter()
        tokenizer = BPETokenizer.train(train_text, args.vocab_size, min_frequency=args.min_frequency,
                                       progress=sys.stderr.isatty())
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    out = pathlib.Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out)
    for name, texts in (("train", train_text), ("val", val_text)):
        ids = tokenizer.encode_batch(texts)
        tokens, size = sum(map(len, ids)), sum(len(t.encode()) for t in texts)
        exact = sum(tokenizer.decode(i) == t for i, t in zip(ids, texts))
        print(f"{name}: {len(texts):,} documents, {size:,} bytes -> {tokens:,} tokens "
              f"({size / max(tokens, 1):.2f} bytes/token); round trip exact for {exact}/{len(texts)}")
    print(f"wrote {out} ({tokenizer.vocab_size:,} tokens, {tokenizer.fingerprint}, ids {np.dtype(tokenizer.dtype)}) "
          f"in {seconds:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
