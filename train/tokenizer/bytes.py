"""Byte-level tokenizer: ids 0..255 are UTF-8 bytes, then three special ids.

Any text round-trips exactly (`decode(encode(s)) == s`), there is nothing to train or download,
and the vocabulary is small enough for tiny models. Ids are `uint16` (the largest id is 258).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from hybrax.train.tokenizer.interface import Specials, id_dtype

BOS: int = 256  # begins every document in a packed stream
EOS: int = 257  # ends every document in a packed stream
PAD: int = 258  # fills the tail of the last evaluation row and batch; never a target
VOCAB_SIZE: int = 259
ID_DTYPE = id_dtype(VOCAB_SIZE)
BYTE_SPECIALS = Specials(bos=BOS, eos=EOS, pad=PAD)


@dataclass(frozen=True)
class ByteTokenizer:
    """UTF-8 bytes as tokens, plus `BOS=256`, `EOS=257`, `PAD=258`; `vocab_size=259`."""

    vocab_size: int = VOCAB_SIZE
    specials: Specials = field(default=BYTE_SPECIALS)
    fingerprint: str = "bytes"

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Encodes `text` as UTF-8 bytes -> ids `[len(text.encode()) + bos + eos]` uint16."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r:.60}")
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(ID_DTYPE)
        if bos or eos:
            head, tail = np.array([BOS] * bos, ID_DTYPE), np.array([EOS] * eos, ID_DTYPE)
            ids = np.concatenate([head, ids, tail])
        return ids

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Decodes ids `[n]` to text; special ids are dropped, broken UTF-8 becomes U+FFFD."""
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= VOCAB_SIZE):
            bad = ids[(ids < 0) | (ids >= VOCAB_SIZE)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {VOCAB_SIZE})")
        return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def byte_lengths(self) -> np.ndarray:
        return (np.arange(VOCAB_SIZE) < 256).astype(np.int32)
