"""LogitsProcessor: picks each request's last new token and projects it onto the vocabulary.

Only the rows the sampler needs go through the (large) lm_head matmul unless the batch asks for
every position's logits (prompt logprobs, scoring). Logits are returned in float32. Under tensor
parallelism each rank's lm_head holds a slice of the vocabulary; the slices are gathered here.
"""

from __future__ import annotations

import torch
from torch import nn

from nlcli.engine.distributed.parallel_state import gather_vocab, tp_rank_size
from nlcli.engine.distributed.split import split_range
from nlcli.engine.forward_batch import ForwardBatch, ForwardMode, LogitsOutput


class LogitsProcessor(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.vocab_size = vocab_size
        self.method = None  # a layers/quantization method for the lm_head; None: torch.matmul
        _, size = tp_rank_size()
        # Each rank's lm_head rows (VocabEmbedding's split); None when the head is whole.
        self.vocab_counts = [split_range(vocab_size, size, r)[1] for r in range(size)] if size > 1 else None

    def set_method(self, method) -> None:
        self.method = method

    def forward(self, hidden: torch.Tensor, lm_head_weight: torch.Tensor, batch: ForwardBatch) -> LogitsOutput:
        if batch.return_all_logits:
            all_logits = self._project(hidden, lm_head_weight)
            last = _last_index(batch)
            return LogitsOutput(next_token_logits=all_logits if last is None else all_logits[last], all_logits=all_logits)
        last = _last_index(batch)
        return LogitsOutput(next_token_logits=self._project(hidden if last is None else hidden[last], lm_head_weight))

    def _project(self, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # The one slice to the vocabulary (lm_head rows may be padded); the sampler relies on it.
        logits = torch.matmul(hidden, weight.t()) if self.method is None else self.method(hidden)
        if self.vocab_counts is not None and weight.shape[0] < self.vocab_size:
            logits = gather_vocab(logits, self.vocab_counts)
        return logits[:, : self.vocab_size].float()


def _last_index(batch: ForwardBatch):
    """Index of each request's last new token in the flat token axis; None when it is every token."""
    if batch.forward_mode == ForwardMode.DECODE or batch.num_tokens == batch.batch_size:
        return None
    return torch.cumsum(batch.extend_lens, dim=0) - 1
