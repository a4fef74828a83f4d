"""Perplexity by context length on a text file.

Method: the whole file is tokenized once (no special tokens) and, for each context length
``L``, cut into non-overlapping chunks of ``L`` tokens from the start (at most
``max_chunks``; a shorter tail is dropped). Each chunk is scored on its own from its first
token. Reported for each ``L``: ``ppl``, the perplexity over every next-token prediction in the
chunks (``L - 1`` a chunk), and ``ppl_last_quarter``, over the predictions of the chunk's last
quarter only (targets at positions ``L - L//4 .. L - 1``), which are the ones that see a long
context.

A chunk goes through the model in segments of ``segment`` tokens that carry the cache, so a
converted model runs on its fixed-size recurrent state and nothing of size ``L x L`` is built;
the result equals one forward over the whole chunk.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F


def text_tokens(tokenizer, path) -> torch.Tensor:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    return torch.tensor(tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"])


@torch.no_grad()
def token_nll(model, ids: torch.Tensor, segment: int = 512) -> torch.Tensor:
    """Per-target next-token NLL of one sequence ``ids: [T]`` -> ``[T - 1]`` (target ``t + 1``
    predicted from tokens ``0..t``), computed segment by segment through the cache."""
    import inspect

    device = next(model.parameters()).device
    ids = ids.to(device)[None]  # [1, T]
    # transformers 5.24 names the cache argument `cache`; 5.17 `past_key_values`
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, logits = None, []
    for start in range(0, ids.shape[1], segment):
        out = model(input_ids=ids[:, start:start + segment], use_cache=True, **({name: cache} if cache is not None else {}))
        cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
        logits.append(out.logits[0].float())
    logits = torch.cat(logits)[:-1]  # [T - 1, V]
    return F.cross_entropy(logits, ids[0, 1:], reduction="none").cpu()


def ppl_by_length(model, tokens: torch.Tensor, lengths, max_chunks: int = 4, segment: int = 512,
                  progress: bool = False) -> list[dict]:
    """One result a length: ``length``, ``chunks``, ``tokens`` (predictions counted), ``ppl``,
    ``ppl_last_quarter``. Lengths the text is too short for are reported with ``chunks: 0``."""
    from tqdm.auto import tqdm

    results = []
    for length in lengths:
        if length < 4:
            raise ValueError(f"context length must be at least 4 tokens, got {length}")
        chunks = min(max_chunks, len(tokens) // length)
        nll_all, nll_last, n_all, n_last = 0.0, 0.0, 0, 0
        for c in tqdm(range(chunks), desc=f"ppl@{length}", unit="chunk", disable=not progress):
            nll = token_nll(model, tokens[c * length:(c + 1) * length], segment)  # [L - 1]
            last = nll[length - length // 4 - 1:]  # targets L - L//4 .. L - 1
            nll_all, n_all = nll_all + float(nll.sum()), n_all + nll.numel()
            nll_last, n_last = nll_last + float(last.sum()), n_last + last.numel()
        results.append({
            "length": length, "chunks": chunks, "tokens": n_all,
            "ppl": math.exp(nll_all / n_all) if n_all else float("nan"),
            "ppl_last_quarter": math.exp(nll_last / n_last) if n_last else float("nan"),
        })
    return results
