"""Prepared token shards: a corpus tokenized once (`hybrax-data prepare`), read while training without
holding it in memory.

A prepared directory holds, per split (`train`, `val`):

    <split>-00000.bin ...    the documents' token ids back to back, in the tokenizer's id dtype;
                             a document never straddles two files
    <split>.lengths.npy      int64 [documents]: tokens per document (the boundaries)
    manifest.json            format, tokenizer fingerprint and vocabulary size, id dtype, and per
                             split: documents, tokens, UTF-8 bytes, and each file's tokens and size

`ShardDocuments` reads document slices with `os.pread` into small buffers (not a memory map, whose
touched pages would count as the process's resident memory), so a run's memory does not grow with
the corpus and each process reads only the rows it trains on. Everything a run could get wrong
(no manifest, another tokenizer, a missing split, a truncated file) is one DataError line.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Iterable

import numpy as np

from hybrax.train.corpus import DataError
from hybrax.train.tokenizer import Tokenizer

FORMAT = 1
MANIFEST = "manifest.json"


class ShardWriter:
    """Appends the documents of one split to `<split>-NNNNN.bin` files of about `shard_tokens` tokens."""

    def __init__(self, directory: pathlib.Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, np.dtype(dtype), shard_tokens
        self.lengths: list[int] = []
        self.shards: list[dict] = []
        self.bytes = 0
        self._file = None

    def add(self, ids: np.ndarray, text_bytes: int) -> None:
        if self._file is None or self.shards[-1]["tokens"] >= self.shard_tokens:
            self._open_next()
        data = np.ascontiguousarray(ids, dtype=self.dtype)
        self._file.write(data.tobytes())
        self.shards[-1]["tokens"] += len(data)
        self.shards[-1]["documents"] += 1
        self.lengths.append(len(data))
        self.bytes += text_bytes

    def _open_next(self) -> None:
        if self._file is not None:
            self._file.close()
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._file = open(self.directory / name, "wb")
        self.shards.append({"file": name, "tokens": 0, "documents": 0})

    def close(self) -> dict:
        if self._file is not None:
            self._file.close()
        np.save(self.directory / f"{self.split}.lengths.npy", np.asarray(self.lengths, np.int64))
        for shard in self.shards:
            shard["size"] = (self.directory / shard["file"]).stat().st_size
        return {"documents": len(self.lengths), "tokens": int(sum(self.lengths)), "bytes": self.bytes,
                "shards": self.shards}


def write_prepared(out: pathlib.Path, splits: dict[str, Iterable[str]], tokenizer: Tokenizer, *,
                   shard_tokens: int = 2**28, source: str = "", batch: int = 256, progress=None) -> dict:
    """Tokenizes each split's texts into `out` (written in a temporary folder, then renamed, so a
    failed or killed prepare leaves nothing half-made); returns the manifest. `progress(n_bytes)` is
    called as text is consumed."""
    out = pathlib.Path(out)
    if out.exists():
        raise DataError(f"{out} already exists; prepare into a new directory (or delete it first)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    dtype = np.dtype(getattr(tokenizer, "dtype", None) or tokenizer.encode("").dtype)
    manifest = {"format": FORMAT, "tokenizer": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size,
                "dtype": dtype.name, "source": source, "splits": {}}
    for split, texts in splits.items():
        writer = ShardWriter(tmp, split, dtype, shard_tokens)
        pending: list[str] = []
        for text in texts:
            pending.append(text)
            if len(pending) == batch:
                _encode_into(writer, tokenizer, pending, progress)
                pending = []
        _encode_into(writer, tokenizer, pending, progress)
        manifest["splits"][split] = writer.close()
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    os.replace(tmp, out)
    return manifest


def _encode_into(writer: ShardWriter, tokenizer: Tokenizer, texts: list[str], progress) -> None:
    encode_batch = getattr(tokenizer, "encode_batch", None)
    encoded = encode_batch(texts) if encode_batch is not None else [tokenizer.encode(t) for t in texts]
    for text, ids in zip(texts, encoded):
        size = len(text.encode("utf-8"))
        writer.add(ids, size)
        if progress is not None:
            progress(size)


def read_manifest(directory: str | pathlib.Path) -> dict:
    path = pathlib.Path(directory) / MANIFEST
    if not path.is_file():
        raise DataError(f"{directory} is not a prepared corpus (no {MANIFEST}); make one with hybrax-data prepare")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}; this hybrax reads format {FORMAT}")
    return manifest


class ShardDocuments:
    """One split of a prepared corpus, as `TokenDocuments` (train/token_documents.py)."""

    def __init__(self, directory: str | pathlib.Path, split: str, tokenizer: Tokenizer):
        directory = pathlib.Path(directory)
        manifest = read_manifest(directory)
        if manifest["tokenizer"] != tokenizer.fingerprint:
            raise DataError(f"{directory} was prepared with tokenizer {manifest['tokenizer']}, but data.tokenizer is "
                            f"{tokenizer.fingerprint}; prepare it again with this tokenizer or name the one it used")
        if split not in manifest["splits"]:
            raise DataError(f"{directory} has no split {split!r}; it has {sorted(manifest['splits'])}")
        info = manifest["splits"][split]
        self.dtype = np.dtype(manifest["dtype"])
        self.lengths = np.load(directory / f"{split}.lengths.npy")
        if len(self.lengths) != info["documents"] or int(self.lengths.sum()) != info["tokens"]:
            raise DataError(f"{directory / (split + '.lengths.npy')} does not match {MANIFEST} "
                            f"({len(self.lengths)} documents, {int(self.lengths.sum())} tokens; the manifest says "
                            f"{info['documents']} and {info['tokens']})")
        self.bytes = int(info["bytes"])
        self._files, first_documents, offsets = [], [], []
        document = 0
        for shard in info["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["size"]:
                size = path.stat().st_size if path.is_file() else "missing"
                raise DataError(f"{path} is {size} bytes; {MANIFEST} says {shard['size']} (damaged or truncated)")
            self._files.append(os.open(path, os.O_RDONLY))
            lengths = self.lengths[document: document + shard["documents"]]
            first_documents.append(document)
            offsets.append(np.concatenate([[0], np.cumsum(lengths)]))
            document += shard["documents"]
        self._first_documents = np.asarray(first_documents)
        self._offsets = offsets

    def read(self, index: int, start: int, stop: int) -> np.ndarray:
        shard = int(np.searchsorted(self._first_documents, index, side="right")) - 1
        begin = int(self._offsets[shard][index - self._first_documents[shard]]) + start
        count, size = stop - start, self.dtype.itemsize
        data = os.pread(self._files[shard], count * size, begin * size)
        return np.frombuffer(data, self.dtype, count=count)

    def close(self) -> None:
        for fd in getattr(self, "_files", []):   # empty when __init__ failed before opening any
            os.close(fd)
        self._files = []

    def __del__(self):
        self.close()
