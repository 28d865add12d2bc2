"""The logprob fields of a /generate answer, assembled in the API process.

The engine sends raw `(logprob, id)` deltas (io_struct.LogprobDelta); this keeps one request's
cumulative lists, adds token text when asked (`return_text_in_logprobs`), and renders the meta_info
keys of API_SPEC 2.1: `input_token_logprobs`, `output_token_logprobs`, `input_top_logprobs` /
`output_top_logprobs` (when top_logprobs_num > 0), `input_token_ids_logprobs` /
`output_token_ids_logprobs` (when token_ids_logprob is set, SGLang's shape: per position a list of
`[logprob, id, text]` in the asked order, None at the first input position) and
`normalized_prompt_logprob`.
Triples are built once per token, so a long stream costs O(tokens), not O(tokens^2).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from nlcli.engine.io_struct import LogprobDelta


class LogprobAccumulator:
    def __init__(self, tokenizer: Any, top_logprobs_num: int, return_text: bool,
                 token_ids: Optional[Sequence[int]] = None):
        self.tokenizer = tokenizer if return_text else None
        self.top_logprobs_num = top_logprobs_num
        self.token_ids = list(token_ids or [])
        self.input_ids_lp: list[Optional[list[list]]] = []
        self.output_ids_lp: list[list[list]] = []
        self.input_token: list[list] = []
        self.input_top: list[Optional[list[list]]] = []
        self.output_token: list[list] = []
        self.output_top: list[list[list]] = []
        self.normalized = 0.0

    def _texts(self, ids: Sequence[int]) -> list[Optional[str]]:
        if self.tokenizer is None or not ids:
            return [None] * len(ids)
        # One token at a time, as the client sees each entry (special tokens included).
        return self.tokenizer.batch_decode([[int(t)] for t in ids], skip_special_tokens=False)

    def _triples(self, pairs: Sequence[tuple[Optional[float], int]]) -> list[list]:
        texts = self._texts([t for _, t in pairs])
        return [[lp, int(t), s] for (lp, t), s in zip(pairs, texts)]

    def _tops(self, lists) -> list[Optional[list[list]]]:
        return [None if pos is None else self._triples(pos) for pos in lists]

    def add(self, delta: Optional[LogprobDelta], new_ids: Sequence[int]) -> None:
        """Apply one engine delta; `new_ids` are the output ids its output entries belong to."""
        if delta is None:
            return
        if delta.input_token_logprobs is not None:
            self.input_token = self._triples(delta.input_token_logprobs)
            lps = [lp for lp, _ in delta.input_token_logprobs if lp is not None]
            self.normalized = sum(lps) / len(lps) if lps else 0.0
            if delta.input_top_logprobs is not None:
                self.input_top = self._tops(delta.input_top_logprobs)
        if delta.output_token_logprobs:
            self.output_token.extend(
                self._triples(list(zip(delta.output_token_logprobs, new_ids))))
        if delta.output_top_logprobs:
            self.output_top.extend(self._tops(delta.output_top_logprobs))
        if delta.input_token_ids_logprobs is not None:
            self.input_ids_lp = self._tops([None if row is None else list(zip(row, self.token_ids))
                                            for row in delta.input_token_ids_logprobs])
        if delta.output_token_ids_logprobs:
            self.output_ids_lp.extend(self._tops(
                [list(zip(row, self.token_ids)) for row in delta.output_token_ids_logprobs]))

    def meta(self) -> dict:
        """Cumulative fields for meta_info (copies: a streamed event must not change later)."""
        out = {"input_token_logprobs": list(self.input_token),
               "output_token_logprobs": list(self.output_token)}
        if self.top_logprobs_num > 0:
            out["input_top_logprobs"] = list(self.input_top)
            out["output_top_logprobs"] = list(self.output_top)
        if self.token_ids:
            out["input_token_ids_logprobs"] = list(self.input_ids_lp)
            out["output_token_ids_logprobs"] = list(self.output_ids_lp)
        out["normalized_prompt_logprob"] = self.normalized
        return out
