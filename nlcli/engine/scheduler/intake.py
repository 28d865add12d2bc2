"""Request intake: a TokenizedGenerateReqInput becomes a Req, checked before it may queue.

The API process rejects bad requests with a 400 first; the checks here guard direct callers of
the engine (input length against the context and the KV pool, token ids against the vocabulary,
custom logit processors only when enabled) and build the per-request helpers a check needs (the
loaded logit processor, the stop-string checker). Last, `--max-queued-requests` (RequestLimits)
refuses a request the full queue has no room for, with a 503.
"""

from __future__ import annotations

from typing import Any, Callable, Optional, Tuple

from nlcli.engine.detokenizer import StopChecker
from nlcli.engine.io_struct import TokenizedGenerateReqInput
from nlcli.engine.limits import check_input_len
from nlcli.engine.sampling.custom_logit_processor import load_processor
from nlcli.engine.scheduler.req import Req
from nlcli.engine.scheduler.timeouts import QUEUE_FULL_MESSAGE, TIMEOUT_STATUS, RequestLimits

# Why a request may not queue: (message, HTTP status).
Refusal = Tuple[str, int]


class RequestIntake:
    def __init__(self, limits: RequestLimits, *, context_len: int, pool_size: int,
                 vocab_size: int, custom_logit_processors: bool, tokenizer: Callable[[], Any]):
        self.limits = limits
        self.context_len = context_len
        self.pool_size = pool_size
        self.vocab_size = vocab_size
        self.custom_logit_processors = custom_logit_processors
        self.tokenizer = tokenizer  # loaded on first use: only stop strings need it here

    def build(self, msg: TokenizedGenerateReqInput, queued: int) -> tuple[Req, Optional[Refusal]]:
        """The request for `msg`, and why it may not join a queue of `queued` (None: it may)."""
        req = Req(msg.rid, msg.input_ids, msg.sampling_params, stream=msg.stream,
                  return_logprob=msg.return_logprob, logprob_start_len=msg.logprob_start_len,
                  top_logprobs_num=msg.top_logprobs_num,
                  custom_logit_processor=msg.custom_logit_processor,
                  token_type_ids=msg.token_type_ids, token_ids_logprob=msg.token_ids_logprob)
        try:
            check_input_len(len(req.origin_input_ids), self.context_len, self.pool_size)
            req.sampling_params.verify_token_ids(self.vocab_size)
            if req.custom_logit_processor:
                req.logit_processor = load_processor(req.custom_logit_processor,
                                                     self.custom_logit_processors)
        except ValueError as e:
            return req, (str(e), 400)
        if req.sampling_params.stop or req.sampling_params.stop_regex:
            try:
                req.stop_checker = StopChecker(self.tokenizer(), req.origin_input_ids,
                                               req.sampling_params)
            except Exception as e:  # no usable tokenizer in the engine
                return req, (f"Stop strings are unavailable: {e}", 400)
        if self.limits.queue_full(queued):
            return req, (QUEUE_FULL_MESSAGE, TIMEOUT_STATUS)
        return req, None
