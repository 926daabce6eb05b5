"""Byte-level BPE through the `tokenizers` library: loaded from a `tokenizer.json`, or trained here
on the configured corpus's training documents (`hybrax-tokenizer train`; nothing is downloaded).

Byte-level: text is UTF-8 bytes, each shown as one of 256 printable characters (GPT-2's table)
before merges, so every text encodes and decodes exactly, unknown characters included. The three
specials `<bos>`, `<eos>`, `<pad>` take ids 0, 1, 2. A token's byte length is the number of bytes
its characters map back to.
"""

from __future__ import annotations

import hashlib
import pathlib
from collections.abc import Iterable

import numpy as np

from hybrax.train.tokenizer.interface import Specials, id_dtype

SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>")


class BPETokenizer:
    def __init__(self, tokenizer, source: str = "trained"):
        """`tokenizer`: a `tokenizers.Tokenizer` with the three special tokens; `source` names it in errors."""
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer {source} lacks the special tokens {missing}; hybrax needs "
                             f"{list(SPECIAL_TOKENS)} (hybrax-tokenizer train adds them)")
        self._tokenizer, self.source = tokenizer, source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.specials = Specials(*(tokenizer.token_to_id(t) for t in SPECIAL_TOKENS))
        self.dtype = id_dtype(self.vocab_size)
        self.fingerprint = "bpe-" + hashlib.sha256(tokenizer.to_str().encode()).hexdigest()[:16]

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2,
              progress: bool = False) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} must be >= {256 + len(SPECIAL_TOKENS)} (256 bytes + "
                             f"{len(SPECIAL_TOKENS)} specials)")
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=list(SPECIAL_TOKENS), show_progress=progress,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tokenizer.train_from_iterator(texts, trainer=trainer)
        return cls(tokenizer)

    @classmethod
    def load(cls, path: str | pathlib.Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)), source=str(path))

    def save(self, path: str | pathlib.Path) -> None:
        self._tokenizer.save(str(path))

    def encode(self, text: str, *, bos: bool = False, eos: bool = False) -> np.ndarray:
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}: {text!r:.60}")
        ids = self._tokenizer.encode(text, add_special_tokens=False).ids
        return np.asarray([self.specials.bos] * bos + ids + [self.specials.eos] * eos, dtype=self.dtype)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        """`encode` of many texts at once (the library's threads)."""
        return [np.asarray(e.ids, dtype=self.dtype) for e in self._tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        ids = np.asarray(ids).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            bad = ids[(ids < 0) | (ids >= self.vocab_size)][0]
            raise ValueError(f"token id {int(bad)} is outside the vocabulary [0, {self.vocab_size})")
        return self._tokenizer.decode([int(i) for i in ids], skip_special_tokens=True)

    def byte_lengths(self) -> np.ndarray:
        to_byte = {c: b for b, c in _bytes_to_unicode().items()}
        lengths = np.zeros(self.vocab_size, np.int32)
        specials = set(SPECIAL_TOKENS)
        for token, i in self._tokenizer.get_vocab(with_added_tokens=True).items():
            if token not in specials:
                lengths[i] = sum(1 for c in token if c in to_byte)
        return lengths


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which the ByteLevel pre-tokenizer uses."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table
