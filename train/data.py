"""From `DataConfig` to batches: pick the source, encode with the tokenizer (data.tokenizer), pack rows.

Sources: the embedded Shakespeare plays (train/plays.py; whole plays held out for validation),
local .txt/.jsonl/.parquet files or synthetic text (train/corpus.py). With `data.modalities`, every
token also gets a modality id (train/modalities.py), packed beside it. Training batches come from a
deterministic, resumable `PackedBatches`; validation walks every held-out row once.

Every problem with the data files or data settings is a `corpus.DataError` (one line), raised here,
before any compute.
"""

import dataclasses
import itertools
from collections.abc import Iterator

import numpy as np

from hybrax.train import corpus, plays
from hybrax.train.config import DataConfig
from hybrax.train.packing import PackedBatches, evaluation_batches
from hybrax.train.shards import ShardDocuments
from hybrax.train.modalities import token_modalities
from hybrax.train.token_documents import InMemoryDocuments, TokenDocuments
from hybrax.train.tokenizer import Tokenizer, load_tokenizer


@dataclasses.dataclass
class Datasets:
    train: PackedBatches
    val_documents: list[np.ndarray] | TokenDocuments
    train_bytes: int              # UTF-8 bytes of the training text
    val_bytes: int
    tokenizer: Tokenizer


def documents(config: DataConfig, seed: int) -> tuple[list[str], list[str]]:
    """(train, validation) texts of a text source; validation is `data.val_path` when given."""
    if config.source == "shakespeare":
        return plays.shakespeare(config.val_plays)
    if config.source == "files" and config.val_path is not None:
        return (corpus.read_documents(config.path, text_field=config.text_field),
                corpus.read_documents(config.val_path, text_field=config.text_field))
    if config.source == "files":
        return corpus.local_files(config.path, text_field=config.text_field, val_fraction=config.val_fraction,
                                  seed=seed)
    if config.source == "prepared":
        raise corpus.DataError(f"data.path={config.path!r} is already prepared (token shards); it has no text to read")
    return corpus.synthetic(seed=seed)


def records(config: DataConfig, seed: int) -> tuple[list, list]:
    """`documents` as (text, modalities) pairs: int8 [characters] from `data.modalities`, or None."""
    if config.modalities == "none":
        return tuple([(text, None) for text in part] for part in documents(config, seed))
    if config.modalities == "script":
        texts, modalities = plays.shakespeare(config.val_plays), plays.shakespeare_modalities(config.val_plays)
        return tuple(list(zip(t, m)) for t, m in zip(texts, modalities))
    read = dict(text_field=config.text_field, modality_field=config.modality_field)   # modalities: field (files)
    if config.val_path is not None:
        return corpus.read_records(config.path, **read), corpus.read_records(config.val_path, **read)
    return corpus.local_files(config.path, val_fraction=config.val_fraction, seed=seed, **read)


def _source(config: DataConfig) -> str:
    return f"data.path={config.path!r}" if config.source in ("files", "prepared") else f"data.source={config.source!r}"


def _check_split(config: DataConfig, train_text: list[str], val_text: list[str]) -> None:
    """Both halves must hold a document: an empty validation set would only fail at the first eval."""
    if train_text and val_text:
        return
    if config.source == "shakespeare":
        raise corpus.DataError(f"data.val_plays={config.val_plays} holds out no play; name at least one for validation")
    count = len(train_text) + len(val_text)
    raise corpus.DataError(f"{_source(config)} holds {count} non-empty document(s); need at least 2, "
                           f"one of them held out for validation (data.val_fraction={config.val_fraction})")


def build_datasets(config: DataConfig, seed: int, row_range: tuple[int, int] | None = None,
                   modality_groups: int | None = None) -> Datasets:
    """Training batches (only rows `row_range` of each global batch when given: one process's share)
    and the validation documents. `modality_groups`: the model's number of modalities (MoMa's
    groups); a modality id outside it is a DataError."""
    tokenizer = load_tokenizer(config.tokenizer)
    if config.source == "prepared":
        return _prepared_datasets(config, seed, row_range, tokenizer)
    train_records, val_records = records(config, seed)
    train_text, val_text = [text for text, _ in train_records], [text for text, _ in val_records]
    _check_split(config, train_text, val_text)
    train_docs, val_docs = _encode(tokenizer, train_text), _encode(tokenizer, val_text)
    if config.modalities != "none":
        _check_modalities(config, train_records + val_records, modality_groups)
        lengths = tokenizer.byte_lengths()
        train_docs, val_docs = (
            InMemoryDocuments(docs, [token_modalities(ids, lengths, text, chars) for ids, (text, chars)
                                     in zip(docs, part)])
            for docs, part in ((train_docs, train_records), (val_docs, val_records)))
    try:
        train = PackedBatches(train_docs, batch_size=config.batch_size, seq_len=config.seq_len, seed=seed,
                              row_range=row_range, specials=tokenizer.specials)
    except corpus.DataError as error:   # say which data: "too few rows" depends on the files
        raise corpus.DataError(f"{_source(config)}: {error}") from None
    return Datasets(train, val_docs, sum(len(t.encode()) for t in train_text), sum(len(t.encode()) for t in val_text),
                    tokenizer)


def _check_modalities(config: DataConfig, records: list, groups: int | None) -> None:
    if groups is None:
        return
    highest = max(int(chars.max()) if len(chars) else 0 for _, chars in records)
    if highest >= groups:
        raise corpus.DataError(f"{_source(config)} has modality id {highest}, but the model has {groups} modality "
                               f"groups (model.moma.experts_per_modality); ids must be in [0, {groups - 1}]")


def _prepared_datasets(config: DataConfig, seed: int, row_range, tokenizer: Tokenizer) -> Datasets:
    """Token shards read as needed (train/shards.py): memory does not grow with the corpus."""
    train_docs = ShardDocuments(config.path, "train", tokenizer)
    val_docs = ShardDocuments(config.path, config.val_split, tokenizer)
    try:
        train = PackedBatches(train_docs, batch_size=config.batch_size, seq_len=config.seq_len, seed=seed,
                              row_range=row_range, specials=tokenizer.specials)
    except corpus.DataError as error:
        raise corpus.DataError(f"{_source(config)}: {error}") from None
    return Datasets(train, val_docs, train_docs.bytes, val_docs.bytes, tokenizer)


def _encode(tokenizer: Tokenizer, texts: list[str]) -> list[np.ndarray]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch is not None else [tokenizer.encode(t) for t in texts]


def validation_batches(datasets: Datasets, config: DataConfig, limit: int | None = None) -> Iterator[dict]:
    batches = evaluation_batches(datasets.val_documents, batch_size=config.batch_size, seq_len=config.seq_len,
                                 specials=datasets.tokenizer.specials)
    return batches if limit is None else itertools.islice(batches, limit)
