"""What the data pipeline, the model and the sampler need from a tokenizer, whatever its kind.

A tokenizer maps text to ids `[0, vocab_size)` and back, and names three special ids: BOS begins
every document of a packed stream, EOS ends it, PAD fills the tail of the last evaluation batch
(never a target). The model's embedding has `vocab_size` rows. `byte_lengths()[i]` is the number of
UTF-8 bytes token i stands for (0 for the specials), so the bits per byte of any evaluated text
is its summed loss over the bytes it covers, comparable across tokenizers. `fingerprint` names the
vocabulary (prepared shards and checkpoints record it). Ids are stored in `id_dtype(vocab_size)`,
the smallest unsigned integer type that holds them.
"""

from __future__ import annotations

import dataclasses
from typing import Protocol, runtime_checkable

import numpy as np


@dataclasses.dataclass(frozen=True)
class Specials:
    bos: int
    eos: int
    pad: int


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    specials: Specials

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        """Ids `[n]` in `id_dtype(vocab_size)`, with BOS first / EOS last when asked."""

    def decode(self, ids) -> str:
        """Text of ids `[n]`; special ids are dropped."""

    def byte_lengths(self) -> np.ndarray:
        """`[vocab_size]` int32: UTF-8 bytes per token, 0 for the specials."""

    @property
    def fingerprint(self) -> str:
        """A short name of the vocabulary: equal fingerprints encode text alike."""


def id_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned integer type that holds ids `[0, vocab_size)`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size <= np.iinfo(dtype).max + 1:
            return np.dtype(dtype)
    raise ValueError(f"vocab_size={vocab_size} does not fit in 32 bits")
