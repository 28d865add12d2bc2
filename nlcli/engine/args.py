"""ServerArgs: every setting of `nl serve`, one frozen dataclass.

The same object is logged at start-up (`server_args=ServerArgs(...)`), returned flat by
`/get_server_args`, and turned into `nl serve` flags (one flag per field, help text from the field's
metadata). Field names follow SGLang's so clients that read them keep working. Fields marked
`secret` (the API keys) are masked wherever args are reported (repr, `public_dict`), and can also
come from a file (`--X-file`) or an environment variable (`with_secrets`). Flags in
COMPAT_GROUP are accepted for SGLang command-line compatibility and ignored: setting one logs a
warning at start, and `nl serve --help` lists them under their own heading. Fields with metadata
`only` accept just those values; anything else stops `nl serve` at start (`refused_flags`).
"""

from __future__ import annotations

import dataclasses
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional


def _arg(default: Any, help: str, choices: tuple[str, ...] | None = None, **kw: Any) -> Any:
    meta = {"help": help}
    if choices:
        meta["choices"] = choices
    meta.update(kw)
    return field(default=default, metadata=meta)


# Prefill token budgets when --max-prefill-tokens is not given. A CPU prefills a few thousand
# tokens a second, so a 2048-token batch bounds how long running requests and the queue's next
# first token wait behind one step; a GPU takes SGLang's 16k.
CPU_MAX_PREFILL_TOKENS = 2048
GPU_MAX_PREFILL_TOKENS = 16384

# Flags SGLang has and nl accepts without acting on them, so existing command lines start.
COMPAT_GROUP = "Compatibility only (accepted, ignored)"


MASK = "***"


def _secret(help: str, env: str, flag: str) -> Any:
    """A secret: masked when reported; unset, it is read from its `_file` field or from `env`."""
    return _arg(None, f"{help} Also from ${env} or {flag}-file; never printed.", secret=True,
                env=env)


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
    skip_tokenizer_init: bool = _arg(False, "Load no tokenizer: requests send input_ids and get "
                                     "output_ids, no text (stop strings, grammars and the chat "
                                     "and completions routes are then refused).")
    load_format: str = _arg("auto", "Weight format.", ("auto", "safetensors", "gguf", "dummy"))
    dtype: str = _arg(
        "auto",
        "Weight and activation dtype. auto: bfloat16 on GPU; on CPU the fastest dtype that stays "
        "correct.",
        ("auto", "float32", "bfloat16", "float16", "half", "float"),
    )
    quantization: Optional[str] = _arg(
        None, "Weight-only quantized matmuls on CPU for decode batches of up to N rows (N measured "
        "at start and logged; larger batches stay dense), computed in bfloat16. gguf: a GGUF's "
        "own 4-bit matrices stay 4-bit (lossless), the rest dense. int8: every matrix and the "
        "lm_head, one scale per row (SGLang: --torchao-config int8wo). int4: every matrix 4-bit "
        "per 32 weights, the lm_head int8 (SGLang: int4wo-32). none: dense. Unset (auto): gguf "
        "for a 4-bit checkpoint where it measures faster; an explicit --dtype float32 stays exact.",
        ("auto", "none", "gguf", "int8", "int4"))
    context_length: Optional[int] = _arg(None, "Override the model's context length.")
    device: str = _arg("auto", "Device: auto (cuda if present), cpu or cuda.", ("auto", "cpu", "cuda"))
    served_model_name: Optional[str] = _arg(None, "Name in /v1/models. Default: the model path.")
    chat_template: Optional[str] = _arg(None, "Jinja chat template file overriding the model's.")
    is_embedding: bool = _arg(False, "Serve an embedding or reward model (/encode, /classify).")
    revision: Optional[str] = _arg(None, "Hub revision for a repo id.")
    json_model_override_args: str = _arg(
        "{}", "A dictionary in JSON string format used to override default model configurations "
        "(merged into the model's config.json at load).")
    download_dir: Optional[str] = _arg(None, "Hub cache directory.")

    # HTTP
    host: str = _arg("127.0.0.1", "Bind address.")
    port: int = _arg(30000, "Bind port.")
    api_key: Optional[str] = _secret("Require `Authorization: Bearer KEY` (all but /health).",
                                     "NL_API_KEY", "--api-key")
    api_key_file: Optional[str] = _arg(None, "Read --api-key from this file (keeps it out of ps).")
    admin_api_key: Optional[str] = _secret(
        "Key for the admin routes (weight updates, flush, abort, pause/continue); the user key "
        "is not enough for them when set. Either key opens the other routes.",
        "NL_ADMIN_API_KEY", "--admin-api-key")
    admin_api_key_file: Optional[str] = _arg(None, "Read --admin-api-key from this file.")
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
    max_prefill_tokens: Optional[int] = _arg(
        None, f"Token budget of one prefill batch (auto: {GPU_MAX_PREFILL_TOKENS} on GPU, "
        f"{CPU_MAX_PREFILL_TOKENS} on CPU, where a smaller batch keeps first tokens coming).")
    enable_mixed_chunk: Optional[bool] = _arg(
        None, "Run running requests' decode tokens in the same forward as prefill chunks, so they "
        "keep decoding while new prompts prefill (auto: on for CPU, off on GPU).")
    schedule_policy: str = _arg("lpm", "Waiting-queue order.", ("lpm", "fcfs"))
    schedule_conservativeness: float = _arg(1.0, "Larger: fewer retractions, less concurrency.")
    max_queued_requests: Optional[int] = _arg(
        None, "Waiting-queue cap; a request beyond it ends with 503 \"The request queue is full.\"")
    waiting_timeout: Optional[float] = _arg(
        None, "Seconds a request may wait in the queue before it ends with a 503 (default: "
        "$SGLANG_REQ_WAITING_TIMEOUT, else off; <= 0 is off).")
    running_timeout: Optional[float] = _arg(
        None, "Seconds a request may run once its prefill started before it ends with a 503 "
        "(default: $SGLANG_REQ_RUNNING_TIMEOUT, else off; <= 0 is off).")
    clip_max_new_tokens_estimation: Optional[int] = _arg(
        None, "Admission counts at most this many future tokens per request, so requests without "
        "max_tokens share a small pool; retraction covers the rest (default: "
        "$SGLANG_CLIP_MAX_NEW_TOKENS_ESTIMATION, else 4096).")
    stream_interval: int = _arg(1, "Decode steps between stream events.")
    random_seed: Optional[int] = _arg(None, "Global seed (random if unset).")
    disable_radix_cache: bool = _arg(False, "Turn off prefix caching.")
    enable_custom_logit_processor: bool = _arg(
        False, "Accept requests' custom_logit_processor: client-supplied Python (a dill pickle) "
        "run inside the engine. Disabled by default for security; enable only for trusted "
        "clients.")
    watchdog_timeout: float = _arg(300.0, "A step longer than this (seconds) dumps every thread's "
                                   "stack to the log and turns /health 503; twice this kills the "
                                   "engine.")
    shutdown_timeout: float = _arg(30.0, "On SIGTERM, seconds to let running requests finish.")
    num_threads: Optional[int] = _arg(None, "torch CPU threads (default: OMP_NUM_THREADS, else one per physical core).")

    # Parallelism. Tensor parallel ranks on torch.distributed (gloo on CPU, nccl on CUDA);
    # data parallelism: --dp-size engine groups behind one API process, which routes each
    # request to one of them (--load-balance-method; nlcli/engine/api/dp/).
    tp_size: int = _arg(1, "Tensor parallel size: engine processes (ranks) that split each layer; "
                        "heads split by KV groups, unevenly if need be.")
    nnodes: int = _arg(1, "Machines the --tp-size ranks span (each runs tp_size / nnodes).")
    node_rank: int = _arg(0, "This machine's index; node 0 serves HTTP, the others run engine "
                          "ranks only.")
    dist_init_addr: Optional[str] = _arg(None, "HOST:PORT of node 0 where ranks meet "
                                         "(torch.distributed TCP store); needed with --nnodes > 1.")
    dist_timeout: Optional[int] = _arg(None, "Seconds ranks wait for each other at start (and for "
                                       "one collective) before failing (default 1800).")
    dp_size: int = _arg(1, "Data parallel size: engine groups (model replicas) behind one API "
                        "process.", minimum=1)
    load_balance_method: str = _arg(
        "auto", "How requests are spread over the --dp-size groups. auto: round_robin (as "
        "SGLang); shortest_queue (SGLang's total_requests): fewest requests in flight; "
        "cache_aware: the group whose routed prompts share the longest prefix, unless groups "
        "are unbalanced (sglang-router's policy).",
        ("auto", "round_robin", "shortest_queue", "total_requests", "cache_aware",
         "total_tokens", "follow_bootstrap_room"),
        only=("auto", "round_robin", "shortest_queue", "total_requests", "cache_aware"))

    # Kernels
    attention_backend: str = _arg("auto", "Attention kernels.", ("auto", "torch_native", "triton"))
    disable_cuda_graph: bool = _arg(False, "Do not capture CUDA graphs for decode.")
    cuda_graph_max_bs: int = _arg(
        160, "Largest decode batch replayed from a CUDA graph (buckets 1, 2, 4, 8, then steps of 8)."
    )

    enable_torch_compile: bool = _arg(
        False, "CPU: run decode batches through torch.compile (inductor), buckets of batch sizes "
        "compiled in a background thread at start while eager serves.")
    torch_compile_max_bs: int = _arg(
        32, "Largest decode batch run compiled (buckets 1, 2, 4, 8, then steps of 8).")

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
    trust_remote_code: bool = _compat(False, "SGLang: run the checkpoint's own Python code. nl "
                                      "never runs remote code.")
    kv_cache_dtype: str = _compat("auto", "SGLang: KV cache dtype. nl keeps K/V in the model "
                                  "dtype.", ("auto",))
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

    def refused_flags(self) -> list[str]:
        """Flags set to a value nl cannot honour (metadata `only`, `minimum`); `nl serve` refuses
        to start."""
        fields = dataclasses.fields(self)
        return [f"--{f.name.replace('_', '-')} {getattr(self, f.name)} (nl supports only "
                f"{', '.join(map(str, f.metadata['only']))})" for f in fields
                if "only" in f.metadata and getattr(self, f.name) not in f.metadata["only"]] + [
            f"--{f.name.replace('_', '-')} {getattr(self, f.name)} (must be at least "
            f"{f.metadata['minimum']})" for f in fields
            if "minimum" in f.metadata and getattr(self, f.name) < f.metadata["minimum"]]

    def env_default(self, name: str, env: str, fallback: Any) -> Any:
        """Flag `name` if set, else SGLang's environment variable `env`, else `fallback`."""
        value = getattr(self, name)
        if value is not None:
            return value
        raw = os.environ.get(env)
        if raw is None or raw.strip() == "":
            return fallback
        return type(fallback)(float(raw)) if fallback is not None else float(raw)

    def prefill_token_budget(self, device_type: str) -> int:
        """--max-prefill-tokens, or the default for this device ("cpu", "cuda")."""
        if self.max_prefill_tokens:
            return int(self.max_prefill_tokens)
        return CPU_MAX_PREFILL_TOKENS if device_type == "cpu" else GPU_MAX_PREFILL_TOKENS

    def mixed_chunk(self, device_type: str) -> bool:
        """Whether decodes ride along in prefill forwards (--enable-mixed-chunk, else auto)."""
        if self.enable_mixed_chunk is None:
            return device_type == "cpu"
        return bool(self.enable_mixed_chunk)

    def replace(self, **changes: Any) -> "ServerArgs":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def public_dict(self) -> dict[str, Any]:
        """to_dict with every secret masked (what /get_server_args and friends report)."""
        return {k: (MASK if v is not None and k in _SECRETS else v)
                for k, v in self.to_dict().items()}

    def __repr__(self) -> str:  # the start-up log prints it
        body = ", ".join(f"{k}={v!r}" for k, v in self.public_dict().items())
        return f"ServerArgs({body})"

    def with_secrets(self, environ: Mapping[str, str] = os.environ) -> "ServerArgs":
        """Each secret left unset read from its --X-file, else from its environment variable.
        ValueError (never quoting a secret) for a flag given with its file, or a file that is
        unreadable or empty."""
        changes = {}
        for name in _SECRETS:
            flag = "--" + name.replace("_", "-")
            value, path = getattr(self, name), getattr(self, name + "_file")
            if path is not None:
                if value is not None:
                    raise ValueError(f"Give {flag} or {flag}-file, not both.")
                try:
                    value = Path(path).read_text().strip()
                except OSError as e:
                    raise ValueError(f"Cannot read {flag}-file: {e}") from None
                if not value:
                    raise ValueError(f"{flag}-file {path} is empty.")
            elif value is None:
                value = environ.get(_ENV[name]) or None
            changes[name] = value
        return self.replace(**changes)

    def with_seed(self) -> "ServerArgs":
        """A copy whose random_seed is fixed, so every process of one server shares it."""
        if self.random_seed is not None:
            return self
        return self.replace(random_seed=random.randint(0, 2**30))


_SECRETS = tuple(f.name for f in dataclasses.fields(ServerArgs) if f.metadata.get("secret"))
_ENV = {f.name: f.metadata["env"] for f in dataclasses.fields(ServerArgs) if f.metadata.get("secret")}
