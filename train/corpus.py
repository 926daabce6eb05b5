"""Where text comes from, besides the Shakespeare plays (train/plays.py). Every source returns
`(train_documents, val_documents)`, lists of str (of (str, modalities) records with `modality_field`).

- `local_files`: `.txt` / `.jsonl` / `.parquet` files, whole documents split by a seeded shuffle.
- `synthetic`: generated text with learnable structure, for benchmarks and tests.

Every problem with the data files or data settings is a `DataError` with a one-line message naming
the file (and line or byte where there is one) and what would be valid, raised before any compute.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable

import numpy as np

from hybrax.train.modalities import field_modalities

LOCAL_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl", ".parquet", ".arrow")


class DataError(ValueError):
    """A problem with the data files or data settings, one line, naming the file or setting."""


# ---------------------------------------------------------------------------------------------
# Local files


def _split(documents: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """Deterministic split of whole documents; both halves keep the original order."""
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val_fraction={val_fraction} must be in [0, 1)")
    n = len(documents)
    num_val = 0
    if n >= 2 and val_fraction > 0:
        num_val = min(n - 1, max(1, round(n * val_fraction)))
    is_val = np.zeros(n, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n)[:num_val]] = True
    train = [d for d, v in zip(documents, is_val) if not v]
    val = [d for d, v in zip(documents, is_val) if v]
    return train, val


def _decode(data: bytes, where: str, offset: int = 0) -> str:
    """`data` as UTF-8; a DataError naming `where` and the file offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        byte = data[error.start : error.start + 1]
        raise DataError(f"{where} is not UTF-8 text (byte {byte!r} at offset {offset + error.start}); "
                        "convert it to UTF-8") from None


def _cannot_read(path: str, error: OSError) -> DataError:
    return DataError(f"cannot read {path}: {error.strerror or error}")


Record = tuple[str, "np.ndarray | None"]   # a document's text; with a modality field, its characters' modalities


def _modalities(record_value, text: str, where: str, modality_field: str) -> np.ndarray:
    try:
        return field_modalities(record_value, len(text))
    except ValueError as error:
        raise DataError(f"{where} field modality_field={modality_field!r}: {error}") from None


def _read_txt(path: str, modality_field: str | None) -> list[Record]:
    if modality_field is not None:
        raise DataError(f"{path} is plain text, with no field modality_field={modality_field!r}; give modality "
                        "ids in .jsonl or .parquet records, or set data.modalities=none")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise _cannot_read(path, error) from None
    return [(_decode(data, path), None)]


def _read_jsonl(path: str, text_field: str, modality_field: str | None) -> list[Record]:
    try:
        with open(path, "rb") as f:
            return _parse_jsonl(f, path, text_field, modality_field)
    except OSError as error:
        raise _cannot_read(path, error) from None


def _parse_jsonl(lines: Iterable[bytes], path: str, text_field: str, modality_field: str | None = None) -> list[Record]:
    documents, offset = [], 0
    for number, raw in enumerate(lines, start=1):
        where = f"{path}:{number}"
        line, offset = _decode(raw, where, offset), offset + len(raw)
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            reason = error.msg.removesuffix(" at")   # "Invalid control character at"
            raise DataError(f"{where} is not valid JSON ({reason} at column {error.colno})") from None
        field = f"text_field={text_field!r}"
        if not isinstance(record, dict):
            raise DataError(f"{where} is a JSON {type(record).__name__}, expected an object with {field}")
        for key, name in ((text_field, field), (modality_field, f"modality_field={modality_field!r}")):
            if key is not None and key not in record:
                raise DataError(f"{where} has no field {name}; found {sorted(record)}")
        value = record[text_field]
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise DataError(f"{where} field {text_field!r} is {kind}, expected a string")
        modalities = None if modality_field is None else _modalities(record[modality_field], value, where,
                                                                     modality_field)
        documents.append((value, modalities))
    return documents


def _read_parquet(path: str, text_field: str, modality_field: str | None) -> list[Record]:
    """A .parquet file, or a Hugging Face `save_to_disk` .arrow file (an Arrow IPC stream)."""
    kind = "arrow" if path.endswith(".arrow") else "parquet"
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install hybrax[parquet]") from None
    columns = [text_field] + ([modality_field] if modality_field is not None else [])
    try:
        table = pyarrow.ipc.open_stream(path).read_all() if kind == "arrow" else None
        names = table.schema.names if table is not None else pq.read_schema(path).names
        for column, key in zip(columns, ("text_field", "modality_field")):
            if column not in names:
                raise DataError(f"{path} has no column {key}={column!r}; columns are {names}")
        if table is None:
            table = pq.read_table(path, columns=columns)
        values = table.column(text_field).to_pylist()
        modalities = table.column(modality_field).to_pylist() if modality_field is not None else None
    except (pyarrow.ArrowException, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot read {path} as {kind} ({reason})") from None
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"{path} row {bad} column {text_field!r} is {values[bad]!r}, expected a string")
    if modalities is None:
        return [(v, None) for v in values]
    return [(v, _modalities(m, v, f"{path} row {i}", modality_field))
            for i, (v, m) in enumerate(zip(values, modalities))]


def _walk_error(error: OSError) -> None:
    raise DataError(f"cannot list {error.filename}: {error.strerror or error}")


def _find_files(path: str) -> list[str]:
    valid = ", ".join(LOCAL_EXTENSIONS)
    if not os.path.exists(path):
        raise DataError(f"data path {path!r} does not exist")
    if os.path.isfile(path):
        if not path.endswith(LOCAL_EXTENSIONS):
            extension = os.path.splitext(path)[1] or "none"
            raise DataError(f"{path} has unsupported extension {extension!r}; valid: {valid}")
        return [path]
    if not os.path.isdir(path):
        raise DataError(f"data path {path} is neither a file nor a directory")
    files = sorted(
        os.path.join(dirpath, name)
        for dirpath, _, names in os.walk(path, onerror=_walk_error)
        for name in names
        if name.endswith(LOCAL_EXTENSIONS)
    )
    if not files:
        raise DataError(f"no {valid} files under directory {path}")
    return files


def local_files(path: str | os.PathLike, *, text_field: str = "text", val_fraction: float = 0.05, seed: int = 0,
                modality_field: str | None = None) -> tuple[list, list]:
    """Documents from a file or a directory (`read_documents`), split into (train, validation) by
    whole documents, with a shuffle seeded with `seed`; with two or more documents and
    `val_fraction > 0`, validation gets at least one and train keeps at least one. With
    `modality_field`, the documents are `read_records`' (text, modalities) pairs.
    """
    if modality_field is None:
        return _split(read_documents(path, text_field=text_field), val_fraction, seed)
    return _split(read_records(path, text_field=text_field, modality_field=modality_field), val_fraction, seed)


def read_documents(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """Documents from a file or a directory (recursively all .txt, .jsonl, .parquet, .arrow, sorted).

    `.txt`: the whole file is one document. `.jsonl`: one document per line, the string at
    `text_field`. `.parquet`, and `.arrow` (a Hugging Face dataset's `save_to_disk` files): one
    document per row of column `text_field`. Empty documents are dropped. Every problem with a
    file is a `DataError` naming it.
    """
    return [text for text, _ in read_records(path, text_field=text_field)]


def read_records(path: str | os.PathLike, *, text_field: str = "text", modality_field: str | None = None
                 ) -> list[Record]:
    """`read_documents`' documents as (text, modalities) pairs. With `modality_field`, every .jsonl
    record and .parquet row must carry that field: an integer (the document's modality) or a list of
    character spans [start, end, modality] (modalities.field_modalities), read into int8 [len(text)];
    .txt files have no fields and are an error. Without it, modalities is None."""
    path = os.fspath(path)
    documents = []
    files = _find_files(path)
    for file in files:
        if file.endswith(".txt"):
            found = _read_txt(file, modality_field)
        elif file.endswith(".jsonl"):
            found = _read_jsonl(file, text_field, modality_field)
        else:
            found = _read_parquet(file, text_field, modality_field)
        documents.extend(d for d in found if d[0])
    if not documents:
        field = f"text_field={text_field!r}"
        if files == [path]:
            what = "the file is empty" if path.endswith(".txt") else f"the file has no non-empty {field} value"
        else:
            what = f"all {len(files)} files are empty"
            if not all(file.endswith(".txt") for file in files):
                what += f" or have only empty {field} values"
        raise DataError(f"no non-empty documents in {path}: {what}")
    return documents


# ---------------------------------------------------------------------------------------------
# Synthetic

_SYLLABLES = ("ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "de", "po", "zu", "fa")
_NUMBERS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")


def _zipf_words(rng: np.random.Generator, count: int) -> list[str]:
    words = set()
    while len(words) < count:
        words.add("".join(rng.choice(_SYLLABLES, size=rng.integers(1, 4))))
    return sorted(words, key=lambda w: (len(w), w))


def synthetic(num_documents: int = 2000, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic generated documents (about 350 bytes each), 5% held out for validation.

    Structure a model can learn, at several ranges: nouns and verbs drawn from Zipf laws
    (p(rank r) ~ 1/r) over small fixed vocabularies, a fixed sentence grammar
    (`the NOUN VERBs the NOUN .`), counting runs (`three four five six`), and a per-document
    refrain repeated after every paragraph (copying from context).
    """
    if num_documents < 1:
        raise DataError(f"num_documents={num_documents} must be >= 1")
    vocab_rng = np.random.default_rng(12345)  # the vocabulary is the same for every seed
    nouns, verbs = _zipf_words(vocab_rng, 96), _zipf_words(vocab_rng, 32)
    noun_cdf = np.cumsum(1.0 / np.arange(1, len(nouns) + 1))
    verb_cdf = np.cumsum(1.0 / np.arange(1, len(verbs) + 1))
    rng = np.random.default_rng(seed)
    documents = []
    for index in range(num_documents):
        # 16 sentences at most (4 paragraphs x 4); draw all words at once, use what is needed.
        subjects = np.searchsorted(noun_cdf, rng.random(16) * noun_cdf[-1])
        objects = np.searchsorted(noun_cdf, rng.random(16) * noun_cdf[-1])
        actions = np.searchsorted(verb_cdf, rng.random(16) * verb_cdf[-1])
        lengths = rng.integers(2, 5, size=4)[: rng.integers(2, 5)]
        counts = rng.integers(0, 6, size=4), rng.integers(3, 5, size=4)
        refrain = " ".join(nouns[i] for i in rng.integers(0, len(nouns), size=4))
        paragraphs, used = [], 0
        for p, length in enumerate(lengths):
            sentences = [
                f"the {nouns[subjects[i]]} {verbs[actions[i]]}s the {nouns[objects[i]]}."
                for i in range(used, used + length)
            ]
            used += length
            start = counts[0][p]
            sentences.append(" ".join(_NUMBERS[start : start + counts[1][p]]) + ".")
            paragraphs.append(" ".join(sentences) + f"\n{refrain}!")
        documents.append(f"document {index}\n\n" + "\n\n".join(paragraphs) + "\n")
    return _split(documents, 0.05, seed)
