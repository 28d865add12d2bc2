"""Request limits both processes enforce with the same words: the API process rejects with a 400
before anything is sent, and the engine applies the same check as its guard for direct callers."""

from __future__ import annotations


def check_input_len(num_tokens: int, context_len: int, pool_size: int) -> None:
    """ValueError when a prompt of `num_tokens` leaves no room for one generated token."""
    if num_tokens >= context_len:
        raise ValueError(f"The input ({num_tokens} tokens) is longer than the model's context "
                         f"length ({context_len} tokens).")
    if num_tokens >= pool_size:
        raise ValueError(f"The input ({num_tokens} tokens) is longer than the KV cache pool "
                         f"({pool_size} tokens).")


# Engine requests one HTTP request may ask for (prompts x n): n alone is capped at MAX_N (64).
MAX_GENERATIONS_PER_REQUEST = 256


def check_generations(num_prompts: int, n: int) -> None:
    """ValueError when one request asks for more engine requests than MAX_GENERATIONS_PER_REQUEST."""
    if num_prompts * n > MAX_GENERATIONS_PER_REQUEST:
        raise ValueError(f"The request asks for {num_prompts * n} generations ({num_prompts} "
                         f"prompt(s) x n={n}); at most {MAX_GENERATIONS_PER_REQUEST} are allowed "
                         "per request.")
