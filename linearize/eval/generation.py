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
    """Greedy continuation of prompts by a Hugging Face causal LM, ``batch_size`` prompts at a
    time, left-padded to the longest of the batch (the students are exactly padding-invariant;
    :func:`score_samples` batches prompts of similar length, so padding stays short).

    The prompt is tokenized as plain text, without a chat template (as Landmark Attention and
    LAWCAT evaluate passkey retrieval), and the continuation is decoded as a whole, so a target
    split across several tokens is found."""

    def __init__(self, model, tokenizer, batch_size: int = 1, prefill_chunk: int | None = None):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        # prompt tokens a forward while prefilling (transformers' ``prefill_chunk_size``): bounds
        # the activations of a long prompt, with the same greedy output (the cache carries on)
        self.prefill_chunk = prefill_chunk

    @torch.no_grad()
    def __call__(self, prompts: list[str], max_new_tokens: int) -> list[str]:
        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        outputs = []
        for start in range(0, len(prompts), self.batch_size):
            rows = [self.tokenizer(p)["input_ids"] for p in prompts[start : start + self.batch_size]]
            width = max(len(r) for r in rows)
            ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows], device=device)
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=device)
            out = self.model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                pad_token_id=pad_id, use_cache=True,
                **({"prefill_chunk_size": self.prefill_chunk} if self.prefill_chunk else {}),
            )
            outputs += [self.tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
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
                  progress: bool = False, desc: str = "generate", batch_size: int = 1) -> list[dict]:
    """Generate greedily for every sample and mark it correct when its target is contained in the
    continuation. Returns one result a sample, in the samples' order: its fields (less the
    prompt), ``output``, ``correct``. Prompts go to ``generate`` ``batch_size`` at a time, the
    samples grouped by prompt length (longest first)."""
    from tqdm.auto import tqdm

    samples = list(samples)
    order = sorted(range(len(samples)), key=lambda i: -samples[i].get("tokens", len(samples[i]["input"])))
    outputs: dict[int, str] = {}
    with tqdm(total=len(samples), desc=desc, unit="sample", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            group = order[start : start + batch_size]
            for i, output in zip(group, generate([samples[i]["input"] for i in group], max_new_tokens)):
                outputs[i] = output
            bar.update(len(group))
    results = []
    for i, sample in enumerate(samples):
        result = {k: v for k, v in sample.items() if k != "input"}
        result.update(output=outputs[i], correct=contains_target(outputs[i], sample["target"]))
        results.append(result)
    return results
