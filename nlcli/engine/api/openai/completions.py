"""/v1/completions: prompts (text or token ids, one or many) to native generation items, answered
whole or streamed, with `echo` and the legacy (completions-style) logprobs.

Logprobs are asked for with the native fields and reshaped from the meta_info triples; with `echo`
they start at the prompt's first token (logprob_start_len=0), and text offsets count from the
start of the echoed text, else from the end of the prompt.
"""

from __future__ import annotations

import uuid
from typing import Optional

from fastapi import Request
from fastapi.responses import StreamingResponse

from nlcli.engine.api.native_input import LogprobArgs
from nlcli.engine.api.openai.protocol import (CompletionRequest, legacy_logprobs, normalize_prompt,
                                              sampling_dict)
from nlcli.engine.api.openai.serving import OpenAIServing, choice
from nlcli.engine.limits import check_input_len

OBJECT = "text_completion"


class CompletionServing(OpenAIServing):
    async def serve(self, request: Request):
        req: CompletionRequest = await self.parse(request, CompletionRequest)
        prompt = normalize_prompt(req.prompt, "prompt")
        by_ids = isinstance(prompt[0], list)
        if by_ids:
            for p in prompt:  # before decoding: an over-long prompt is refused at once
                check_input_len(len(p), self.tm.context_len, self.tm.pool_size)
            echo_texts = [self.tm.tokenizer.decode(p) if self.tm.tokenizer else "" for p in prompt]
        else:
            echo_texts = list(prompt)
        rid = req.rid or f"cmpl-{uuid.uuid4().hex}"
        sp = sampling_dict(req, req.max_tokens)
        if req.json_schema is not None:
            sp["json_schema"] = req.json_schema
        k = req.logprobs
        lp = LogprobArgs()
        if k is not None:
            lp = LogprobArgs(return_logprob=True, logprob_start_len=0 if req.echo else -1,
                             top_logprobs_num=k, return_text_in_logprobs=True)
        rids = [f"{rid}-{i}" for i in range(len(prompt))]
        states = await self._submit(prompt, sp, rids, req.stream, lp, req.custom_logit_processor)
        if req.stream:
            return StreamingResponse(self._stream_completion(req, states, echo_texts, rid),
                                     media_type="text/event-stream")

        def choice_of(i: int, out: dict) -> dict:
            meta, prefix = out["meta_info"], (echo_texts[i // req.n] if req.echo else "")
            logprobs = None
            if k is not None:
                logprobs = self._legacy(meta, k, req.echo, 0 if req.echo else len(echo_texts[i // req.n]))
            return choice(i, "text", prefix + out["text"], logprobs, meta["finish_reason"])

        return await self._respond(request, states, rid, OBJECT, req.model, req.n, choice_of)

    def _legacy(self, meta: dict, k: int, with_prompt: bool, offset0: int,
                out_from: int = 0) -> Optional[dict]:
        """Legacy logprobs of the output from `out_from` on, led by the prompt's when `with_prompt`
        (prompt tokens carry no top alternatives)."""
        got = self._output_logprobs(meta, out_from)
        if got is None:
            return None
        entries, tops = got
        if with_prompt:
            n_in = len(meta.get("input_token_logprobs") or [])
            entries = list(meta.get("input_token_logprobs") or []) + entries
            tops = (list(meta.get("input_top_logprobs") or []) + [None] * n_in)[:n_in] + tops
        return legacy_logprobs(entries, tops, k, self._token_text, offset0)

    def _stream_completion(self, req, states, echo_texts, rid):
        n, sent = req.n, [""] * len(states)
        sent_lp, offsets, first = [0] * len(states), [0] * len(states), [True] * len(states)

        def choices_of(i: int, out: dict) -> list:
            meta = out["meta_info"]
            delta = out["text"][len(sent[i]):]
            sent[i] = out["text"]
            echo = req.echo and first[i]  # the prompt (and its logprobs) go in the first chunk
            if echo:
                delta = echo_texts[i // n] + delta
            logprobs = None
            if req.logprobs is not None:
                if first[i] and not req.echo:
                    offsets[i] = len(echo_texts[i // n])
                logprobs = self._legacy(meta, req.logprobs, echo, offsets[i], sent_lp[i])
                sent_lp[i] = len(meta.get("output_token_logprobs") or [])
                if logprobs:
                    offsets[i] += sum(len(t) for t in logprobs["tokens"])
            first[i] = False
            fr = meta["finish_reason"]
            if fr is None and not delta and not (logprobs and logprobs["tokens"]):
                return []
            return [choice(i, "text", delta, logprobs, fr)]

        return self._stream(req, states, rid, OBJECT, n, choices_of)
