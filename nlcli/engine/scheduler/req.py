"""Req: one generation request as the scheduler tracks it, and its finish checks.

A request's tokens are `origin_input_ids + output_ids`. `fill_ids` is the part scheduled into the
KV cache so far (the whole sequence, or a prefix of it while chunked prefill is under way);
`kv_len` counts tokens whose K/V are written. `prefix_indices`/`last_node` are the radix-cache match
this request holds locked.
"""

from __future__ import annotations

import itertools
import time
from typing import Optional

import torch

from nlcli.engine.sampling.params import SamplingParams

_arrival = itertools.count()


class Req:
    def __init__(self, rid: str, input_ids: list[int], sampling_params: SamplingParams,
                 stream: bool = False, return_logprob: bool = False, logprob_start_len: int = -1,
                 top_logprobs_num: int = 0, custom_logit_processor: Optional[str] = None,
                 token_type_ids: Optional[list[int]] = None,
                 token_ids_logprob: Optional[list[int]] = None):
        self.rid = rid
        self.origin_input_ids = list(input_ids)
        self.sampling_params = sampling_params
        self.stream = stream
        # the serialized processor (the sampler groups rows by this string) and its loaded instance
        self.custom_logit_processor = custom_logit_processor
        self.logit_processor = None
        # logprobs (see scheduler/logprobs.py); input ones are computed once, at the first prefill
        self.return_logprob = return_logprob
        # k == P asks for no prompt position at all: the same as -1 (an empty list).
        start = logprob_start_len if return_logprob else -1
        self.logprob_start_len = -1 if start >= len(self.origin_input_ids) else start
        self.top_logprobs_num = top_logprobs_num if return_logprob else 0
        # token_ids_logprob: those ids' logprobs at every computed position (SGLang's field)
        self.token_ids_logprob = list(token_ids_logprob or []) if return_logprob else []
        self.output_token_ids_logprobs: list[list[float]] = []
        self.input_token_ids_logprobs: Optional[list] = None
        self.input_ids_acc: list[list[float]] = []
        self.output_token_logprobs: list[float] = []
        self.output_top_logprobs: list[list[tuple[float, int]]] = []
        self.input_token_logprobs: Optional[list] = None
        self.input_top_logprobs: Optional[list] = None
        self.input_logprobs_sent = False
        self.input_lp_acc: list[float] = []  # prompt rows gathered so far (chunked prefill)
        self.input_top_acc: list = []
        # finish helpers set by the scheduler: a text tail for stop strings, a grammar matcher
        self.stop_checker = None
        self.grammar = None
        self.grammar_future = None
        self.arrival = next(_arrival)
        self.output_ids: list[int] = []
        self.finished_reason: Optional[dict] = None
        # memory held
        self.req_pool_idx: Optional[int] = None
        self.prefix_indices: torch.Tensor = torch.empty((0,), dtype=torch.int64)
        self.last_node = None
        self.fill_ids: list[int] = []
        self.kv_len = 0
        # accounting
        self.cached_tokens: Optional[int] = None  # prefix reused at first admission
        self.num_sent = 0  # output ids already handed to the API process
        self.to_abort: Optional[str] = None
        self.num_retractions = 0
        # deadlines (timeouts.py): entered the queue (again, after a retraction); first prefill
        self.queued_at = time.monotonic()
        self.started_at: Optional[float] = None
        self.token_type_ids = token_type_ids  # a cross-encoder pair's segments (see io_struct)

    # ---- sizes ---------------------------------------------------------------------------
    @property
    def all_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids

    @property
    def prefix_len(self) -> int:
        return int(self.prefix_indices.shape[0])

    @property
    def extend_len(self) -> int:
        return len(self.fill_ids) - self.prefix_len

    @property
    def is_chunked(self) -> bool:
        """True while the scheduled fill does not yet cover the whole sequence."""
        return len(self.fill_ids) < len(self.origin_input_ids) + len(self.output_ids)

    @property
    def max_new_tokens(self) -> Optional[int]:
        return self.sampling_params.max_new_tokens

    def remaining_new_tokens(self, context_len: int) -> int:
        room = context_len - len(self.origin_input_ids) - len(self.output_ids)
        cap = self.max_new_tokens
        left = room if cap is None else min(cap - len(self.output_ids), room)
        return max(left, 0)

    @property
    def needs_input_logprobs(self) -> bool:
        """Prompt logprobs asked for and not computed yet (a retracted request keeps its own)."""
        return self.logprob_start_len >= 0 and self.input_token_logprobs is None

    @property
    def return_all_logits(self) -> bool:
        """Whether its extend needs logits at every new position, not just the last."""
        return self.needs_input_logprobs

    @property
    def max_prefix_match(self) -> int:
        """How many leading tokens may come from the radix cache: the last one is always
        recomputed (it yields the next-token logits), and prompt positions whose logprobs are
        asked for must be recomputed too."""
        limit = len(self.origin_input_ids) + len(self.output_ids) - 1
        if self.needs_input_logprobs:
            limit = min(limit, self.logprob_start_len)
        return max(limit, 0)

    @property
    def finished(self) -> bool:
        return self.finished_reason is not None

    # ---- finish checks -------------------------------------------------------------------
    def check_finished(self, eos_token_ids: set[int], context_len: int) -> None:
        """Set finished_reason after a token was appended (length before EOS, as upstream)."""
        if self.finished_reason is not None:
            return
        sp = self.sampling_params
        cap = self.max_new_tokens
        n_out = len(self.output_ids)
        if cap is not None and n_out >= cap:
            self.finished_reason = {"type": "length", "length": cap}
            return
        if len(self.origin_input_ids) + n_out >= context_len:
            self.finished_reason = {"type": "length", "length": n_out}
            return
        last = self.output_ids[-1]
        if sp.ignore_eos:
            return
        if last in eos_token_ids or last in sp.stop_token_ids:
            self.finished_reason = {"type": "stop", "matched": last}

    def check_stop_strings(self) -> None:
        """Feed the newest token to the stop-string checker; stop strings fire despite ignore_eos
        and min_new_tokens, but not after another finish."""
        if self.stop_checker is None:
            return
        matched = self.stop_checker.add(self.output_ids[-1])
        if matched is not None and self.finished_reason is None:
            self.finished_reason = {"type": "stop", "matched": matched}

    def finish_abort(self, message: str, status_code: Optional[int] = None) -> None:
        if self.finished_reason is None:
            self.finished_reason = {"type": "abort", "message": message}
            if status_code is not None:
                self.finished_reason["status_code"] = status_code

    def __repr__(self) -> str:
        return (f"Req(rid={self.rid!r}, input={len(self.origin_input_ids)}, "
                f"output={len(self.output_ids)}, kv_len={self.kv_len})")
