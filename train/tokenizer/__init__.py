"""Tokenizers: `bytes` (UTF-8 bytes, the default) and byte-level BPE (`tokenizers` library) from a
`tokenizer.json`; both satisfy `interface.Tokenizer`. `load_tokenizer(data.tokenizer)` picks one.
"""

import functools
import pathlib

from hybrax.configs import DIRECTORY

from hybrax.train.tokenizer.bpe import BPETokenizer
from hybrax.train.tokenizer.bytes import BOS, BYTE_SPECIALS, EOS, ID_DTYPE, PAD, VOCAB_SIZE, ByteTokenizer
from hybrax.train.tokenizer.interface import Specials, Tokenizer, id_dtype

__all__ = ["BOS", "BYTE_SPECIALS", "EOS", "ID_DTYPE", "PAD", "VOCAB_SIZE", "BPETokenizer", "ByteTokenizer",
           "Specials", "Tokenizer", "find_tokenizer", "id_dtype", "load_tokenizer"]


SHIPPED = DIRECTORY / "tokenizers"   # tokenizers that ship with the presets, found by name


def find_tokenizer(spec: str) -> pathlib.Path | None:
    """The tokenizer.json `spec` names: a path from the working directory, else a shipped one's
    name (`shakespeare_bpe2048.json`); None when neither exists."""
    path = pathlib.Path(spec).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED / path.name
    return shipped if len(path.parts) == 1 and shipped.is_file() else None


def load_tokenizer(spec: str = "bytes") -> Tokenizer:
    """`bytes`, or a tokenizer.json (`find_tokenizer`); ValueError, one line, when it cannot be loaded."""
    if spec == "bytes":
        return ByteTokenizer()
    path = find_tokenizer(spec)
    if path is None:
        shipped = ", ".join(sorted(p.name for p in SHIPPED.glob("*.json")))
        raise ValueError(f"data.tokenizer={spec!r} is neither 'bytes' nor an existing tokenizer.json file (shipped: "
                         f"{shipped}; make one with hybrax-tokenizer train)")
    return _load_bpe(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_bpe(path: str, mtime_ns: int) -> BPETokenizer:
    try:
        return BPETokenizer.load(path)
    except Exception as e:   # the library raises its own types for a malformed file
        raise ValueError(f"data.tokenizer={path!r} cannot be loaded: {str(e).splitlines()[0][:200]}") from None
