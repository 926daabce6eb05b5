"""Tokenizers: `bytes` (UTF-8 bytes, the default) and byte-level BPE (`tokenizers` library) from a
`tokenizer.json`; both satisfy `interface.Tokenizer`. `load_tokenizer(data.tokenizer)` picks one.
"""

import functools
import pathlib

from hybrax.train.tokenizer.bpe import BPETokenizer
from hybrax.train.tokenizer.bytes import BOS, BYTE_SPECIALS, EOS, ID_DTYPE, PAD, VOCAB_SIZE, ByteTokenizer
from hybrax.train.tokenizer.interface import Specials, Tokenizer, id_dtype

__all__ = ["BOS", "BYTE_SPECIALS", "EOS", "ID_DTYPE", "PAD", "VOCAB_SIZE", "BPETokenizer", "ByteTokenizer",
           "Specials", "Tokenizer", "id_dtype", "load_tokenizer"]


def load_tokenizer(spec: str = "bytes") -> Tokenizer:
    """`bytes`, or the path of a tokenizer.json (ValueError, one line, when it cannot be loaded)."""
    if spec == "bytes":
        return ByteTokenizer()
    path = pathlib.Path(spec).expanduser()
    if not path.is_file():
        raise ValueError(f"data.tokenizer={spec!r} is neither 'bytes' nor an existing tokenizer.json file")
    return _load_bpe(str(path.resolve()), path.stat().st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _load_bpe(path: str, mtime_ns: int) -> BPETokenizer:
    try:
        return BPETokenizer.load(path)
    except Exception as e:   # the library raises its own types for a malformed file
        raise ValueError(f"data.tokenizer={path!r} cannot be loaded: {str(e).splitlines()[0][:200]}") from None
