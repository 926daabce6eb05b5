"""Packs tokenized documents into fixed-length rows with segment ids, deterministically.

The stream of an epoch is `BOS d EOS BOS d EOS ...` over all documents. Row r is the window
`stream[r*T : r*T + T + 1]` (T = seq_len): consecutive rows overlap by one token, so the rows'
targets tile `stream[1:]` and every next-token prediction in the stream appears exactly once.

- Training (`PackedBatches`): per epoch e, `rng = np.random.default_rng([seed, e])` permutes the
  documents, then the rows. The last partial row is dropped, and so are the rows left over after
  the last full batch (a batch never mixes epochs); with shuffling a different tail is dropped
  each epoch.
- Evaluation (`evaluation_batches`): documents in order, no shuffling, the last partial row and
  the last batch are filled with PAD, whose loss_mask is 0, so every batch has one shape.
  Padding has segment id 0 and position 0; PAD is never a target.

A batch is a dict of `[B, T]` arrays:

- `tokens`, `targets` (int32): `row[:-1]`, `row[1:]`.
- `segment_ids` (int32): 1 at the row start, +1 at every BOS, 0 on padding; attention and
  recurrent state must not cross a change of id.
- `positions` (int32): index within the segment, 0 at each segment start and at the row start.
- `loss_mask` (float32): 1 where the target is the next token of the same document (including
  the EOS that ends it); 0 where the target is the BOS of the next document, and on padding.
- `modality_ids` (int32, only when the documents carry modalities: `data.modalities`): each
  token's modality (train/modalities.py), 0 on BOS, EOS and padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from hybrax.train.corpus import DataError
from hybrax.train.token_documents import TokenDocuments, as_documents
from hybrax.train.tokenizer import BYTE_SPECIALS, Specials

Batch = dict[str, np.ndarray]


class _Stream:
    """`BOS d EOS` for every document in `order`, read by window without building it."""

    def __init__(self, documents: TokenDocuments, order: np.ndarray, specials: Specials):
        self.documents, self.order, self.specials = documents, np.asarray(order), specials
        framed = documents.lengths[self.order] + 2
        self.starts = np.concatenate([[0], np.cumsum(framed)])   # int64 [n + 1]
        self.length = int(self.starts[-1])
        self.dtype = documents.dtype if np.issubdtype(documents.dtype, np.unsignedinteger) else np.dtype(np.int32)

    def window(self, start: int, size: int, fill: int | None = None) -> np.ndarray:
        """Stream tokens `start : start + size`; past the end, `fill` (which must then be given)."""
        return self._window(start, size, fill, self.documents.read, self.dtype,
                            (self.specials.bos, self.specials.eos))

    def window_modalities(self, start: int, size: int) -> np.ndarray:
        """The modality id of each token of `window(start, size)` (0 for BOS, EOS and fill)."""
        return self._window(start, size, 0, self.documents.read_modalities, np.dtype(np.int8), (0, 0))

    def _window(self, start: int, size: int, fill, read, dtype, framing) -> np.ndarray:
        bos, eos = framing
        out = np.empty(size, dtype)
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        pos, done = start, 0
        while done < size:
            if k >= len(self.order):
                out[done:] = fill
                break
            doc, offset = int(self.order[k]), pos - int(self.starts[k])
            length = int(self.documents.lengths[doc])
            take = min(length + 2 - offset, size - done)
            segment = out[done: done + take]
            first, last = offset, offset + take   # framed positions [first, last) of this document
            i = 0
            if first == 0:
                segment[0] = bos
                i = 1
            body_stop = min(last, length + 1)
            if body_stop > max(first, 1):
                body = read(doc, max(first, 1) - 1, body_stop - 1)
                segment[i: i + len(body)] = body
            if last == length + 2:
                segment[-1] = eos
            done, pos, k = done + take, pos + take, k + 1
        return out


def batch_from_rows(rows: np.ndarray, specials: Specials = BYTE_SPECIALS) -> Batch:
    """Builds a batch from token rows `[B, T+1]` (PAD marks padding); arrays are `[B, T]`."""
    rows = rows.astype(np.int32, copy=False)
    tokens, targets = rows[:, :-1], rows[:, 1:]
    real = tokens != specials.pad
    is_start = tokens == specials.bos
    is_start[:, 0] = True
    segment_ids = np.cumsum(is_start, axis=1, dtype=np.int32) * real
    index = np.arange(tokens.shape[1], dtype=np.int32)
    last_start = np.maximum.accumulate(np.where(is_start, index, 0), axis=1)
    positions = (index - last_start) * real
    loss_mask = real & (targets != specials.bos) & (targets != specials.pad)
    return {
        "tokens": np.ascontiguousarray(tokens),
        "targets": np.ascontiguousarray(targets),
        "segment_ids": segment_ids.astype(np.int32),
        "positions": positions.astype(np.int32),
        "loss_mask": loss_mask.astype(np.float32),
    }


def _check_sizes(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size={batch_size} and seq_len={seq_len} must both be >= 1")


class PackedBatches:
    """Infinite, deterministic, resumable iterator of packed training batches.

    Args:
      documents: token ids of each document `[n_i]`, without BOS/EOS (they are added here).
      batch_size: rows per batch, B.
      seq_len: tokens per row, T (each row holds T + 1 stream tokens).
      seed: with the epoch number, seeds the document and row permutations.
      shuffle: permute documents and rows each epoch; if False, epochs repeat the same order.
      row_range: (start, stop): yield only rows start..stop-1 of every global batch (one host's
        share in a multi-process run); the position and state stay those of the global batches.

    The stream and row order are built once per epoch; a batch is one gather of `[B, T+1]`.
    `state()` / `restore(state)` checkpoint the position as JSON-serialisable ints.
    """

    def __init__(
        self,
        documents: Sequence[np.ndarray] | TokenDocuments,
        *,
        batch_size: int,
        seq_len: int,
        seed: int,
        shuffle: bool = True,
        row_range: tuple[int, int] | None = None,
        specials: Specials = BYTE_SPECIALS,
    ) -> None:
        _check_sizes(batch_size, seq_len)
        start, stop = (0, batch_size) if row_range is None else row_range
        if not 0 <= start < stop <= batch_size:
            raise DataError(f"row_range={row_range} must satisfy 0 <= start < stop <= batch_size={batch_size}")
        self.row_range = (int(start), int(stop))
        if seed < 0:
            raise DataError(f"seed={seed} must be >= 0 (it seeds default_rng([seed, epoch]))")
        self._documents, self.specials = as_documents(documents), specials
        self.batch_size, self.seq_len = batch_size, seq_len
        self.seed, self.shuffle = int(seed), shuffle
        stream_length = int(self._documents.lengths.sum()) + 2 * len(self._documents.lengths)
        self.rows_per_epoch = (stream_length - 1) // seq_len
        self.batches_per_epoch = self.rows_per_epoch // batch_size
        if self.batches_per_epoch == 0:
            raise DataError(
                f"the documents pack into {self.rows_per_epoch} rows of seq_len={seq_len} ({stream_length} "
                f"tokens), fewer than batch_size={batch_size}; lower batch_size or seq_len, or add documents"
            )
        self._epoch, self._batch = 0, 0
        self._cached: tuple[int, np.ndarray, np.ndarray] | None = None

    def _epoch_plan(self, epoch: int) -> tuple[_Stream, np.ndarray]:
        """The epoch's stream (documents in order) and row order `[rows_per_epoch]`, built once per epoch."""
        if self._cached is None or self._cached[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            n = len(self._documents.lengths)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            rows = np.arange(self.rows_per_epoch)
            if self.shuffle:
                rows = rng.permutation(rows)
            self._cached = (epoch, _Stream(self._documents, order, self.specials), rows)
        return self._cached[1], self._cached[2]

    def __iter__(self) -> PackedBatches:
        return self

    def __next__(self) -> Batch:
        stream, row_order = self._epoch_plan(self._epoch)
        rows = row_order[self._batch * self.batch_size : (self._batch + 1) * self.batch_size]
        rows = rows[self.row_range[0] : self.row_range[1]]
        window = np.stack([stream.window(int(r) * self.seq_len, self.seq_len + 1) for r in rows])
        batch = batch_from_rows(window, self.specials)
        if getattr(self._documents, "has_modalities", False):
            batch["modality_ids"] = np.stack([stream.window_modalities(int(r) * self.seq_len, self.seq_len)
                                              for r in rows]).astype(np.int32)
        self._batch += 1
        if self._batch == self.batches_per_epoch:
            self._epoch, self._batch = self._epoch + 1, 0
        return batch

    def state(self) -> dict[str, int]:
        """The position of the next batch, plus the settings it is only valid for (all ints)."""
        return {
            "epoch": self._epoch,
            "batch": self._batch,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "rows_per_epoch": self.rows_per_epoch,
        }

    # The settings a data state is only valid for, and where each comes from in a run's config.
    _SETTINGS = {"seed": "train.seed", "batch_size": "data.batch_size", "seq_len": "data.seq_len",
                 "rows_per_epoch": "the documents: data.source, data.path, data.val_fraction or the files"}

    def restore(self, state: Mapping[str, Any]) -> None:
        """Continues from `state()`; only `epoch` and `batch` are required, the rest is checked.

        Any mismatch (other settings, missing keys, values that are not ints) is one `DataError`."""
        mismatch = "the checkpoint's data state does not match this config's data settings"
        if not isinstance(state, Mapping):
            raise DataError(f"{mismatch}: it is a {type(state).__name__}, expected a dict with 'epoch' and 'batch'")
        missing = [key for key in ("epoch", "batch") if key not in state]
        if missing:
            raise DataError(f"{mismatch}: it lacks {missing[0]!r} (it has {sorted(map(str, state))})")
        values = {}
        for key in (*self._SETTINGS, "epoch", "batch"):
            if key not in state:
                continue
            value = state[key]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise DataError(f"{mismatch}: {key}={value!r} is a {type(value).__name__}, expected an int")
            values[key] = int(value)
        for key, where in self._SETTINGS.items():
            if key in values and values[key] != getattr(self, key):
                raise DataError(f"{mismatch}: {key}={values[key]} in the checkpoint, {key}={getattr(self, key)} "
                                f"now (set by {where}); resume with the same data settings")
        epoch, batch = values["epoch"], values["batch"]
        if epoch < 0 or not 0 <= batch < self.batches_per_epoch:
            raise DataError(f"{mismatch}: epoch={epoch} batch={batch} is out of range; "
                            f"valid: epoch >= 0 and 0 <= batch < {self.batches_per_epoch}")
        self._epoch, self._batch = epoch, batch


def evaluation_batches(
    documents: Sequence[np.ndarray] | TokenDocuments, *, batch_size: int, seq_len: int,
    specials: Specials = BYTE_SPECIALS
) -> Iterator[Batch]:
    """Every row of the validation stream once, in order; PAD fills the last row and batch.

    Yields `ceil(ceil((L - 1) / T) / B)` batches of `[B, T]` arrays for a stream of L tokens.
    Over all batches the non-PAD `tokens` are exactly `stream[:-1]` (the final EOS predicts
    nothing, so it is padded) and the non-PAD `targets` exactly `stream[1:]`: summing
    `loss * loss_mask` scores every next-token prediction inside each document exactly once.
    """
    _check_sizes(batch_size, seq_len)
    documents = as_documents(documents)
    stream, pad = _Stream(documents, np.arange(len(documents.lengths)), specials), specials.pad
    num_rows = -(-(stream.length - 1) // seq_len)
    num_batches = -(-num_rows // batch_size)
    for k in range(num_batches):
        rows = range(k * batch_size, (k + 1) * batch_size)
        window = np.stack([stream.window(r * seq_len, seq_len + 1, fill=pad) if r < num_rows
                           else np.full(seq_len + 1, pad, stream.dtype) for r in rows])
        batch = batch_from_rows(window, specials)
        final = (batch["targets"] == pad) & (batch["tokens"] != pad)  # the stream's last EOS
        batch["tokens"][final], batch["segment_ids"][final], batch["positions"][final] = pad, 0, 0
        if getattr(documents, "has_modalities", False):
            batch["modality_ids"] = np.stack([stream.window_modalities(r * seq_len, seq_len) if r < num_rows
                                              else np.zeros(seq_len, np.int8) for r in rows]).astype(np.int32)
        yield batch
