"""Prepared token shards: the same batches as the text they came from (train and validation, bytes
and BPE), disjoint rows per process that together make the global batch, exact resume, memory that
does not hold the corpus, Hugging Face `.arrow` files and a named validation split, and a one-line
error for every way a prepared directory can be wrong."""

import hashlib
import json
import os
import pathlib

import numpy as np
import pytest

from hybrax.train import plays
from hybrax.train.config import ConfigError, DataConfig, build_config
from hybrax.train.corpus import DataError
from hybrax.train.data import build_datasets, documents, validation_batches
from hybrax.train.shards import ShardDocuments, write_prepared
from hybrax.train.tokenizer import BPETokenizer, ByteTokenizer, load_tokenizer


def digest(batches) -> str:
    h = hashlib.sha256()
    for batch in batches:
        for key in sorted(batch):
            h.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
    return h.hexdigest()


def prepare(config: DataConfig, out: pathlib.Path, shard_tokens: int = 300_000) -> dict:
    train, val = documents(config, 0)
    return write_prepared(out, {"train": train, "val": val}, load_tokenizer(config.tokenizer), shard_tokens=shard_tokens)


@pytest.fixture(scope="module")
def bpe_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    BPETokenizer.train(plays.shakespeare()[0], 512).save(path)
    return str(path)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_prepared_shards_give_the_batches_of_the_text(tmp_path, bpe_path, kind):
    text = DataConfig(seq_len=64, batch_size=8, tokenizer="bytes" if kind == "bytes" else bpe_path)
    manifest = prepare(text, tmp_path / "prepared")
    assert len(manifest["splits"]["train"]["shards"]) > 1   # documents spread over several files
    prepared = text.model_copy(update={"source": "prepared", "path": str(tmp_path / "prepared")})
    a, b = build_datasets(text, 0), build_datasets(prepared, 0)
    assert (a.train_bytes, a.val_bytes) == (b.train_bytes, b.val_bytes)
    assert digest(next(a.train) for _ in range(5)) == digest(next(b.train) for _ in range(5))
    assert digest(validation_batches(a, text)) == digest(validation_batches(b, prepared))


def test_each_process_reads_its_rows_and_together_they_are_the_batch(tmp_path):
    text = DataConfig(seq_len=32, batch_size=8)
    prepare(text, tmp_path / "prepared")
    prepared = text.model_copy(update={"source": "prepared", "path": str(tmp_path / "prepared")})
    whole = build_datasets(prepared, 3).train
    halves = [build_datasets(prepared, 3, row_range=r).train for r in [(0, 4), (4, 8)]]
    for _ in range(4):
        full, first, second = next(whole), next(halves[0]), next(halves[1])
        for key in full:
            assert np.array_equal(full[key], np.concatenate([first[key], second[key]]))


def test_resume_from_a_saved_position_continues_exactly(tmp_path):
    text = DataConfig(seq_len=32, batch_size=4)
    prepare(text, tmp_path / "prepared")
    prepared = text.model_copy(update={"source": "prepared", "path": str(tmp_path / "prepared")})
    run = build_datasets(prepared, 1).train
    for _ in range(7):
        next(run)
    state = run.state()
    expected = digest(next(run) for _ in range(5))
    resumed = build_datasets(prepared, 1).train
    resumed.restore(state)
    assert digest(next(resumed) for _ in range(5)) == expected


def test_the_corpus_is_read_in_pieces_not_held(tmp_path):
    """The reader holds the document lengths and one file handle per shard, never the tokens."""
    text = DataConfig(seq_len=64, batch_size=8)
    manifest = prepare(text, tmp_path / "prepared")
    documents_ = ShardDocuments(tmp_path / "prepared", "train", ByteTokenizer())
    held = sum(v.nbytes for v in vars(documents_).values() if isinstance(v, np.ndarray))
    assert held < 0.01 * manifest["splits"]["train"]["tokens"] * 2
    assert ByteTokenizer().decode(documents_.read(0, 0, 50)) == documents(text, 0)[0][0][:50]


def _bad_prepared(tmp_path, bpe_path) -> dict:
    text = DataConfig(seq_len=32, batch_size=4)
    good = tmp_path / "good"
    prepare(text, good, shard_tokens=10**9)
    cases = {}
    cases["not prepared"] = (DataConfig(source="prepared", path=str(tmp_path)), "is not a prepared corpus")
    cases["another tokenizer"] = (DataConfig(source="prepared", path=str(good), tokenizer=bpe_path),
                                  "was prepared with tokenizer bytes, but data.tokenizer is bpe-")
    cases["missing split"] = (DataConfig(source="prepared", path=str(good), val_split="test"),
                              "has no split 'test'; it has ['train', 'val']")
    truncated = tmp_path / "truncated"
    prepare(text, truncated, shard_tokens=10**9)
    os.truncate(truncated / "train-00000.bin", 1000)
    cases["truncated shard"] = (DataConfig(source="prepared", path=str(truncated)),
                                "train-00000.bin is 1000 bytes; manifest.json says")
    lengths = tmp_path / "lengths"
    prepare(text, lengths, shard_tokens=10**9)
    np.save(lengths / "train.lengths.npy", np.load(lengths / "train.lengths.npy")[:-1])
    cases["lengths disagree"] = (DataConfig(source="prepared", path=str(lengths)), "does not match manifest.json")
    future = tmp_path / "future"
    prepare(text, future, shard_tokens=10**9)
    manifest = json.loads((future / "manifest.json").read_text())
    (future / "manifest.json").write_text(json.dumps({**manifest, "format": 99}))
    cases["other format"] = (DataConfig(source="prepared", path=str(future)), "has format 99")
    return cases


def test_every_bad_prepared_directory_is_one_data_error(tmp_path, bpe_path):
    for name, (config, message) in _bad_prepared(tmp_path, bpe_path).items():
        with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")) as error:
            build_datasets(config, 0)
        assert "\n" not in str(error.value), name
    with pytest.raises(DataError, match="already exists; prepare into a new directory"):
        prepare(DataConfig(), tmp_path / "good")
    with pytest.raises(DataError, match="is already prepared"):
        documents(DataConfig(source="prepared", path=str(tmp_path / "good")), 0)


def test_a_named_validation_split_and_hugging_face_arrow_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.ipc

    for split, texts in {"train": ["one two three " * 40] * 6, "validation": ["four five " * 30] * 2}.items():
        folder = tmp_path / "dataset" / split   # the layout of DatasetDict.save_to_disk
        folder.mkdir(parents=True)
        table = pa.table({"text": texts, "id": list(range(len(texts)))})
        with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
            with pyarrow.ipc.new_stream(sink, table.schema) as writer:
                writer.write_table(table)
        (folder / "dataset_info.json").write_text("{}")
    config = DataConfig(source="files", path=str(tmp_path / "dataset" / "train"),
                        val_path=str(tmp_path / "dataset" / "validation"), seq_len=16, batch_size=2)
    train, val = documents(config, 0)
    assert train == ["one two three " * 40] * 6 and val == ["four five " * 30] * 2
    assert build_datasets(config, 0).val_bytes == 2 * len("four five " * 30)
    with pytest.raises(ConfigError, match="data.val_path='/nope' does not exist"):
        build_config({"data": {"source": "files", "path": str(tmp_path), "val_path": "/nope"}})
    with pytest.raises(ConfigError, match="data.val_path is for data.source='files'"):
        build_config({"data": {"val_path": str(tmp_path)}})
