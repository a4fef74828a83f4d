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


def next_token_kl(teacher_logits: torch.Tensor, logits: torch.Tensor, attention_mask: torch.Tensor,
                  rows: int = 256) -> tuple[float, int]:
    """Summed ``KL(p_teacher || p)`` of the next-token distributions over the real positions, and
    their count: ``sum_t sum_v p_t(v) (log p_t(v) - log q_t(v))``. ``*_logits: [B, T, V]``,
    ``attention_mask: [B, T]`` (1: real). Computed in float64, ``rows`` positions at a time: a
    small KL is a sum of terms of both signs far larger than itself, which float32 loses."""
    real = attention_mask.bool()
    teacher, student = teacher_logits[real], logits[real]
    total = 0.0
    for start in range(0, teacher.shape[0], rows):
        log_p = F.log_softmax(teacher[start : start + rows].double(), -1)
        log_q = F.log_softmax(student[start : start + rows].double(), -1)
        total += float(F.kl_div(log_q, log_p, log_target=True, reduction="sum"))
    return total, int(real.sum())


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
