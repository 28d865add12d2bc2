"""Incremental detokenization of one request's output ids, and the engine's stop-string check.

Decoding only a window of recent ids keeps each step O(window) while staying identical to a full
decode: `decode(ids[surr:])` minus `decode(ids[surr:read])` is the new text, where `surr` trails
`read` by a few tokens so that tokenizers whose rendering depends on neighbours (leading-space
markers, byte fallback) see the context they need. A window that ends in an incomplete UTF-8
sequence (rendered as U+FFFD) is held back until the next token completes it.

Stop strings are decided in one place: the engine's `StopChecker` ends generation at the token
where one appears and reports it as `finished_reason = {"type": "stop", "matched": "<str>"}`. The
API process's `IncrementalDetokenizer` never decides a stop: it cuts the final text at the string
the engine reported (`final_text`), and while streaming holds back a tail that could be the start
of a stop string (`visible_text`), which is presentation only.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from nlcli.engine.sampling.stop_regex import StopRegexes

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int] = (), skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, stop: Sequence[str] = (),
                 no_stop_trim: bool = False):
        self.tokenizer = tokenizer
        self.kwargs = {"skip_special_tokens": skip_special_tokens}
        if not spaces_between_special_tokens:
            self.kwargs["spaces_between_special_tokens"] = False
        # Seed the window with the prompt's tail so the first output token renders in context.
        self.ids: list[int] = list(prompt_ids[-CONTEXT_TOKENS:])
        self.surr = 0
        self.read = len(self.ids)
        self.text = ""
        self.stop = [s for s in stop if s]  # only for holding back a possible start while streaming
        self.no_stop_trim = no_stop_trim

    def _decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(ids, **self.kwargs)

    def add(self, new_ids: Sequence[int], final: bool = False) -> str:
        """Append ids; returns the cumulative text (held back at an incomplete character unless
        `final`)."""
        self.ids.extend(new_ids)
        prefix = self._decode(self.ids[self.surr:self.read])
        full = self._decode(self.ids[self.surr:])
        if len(full) > len(prefix) and (final or not full.endswith(REPLACEMENT)):
            self.text += full[len(prefix):]
            self.surr, self.read = self.read, len(self.ids)
        return self.text

    def final_text(self, matched_stop: Optional[str] = None) -> str:
        """The whole text once the engine finished the request: cut before the stop string the
        engine matched (or just after it with no_stop_trim). The engine stops at the first
        appearance, so the first occurrence is the one it matched."""
        if matched_stop:
            at = self.text.find(matched_stop)
            if at != -1:
                self.text = self.text[: at + len(matched_stop)] if self.no_stop_trim else self.text[:at]
        return self.text

    def visible_text(self) -> str:
        """Text safe to stream: a suffix that could start a stop string is not shown yet (the
        engine may yet report it matched and the text be cut there)."""
        if not self.stop:
            return self.text
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return self.text[: len(self.text) - hold] if hold else self.text


class StopChecker:
    """The engine's stop-string and stop_regex check for one request, one token at a time: the
    decision that ends generation. It renders text with the same incremental algorithm the API
    process uses, so the string it reports appears in the API's text exactly where it matched.
    Stop strings are checked first, then patterns; a pattern reports itself as `matched` (as
    SGLang does, so the API's literal cut normally leaves a regex match in the text)."""

    def __init__(self, tokenizer: Any, prompt_ids: Sequence[int], sampling_params: Any):
        sp = sampling_params
        self.detok = IncrementalDetokenizer(tokenizer, prompt_ids, sp.skip_special_tokens,
                                            sp.spaces_between_special_tokens)
        self.stop = [s for s in sp.stop if s]
        patterns = list(getattr(sp, "stop_regex", None) or [])
        self.regexes = StopRegexes(patterns) if patterns else None
        self.matched: Optional[str] = None
        self.searched = 0  # text before this index holds no stop string

    def add(self, token_id: int) -> Optional[str]:
        """Append one generated id; the matched stop string (or pattern), once one appears."""
        if self.matched is not None:
            return self.matched
        text = self.detok.add([token_id])
        # Only text that arrived since the last search (plus an overlap) can hold a new match.
        for s in self.stop:
            if text.find(s, max(self.searched - len(s) + 1, 0)) != -1:
                self.matched = s
                return s
        if self.regexes is not None and len(text) > self.searched:
            self.matched = self.regexes.search(text, self.searched)
            if self.matched is not None:
                return self.matched
        self.searched = len(text)
        return None
