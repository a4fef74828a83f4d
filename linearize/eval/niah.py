"""Single-needle needle-in-a-haystack tasks in the manner of RULER's S-NIAH (Hsieh et al., 2024):

* ``niah_single_1``: the repeated noise filler, a 7-digit number as the needle's value;
* ``niah_single_2``: a real-text haystack, a 7-digit number;
* ``niah_single_3``: a real-text haystack, a uuid.

The needle is RULER's "One of the special magic numbers for {key} is: {value}." (``uuids`` for
task 3), inserted between sentences at the chosen depth; the question is "What is the special
magic number for {key} mentioned in the provided text?", followed by the answer prefix as
RULER gives base models. Keys are adjective-noun pairs. The real-text haystack is a file named
by the user (``--haystack``: RULER's Paul Graham essays JSON, a folder of ``.txt`` files, any
text) or, by default, :func:`~.haystack.generated_prose`. Plain prompts, no chat template.
"""

from __future__ import annotations

import random
import uuid

from .haystack import NOISE, cycle, fit_units, generated_prose, place, read_haystack, sentences

TASKS = {  # name: (haystack, value kind)
    "niah_single_1": ("noise", "number"),
    "niah_single_2": ("essay", "number"),
    "niah_single_3": ("essay", "uuid"),
}

_ADJECTIVES = ["abundant", "bitter", "calm", "daring", "eager", "fragile", "gentle", "hollow", "icy", "jolly",
               "keen", "lucky", "mellow", "noisy", "odd", "proud", "quiet", "rapid", "silent", "tender"]
_NOUNS = ["apple", "badger", "canyon", "dolphin", "ember", "falcon", "glacier", "harbor", "island", "jungle",
          "kettle", "lantern", "meadow", "nectar", "orchid", "pebble", "quartz", "raven", "saddle", "tulip"]


def needle(key: str, value: str, kind: str) -> str:
    return f"One of the special magic {kind}s for {key} is: {value}."


def niah_prompt(units: list[str], depth: float, key: str, value: str, kind: str) -> str:
    line = needle(key, value, kind)
    before, after = place(units, line, depth)
    context = " ".join(part for part in (before, line, after) if part)
    return (
        f"Some special magic {kind}s are hidden within the following text. Make sure to memorize it. "
        f"I will quiz you about the {kind}s afterwards.\n{context}\n"
        f"What is the special magic {kind} for {key} mentioned in the provided text? "
        f"The special magic {kind} for {key} mentioned in the provided text is"
    )


def key_and_value(rng: random.Random, kind: str) -> tuple[str, str]:
    key = f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"
    if kind == "number":
        return key, str(rng.randint(1_000_000, 9_999_999))
    return key, str(uuid.UUID(int=rng.getrandbits(128), version=4))


def niah_samples(tokenizer, task: str, lengths, depths, samples: int = 3, seed: int = 0,
                 haystack: str | None = None) -> list[dict]:
    """Samples of one S-NIAH task: ``input``, ``target`` (the value), ``key``, ``length``,
    ``depth``, ``index``, ``tokens``."""
    if task not in TASKS:
        raise ValueError(f"unknown needle task {task!r}; choose from {', '.join(TASKS)}")
    source, kind = TASKS[task]
    pool = NOISE if source == "noise" else sentences(read_haystack(haystack) if haystack else generated_prose())
    out = []
    for length in lengths:
        hint = 64
        for depth in depths:
            for i in range(samples):
                key, value = key_and_value(random.Random(f"{task}-{seed}-{length}-{depth}-{i}"), kind)
                n, prompt = fit_units(tokenizer, lambda n: niah_prompt(cycle(pool, n), depth, key, value, kind),
                                      length, start=hint)
                hint = max(1, n)
                out.append({"input": prompt, "target": value, "key": key, "length": length, "depth": depth,
                            "index": i, "tokens": len(tokenizer(prompt)["input_ids"])})
    return out
