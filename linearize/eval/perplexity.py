"""Perplexity on fixed-length blocks: ``exp`` of the mean next-token negative log-likelihood
over every predicted token (each block is scored on its own, from its first token)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> float:
    """``blocks: [N, T]`` token ids. Returns the perplexity over all ``N * (T - 1)`` predictions."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    nll, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        ids = blocks[start : start + batch_size].to(device)
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum").item()
        count += ids[:, 1:].numel()
    return math.exp(nll / count)
