"""Benchmark prompts: `random` (lengths drawn per request) and `shared-prefix` (one long common
prefix per group, then a short distinct question).

Lengths are in words from a fixed list of common English words; each is one token (with its
leading space) for most BPE vocabularies, so N words is close to N prompt tokens. The server's
`prompt_tokens` gives the exact count the report uses, so the client needs no tokenizer.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or "
    "one had by word but not what all were we when your can said there use an each which she do "
    "how their if will up other about out many then them these so some her would make like him "
    "into time has look two more write go see number no way could people my than first water "
    "been call who oil its now find long down day did get come made may part over new sound take "
    "only little work know place year live me back give most very after thing our just name good "
    "sentence man think say great where help through much before line right too mean old any "
    "same tell boy follow came want show also around form three small set put end does another "
    "well large must big even such because turn here why ask went men read need land different "
    "home us move try kind hand picture again change off play spell air away animal house point "
    "page letter mother answer found study still learn should world high every near add food "
    "between own below country plant last school father keep tree never start city earth eye "
    "light thought head under story saw left few while along might close something seem next "
    "hard open example begin life always those both paper together got group often run"
).split()


@dataclass
class BenchRequest:
    prompt: str
    output_len: int
    group: int = 0  # shared-prefix group (0 for random prompts)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(max(n, 1)))


def _length(rng: random.Random, full: int, range_ratio: float) -> int:
    """Uniform in [full * range_ratio, full], as bench_serving's random dataset draws lengths."""
    low = max(int(full * range_ratio), 1)
    return rng.randint(low, max(full, low))


def random_requests(num_prompts: int, input_len: int, output_len: int, range_ratio: float,
                    seed: int, output_range_ratio: float | None = None) -> list[BenchRequest]:
    """`output_range_ratio` (default: `range_ratio`) lets output lengths stay fixed while input
    lengths vary, e.g. 48-384 input words with exactly 128 output tokens."""
    out_ratio = range_ratio if output_range_ratio is None else output_range_ratio
    if not (0.0 <= range_ratio <= 1.0 and 0.0 <= out_ratio <= 1.0):
        raise ValueError("range ratios must be between 0 and 1")
    rng = random.Random(seed)
    out = []
    for _ in range(num_prompts):
        n_in = _length(rng, input_len, range_ratio)
        n_out = _length(rng, output_len, out_ratio)
        out.append(BenchRequest(_words(rng, n_in), n_out))
    return out


def shared_prefix_requests(num_prompts: int, prefix_len: int, question_len: int, output_len: int,
                           num_groups: int, seed: int) -> list[BenchRequest]:
    """`num_prompts` spread round-robin over `num_groups` prefixes of `prefix_len` words each."""
    if num_groups < 1:
        raise ValueError("--shared-prefix-groups must be at least 1")
    rng = random.Random(seed)
    prefixes = [_words(rng, prefix_len) for _ in range(num_groups)]
    out = []
    for i in range(num_prompts):
        g = i % num_groups
        question = _words(rng, question_len)
        out.append(BenchRequest(f"{prefixes[g]}\n\nQuestion {i}: {question}", output_len, g))
    return out
