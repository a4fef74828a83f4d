"""Greedy generation and exact-match-by-containment scoring, shared by the retrieval suites.

A *generator* is any callable ``generate(prompts: list[str], max_new_tokens: int) -> list[str]``
returning each prompt's continuation as text. :class:`ModelGenerator` wraps a loaded model (a
converted one generates through its fixed-size recurrent cache); tests pass plain functions.

A sample is a dict with ``input`` (the prompt), ``target`` (the string that must appear in the
continuation) and any numeric fields (``length``, ``depth``, ...) that results are grouped by.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Callable, Iterable

import torch

Generator = Callable[[list[str], int], list[str]]


def contains_target(output: str, target: str) -> bool:
    """Correct when ``target`` occurs anywhere in ``output`` (case and spacing as written)."""
    return target in output


class ModelGenerator:
    """Greedy continuation of prompts by a Hugging Face causal LM, one prompt at a time (prompts
    of a grid differ in length, so no padding is ever needed).

    The prompt is tokenized as plain text, without a chat template (as Landmark Attention and
    LAWCAT evaluate passkey retrieval), and the continuation is decoded as a whole, so a target
    split across several tokens is found."""

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        device = next(self.model.parameters()).device
        outputs = []
        for prompt in prompts:
            enc = self.tokenizer(prompt, return_tensors="pt").to(device)
            out = self.model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=self.tokenizer.pad_token_id, use_cache=True,
            )
            outputs.append(self.tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
        return outputs


# Numeric fields that identify a sample rather than describe it: never grouped by.
NOT_GROUPED = ("index", "tokens", "line")


def numeric_fields(sample: dict) -> list[str]:
    return [k for k, v in sample.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in NOT_GROUPED]


def summarize(results: list[dict]) -> dict:
    """Accuracy overall and for each value of each numeric field (``by[field][value]``)."""
    by: dict = defaultdict(lambda: defaultdict(list))
    for r in results:
        for field in numeric_fields(r):
            by[field][r[field]].append(r["correct"])
    return {
        "accuracy": sum(r["correct"] for r in results) / len(results) if results else float("nan"),
        "samples": len(results),
        "by": {f: {v: sum(c) / len(c) for v, c in sorted(values.items())} for f, values in by.items()},
    }


def score_samples(samples: Iterable[dict], generate: Generator, max_new_tokens: int,
                  progress: bool = False, desc: str = "generate") -> list[dict]:
    """Generate greedily for every sample and mark it correct when its target is contained in the
    continuation. Returns one result a sample: its fields (less the prompt), ``output``, ``correct``."""
    from tqdm.auto import tqdm

    samples = list(samples)
    results = []
    for sample in tqdm(samples, desc=desc, unit="sample", disable=not progress):
        (output,) = generate([sample["input"]], max_new_tokens)
        result = {k: v for k, v in sample.items() if k != "input"}
        result.update(output=output, correct=contains_target(output, sample["target"]))
        results.append(result)
    return results
