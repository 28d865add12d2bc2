"""Greedy and temperature sampling of next tokens from float32 logits, batched.

A stop-gap for the engine core; the full sampler (top-k/p, min-p, penalties, grammar masks,
logprobs) lives in nlcli/engine/sampling/.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch


def sample(
    logits: torch.Tensor,
    temperatures: Optional[Union[Sequence[float], torch.Tensor]] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """logits [bs, vocab] -> next ids [bs] int64. Temperature 0 (or None) means greedy."""
    greedy = torch.argmax(logits, dim=-1)
    if temperatures is None:
        return greedy
    temps = torch.as_tensor(temperatures, dtype=torch.float32, device=logits.device).view(-1)
    if not bool((temps > 0).any()):
        return greedy
    probs = torch.softmax(logits / temps.clamp_min(1e-6).unsqueeze(1), dim=-1)
    # Exponential-race sampling: argmax(p / E) with E ~ Exp(1) draws from p without a sync-heavy
    # multinomial, and stays batched.
    noise = torch.empty_like(probs).exponential_(generator=generator)
    sampled = torch.argmax(probs / noise, dim=-1)
    return torch.where(temps > 0, sampled, greedy)
