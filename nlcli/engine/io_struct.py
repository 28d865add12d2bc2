"""IPC messages between the API process and the engine process (pickled over ZMQ).

API -> engine: TokenizedGenerateReqInput, AbortReq, FlushCacheReq, UpdateWeightReq,
GenerationControlReq, ShutdownReq.
Engine -> API: EngineReady (once), BatchTokenIDOut (output deltas), BatchEmbeddingOut (pooled
vectors / scores of embedding servers), FlushCacheReqOutput, UpdateWeightReqOutput,
GenerationControlOutput, Heartbeat (about once a second, with the scheduler's gauges).
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
    return_logprob: bool = False
    logprob_start_len: int = -1  # -1: no prompt logprobs; k >= 0: positions k .. P-1 (first null)
    top_logprobs_num: int = 0
    custom_logit_processor: Optional[str] = None  # CustomLogitProcessor.to_str() (SGLang's format)
    token_type_ids: Optional[list[int]] = None  # segment ids of a cross-encoder's (query, doc) pair
    token_ids_logprob: Optional[list[int]] = None


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
    # For the constant metrics: memory the weights and the KV pool take (GB), and how long the
    # engine's start-up phases took (seconds: load_weight, kv_cache_allocation, scheduler_e2e).
    weight_memory_gb: float = 0.0
    kv_cache_memory_gb: float = 0.0
    startup_seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LogprobDelta:
    """Logprobs of one request that the API process has not seen yet (raw floats and ids).

    Output lists align with the `new_token_ids` of the same entry; the input lists come once, in
    the spec's order (first entry `(None, prompt id k)` for logprob_start_len k, as SGLang).
    """

    output_token_logprobs: list[float] = field(default_factory=list)
    output_top_logprobs: Optional[list[list[tuple[float, int]]]] = None
    input_token_logprobs: Optional[list[tuple[Optional[float], int]]] = None
    input_top_logprobs: Optional[list[Optional[list[tuple[float, int]]]]] = None
    # token_ids_logprob: per position, the listed ids' logprobs in the request's order (input:
    # first entry None, like input_token_logprobs; output: one per output token, or one for
    # max_new_tokens == 0)
    output_token_ids_logprobs: Optional[list[list[float]]] = None
    input_token_ids_logprobs: Optional[list[Optional[list[float]]]] = None


@dataclass
class BatchTokenIDOut:
    """One entry per request that produced something this step; ids are the new ones only."""

    rids: list[str]
    new_token_ids: list[list[int]]
    finished_reasons: list[Optional[dict]]
    prompt_tokens: list[int]
    completion_tokens: list[int]
    cached_tokens: list[int]
    # One per entry: None unless the request asked for logprobs.
    logprobs: list[Optional[LogprobDelta]] = field(default_factory=list)


@dataclass
class Heartbeat:
    num_running_reqs: int = 0
    num_queue_reqs: int = 0
    num_used_tokens: int = 0
    token_usage: float = 0.0
    cache_hit_rate: float = 0.0
    gen_throughput: float = 0.0
    num_retractions: int = 0
    kv_available: int = 0
    kv_evictable: int = 0
    kv_used: int = 0
    num_grammar_queue_reqs: int = 0  # waiting for their grammar to compile


@dataclass
class BatchEmbeddingOut:
    """Finished requests of an embedding server: one pooled vector (or head scores) each."""

    rids: list[str]
    embeddings: list[list[float]]
    prompt_tokens: list[int]
    cached_tokens: list[int]


@dataclass
class UpdateWeightReq:
    model_path: str
    load_format: Optional[str] = None


@dataclass
class UpdateWeightReqOutput:
    success: bool
    message: str
    model_path: str  # what the engine serves afterwards (unchanged on failure)
    load_format: str


@dataclass
class GenerationControlReq:
    """/pause_generation (pause=True, with SGLang's mode: "abort" | "retract" | "in_place") and
    /continue_generation (pause=False)."""

    pause: bool
    mode: str = "abort"
    torch_empty_cache: bool = False


@dataclass
class GenerationControlOutput:
    paused: bool
    num_paused_requests: int = 0  # requests held in the engine (running or queued)
