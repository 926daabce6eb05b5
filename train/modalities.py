"""Modality ids per token (MoMa's routing groups), carried beside the tokens like segment ids.

A source gives each character of a document a modality (`data.modalities`): `script` splits the
Shakespeare plays into SPEECH (0, the spoken lines) and SCRIPT (1: scene headers, speaker headings,
stage directions) from their markup (corpus.parse_play_modalities). A token takes the modality of
the first byte it encodes: tokenizer-agnostic, since the UTF-8 bytes of a document's tokens
(`byte_lengths`) concatenate to the document's bytes. BOS, EOS and PAD carry modality 0.
"""

import numpy as np


def byte_modalities(text: str, char_modalities: np.ndarray) -> np.ndarray:
    """int8 [UTF-8 bytes of text]: each character's modality repeated over its bytes."""
    widths = np.fromiter((len(ch.encode("utf-8")) for ch in text), np.int64, count=len(text))
    return np.repeat(np.asarray(char_modalities, np.int8), widths)


def token_modalities(ids: np.ndarray, byte_lengths: np.ndarray, text: str, char_modalities: np.ndarray) -> np.ndarray:
    """int8 [len(ids)]: the modality of the first byte of each token of `text`."""
    per_byte = byte_modalities(text, char_modalities)
    widths = np.asarray(byte_lengths)[np.asarray(ids, np.int64)]
    starts = np.concatenate([[0], np.cumsum(widths)[:-1]]).astype(np.int64)
    if len(ids) and int(starts[-1] + widths[-1]) != len(per_byte):
        raise ValueError(f"the tokens encode {int(starts[-1] + widths[-1])} bytes, the text has {len(per_byte)}")
    return per_byte[np.minimum(starts, max(len(per_byte) - 1, 0))] if len(ids) else np.zeros(0, np.int8)
