"""Data pipeline: byte tokenizer, corpora (Shakespeare, local files, synthetic), packing."""

from __future__ import annotations

import json
import re
import sys

import numpy as np
import pytest

from hybrax.train import corpus, plays
from hybrax.train.config import DataConfig
from hybrax.train.data import build_datasets
from hybrax.train.packing import PackedBatches, evaluation_batches
from hybrax.train.tokenizer import BOS, EOS, PAD, VOCAB_SIZE, ByteTokenizer

TOKENIZER = ByteTokenizer()


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_round_trips_non_ascii_text():
    text = "Ünïcödé — 日本語, emoji 🎭, and plain ASCII.\n"
    ids = TOKENIZER.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and ids.max() < 256
    assert TOKENIZER.decode(ids) == text
    framed = TOKENIZER.encode(text, bos=True, eos=True)
    assert framed[0] == BOS and framed[-1] == EOS and np.array_equal(framed[1:-1], ids)
    assert TOKENIZER.decode(np.concatenate([framed, [PAD, PAD]])) == text  # specials dropped
    assert (BOS, EOS, PAD, VOCAB_SIZE, TOKENIZER.vocab_size) == (256, 257, 258, 259, 259)


def test_tokenizer_decodes_broken_utf8_with_replacement():
    ids = TOKENIZER.encode("é")[:1]  # first byte of a two-byte character
    assert TOKENIZER.decode(ids) == "\ufffd"
    with pytest.raises(ValueError, match="300"):
        TOKENIZER.decode([65, 300])


# --- Shakespeare -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def split_plays():
    return plays.shakespeare()


def test_shakespeare_markup_is_stripped(split_plays):
    documents = split_plays[0] + split_plays[1]
    for document in documents:
        assert "**" not in document and "_" not in document and "*" not in document
        assert "\\" not in document and not re.search(r"^#", document, re.M)
        assert not re.search(r"[ \t]$", document, re.M)  # markdown's two-space line breaks
    hamlet = next(d for d in split_plays[1] if d.startswith("Hamlet\nACT I\nSCENE I. Elsinore"))
    assert "\nBERNARDO:\nWho's there?\n" in hamlet
    assert "\nEnter HORATIO and MARCELLUS\n" in hamlet  # was _Enter HORATIO and MARCELLUS_
    speaker_lines = sum(len(re.findall(r"^[A-Z][A-Za-z .,'-]*:$", d, re.M)) for d in documents)
    assert speaker_lines > 30_000


def test_shakespeare_modalities_mark_speech_against_the_script():
    """Every scene's text is parse_play's, and each character carries its modality: the header,
    speaker headings and stage directions (from the markup) are SCRIPT, spoken lines SPEECH."""
    path = plays._play_files()["hamlet"]
    markdown = open(path, encoding="utf-8").read()
    scenes = plays.parse_play_modalities(markdown)
    assert [text for text, _ in scenes] == plays.parse_play(markdown)
    text, kinds = scenes[0]
    assert len(kinds) == len(text) and kinds.dtype == np.int8

    def kind_of(fragment):
        start = text.index(fragment)
        return set(kinds[start: start + len(fragment)].tolist())
    assert kind_of("Hamlet\nACT I\nSCENE I. Elsinore") == {plays.SCRIPT}
    assert kind_of("BERNARDO:") == {plays.SCRIPT}
    assert kind_of("Enter HORATIO and MARCELLUS") == {plays.SCRIPT}    # was _Enter HORATIO and MARCELLUS_
    assert kind_of("Who's there?") == {plays.SPEECH}
    share = np.mean(np.concatenate([k for _, k in scenes]) == plays.SCRIPT)
    assert 0.05 < share < 0.3, share


def test_shakespeare_documents_are_scenes_with_headings(split_plays):
    for document in split_plays[0] + split_plays[1]:
        header = document.split("\n\n")[0].split("\n")
        assert len(header) >= 2, header  # title, then the act and/or scene lines
    scenes = [d for d in split_plays[1] if d.startswith("Hamlet\n")]
    assert len(scenes) == 20 and sum("\nSCENE " in d.split("\n\n")[0] for d in scenes) == 20


def test_shakespeare_split_holds_out_whole_plays(split_plays):
    train, val = split_plays
    line = "To be, or not to be: that is the question"
    assert any(line in d for d in val) and not any(line in d for d in train)
    train_titles = {d.split("\n")[0] for d in train}
    val_titles = {d.split("\n")[0] for d in val}
    assert val_titles == {"Hamlet", "The Tempest", "Twelfth Night"}
    assert not train_titles & val_titles
    assert len(train_titles | val_titles) == len(plays.play_names()) == 38
    everything, none = plays.shakespeare(val_plays=())
    assert none == [] and len(everything) == len(train) + len(val)
    val_bytes = sum(len(d) for d in val)
    assert 0.05 < val_bytes / (val_bytes + sum(len(d) for d in train)) < 0.12


# --- packing ---------------------------------------------------------------------------------


def random_documents(count: int = 40, seed: int = 0, max_length: int = 60) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, max_length, size=count)
    return [rng.integers(0, 256, size=n).astype(np.uint16) for n in lengths]


def stream_of(documents: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([np.concatenate([[BOS], d, [EOS]]) for d in documents]).astype(np.int32)


def check_batch_laws(batch: dict[str, np.ndarray]) -> None:
    tokens, targets = batch["tokens"], batch["targets"]
    segments, positions = batch["segment_ids"], batch["positions"]
    real = tokens != PAD
    next_real = real[:, 1:]  # padding ends a row early; the target before it may be the last EOS
    assert np.array_equal(targets[:, :-1][next_real], tokens[:, 1:][next_real])
    assert np.all(targets[:, :-1][~next_real & real[:, :-1]] == EOS)
    starts = tokens == BOS
    starts[:, 0] = True
    assert np.all(positions[starts & real] == 0)
    inside = ~starts[:, 1:] & real[:, 1:]  # continues the segment of the previous token
    assert np.array_equal(positions[:, 1:][inside], positions[:, :-1][inside] + 1)
    changes = segments[:, 1:] != segments[:, :-1]
    assert np.array_equal(changes & real[:, 1:], (tokens[:, 1:] == BOS) & real[:, 1:])
    assert np.all(segments[real] >= 1) and np.all(segments[~real] == 0)
    expected_mask = real & (targets != BOS) & (targets != PAD)
    assert np.array_equal(batch["loss_mask"], expected_mask.astype(np.float32))
    assert {k: (v.dtype, v.shape) for k, v in batch.items()} == {
        k: (np.dtype(np.float32 if k == "loss_mask" else np.int32), tokens.shape) for k in batch
    }


def test_packed_batches_obey_the_packing_laws():
    documents = random_documents()
    batches = PackedBatches(documents, batch_size=4, seq_len=16, seed=3)
    contents = [bytes(d.astype(np.uint8)) for d in documents]
    for _ in range(2 * batches.batches_per_epoch):
        batch = next(batches)
        check_batch_laws(batch)
        for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
            for s in np.unique(segments):  # each segment is a piece of one document
                piece = tokens[segments == s]
                piece = bytes(piece[(piece != BOS) & (piece != EOS)].astype(np.uint8))
                assert any(piece in c for c in contents)


def test_unshuffled_epoch_is_the_document_stream_in_order():
    documents = random_documents(count=30)
    batches = PackedBatches(documents, batch_size=3, seq_len=8, seed=0, shuffle=False)
    epoch = [next(batches) for _ in range(batches.batches_per_epoch)]
    stream = stream_of(documents)
    used = batches.batches_per_epoch * 3 * 8
    tokens = np.concatenate([b["tokens"].reshape(-1) for b in epoch])
    targets = np.concatenate([b["targets"].reshape(-1) for b in epoch])
    assert np.array_equal(tokens, stream[:used]) and np.array_equal(targets, stream[1 : used + 1])
    assert np.array_equal(next(batches)["tokens"], epoch[0]["tokens"])  # epoch 1 restarts cleanly


def test_determinism_and_seed_dependence():
    documents = random_documents()
    first = PackedBatches(documents, batch_size=4, seq_len=16, seed=7)
    second = PackedBatches(documents, batch_size=4, seq_len=16, seed=7)
    other = PackedBatches(documents, batch_size=4, seq_len=16, seed=8)
    for _ in range(10):
        a, b, c = next(first), next(second), next(other)
        assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["tokens"], c["tokens"])


def test_row_range_packs_one_hosts_rows_of_every_global_batch():
    documents = random_documents()
    whole = PackedBatches(documents, batch_size=4, seq_len=16, seed=3)
    halves = [PackedBatches(documents, batch_size=4, seq_len=16, seed=3, row_range=r) for r in ((0, 2), (2, 4))]
    for _ in range(12):   # crosses an epoch
        want = next(whole)
        got = [next(h) for h in halves]
        assert all(np.array_equal(np.concatenate([g[k] for g in got]), want[k]) for k in want)
    assert halves[1].state() == whole.state()
    with pytest.raises(ValueError, match=re.escape("row_range=(2, 5) must satisfy 0 <= start < stop <= batch_size=4")):
        PackedBatches(documents, batch_size=4, seq_len=16, seed=3, row_range=(2, 5))


@pytest.mark.parametrize("seq_len", [16, 64])  # 64: only 3 batches per epoch, resume crosses epochs
def test_resume_continues_exactly(seq_len):
    documents = random_documents()
    reference = PackedBatches(documents, batch_size=4, seq_len=seq_len, seed=1)
    expected = [next(reference) for _ in range(8)]
    interrupted = PackedBatches(documents, batch_size=4, seq_len=seq_len, seed=1)
    for _ in range(5):
        next(interrupted)
    state = json.loads(json.dumps(interrupted.state()))
    resumed = PackedBatches(documents, batch_size=4, seq_len=seq_len, seed=1)
    resumed.restore(state)
    for want in expected[5:8]:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


MISMATCH = "the checkpoint's data state does not match this config's data settings: "
FEWER_DOCUMENTS = random_documents()[:30]


@pytest.mark.parametrize("settings, state, reason", [
    ({"seq_len": 32}, None, "seq_len=16 in the checkpoint, seq_len=32 now (set by data.seq_len)"),
    ({"batch_size": 2}, None, "batch_size=4 in the checkpoint, batch_size=2 now (set by data.batch_size)"),
    ({"seed": 2}, None, "seed=1 in the checkpoint, seed=2 now (set by train.seed)"),
    ({"documents": FEWER_DOCUMENTS}, None, "rows_per_epoch=77 in the checkpoint, rows_per_epoch=62 now (set by "
                                           "the documents: data.source, data.path, data.val_fraction or the files)"),
    ({}, {"epoch": 0, "batch": 999}, "epoch=0 batch=999 is out of range; valid: epoch >= 0 and 0 <= batch < 19"),
    ({}, {"epoch": -1, "batch": 0}, "epoch=-1 batch=0 is out of range"),
    ({}, {"epoch": 0}, "it lacks 'batch' (it has ['epoch'])"),
    ({}, {}, "it lacks 'epoch' (it has [])"),
    ({}, [0, 3], "it is a list, expected a dict with 'epoch' and 'batch'"),
    ({}, "corrupted", "it is a str, expected a dict"),
    ({}, {"epoch": "0", "batch": 3}, "epoch='0' is a str, expected an int"),
    ({}, {"epoch": 0, "batch": 3, "seq_len": 16.0}, "seq_len=16.0 is a float, expected an int"),
    ({}, {"epoch": 0, "batch": None}, "batch=None is a NoneType, expected an int"),
    ({}, {"epoch": 0, "batch": True}, "batch=True is a bool, expected an int"),
])
def test_restore_rejects_a_mismatched_data_state(settings, state, reason):
    """Every mismatch, a malformed dict included, is one DataError line; the iterator is left as it was."""
    saved = PackedBatches(random_documents(), batch_size=4, seq_len=16, seed=1).state()
    state = json.loads(json.dumps(saved)) if state is None else state
    arguments = {"documents": random_documents(), "batch_size": 4, "seq_len": 16, "seed": 1} | settings
    batches = PackedBatches(arguments.pop("documents"), **arguments)
    before = batches.state()
    with pytest.raises(corpus.DataError) as caught:
        batches.restore(state)
    assert str(caught.value).startswith(MISMATCH) and reason in str(caught.value), str(caught.value)
    assert "\n" not in str(caught.value) and batches.state() == before


def test_packing_settings_are_data_errors():
    documents = random_documents()
    with pytest.raises(corpus.DataError, match="seed=-1 must be >= 0"):
        PackedBatches(documents, batch_size=4, seq_len=16, seed=-1)
    with pytest.raises(corpus.DataError, match="batch_size=0 and seq_len=16 must both be >= 1"):
        PackedBatches(documents, batch_size=0, seq_len=16, seed=0)
    with pytest.raises(corpus.DataError, match="documents is empty"):
        PackedBatches([], batch_size=4, seq_len=16, seed=0)


def test_epoch_rollover_reshuffles_and_never_mixes_epochs():
    documents = random_documents()
    batches = PackedBatches(documents, batch_size=5, seq_len=16, seed=2)
    per_epoch = batches.batches_per_epoch
    assert batches.rows_per_epoch % 5 != 0  # leftover rows exist and must be dropped
    epoch0 = [next(batches) for _ in range(per_epoch)]
    assert batches.state()["epoch"] == 1 and batches.state()["batch"] == 0
    epoch1 = [next(batches) for _ in range(per_epoch)]
    rows0 = {r.tobytes() for b in epoch0 for r in b["tokens"]}
    rows1 = {r.tobytes() for b in epoch1 for r in b["tokens"]}
    assert len(rows0) == per_epoch * 5  # each row of the epoch used at most once
    assert rows0 != rows1  # documents and rows are reshuffled
    stream = stream_of(documents)
    in_order = {stream[r * 16 : r * 16 + 16].tobytes() for r in range(batches.rows_per_epoch)}
    assert len(rows0 & in_order) < len(rows0) // 2  # documents were permuted, not only rows


def test_too_few_rows_for_a_batch_is_an_error():
    with pytest.raises(ValueError, match="batch_size=64"):
        PackedBatches(random_documents(count=2), batch_size=64, seq_len=32, seed=0)


@pytest.mark.parametrize("count", [25, 26])
def test_evaluation_batches_cover_the_stream_exactly_once(count):
    documents = random_documents(count=count, seed=5)
    stream = stream_of(documents)
    seq_len = 16
    if count == 26:  # make (L - 1) divisible by seq_len: no partial row at all
        extra = (-(len(stream) - 1)) % seq_len
        documents[-1] = np.concatenate([documents[-1], np.full(extra, 65, np.uint16)])
        stream = stream_of(documents)
        assert (len(stream) - 1) % seq_len == 0
    batches = list(evaluation_batches(documents, batch_size=3, seq_len=seq_len))
    assert len({b["tokens"].shape for b in batches}) == 1
    tokens = np.concatenate([b["tokens"].reshape(-1) for b in batches])
    targets = np.concatenate([b["targets"].reshape(-1) for b in batches])
    mask = np.concatenate([b["loss_mask"].reshape(-1) for b in batches])
    assert np.array_equal(tokens[tokens != PAD], stream[:-1])
    assert np.array_equal(targets[targets != PAD], stream[1:])
    assert mask.sum() == np.sum(stream[1:] != BOS) and np.all(mask[targets == PAD] == 0)
    for batch in batches:
        check_batch_laws(batch)
    again = list(evaluation_batches(documents, batch_size=3, seq_len=seq_len))
    assert all(np.array_equal(a[k], b[k]) for a, b in zip(batches, again, strict=True) for k in a)


def test_shakespeare_packs_end_to_end(split_plays):
    documents = [TOKENIZER.encode(d) for d in split_plays[1]]
    batch = next(PackedBatches(documents, batch_size=2, seq_len=128, seed=0))
    check_batch_laws(batch)
    for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
        for s in np.unique(segments):
            piece = tokens[segments == s]
            text = TOKENIZER.decode(piece[(piece != BOS) & (piece != EOS)])
            assert "\ufffd" in text or any(text in d for d in split_plays[1])  # cut mid-character


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
def test_modality_ids_travel_with_the_tokens(tokenizer, tmp_path):
    """data.modalities=script: training and validation batches carry modality_ids, each token the
    modality of the first byte it encodes (checked by decoding every maximal run of one modality:
    script runs hold speaker headings, spoken runs never do); the same batches after a restore."""
    if tokenizer == "bpe":
        pytest.importorskip("tokenizers")
        from hybrax.train.tokenizer import BPETokenizer
        tokenizer = str(tmp_path / "bpe.json")
        BPETokenizer.train(plays.shakespeare()[0][:200], 400).save(tokenizer)
    config = DataConfig(seq_len=128, batch_size=4, modalities="script", tokenizer=tokenizer)
    data = build_datasets(config, seed=0)
    decode = data.tokenizer.decode
    for batch in (next(data.train), next(evaluation_batches(data.val_documents, batch_size=4, seq_len=128,
                                                            specials=data.tokenizer.specials))):
        ids, kinds = batch["tokens"], batch["modality_ids"]
        assert kinds.shape == ids.shape and kinds.dtype == np.int32 and set(np.unique(kinds)) <= {0, 1}
        script = "".join(decode(ids[b][kinds[b] == 1]) for b in range(4))
        speech = "".join(decode(ids[b][kinds[b] == 0]) for b in range(4))
        assert re.search(r"^[A-Z][A-Z .'-]+:$", script, re.M) and not re.search(r"^[A-Z][A-Z .'-]+:$", speech, re.M)
        assert 0.02 < np.mean(kinds[batch["tokens"] != data.tokenizer.specials.pad]) < 0.5
    state = data.train.state()
    after = next(data.train)
    again = build_datasets(config, seed=0).train
    again.restore(state)
    np.testing.assert_array_equal(next(again)["modality_ids"], after["modality_ids"])


def test_modalities_need_a_source_that_marks_them(tmp_path):
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    with pytest.raises(ValueError, match="data.modalities='script' needs data.source='shakespeare' .source is 'files'"):
        DataConfig(source="files", path=str(tmp_path), modalities="script")
    with pytest.raises(ValueError, match="data.modalities='field' needs data.source='files' .source is 'shakespeare'"):
        DataConfig(modalities="field")


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def test_files_give_modalities_per_document_and_per_span(tmp_path):
    """data.modalities=field: a record's field is the document's modality id, or [start, end, id]
    character spans (0 elsewhere). Decoding the validation tokens of each modality gives back exactly
    the characters marked with it, multi-byte characters included; training batches carry them too."""
    text = "Plain words, then [a dïrection] and «a caption» to end."
    spans = [[text.index("["), text.index("]") + 1, 1], [text.index("«"), text.index("»") + 1, 2]]
    _write_jsonl(tmp_path / "val.jsonl", [{"text": text, "kind": spans}, {"text": "all of it is two", "kind": 2}])
    _write_jsonl(tmp_path / "train.jsonl", [{"text": f"train document {i} ü", "kind": i % 3} for i in range(40)])
    config = DataConfig(source="files", path=str(tmp_path / "train.jsonl"), val_path=str(tmp_path / "val.jsonl"),
                        modalities="field", modality_field="kind", seq_len=32, batch_size=4)
    data = build_datasets(config, seed=0, modality_groups=3)
    batch = next(evaluation_batches(data.val_documents, batch_size=4, seq_len=128, specials=data.tokenizer.specials))
    ids, kinds = batch["tokens"].reshape(-1), batch["modality_ids"].reshape(-1)
    decoded = {m: data.tokenizer.decode(ids[kinds == m]) for m in (1, 2)}
    assert decoded == {1: "[a dïrection]", 2: "«a caption»all of it is two"}
    train = next(data.train)   # byte tokens: token i is byte i of the row (specials as NUL)
    checked = 0
    for row, row_kinds in zip(train["tokens"], train["modality_ids"]):
        raw = bytes(int(t) if t < 256 else 0 for t in row)
        for match in re.finditer(rb"train document (\d+) ", raw):
            assert set(row_kinds[match.start():match.end()]) == {int(match.group(1)) % 3}
            checked += 1
    assert checked >= 2
    with pytest.raises(corpus.DataError, match=r"has modality id 2, but the model has 2 modality groups .*\[0, 1\]"):
        build_datasets(config, seed=0, modality_groups=2)


@pytest.mark.parametrize("record, message", [
    ({"text": "abc"}, r"a.jsonl:1 has no field modality_field='kind'; found \['text'\]"),
    ({"text": "abc", "kind": [[0, 4, 1]]}, r"a.jsonl:1 field modality_field='kind': span \[0, 4, 1\] must have "
                                           r"0 <= start < end <= 3"),
    ({"text": "abc", "kind": 200}, r"a.jsonl:1 field modality_field='kind': modality 200 must be an integer in "
                                   r"\[0, 127\]"),
    ({"text": "abc", "kind": True}, "modality True must be an integer"),
    ({"text": "abc", "kind": [[0, 1]]}, r"span \[0, 1\] must be \[start, end, modality\]"),
])
def test_a_bad_modality_field_is_one_line_naming_the_record(tmp_path, record, message):
    _write_jsonl(tmp_path / "a.jsonl", [record])
    with pytest.raises(corpus.DataError, match=message):
        corpus.read_records(tmp_path / "a.jsonl", modality_field="kind")


def test_plain_text_files_have_no_modality_field(tmp_path):
    (tmp_path / "a.txt").write_text("some text", encoding="utf-8")
    with pytest.raises(corpus.DataError, match="a.txt is plain text, with no field modality_field='kind'"):
        corpus.read_records(tmp_path, modality_field="kind")


def test_parquet_rows_give_modalities(tmp_path):
    pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    table = pyarrow.table({"text": ["abcd", "éf"], "kind": [[[1, 3, 1]], [[0, 1, 2]]]})
    parquet.write_table(table, tmp_path / "a.parquet")
    records = corpus.read_records(tmp_path / "a.parquet", modality_field="kind")
    assert [(t, m.tolist()) for t, m in records] == [("abcd", [0, 1, 1, 0]), ("éf", [2, 0])]
    with pytest.raises(corpus.DataError, match="has no column modality_field='modality'"):
        corpus.read_records(tmp_path / "a.parquet", modality_field="modality")


# --- local files and synthetic ---------------------------------------------------------------


def test_local_files_read_every_format_and_split_deterministically(tmp_path):
    pyarrow, parquet = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    (tmp_path / "nested").mkdir()
    (tmp_path / "a.txt").write_text("first text file\nwith two lines", encoding="utf-8")
    (tmp_path / "nested" / "b.txt").write_text("second text file", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored: not a data extension", encoding="utf-8")
    lines = [{"body": f"json document {i} é", "id": i} for i in range(10)] + [{"body": ""}]
    jsonl = "\n".join(json.dumps(r) for r in lines) + "\n\n"  # blank lines are skipped
    (tmp_path / "c.jsonl").write_text(jsonl, encoding="utf-8")
    rows = pyarrow.table({"body": [f"parquet row {i}" for i in range(8)]})
    parquet.write_table(rows, tmp_path / "d.parquet")
    for path in (tmp_path / "a.txt", tmp_path / "nested" / "b.txt"):  # a .txt file is one document
        assert corpus.local_files(str(path))[0] == [path.read_text(encoding="utf-8")]
    def split(seed: int) -> tuple[list[str], list[str]]:
        return corpus.local_files(str(tmp_path), text_field="body", val_fraction=0.2, seed=seed)

    train, val = split(0)
    documents = ["first text file\nwith two lines", "second text file"]
    documents += [f"json document {i} é" for i in range(10)]
    documents += [f"parquet row {i}" for i in range(8)]
    assert sorted(train + val) == sorted(documents) and len(val) == 4  # the empty one is dropped
    assert (train, val) == split(0) and val != split(1)[1]
    two = tmp_path / "two.jsonl"
    two.write_text('{"text": "x"}\n{"text": "y"}\n', encoding="utf-8")
    assert sorted(len(part) for part in corpus.local_files(str(two))) == [1, 1]


def _deny_open(monkeypatch):
    def deny(file, *args, **kwargs):
        raise PermissionError(13, "Permission denied", file)
    monkeypatch.setattr(corpus, "open", deny, raising=False)   # root can read any file: fake the refusal


def _hide_pyarrow(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)


# id: (files to create, the data path, local_files keyword arguments, expected message (regex), setup).
# A file's content is str or bytes, a dict is a parquet table, None a dangling symlink.
BAD_FILES = {
    "missing path": ({}, "no-such-dir", {}, r"data path '.*/no-such-dir' does not exist$", None),
    "unsupported extension": ({"data.csv": "a,b\n"}, "data.csv", {},
                              r"/data\.csv has unsupported extension '\.csv'; valid: \.txt, \.jsonl, \.parquet, \.arrow$", None),
    "no data files": ({"d/notes.md": "not data"}, "d", {},
                      r"^no \.txt, \.jsonl, \.parquet, \.arrow files under directory .*/d$", None),
    "empty txt": ({"a.txt": ""}, "a.txt", {}, r"^no non-empty documents in .*/a\.txt: the file is empty$", None),
    "only empty files": ({"d/a.txt": "", "d/b.jsonl": '\n{"text": ""}\n'}, "d", {},
                         r"^no non-empty documents in .*/d: all 2 files are empty or have only empty "
                         r"text_field='text' values$", None),
    "binary txt": ({"blob.txt": b"GIF89a\x01\x00\xff\xfe"}, "blob.txt", {},
                   r"/blob\.txt is not UTF-8 text \(byte b'\\xff' at offset 8\); convert it to UTF-8$", None),
    "latin-1 jsonl": ({"x.jsonl": '{"text": "ok"}\n{"text": "café"}\n'.encode("latin-1")}, "x.jsonl", {},
                      r"/x\.jsonl:2 is not UTF-8 text \(byte b'\\xe9' at offset 28\)", None),
    "malformed json": ({"bad.jsonl": '{"text": "ok"}\n{"text": oops}\n'}, "bad.jsonl", {},
                       r"/bad\.jsonl:2 is not valid JSON \(Expecting value at column 10\)$", None),
    "missing field": ({"records.jsonl": '{"content": "hello"}\n'}, "records.jsonl", {},
                      r"/records\.jsonl:1 has no field text_field='text'; found \['content'\]$", None),
    "field not a string": ({"n.jsonl": '{"text": "a"}\n{"text": 7}\n'}, "n.jsonl", {},
                           r"/n\.jsonl:2 field 'text' is int, expected a string$", None),
    "null field": ({"n.jsonl": '{"body": null}\n'}, "n.jsonl", {"text_field": "body"},
                   r"/n\.jsonl:1 field 'body' is null, expected a string$", None),
    "record not an object": ({"l.jsonl": '["text", "x"]\n'}, "l.jsonl", {},
                             r"/l\.jsonl:1 is a JSON list, expected an object with text_field='text'$", None),
    "parquet missing column": ({"rows.parquet": {"content": ["x"]}}, "rows.parquet", {},
                               r"/rows\.parquet has no column text_field='text'; columns are \['content'\]$", None),
    "parquet not strings": ({"rows.parquet": {"text": ["x", None]}}, "rows.parquet", {},
                            r"/rows\.parquet row 1 column 'text' is None, expected a string$", None),
    "corrupt parquet": ({"junk.parquet": b"this is not parquet"}, "junk.parquet", {},
                        r"^cannot read .*/junk\.parquet as parquet \(.+\)$", None),
    "parquet needs pyarrow": ({"rows.parquet": b"PAR1"}, "rows.parquet", {},
                              r"^reading .*/rows\.parquet needs pyarrow: pip install hybrax\[parquet\]$",
                              _hide_pyarrow),
    "dangling symlink": ({"d/a.txt": "fine", "d/gone.txt": None}, "d", {},
                         r"^cannot read .*/d/gone\.txt: No such file or directory$", None),
    "unreadable file": ({"secret.txt": "x"}, "secret.txt", {}, r"^cannot read .*/secret\.txt: Permission denied$",
                        _deny_open),
    "val_fraction out of range": ({"a.txt": "x"}, "a.txt", {"val_fraction": 1.0},
                                  r"^val_fraction=1\.0 must be in \[0, 1\)$", None),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=list(BAD_FILES))
def test_every_bad_data_file_is_one_data_error_line(case, tmp_path, monkeypatch):
    files, target, keywords, expected, setup = BAD_FILES[case]
    if case == "corrupt parquet":   # pyarrow's own message is part of the expected one
        pytest.importorskip("pyarrow.parquet")
    for name, content in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, dict):
            parquet = pytest.importorskip("pyarrow.parquet")
            parquet.write_table(pytest.importorskip("pyarrow").table(content), path)
        elif content is None:
            path.symlink_to(tmp_path / "nowhere")
        else:
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    if setup:
        setup(monkeypatch)
    with pytest.raises(corpus.DataError) as caught:
        corpus.local_files(str(tmp_path / target), **keywords)
    message = str(caught.value)
    assert "\n" not in message and re.search(expected, message), message
    assert isinstance(caught.value, ValueError)   # older `except ValueError` callers still catch it


def test_bad_data_settings_are_data_errors(tmp_path):
    with pytest.raises(corpus.DataError, match=r"'hamlett'.*the-tempest"):
        plays.shakespeare(val_plays=("hamlet", "hamlett"))
    with pytest.raises(corpus.DataError, match="val_plays holds out all 38 plays, leaving none to train on"):
        plays.shakespeare(val_plays=plays.play_names())
    with pytest.raises(corpus.DataError, match=r"^num_documents=0 must be >= 1$"):
        corpus.synthetic(num_documents=0)
    (tmp_path / "one.txt").write_text("a single document " * 40, encoding="utf-8")
    one = DataConfig(source="files", path=str(tmp_path / "one.txt"), batch_size=2, seq_len=8)
    with pytest.raises(corpus.DataError, match=r"one\.txt' holds 1 non-empty document\(s\); need at least 2, one of "
                                               r"them held out for validation \(data\.val_fraction=0\.05\)$"):
        build_datasets(one, seed=0)
    with pytest.raises(corpus.DataError, match=r"^data\.val_plays=\[\] holds out no play"):
        build_datasets(DataConfig(val_plays=[], batch_size=2, seq_len=8), seed=0)
    (tmp_path / "two.jsonl").write_text('{"text": "short"}\n{"text": "tiny"}\n', encoding="utf-8")
    small = DataConfig(source="files", path=str(tmp_path / "two.jsonl"), batch_size=4, seq_len=8)
    with pytest.raises(corpus.DataError, match=r"^data\.path='.*two\.jsonl': the documents pack into 0 rows of "
                                               r"seq_len=8 \(6 tokens\), fewer than batch_size=4"):
        build_datasets(small, seed=0)


def test_synthetic_is_deterministic_and_zipfian():
    train, val = corpus.synthetic(num_documents=200, seed=0)
    assert len(train) + len(val) == 200 and len(val) == 10
    assert (train, val) == corpus.synthetic(num_documents=200, seed=0)
    assert train != corpus.synthetic(num_documents=200, seed=1)[0]
    subjects = re.findall(r"the (\w+) \w+s the", " ".join(train))
    counts = np.sort(np.unique(subjects, return_counts=True)[1])[::-1]
    assert counts[0] > 5 * counts[20]  # p(rank) ~ 1/rank: rank 1 is ~21 times rank 21
