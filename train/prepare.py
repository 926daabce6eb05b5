"""hybrax-data prepare --config quickstart.yaml --out data/shakespeare-bytes [--shard-tokens N] [key=value ...]

Tokenizes the config's corpus once (its data section: source, path, val_path or val_fraction, and
data.tokenizer) into token shards (train/shards.py), train and val splits, with a progress bar
and a manifest. Then train from them with `data.source=prepared data.path=<out>` and the same
data.tokenizer: memory no longer grows with the corpus.
"""

import argparse
import pathlib
import sys
import time

from tqdm import tqdm


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hybrax-data", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    prepare = sub.add_parser("prepare", help="tokenize the config's corpus into token shards")
    prepare.add_argument("--config", required=True, help="YAML preset whose data section names the corpus")
    prepare.add_argument("--out", required=True, help="the prepared directory to create")
    prepare.add_argument("--shard-tokens", type=int, default=2**28, help="tokens per shard file (default 2^28)")
    prepare.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.source=files data.path=corpus/")
    args = p.parse_args(argv)

    from hybrax.train.config import ConfigError, load_config
    from hybrax.train.corpus import DataError
    from hybrax.train.data import documents
    from hybrax.train.shards import write_prepared
    from hybrax.train.tokenizer import load_tokenizer

    try:
        config = load_config(args.config, args.overrides)
        if args.shard_tokens < 1:
            raise ConfigError(f"--shard-tokens={args.shard_tokens} must be >= 1")
        tokenizer = load_tokenizer(config.data.tokenizer)
        train_text, val_text = documents(config.data, config.train.seed)
        total = sum(len(t.encode("utf-8")) for t in train_text) + sum(len(t.encode("utf-8")) for t in val_text)
        t0 = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, desc="prepare", disable=not sys.stderr.isatty()) as bar:
            manifest = write_prepared(pathlib.Path(args.out), {"train": train_text, "val": val_text}, tokenizer,
                                      shard_tokens=args.shard_tokens, progress=bar.update,
                                      source=f"{config.data.source} {config.data.path or ''}".strip())
    except (ConfigError, DataError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    seconds = time.perf_counter() - t0
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['documents']:,} documents, {info['bytes']:,} bytes -> {info['tokens']:,} tokens in "
              f"{len(info['shards'])} shard(s)")
    print(f"wrote {args.out} ({manifest['tokenizer']}, ids {manifest['dtype']}) in {seconds:.1f}s "
          f"({total / max(seconds, 1e-9) / 2**20:.1f} MiB/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
