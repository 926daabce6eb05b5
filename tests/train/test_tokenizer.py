"""Tokenizers: the interface both implement, byte-level BPE trained on the training plays (exact
round trips, byte lengths that sum to the UTF-8 size), bits per byte that compare across
tokenizers, the model's vocabulary following the tokenizer, and one-line errors."""

import hashlib
import json
import math
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from hybrax.train import plays
from hybrax.train.config import ConfigError, DataConfig, build_config
from hybrax.train.data import build_datasets, validation_batches
from hybrax.train.optim import make_optimizer
from hybrax.train.packing import evaluation_batches
from hybrax.train.step import create_model, init_state, make_eval_step, summarize_eval, token_losses
from hybrax.train.tokenizer import BPETokenizer, ByteTokenizer, Tokenizer, id_dtype, load_tokenizer

ROOT = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split_plays():
    return plays.shakespeare()


@pytest.fixture(scope="module")
def bpe(split_plays, tmp_path_factory):
    """Trained on the training plays only; saved, so configs can name it."""
    tokenizer = BPETokenizer.train(split_plays[0], 1024)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(path)
    return tokenizer, path


def test_both_tokenizers_implement_the_interface(bpe):
    for tokenizer in (ByteTokenizer(), bpe[0]):
        assert isinstance(tokenizer, Tokenizer)
        assert tokenizer.byte_lengths().shape == (tokenizer.vocab_size,)
        specials = [tokenizer.specials.bos, tokenizer.specials.eos, tokenizer.specials.pad]
        assert len(set(specials)) == 3 and all(tokenizer.byte_lengths()[s] == 0 for s in specials)
    assert (bpe[0].specials.bos, bpe[0].specials.eos, bpe[0].specials.pad, bpe[0].vocab_size) == (0, 1, 2, 1024)


@pytest.mark.parametrize("vocab,dtype", [(256, np.uint8), (257, np.uint16), (65536, np.uint16), (65537, np.uint32)])
def test_ids_use_the_smallest_type_that_holds_them(vocab, dtype):
    assert id_dtype(vocab) == dtype


def test_bpe_round_trips_every_play_and_its_bytes_add_up(split_plays, bpe):
    tokenizer, _ = bpe
    lengths = tokenizer.byte_lengths()
    documents = split_plays[0] + split_plays[1]
    for text, ids in zip(documents, tokenizer.encode_batch(documents)):
        assert ids.dtype == np.uint16 and tokenizer.decode(ids) == text
        assert int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert np.array_equal(tokenizer.encode(documents[0]), tokenizer.encode_batch(documents[:1])[0])
    odd = "Ünïcödé — 日本語 🎭 \x00\t tabs  and  spaces\n"
    framed = tokenizer.encode(odd, bos=True, eos=True)
    assert framed[0] == 0 and framed[-1] == 1 and tokenizer.decode(framed) == odd
    words = sum(len(t.encode()) for t in documents) / sum(len(tokenizer.encode(t)) for t in documents)
    assert words > 2.0   # merges happened: more than two bytes per token on these plays


def test_a_saved_tokenizer_loads_with_the_same_fingerprint_and_ids(split_plays, bpe):
    tokenizer, path = bpe
    loaded = load_tokenizer(str(path))
    assert loaded.fingerprint == tokenizer.fingerprint and loaded.fingerprint.startswith("bpe-")
    assert np.array_equal(loaded.encode(split_plays[1][0]), tokenizer.encode(split_plays[1][0]))
    assert load_tokenizer("bytes").fingerprint == "bytes"


def test_bad_tokenizers_are_one_line_errors(tmp_path):
    (tmp_path / "broken.json").write_text("{not json")
    from tokenizers import Tokenizer as Raw, models
    Raw(models.BPE()).save(str(tmp_path / "nospecials.json"))
    cases = {"missing.json": "neither 'bytes' nor an existing tokenizer.json",
             "broken.json": "cannot be loaded", "nospecials.json": "lacks the special tokens"}
    for name, message in cases.items():
        with pytest.raises(ValueError, match=message) as error:
            load_tokenizer(str(tmp_path / name))
        assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="vocab_size=100 must be >= 259"):
        BPETokenizer.train(["x"], 100)


def test_the_model_vocabulary_follows_the_tokenizer(bpe):
    _, path = bpe
    assert build_config({"data": {"tokenizer": str(path)}}).model.vocab_size == 1024
    assert build_config({"data": {"tokenizer": str(path)}, "model": {"vocab_size": 1152}}).model.vocab_size == 1152
    assert build_config({}).model.vocab_size == 259
    for tree, message in [({"data": {"tokenizer": str(path)}, "model": {"vocab_size": 512}},
                           "model.vocab_size=512 is smaller than data.tokenizer's 1024 tokens"),
                          ({"model": {"vocab_size": 200}}, "model.vocab_size=200 is smaller than data.tokenizer's 259"),
                          ({"data": {"tokenizer": "nope.json"}}, "data.tokenizer='nope.json' is neither")]:
        with pytest.raises(ConfigError, match=message):
            build_config(tree)


def test_byte_batches_are_unchanged():
    """The digest of the byte pipeline's first train and validation batches, taken before the
    tokenizer interface existed (commit f74698d)."""
    for config, seed, expected in [(DataConfig(seq_len=64, batch_size=8), 0, "8fe46b33fe7775f0"),
                                   (DataConfig(source="synthetic", seq_len=32, batch_size=4), 3, "9a2232e2e19064c6")]:
        data = build_datasets(config, seed)
        h = hashlib.sha256()
        for batch in [next(data.train) for _ in range(3)] + list(validation_batches(data, config, 2)):
            for key in sorted(batch):
                h.update(key.encode() + np.ascontiguousarray(batch[key]).tobytes())
        assert h.hexdigest()[:16] == expected


@pytest.mark.parametrize("kind", [pytest.param("bytes", marks=pytest.mark.slow), "bpe"])
def test_bits_per_byte_count_every_byte_of_the_evaluated_text_once(split_plays, bpe, kind):
    """Over the validation batches the byte count is the UTF-8 size of the held-out text, and val_bpb
    is the text tokens' nats over those bytes, in bits."""
    tokenizer = ByteTokenizer() if kind == "bytes" else bpe[0]
    texts = split_plays[1][:3]
    documents = [tokenizer.encode(t) for t in texts]
    config = build_config({"model": {"d_model": 32, "num_layers": 1, "num_heads": 2,
                                     "vocab_size": tokenizer.vocab_size}})
    graphdef, state = init_state(create_model(config.model, 0), make_optimizer(config.optim, 10))
    eval_step = make_eval_step(graphdef, tokenizer.byte_lengths())
    sums = {"nll": 0.0, "tokens": 0.0, "byte_nll": 0.0, "bytes": 0.0}
    text_nll = 0.0
    for batch in evaluation_batches(documents, batch_size=2, seq_len=64, specials=tokenizer.specials):
        out = jax.device_get(eval_step(state.params, state.model_state, batch))
        for key in sums:
            sums[key] += float(out[key])
        nll = np.asarray(token_losses(graphdef, state.params, state.model_state, batch))
        is_text = (batch["loss_mask"] > 0) & (tokenizer.byte_lengths()[batch["targets"]] > 0)
        text_nll += float((nll * is_text).sum())
    assert sums["bytes"] == sum(len(t.encode("utf-8")) for t in texts)
    assert sums["byte_nll"] == pytest.approx(text_nll, rel=1e-5)
    assert summarize_eval(sums)["val_bpb"] == pytest.approx(text_nll / sums["bytes"] / math.log(2), rel=1e-5)


@pytest.mark.slow
def test_cli_trains_a_tokenizer_on_the_training_plays_only(tmp_path):
    out = tmp_path / "tok.json"
    result = subprocess.run([sys.executable, "-m", "hybrax.train.tokenizer", "train", "--config", "quickstart.yaml",
                             "--vocab-size", "512", "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "round trip exact for 737/737" in result.stdout and "round trip exact for 46/46" in result.stdout
    assert json.loads(out.read_text())["model"]["type"] == "BPE" and load_tokenizer(str(out)).vocab_size == 512
    bad = subprocess.run([sys.executable, "-m", "hybrax.train.tokenizer", "train", "--config", "quickstart.yaml",
                          "--vocab-size", "10", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == \
        "error: vocab_size=10 must be >= 259 (256 bytes + 3 specials)"


def test_the_shipped_bpe_round_trips_every_play_and_was_trained_on_the_training_plays(split_plays, tmp_path, monkeypatch):
    """configs/quickstart_bpe.yaml's tokenizer, found by name from any folder; retraining it on the
    training plays gives the same vocabulary (the tokenizers library trains deterministically)."""
    monkeypatch.chdir(tmp_path)
    shipped = load_tokenizer("shakespeare_bpe2048.json")
    lengths = shipped.byte_lengths()
    for text, ids in zip(split_plays[0] + split_plays[1], shipped.encode_batch(split_plays[0] + split_plays[1])):
        assert shipped.decode(ids) == text and int(lengths[ids].sum()) == len(text.encode("utf-8"))
    assert BPETokenizer.train(split_plays[0], 2048).fingerprint == shipped.fingerprint
    assert build_config({"data": {"tokenizer": "shakespeare_bpe2048.json"}}).model.vocab_size == 2048
