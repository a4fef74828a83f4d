"""Long prompts of an exact token budget: filler units (sentences) with one line hidden at a
chosen depth, shared by the passkey and needle-in-a-haystack suites.

A prompt for ``length`` tokens holds the largest number of filler units for which the whole
prompt, tokenized as the model will see it, is at most ``length`` tokens. So a prompt is never
longer than asked, and shorter by less than one filler unit (plus, rarely, a token where the
tokenizer merges across the unit boundary). The hidden line goes after ``round(depth * n)`` of
the ``n`` units: depth 0 puts it first, depth 1 last.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Callable

# Landmark Attention's filler (also RULER's "noise" haystack), one sentence a unit.
NOISE = ["The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again."]


def token_count(tokenizer, text: str) -> int:
    return len(tokenizer(text)["input_ids"])


def fit_units(tokenizer, build: Callable[[int], str], length: int, start: int = 64) -> tuple[int, str]:
    """The largest ``n`` with ``token_count(build(n)) <= length`` (the count grows with ``n``),
    and that prompt. Raises ``ValueError`` when even ``build(0)`` is too long."""
    base = token_count(tokenizer, build(0))
    if base > length:
        raise ValueError(f"a {length}-token prompt is too short: the prompt without any filler already takes {base} tokens")
    lo, hi = 0, max(1, start)
    while token_count(tokenizer, build(hi)) <= length:  # grow until too long
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if token_count(tokenizer, build(mid)) <= length:
            lo = mid
        else:
            hi = mid
    return lo, build(lo)


def place(units: list[str], line: str, depth: float) -> tuple[str, str]:
    """The filler text before and after ``line`` when it sits at ``depth`` (0..1) of ``units``."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be between 0 and 1, got {depth}")
    cut = round(depth * len(units))
    return " ".join(units[:cut]), " ".join(units[cut:])


def cycle(units: list[str], n: int) -> list[str]:
    """The first ``n`` units, going round ``units`` again when it is too short (as RULER repeats a
    short haystack)."""
    return [units[i % len(units)] for i in range(n)]


def sentences(text: str) -> list[str]:
    """Whitespace-normalised sentences (split after ``.``, ``!`` or ``?``)."""
    text = re.sub(r"\s+", " ", text).strip()
    return [s for s in re.split(r"(?<=[.!?])\s+", text) if s]


def read_haystack(path) -> str:
    """Text of a haystack: a ``.json`` file holding ``{"text": ...}`` (RULER's format), a folder of
    ``.txt`` files (joined in name order), or any text file."""
    import json

    path = Path(path)
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise FileNotFoundError(f"haystack folder {path} has no .txt files")
        return "\n".join(f.read_text(encoding="utf-8") for f in files)
    if not path.is_file():
        raise FileNotFoundError(f"haystack file not found: {path}")
    if path.suffix == ".json":
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict) or not isinstance(data.get("text"), str):
            raise ValueError(f"haystack {path}: a .json haystack must be an object with a 'text' string")
        return data["text"]
    return path.read_text(encoding="utf-8")


_SUBJECTS = ["The old miller", "A young sailor", "The baker's daughter", "The village teacher", "A tired traveller",
             "The quiet librarian", "An old fisherman", "The shepherd", "The clockmaker", "A curious child",
             "The gardener", "The ferryman", "A wandering painter", "The innkeeper", "The blacksmith"]
_VERBS = ["walked along", "looked across", "thought about", "wrote a letter about", "sang softly near",
          "painted a picture of", "told a long story about", "rested for a while by", "searched for something in",
          "remembered the summer at", "swept the path to", "carried a basket to"]
_PLACES = ["the river", "the northern hills", "the market square", "the old bridge", "the harbour", "the orchard",
           "the edge of the forest", "the stone chapel", "the windmill", "the narrow lane", "the meadow",
           "the lighthouse", "the empty station", "the walled garden"]
_TAILS = ["while the rain began to fall", "before the bells rang", "as the evening grew cold",
          "when nobody was watching", "and then went home", "without saying a word", "in the early morning",
          "as the wind changed", "long after the others had left", "with a small lantern", "", "", ""]


def generated_prose(sentences_count: int = 4000, seed: int = 0) -> str:
    """A built-in haystack: plain English sentences from a small grammar (no digits, so nothing in it
    looks like a needle's value). Pass a real text with ``--haystack`` for RULER's setting."""
    rng = random.Random(seed)
    out = []
    for _ in range(sentences_count):
        tail = rng.choice(_TAILS)
        out.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_PLACES)}{' ' + tail if tail else ''}.")
    return " ".join(out)
