"""Which request fields nl honours, per request shape, and the check that makes every other field
a 400 naming it: nothing a client sends is silently ignored.

A `FieldPolicy` covers one request shape (the /generate body, /encode, each /v1 model). It knows
the fields nl honours and the fields it knows but does not implement, each of those with the
values that mean "not asked for" (null and the field's default always do). `check(fields)` raises
ValueError `<field> is not supported by this server.` for an unimplemented field set to anything
else. A field the shape does not know at all is `Unknown field: '<name>'` on /generate (its list is
SGLang's GenerateReqInput, so an unknown name is a typo) and unsupported on /v1 (OpenAI and SGLang
keep adding fields there; an SDK's `extra_body` lands at the top level too).

Wiring a newly implemented field is one line beside the code that reads it:
`GENERATE.honour("token_ids_logprob")`, or the model's `OPENAI_POLICIES[...]` entry. A field that
is read but not honoured is refused at runtime, and tests/test_request_fields.py fails on it.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping, Optional

_UNSET = object()


class FieldPolicy:
    def __init__(self, name: str, honoured: Iterable[str], unsupported: Mapping[str, tuple] = (),
                 unknown_is_typo: bool = False):
        self.name = name
        self.honoured: set[str] = set(honoured)
        # field -> values that leave it unused (besides None and `defaults[field]`)
        self.unsupported: dict[str, tuple] = dict(unsupported or {})
        self.defaults: dict[str, Any] = {}
        self.unknown_is_typo = unknown_is_typo

    # ---- registration ----------------------------------------------------------------------
    def honour(self, *names: str) -> "FieldPolicy":
        """Mark fields as implemented (they stop being refused)."""
        for n in names:
            self.honoured.add(n)
            self.unsupported.pop(n, None)
        return self

    def refuse(self, name: str, *neutral: Any) -> "FieldPolicy":
        """Mark a known field as not implemented; `neutral` values are accepted as "unused"."""
        self.honoured.discard(name)
        self.unsupported[name] = tuple(neutral)
        return self

    def known(self) -> set[str]:
        return self.honoured | set(self.unsupported)

    # ---- the check -------------------------------------------------------------------------
    def is_neutral(self, name: str, value: Any) -> bool:
        if value is None:
            return True
        if self.defaults.get(name, _UNSET) == value:
            return True
        return any(type(v) is type(value) and v == value for v in self.unsupported.get(name, ()))

    def problem(self, fields: Mapping[str, Any]) -> Optional[tuple[str, str]]:
        """(field, 400 message) for the first field in `fields` nl would ignore, else None."""
        for name, value in fields.items():
            if name in self.honoured:
                continue
            if name not in self.unsupported and self.unknown_is_typo:
                return name, f"Unknown field: {name!r}"
            if not self.is_neutral(name, value):
                return name, f"{name} is not supported by this server."
        return None

    def check(self, fields: Mapping[str, Any]) -> None:
        found = self.problem(fields)
        if found is not None:
            raise ValueError(found[1])


# ---- /generate: SGLang's GenerateReqInput, every field (sglang 0.5.23, managers/io_struct.py) --
# A bool field's False, and log_metrics' True, are its SGLang default: "not asked for".
GENERATE = FieldPolicy(
    "/generate",
    honoured=("rid", "text", "input_ids", "sampling_params", "stream", "return_logprob",
              "logprob_start_len", "top_logprobs_num", "return_text_in_logprobs",
              "custom_logit_processor", "token_ids_logprob"),
    unsupported={
        # identity and input
        "session_id": (), "input_embeds": (), "image_data": (), "video_data": (), "audio_data": (),
        "mm_hashes": (), "mm_content_hashes": (), "use_audio_in_video": (False,),
        "video_config": (), "watermark": (),
        # logprobs
        "return_sampling_mask": (False,), "sampling_logprobs_mode": (),
        "return_flat_raw_top_logprobs": (False,), "return_flat_raw_output_top_logprobs": (False,),
        "return_flat_raw_top_logprobs_b64": (False,),
        # output and extras
        "log_metrics": (True,), "return_hidden_states": (False,),
        "return_routed_experts": (False,), "routed_experts_start_len": (0,),
        "return_indexer_topk": (False,), "modalities": (), "session_params": (), "lora_path": (),
        "lora_id": (), "positional_embed_overrides": (),
        # disaggregation and routing
        "bootstrap_host": (), "bootstrap_port": (), "bootstrap_room": (), "bootstrap_pair_key": (),
        "decode_tp_size": (), "routed_dp_rank": (), "data_parallel_rank": (),
        "disagg_prefill_dp_rank": (), "routing_key": (), "conversation_id": (),
        "http_worker_ipc": (),
        # request options
        "background": (False,), "require_reasoning": (False,), "max_thinking_tokens": (),
        "priority": (), "extra_key": (), "no_logs": (False,), "custom_labels": (),
        "return_bytes": (False,), "return_entropy": (False,), "return_prompt_token_ids": (False,),
        "external_trace_header": (), "received_time": (),
        # multimodal and internal
        "need_wait_for_mm_inputs": (False,), "num_items_assigned": (), "encoder_urls": (),
        "max_dynamic_patch": (), "min_dynamic_patch": (), "image_max_dynamic_patch": (),
        "video_max_dynamic_patch": (), "images_config": (), "mm_processor_kwargs": (),
        "multi_item_delimiter_indices": (), "token_indices_to_pool": (), "cache_salt": (),
        "kv_hints": (),
        # Not SGLang's field: sglang-router re-serializes /generate bodies with `"model": null`.
        "model": (),
    },
    unknown_is_typo=True,
)

# ---- /encode, /classify, /judge: the text / input_ids / rid of SGLang's EmbeddingReqInput -----
ENCODE = FieldPolicy(
    "/encode",
    honoured=("text", "input_ids", "rid"),
    unsupported={"image_data": (), "audio_data": (), "video_data": (), "input_embeds": (),
                 "log_metrics": (True,), "modalities": (), "lora_path": (), "lora_id": (),
                 "dimensions": (), "is_cross_encoder_request": (False,), "priority": (),
                 "http_worker_ipc": (), "positional_embed_overrides": (), "routed_dp_rank": (),
                 "data_parallel_rank": (), "external_trace_header": (), "received_time": (),
                 "embed_override_token_id": (), "embed_overrides": ()},
)

# ---- /v1: one policy per request model (openai/protocol.py), keyed by the model's class name ---
# Every declared field is listed as honoured or unsupported (the walk test checks it); fields the
# model does not declare (newer OpenAI fields, SGLang extras, `extra_body`) are unsupported
# unless null, or one of the neutral values listed here.
_SAMPLING = ("model", "temperature", "top_p", "n", "stop", "stream", "stream_options",
             "presence_penalty", "frequency_penalty", "seed", "logit_bias", "user", "top_k", "min_p",
             "repetition_penalty", "min_tokens", "stop_token_ids", "no_stop_trim", "ignore_eos",
             "skip_special_tokens", "spaces_between_special_tokens", "regex", "ebnf", "rid",
             "stop_regex", "custom_params", "custom_logit_processor")
# OpenAI fields whose usual values ask for nothing nl lacks.
_OPENAI_NEUTRAL = {"store": (False,), "service_tier": ("auto", "default"), "metadata": ({},),
                   "modalities": (["text"],), "parallel_tool_calls": (True,),
                   # SGLang's defaults, which sglang-router sends on every chat request: nothing
                   # to separate without a reasoning parser, no hidden states asked for.
                   "separate_reasoning": (True,), "stream_reasoning": (True,),
                   "return_hidden_states": (False,)}

OPENAI_POLICIES: dict[str, FieldPolicy] = {
    "CompletionRequest": FieldPolicy(
        "/v1/completions",
        honoured=_SAMPLING + ("prompt", "max_tokens", "echo", "logprobs", "json_schema"),
        unsupported={"best_of": (1,), "suffix": ("",), "lora_path": (), **_OPENAI_NEUTRAL}),
    "ChatCompletionRequest": FieldPolicy(
        "/v1/chat/completions",
        honoured=_SAMPLING + ("messages", "max_tokens", "max_completion_tokens", "logprobs",
                              "top_logprobs", "response_format", "tools", "continue_final_message",
                              "chat_template_kwargs"),
        # The tools go to the chat template; nl neither forces nor forbids a call.
        unsupported={"tool_choice": ("auto",), "lora_path": (), **_OPENAI_NEUTRAL}),
    "EmbeddingRequest": FieldPolicy(
        "/v1/embeddings",
        honoured=("model", "input", "encoding_format", "user", "dimensions")),
}
