"""Modality ids per token (MoMa's routing groups), carried beside the tokens like segment ids.

A source gives each character of a document a modality (`data.modalities`): `script` splits the
Shakespeare plays into SPEECH (0, the spoken lines) and SCRIPT (1: scene headers, speaker headings,
stage directions) from their markup (plays.parse_play_modalities); `field` reads each record's
`data.modality_field` in .jsonl / .parquet files (`field_modalities`). A token takes the modality of
the first byte it encodes: tokenizer-agnostic, since the UTF-8 bytes of a document's tokens
(`byte_lengths`) concatenate to the document's bytes. BOS, EOS and PAD carry modality 0.
"""

import numpy as np

MAX_MODALITY = 127   # ids are stored as int8


def field_modalities(value, length: int) -> np.ndarray:
    """int8 [length]: the modality of each character of a document from its record's field: an integer
    (the whole document), or a list of spans [start, end, id] over characters (end exclusive, applied
    in order, so a later span wins where they overlap; characters outside every span are modality 0).
    A ValueError saying what is wrong otherwise."""
    def modality(v) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_MODALITY:
            raise ValueError(f"modality {v!r} must be an integer in [0, {MAX_MODALITY}]")
        return v

    if not isinstance(value, (list, tuple)):
        return np.full(length, modality(value), np.int8)
    out = np.zeros(length, np.int8)
    for span in value:
        if (not isinstance(span, (list, tuple)) or len(span) != 3
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span[:2])):
            raise ValueError(f"span {span!r} must be [start, end, modality] with integer character offsets")
        start, end, m = span
        if not 0 <= start < end <= length:
            raise ValueError(f"span {list(span)} must have 0 <= start < end <= {length} (the text's characters)")
        out[start:end] = modality(m)
    return out


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
