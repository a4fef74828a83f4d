"""Passkey retrieval in the format of Landmark Attention (Mohtashami & Jaggi, 2023), as LAWCAT
reports it: a task line, filler ("The grass is green. The sky is blue. ..." repeated), the key
line "The pass key is 12345. Remember it. 12345 is the pass key." at a chosen depth, more
filler, then "What is the pass key? The pass key is". Greedy generation; a sample is correct
when its 5-digit key appears in the continuation.

Lines are joined with newlines; at depth 0 or 1 the empty filler part is left out rather than
leaving a blank line. The prompt is plain text, without the chat template, for base and chat models alike (as
Landmark Attention and LAWCAT do). Each prompt has at most ``length`` tokens and less than one
filler sentence fewer (see :mod:`.haystack`).
"""

from __future__ import annotations

import random

from .haystack import NOISE, cycle, fit_units, place

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. "
        "I will quiz you about the important information there.")
QUESTION = "What is the pass key? The pass key is"


def key_line(key: str) -> str:
    return f"The pass key is {key}. Remember it. {key} is the pass key."


def passkey_prompt(filler_units: int, depth: float, key: str) -> str:
    before, after = place(cycle(NOISE, filler_units), key_line(key), depth)
    return "\n".join(part for part in (TASK, before, key_line(key), after, QUESTION) if part)


def passkey_key(seed: int, length: int, depth: float, index: int) -> str:
    return str(random.Random(f"passkey-{seed}-{length}-{depth}-{index}").randint(10000, 99999))


def passkey_samples(tokenizer, lengths, depths, samples: int = 3, seed: int = 0) -> list[dict]:
    """One sample per (length, depth, index): ``input``, ``target`` (the key), ``length``,
    ``depth``, ``index`` and ``tokens`` (the prompt's actual token count)."""
    out = []
    for length in lengths:
        hint = 64
        for depth in depths:
            for i in range(samples):
                key = passkey_key(seed, length, depth, i)
                n, prompt = fit_units(tokenizer, lambda n: passkey_prompt(n, depth, key), length, start=hint)
                hint = max(1, n)
                out.append({"input": prompt, "target": key, "length": length, "depth": depth, "index": i,
                            "tokens": len(tokenizer(prompt)["input_ids"])})
    return out
