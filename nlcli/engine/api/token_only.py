"""What a server started with `--skip-tokenizer-init` refuses, and why (SGLang's token-in /
token-out mode for RL rollout clients).

Without a tokenizer a request can only bring `input_ids` and get `output_ids` back; everything that
turns ids into text or text into ids is a 400 that says so: text prompts, stop strings, grammars
(their token masks are built from the vocabulary's strings), token text in logprobs, and the
OpenAI routes that speak text (chat and completions). min_new_tokens, stop_token_ids, logprobs
and token_ids_logprob work as usual.
"""

from __future__ import annotations

from nlcli.engine.api.native_input import GenItem
from nlcli.engine.sampling.params import SamplingParams

TEXT_PROMPT = ("The engine initialized with skip_tokenizer_init=True cannot accept text prompts. "
               "Please provide input_ids or re-initialize the engine with "
               "skip_tokenizer_init=False.")


def no_tokenizer_route(route: str) -> str:
    return (f"{route} needs a tokenizer, but this server runs with --skip-tokenizer-init; send "
            f"input_ids to /generate instead.")


def check_prompt(item: GenItem) -> None:
    """Before tokenizing: a text prompt cannot be turned into ids."""
    if item.input_ids is None:
        raise ValueError(TEXT_PROMPT)


def check_token_only(item: GenItem, sp: SamplingParams) -> None:
    """After parsing: the options that need text to work."""
    if sp.stop:
        raise ValueError(f"stop={sp.stop!r} is unavailable when skip_tokenizer_init=True (requires "
                         f"tokenizer to decode tokens to text for matching); use stop_token_ids.")
    if sp.grammar is not None:
        raise ValueError(f"{sp.grammar[0]} is unavailable when skip_tokenizer_init=True (a "
                         f"grammar's token masks need the tokenizer).")
    if item.return_logprob and item.return_text_in_logprobs:
        raise ValueError("return_text_in_logprobs is unavailable when skip_tokenizer_init=True "
                         "(no tokenizer to decode token text).")
