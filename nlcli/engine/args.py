"""ServerArgs: every setting of `nl serve`, one frozen dataclass.

The same object is logged at start-up (`server_args=ServerArgs(...)`), returned flat by
`/get_server_args`, and turned into `nl serve` flags (one flag per field, help text from the field's
metadata). Field names follow SGLang's so clients that read them keep working. Flags in
COMPAT_GROUP are accepted for SGLang command-line compatibility and ignored: setting one logs a
warning at start, and `nl serve --help` lists them under their own heading.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field
from typing import Any, Optional


def _arg(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    meta.update(kw)
    return field(default=default, metadata=meta)


# Flags SGLang has and nl accepts without acting on them, so existing command lines start.
COMPAT_GROUP = "Compatibility only (accepted, ignored)"


def _compat(default: Any, help: str, choices: tuple[str, ...] | None = None) -> Any:
    return _arg(default, help, choices, group=COMPAT_GROUP)


@dataclass(frozen=True)
class ServerArgs:
    # Model and tokenizer
    model_path: Optional[str] = _arg(
        None,
        "HF model directory, .gguf file, or Hub repo id. Default: the embedded SmolLM2-135M-Instruct "
        "(all-MiniLM-L6-v2 with --is-embedding).",
    )
    tokenizer_path: Optional[str] = _arg(None, "Tokenizer location. Default: the model's.")
    load_format: str = _arg("auto", "Weight format.", ("auto", "safetensors", "gguf", "dummy"))
    dtype: str = _arg(
        "auto",
        "Weight and activation dtype. auto: bfloat16 on GPU; on CPU the fastest dtype that stays "
        "correct.",
        ("auto", "float32", "bfloat16", "float16", "half", "float"),
    )
    context_length: Optional[int] = _arg(None, "Override the model's context length.")
    device: str = _arg("auto", "Device: auto (cuda if present), cpu or cuda.", ("auto", "cpu", "cuda"))
    served_model_name: Optional[str] = _arg(None, "Name in /v1/models. Default: the model path.")
    chat_template: Optional[str] = _arg(None, "Jinja chat template file overriding the model's.")
    is_embedding: bool = _arg(False, "Serve an embedding or reward model (/encode, /classify).")
    revision: Optional[str] = _arg(None, "Hub revision for a repo id.")
    download_dir: Optional[str] = _arg(None, "Hub cache directory.")

    # HTTP
    host: str = _arg("127.0.0.1", "Bind address.")
    port: int = _arg(30000, "Bind port.")
    api_key: Optional[str] = _arg(None, "Require `Authorization: Bearer KEY` (all but /health).")
    cors_origins: Optional[str] = _arg(None, "Comma-separated allowed CORS origins (off if unset).")
    max_request_bytes: int = _arg(8 * 1024 * 1024, "Largest accepted request body (413 above).")
    timeout_keep_alive: int = _arg(5, "Seconds an idle keep-alive connection stays open.")
    timeout_request_header: float = _arg(
        30.0, "Seconds a connection may take to send a request's headers before it is closed.")
    limit_concurrency: Optional[int] = _arg(
        None, "Answer 503 once this many connections or requests are open (default: no limit).")

    # Memory and scheduling
    mem_fraction_static: Optional[float] = _arg(
        None, "Fraction of free memory for weights + KV pool (auto: 0.88 GPU, 0.25 CPU)."
    )
    max_running_requests: Optional[int] = _arg(None, "Cap on concurrently running requests.")
    max_total_tokens: Optional[int] = _arg(None, "KV pool size in tokens (overrides the fraction).")
    chunked_prefill_size: int = _arg(2048, "Split prompts longer than this into chunks; -1 = off.")
    max_prefill_tokens: int = _arg(16384, "Token budget of one prefill batch.")
    schedule_policy: str = _arg("lpm", "Waiting-queue order.", ("lpm", "fcfs"))
    schedule_conservativeness: float = _arg(1.0, "Larger: fewer retractions, less concurrency.")
    stream_interval: int = _arg(1, "Decode steps between stream events.")
    random_seed: Optional[int] = _arg(None, "Global seed (random if unset).")
    disable_radix_cache: bool = _arg(False, "Turn off prefix caching.")
    watchdog_timeout: float = _arg(300.0, "Kill the engine if one step takes longer (seconds).")
    shutdown_timeout: float = _arg(30.0, "On SIGTERM, seconds to let running requests finish.")
    num_threads: Optional[int] = _arg(None, "torch CPU threads (default: OMP_NUM_THREADS, else one per physical core).")

    # Parallelism (single process group for now)
    tp_size: int = _arg(1, "Tensor parallel size.")
    dp_size: int = _arg(1, "Data parallel size.")

    # Kernels
    attention_backend: str = _arg("auto", "Attention kernels.", ("auto", "torch_native", "triton"))
    disable_cuda_graph: bool = _arg(False, "Do not capture CUDA graphs for decode.")
    cuda_graph_max_bs: int = _arg(
        160, "Largest decode batch replayed from a CUDA graph (buckets 1, 2, 4, 8, then steps of 8)."
    )

    # Weight updates
    weights_root: Optional[str] = _arg(None, "update_weights paths must lie under this directory.")
    allow_remote_weights: bool = _arg(False, "Let update_weights download Hub repo ids.")

    # Logging and metrics
    log_level: str = _arg("info", "Log level.", ("debug", "info", "warning", "error"))
    log_level_http: Optional[str] = _arg(None, "uvicorn access-log level (default: warning).")
    log_requests: bool = _arg(False, "Log each request's rid and token counts as it arrives and "
                              "finishes.")
    decode_log_interval: int = _arg(40, "Decode steps between `Decode batch.` log lines.")
    enable_metrics: bool = _arg(False, "Expose Prometheus metrics at /metrics.")
    enable_cache_report: bool = _arg(False, "Report cached_tokens in OpenAI usage.")

    # Compatibility only: accepted so SGLang command lines start, but nl ignores them (a
    # non-default value logs a warning at start; `nl serve --help` lists them apart).
    tokenizer_mode: str = _compat("auto", "SGLang: slow tokenizer mode. nl always uses the fast "
                                  "tokenizer.", ("auto", "slow"))
    skip_tokenizer_init: bool = _compat(False, "SGLang: serve token ids without a tokenizer. nl "
                                        "always loads the tokenizer.")
    trust_remote_code: bool = _compat(False, "SGLang: run the checkpoint's own Python code. nl "
                                      "never runs remote code.")
    kv_cache_dtype: str = _compat("auto", "SGLang: KV cache dtype. nl keeps K/V in the model "
                                  "dtype.", ("auto",))
    quantization: Optional[str] = _compat(None, "SGLang: quantization method. nl dequantizes GGUF "
                                          "weights to --dtype at load.")
    load_balance_method: str = _compat("round_robin", "SGLang: data-parallel routing. nl runs one "
                                       "engine.", ("round_robin", "shortest_queue"))
    grammar_backend: str = _compat("xgrammar", "SGLang: grammar engine. nl always uses xgrammar.",
                                   ("xgrammar",))
    constrained_json_whitespace_pattern: Optional[str] = _compat(
        None, "SGLang: whitespace regex for JSON output. nl always emits compact JSON.")
    sampling_backend: str = _compat("pytorch", "SGLang: sampler implementation. nl has one.",
                                    ("pytorch",))
    show_time_cost: bool = _compat(False, "SGLang: log time spent per step. Not implemented.")

    def ignored_flags(self) -> list[str]:
        """The compatibility-only flags set to something other than their default."""
        return ["--" + f.name.replace("_", "-") for f in dataclasses.fields(self)
                if f.metadata.get("group") == COMPAT_GROUP and getattr(self, f.name) != f.default]

    def replace(self, **changes: Any) -> "ServerArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_seed(self) -> "ServerArgs":
        """A copy whose random_seed is fixed, so every process of one server shares it."""
        if self.random_seed is not None:
            return self
        return self.replace(random_seed=random.randint(0, 2**30))
