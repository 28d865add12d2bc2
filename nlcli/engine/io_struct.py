"""IPC messages between the API process and the engine process (pickled over ZMQ).

API -> engine: TokenizedGenerateReqInput, AbortReq, FlushCacheReq, ShutdownReq.
Engine -> API: EngineReady (once), BatchTokenIDOut (output deltas), FlushCacheReqOutput,
Heartbeat (about once a second, with the scheduler's gauges).
Plain dataclasses of builtins so the API process can unpickle them without torch model code.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class TokenizedGenerateReqInput:
    rid: str
    input_ids: list[int]
    sampling_params: Any  # SamplingParams (picklable dataclass)
    stream: bool = False


@dataclass
class AbortReq:
    rid: Optional[str] = None
    abort_all: bool = False
    message: str = "Abort request"


@dataclass
class FlushCacheReq:
    pass


@dataclass
class FlushCacheReqOutput:
    success: bool


@dataclass
class ShutdownReq:
    pass


@dataclass
class EngineReady:
    max_total_num_tokens: int
    max_prefill_tokens: int
    max_running_requests: int
    context_len: int
    device: str
    dtype: str
    is_generation: bool = True
    vocab_size: int = 0
    eos_token_ids: list[int] = field(default_factory=list)


@dataclass
class BatchTokenIDOut:
    """One entry per request that produced something this step; ids are the new ones only."""

    rids: list[str]
    new_token_ids: list[list[int]]
    finished_reasons: list[Optional[dict]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]


@dataclass
class Heartbeat:
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_used_tokens: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0
    gen_throughput: float = 0.0
    num_retractions: int = 0
