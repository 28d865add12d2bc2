"""SamplingParams: one request's `sampling_params`, normalized and validated.

`SamplingParams.from_dict` is what the API process calls on the wire dict; every rejection is a
`ValueError` whose text is the message the client gets back in a 400 (API_SPEC section 3). The
object is a plain dataclass so it crosses the ZMQ pipe as a pickle.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from nlcli.engine.sampling.coerce import FLOAT32_MAX, as_float32, coerce, show

# Caps that keep one request from monopolising a step or the detokenizer (stated in the README).
MAX_N = 64
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_LEN = 256
MAX_STOP_TOKEN_IDS = 256
MAX_STOP_REGEX = 32  # SGLang's caps: patterns per request, UTF-8 bytes per pattern
MAX_STOP_REGEX_BYTES = 256
MAX_LOGIT_BIAS = 300
MAX_SEED = 2**63 - 1
# Below this a temperature means greedy (SGLang's threshold).
GREEDY_EPS = 1e-6

_ALIASES = {"sampling_seed": "seed", "no_eos_trim": "no_stop_trim"}
_GRAMMAR_KINDS = ("regex", "json_schema", "ebnf")


@dataclass
class SamplingParams:
    max_new_tokens: Optional[int] = 128  # None = until the context is full
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = whole vocabulary
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_regex: list[str] = field(default_factory=list)  # re.search over the decoded output tail
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    regex: Optional[str] = None
    json_schema: Optional[str] = None
    ebnf: Optional[str] = None
    custom_params: Optional[dict] = None
    seed: Optional[int] = None
    logit_bias: Optional[dict[int, float]] = None  # OpenAI's token id -> additive bias

    def __post_init__(self) -> None:
        self._verify()
        # Greedy is top_k=1 at temperature 1, so the sampler has a single code path (SGLang's rewrite).
        if self.temperature < GREEDY_EPS:
            self.temperature = 1.0
            self.top_k = 1

    # ------------------------------------------------------------------ construction from the wire

    @classmethod
    def from_dict(cls, d: Optional[dict]) -> "SamplingParams":
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise ValueError(f"sampling_params must be an object, got {show(d)}.")
        known = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in d.items():
            name = _ALIASES.get(key, key)
            if name not in known:
                raise ValueError(f"Unknown sampling parameter: {key!r}")
            if name in kwargs and kwargs[name] != value and value is not None:
                raise ValueError(f"{key} conflicts with {name}; set only one.")
            if value is None and name in kwargs:
                continue
            kwargs[name] = value
        for name, value in list(kwargs.items()):
            if value is None and name != "max_new_tokens":
                del kwargs[name]  # an explicit null means the default
        return cls(**{k: coerce(k, v) for k, v in kwargs.items()})

    # ------------------------------------------------------------------ derived views

    @property
    def is_greedy(self) -> bool:
        return self.top_k == 1

    @property
    def grammar(self) -> Optional[tuple[str, str]]:
        """(kind, text) of the output constraint, or None."""
        for kind in _GRAMMAR_KINDS:
            text = getattr(self, kind)
            if text is not None:
                return kind, text
        return None

    def verify_token_ids(self, vocab_size: int) -> None:
        """Reject token ids the model cannot produce (needs the vocab, so it runs after load)."""
        for tid in self.stop_token_ids:
            if tid >= vocab_size:
                raise ValueError(
                    f"stop_token_ids contains {tid}, which is out of the vocabulary "
                    f"(size {vocab_size})."
                )
        for tid in self.logit_bias or {}:
            if tid >= vocab_size:
                raise ValueError(
                    f"logit_bias contains token id {tid}, which is out of the vocabulary "
                    f"(size {vocab_size})."
                )

    # ------------------------------------------------------------------ checks

    def _verify(self) -> None:
        if self.max_new_tokens is not None and self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be at least 0, got {self.max_new_tokens}.")
        if self.min_new_tokens < 0:
            raise ValueError(
                f"min_new_tokens must be in (0, max_new_tokens], got {self.min_new_tokens}."
            )
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens must be in (0, max_new_tokens({self.max_new_tokens})], "
                f"got {self.min_new_tokens}."
            )
        if self.temperature < 0.0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}.")
        # The sampler divides in float32: a temperature that overflows it would turn masked
        # (-inf) logits into NaN.
        if math.isinf(as_float32(self.temperature)):
            raise ValueError(
                f"temperature must be at most {FLOAT32_MAX:.7g} (float32), got {self.temperature}."
            )
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")
        if self.top_k != -1 and self.top_k < 1:
            raise ValueError(f"top_k must be -1 (disable), or at least 1, got {self.top_k}.")
        if not 0.0 <= self.min_p <= 1.0:
            raise ValueError(f"min_p must be in [0, 1], got {self.min_p}.")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            raise ValueError(f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.")
        if not -2.0 <= self.presence_penalty <= 2.0:
            raise ValueError(f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.")
        # 0 would divide positive logits by zero, so the open bound the message states is enforced,
        # on the float32 value the sampler uses (1e-300 is 0.0 there).
        if not 0.0 < self.repetition_penalty <= 2.0:
            raise ValueError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}."
            )
        if as_float32(self.repetition_penalty) == 0.0:
            raise ValueError(
                f"repetition_penalty must be in (0, 2], got {self.repetition_penalty} "
                "(0.0 in float32)."
            )
        if not 1 <= self.n <= MAX_N:
            raise ValueError(f"n must be in [1, {MAX_N}], got {self.n}.")
        if len(self.stop) > MAX_STOP_STRINGS:
            raise ValueError(f"stop must have at most {MAX_STOP_STRINGS} strings, got {len(self.stop)}.")
        for s in self.stop:
            if not s:
                raise ValueError("stop strings must be non-empty.")
            if len(s) > MAX_STOP_STRING_LEN:
                raise ValueError(
                    f"stop strings must be at most {MAX_STOP_STRING_LEN} characters, got {len(s)}."
                )
        _verify_stop_regex(self.stop_regex)
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise ValueError(
                f"stop_token_ids must have at most {MAX_STOP_TOKEN_IDS} ids, "
                f"got {len(self.stop_token_ids)}."
            )
        for tid in self.stop_token_ids:
            if tid < 0:
                raise ValueError(f"stop_token_ids must be non-negative, got {tid}.")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2**63 - 1], got {self.seed}.")
        if self.logit_bias:
            if len(self.logit_bias) > MAX_LOGIT_BIAS:
                raise ValueError(f"logit_bias must have at most {MAX_LOGIT_BIAS} entries.")
            for tid, bias in self.logit_bias.items():
                if tid < 0:
                    raise ValueError(f"logit_bias token ids must be non-negative, got {tid}.")
                if not -100.0 <= bias <= 100.0:
                    raise ValueError(f"logit_bias values must be in [-100, 100], got {bias}.")
        set_grammars = [k for k in _GRAMMAR_KINDS if getattr(self, k) is not None]
        if len(set_grammars) > 1:
            raise ValueError("Only one of regex, json_schema, or ebnf can be set.")
        for kind in set_grammars:
            if not getattr(self, kind).strip():
                raise ValueError(f"{kind} must be a non-empty string.")


def _verify_stop_regex(patterns: list[str]) -> None:
    """SGLang's caps and messages; a pattern that does not compile is refused here (SGLang's
    engine aborts it with the same text) so the engine only ever sees valid ones."""
    if len(patterns) > MAX_STOP_REGEX:
        raise ValueError(f"at most {MAX_STOP_REGEX} stop_regex patterns are allowed, "
                         f"got {len(patterns)}")
    for p in patterns:
        size = len(p.encode("utf-8"))
        if size > MAX_STOP_REGEX_BYTES:
            raise ValueError(f"stop_regex is {size} bytes, over the {MAX_STOP_REGEX_BYTES}-byte limit")
        try:
            re.compile(p)
        except (re.error, RecursionError, OverflowError) as e:
            raise ValueError(f"invalid stop_regex {p!r}: {e}") from None
