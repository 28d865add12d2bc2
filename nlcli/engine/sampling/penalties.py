"""Logit penalties over a request's history: OpenAI frequency/presence and CTRL repetition.

All functions take the rows of the batch that have a penalty (`rows`) so requests without one cost
nothing; the token histories are scattered into dense [rows, vocab] tensors on the device once per
step, never walked in Python per token.
"""

from __future__ import annotations

from typing import Sequence

import torch


def token_counts(
    seqs: Sequence[Sequence[int]], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """[len(seqs), vocab] float32 counts of each token id in each sequence."""
    counts = torch.zeros((len(seqs), vocab_size), dtype=torch.float32, device=device)
    lens = [len(s) for s in seqs]
    total = sum(lens)
    if total == 0:
        return counts
    flat = torch.tensor([t for s in seqs for t in s], dtype=torch.int64, device=device)
    row = torch.repeat_interleave(
        torch.arange(len(seqs), device=device), torch.tensor(lens, device=device)
    )
    counts.view(-1).index_add_(
        0, row * vocab_size + flat, torch.ones(total, dtype=torch.float32, device=device)
    )
    return counts


def apply_frequency_presence(
    logits: torch.Tensor,
    rows: torch.Tensor,
    output_counts: torch.Tensor,
    frequency: torch.Tensor,
    presence: torch.Tensor,
) -> None:
    """In place: logit[j] -= count[j] * frequency + (count[j] > 0) * presence (OpenAI's formula).

    `output_counts` covers generated tokens only, as OpenAI defines it.
    """
    delta = output_counts * frequency[:, None] + (output_counts > 0).float() * presence[:, None]
    logits[rows] -= delta


def apply_repetition(
    logits: torch.Tensor, rows: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor
) -> None:
    """In place, for tokens seen in prompt + output: positive logits / penalty, others * penalty.

    Dividing a positive logit and multiplying a negative one both make the token less likely
    for penalty > 1 (CTRL, as transformers' RepetitionPenaltyLogitsProcessor does it).
    """
    sub = logits[rows]
    p = penalty[:, None]
    penalized = torch.where(sub > 0, sub / p, sub * p)
    logits[rows] = torch.where(seen, penalized, sub)
