"""Tokenized documents as the packer reads them: a length per document and `read(i, start, stop)`.

`InMemoryDocuments` holds them in one flat array (the corpora read as text). Prepared token shards
(train/shards.py) give the same interface from files on disk, read with `pread` into small
buffers, so memory does not grow with the corpus. The packer (train/packing.py) frames each
document as `BOS d EOS` on the fly, as a virtual stream: nothing the size of the corpus is built.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from hybrax.train.corpus import DataError


@runtime_checkable
class TokenDocuments(Protocol):
    lengths: np.ndarray     # int64 [n]: tokens per document (without BOS/EOS)
    dtype: np.dtype         # the stored ids' dtype

    def read(self, index: int, start: int, stop: int) -> np.ndarray:
        """Tokens `start:stop` of document `index`."""


class InMemoryDocuments:
    """`modalities` (optional): an int8 array per document, one modality id per token
    (train/modalities.py); then `read_modalities(i, start, stop)` reads them like `read`."""

    def __init__(self, documents: Sequence[np.ndarray], modalities: Sequence[np.ndarray] | None = None):
        if len(documents) == 0:
            raise DataError("documents is empty; need at least one tokenized document")
        arrays = []
        for index, document in enumerate(documents):
            document = np.asarray(document)
            if document.ndim != 1 or not np.issubdtype(document.dtype, np.integer):
                raise DataError(f"documents[{index}] has shape {document.shape} dtype {document.dtype}; "
                                "expected a 1-D integer array of token ids")
            arrays.append(document)
        dtypes = {a.dtype for a in arrays}
        unsigned = len(dtypes) == 1 and np.issubdtype(next(iter(dtypes)), np.unsignedinteger)
        self.dtype = next(iter(dtypes)) if unsigned else np.dtype(np.int32)
        self.lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(self.lengths)])
        self._flat = np.concatenate(arrays).astype(self.dtype, copy=False)
        self._flat_modalities = None
        if modalities is not None:
            lengths = np.array([len(m) for m in modalities], dtype=np.int64)
            if len(modalities) != len(arrays) or not np.array_equal(lengths, self.lengths):
                raise DataError("modalities must give one id per token of every document")
            self._flat_modalities = np.concatenate([np.asarray(m, np.int8) for m in modalities])

    @property
    def has_modalities(self) -> bool:
        return self._flat_modalities is not None

    def read(self, index: int, start: int, stop: int) -> np.ndarray:
        base = self._starts[index]
        return self._flat[base + start: base + stop]

    def read_modalities(self, index: int, start: int, stop: int) -> np.ndarray:
        base = self._starts[index]
        return self._flat_modalities[base + start: base + stop]


def as_documents(documents: Sequence[np.ndarray] | TokenDocuments) -> TokenDocuments:
    return documents if isinstance(documents, TokenDocuments) else InMemoryDocuments(documents)
