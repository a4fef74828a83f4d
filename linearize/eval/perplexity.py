"""Perplexity on fixed-length blocks: ``exp`` of the mean next-token negative log-likelihood
over every predicted real token (each block is scored on its own, from its first token;
padding is neither input to a prediction that counts nor a target)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data import as_blocks


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over real targets, and their count. ``logits: [B, T, V]``."""
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    nll = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), labels.reshape(-1), reduction="sum")
    return nll, int((labels != -100).sum())


@torch.no_grad()
def perplexity(model, blocks, batch_size: int = 4, progress: bool = False, desc: str = "perplexity") -> float:
    """``blocks``: :class:`~linearize.data.Blocks` or ``[N, T]`` token ids. Returns the
    perplexity over all real next-token predictions."""
    from tqdm.auto import tqdm

    blocks = as_blocks(blocks)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    starts = range(0, len(blocks), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(**batch.model_inputs(), use_cache=False).logits
        part, n = next_token_nll(logits, batch.input_ids, batch.attention_mask)
        nll, count = nll + part.item(), count + n
    return math.exp(nll / count)
