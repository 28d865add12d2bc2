"""Custom logit processors: client-supplied Python that edits a request's next-token logits.

The wire format is SGLang's, so its client helpers work unchanged: a client subclasses
`CustomLogitProcessor`, sends `MyProcessor.to_str()` (JSON `{"callable": <dill pickle, hex>}`) as
the request's top-level `custom_logit_processor` and its arguments as
`sampling_params.custom_params`. The engine turns the string back into an instance with
`from_str` (cached per string) and the sampler calls it on the rows of the requests that carry it,
`processor(logits[rows], [custom_params of each row])`, after logit_bias, penalties and grammar
masks and before temperature and top-k/top-p/min-p. Each row's params also hold `"__req__"`, a weak
proxy to the engine's request (output_ids, origin_input_ids, ...), as SGLang's do.

Loading a processor runs arbitrary code from the client: servers accept them only with
`--enable-custom-logit-processor`. A pickle made against SGLang's base class
(`sglang.srt.sampling.custom_logit_processor`) loads against this one. Torch is imported only by
the processors themselves, so clients and the API process can import this module cheaply.
"""

from __future__ import annotations

import io
import json
from abc import ABC, abstractmethod
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional

import dill
import orjson

if TYPE_CHECKING:
    import torch

DISABLED_MESSAGE = ("The server is not configured to enable custom logit processor. Please set "
                    "`--enable-custom-logit-processor` to enable this feature.")
_SGLANG_MODULE = "sglang.srt.sampling.custom_logit_processor"


class _Unpickler(dill.Unpickler):
    """dill's unpickler, with SGLang's module for these classes mapped onto this one."""

    def find_class(self, module: str, name: str) -> Any:
        return super().find_class(__name__ if module == _SGLANG_MODULE else module, name)


@lru_cache(maxsize=256)
def _cache_from_str(json_str: str) -> type:
    data = orjson.loads(json_str)
    return _Unpickler(io.BytesIO(bytes.fromhex(data["callable"]))).load()


class CustomLogitProcessor(ABC):
    """Subclass it and implement `__call__`; send `YourClass.to_str()` with the request."""

    @abstractmethod
    def __call__(self, logits: "torch.Tensor",
                 custom_param_list: Optional[list[dict[str, Any]]] = None) -> "torch.Tensor":
        """`logits` [rows, vocab] of the requests carrying this processor, `custom_param_list`
        one params dict (or None) per row; return a tensor of the same shape."""
        raise NotImplementedError

    @classmethod
    def to_str(cls) -> str:
        """The class as SGLang's wire string."""
        return json.dumps({"callable": dill.dumps(cls).hex()})

    @classmethod
    def from_str(cls, json_str: str) -> "CustomLogitProcessor":
        """An instance of the class `json_str` carries (the class is cached per string)."""
        return _cache_from_str(json_str)()


class DisallowedTokensLogitsProcessor(CustomLogitProcessor):
    """SGLang's built-in: `custom_params={"token_ids": [...]}` can never be sampled."""

    def __call__(self, logits, custom_param_list=None):
        disallowed = custom_param_list[0]["token_ids"]
        if any(p["token_ids"] != disallowed for p in custom_param_list):
            raise ValueError("DisallowedTokensLogitsProcessor needs the same token_ids on every row")
        logits[..., disallowed] = -float("inf")
        return logits


def check_wire_format(value: Any) -> None:
    """The API process's cheap check (it never unpickles): JSON holding a hex "callable"."""
    try:
        data = orjson.loads(value) if isinstance(value, str) else None
        ok = isinstance(data, dict) and isinstance(data.get("callable"), str)
        if ok:
            bytes.fromhex(data["callable"])
    except (orjson.JSONDecodeError, ValueError):
        ok = False
    if not ok:
        raise ValueError("custom_logit_processor must be the string CustomLogitProcessor.to_str() "
                         'returns (JSON with a hex "callable").')


def load_processor(json_str: str, enabled: bool) -> CustomLogitProcessor:
    """The engine's load of a request's processor; ValueError (a 400) when the server does not
    enable them or the string does not unpickle to a CustomLogitProcessor."""
    if not enabled:
        raise ValueError(DISABLED_MESSAGE)
    check_wire_format(json_str)
    try:
        processor = CustomLogitProcessor.from_str(json_str)
    except Exception as e:  # unpickling runs the client's code: any error is theirs
        raise ValueError(f"custom_logit_processor could not be loaded: {e!r}") from None
    if not callable(processor):
        raise ValueError("custom_logit_processor is not callable.")
    return processor


def apply_processors(logits: "torch.Tensor", groups: list[tuple[Any, list[int], "torch.Tensor"]],
                     params: list[Optional[dict]]) -> dict[int, str]:
    """Run each (processor, rows, row index tensor) group on its rows of `logits`, in place.
    Returns {row: error} for the rows whose processor raised or returned a wrong shape: those
    rows keep their logits and their requests are ended by the caller, not the whole batch."""
    failed: dict[int, str] = {}
    for processor, rows, index in groups:
        selected = logits.index_select(0, index)
        try:
            result = processor(selected, [params[i] for i in rows])
            if tuple(getattr(result, "shape", ())) != tuple(selected.shape):
                raise ValueError(f"returned shape {tuple(getattr(result, 'shape', ()))}, "
                                 f"expected {tuple(selected.shape)}")
            logits.index_copy_(0, index, result.to(device=logits.device, dtype=logits.dtype))
        except Exception as e:  # the client's code: fail its requests, keep the batch
            failed.update({i: f"custom_logit_processor failed: {e!r}" for i in rows})
    return failed
