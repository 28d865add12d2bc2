"""The batched sampler: one pass per step turns next-token logits into next ids for every request.

`SamplingBatchInfo.from_reqs` gathers the running batch's per-request values into device tensors;
`sample(logits)` then applies, in order: logit_bias, repetition penalty (prompt + output),
frequency/presence penalties (output), the grammar bitmask, the min_new_tokens mask, custom logit
processors (custom_logit_processor.py), temperature, and top-k / top-p / min-p, and draws by
inverse CDF. The draw for a request with a seed uses a
uniform number hashed from (seed, number of tokens generated so far), so its sample depends only on
its own logits, never on the rest of the batch. A row it cannot use (NaN anywhere, or every token
masked) gets `INVALID_TOKEN`; the other rows are unaffected. Logprobs are of the raw logits (the model's
distribution before bias, penalties, masks and temperature).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol, Sequence

import torch

from nlcli.engine.sampling.custom_logit_processor import apply_processors
from nlcli.engine.sampling.draw import draw_truncated, draw_unsorted, seeded_uniform
from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.sampling.penalties import (
    apply_frequency_presence,
    apply_repetition,
    token_counts,
)


# A row's custom logit processor: (its wire string, the loaded processor, its custom_params).
CustomProcessorRow = tuple[str, Any, Optional[dict]]


class TokenMask(Protocol):
    """What the sampler needs from a request's grammar matcher (see grammar.py)."""

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None: ...


# The id `sample` gives a row whose logits are unusable (NaN, or every token masked): the
# scheduler fails that request alone.
INVALID_TOKEN = -1


@dataclass
class SampleOutput:
    next_token_ids: torch.Tensor  # [bs] int64
    # With return_logprobs only: raw log-softmax at the chosen ids [bs], and in full [bs, vocab].
    next_token_logprobs: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None
    # Rows whose custom logit processor failed, with the message that ends their request.
    failed_rows: Optional[dict[int, str]] = None


@dataclass
class SamplingBatchInfo:
    vocab_size: int
    device: torch.device
    temperatures: torch.Tensor  # [bs, 1] float32
    top_ps: torch.Tensor  # [bs] float32
    top_ks: torch.Tensor  # [bs] int64, -1 already replaced by vocab_size
    min_ps: torch.Tensor  # [bs] float32
    all_greedy: bool
    # Rows drawn from the top candidates (a top-k or top-p cut) and rows drawn from the whole
    # vocabulary; None when the group is empty, and the batch's full range needs no index.
    cut_rows: Optional[torch.Tensor]
    free_rows: Optional[torch.Tensor]
    # Rows with a seed and the uniforms for them (host-computed; see seeded_uniform).
    seeded_rows: Optional[torch.Tensor]
    seeded_u: Optional[torch.Tensor]
    # Penalties, only for the rows that have them.
    rep_rows: Optional[torch.Tensor] = None
    rep_seen: Optional[torch.Tensor] = None
    rep_penalty: Optional[torch.Tensor] = None
    freq_rows: Optional[torch.Tensor] = None
    freq_counts: Optional[torch.Tensor] = None
    freq_penalty: Optional[torch.Tensor] = None
    pres_penalty: Optional[torch.Tensor] = None
    # Additive logit_bias as a dense [rows, vocab] block.
    bias_rows: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    # min_new_tokens: rows still below their minimum, and the ids they may not emit.
    min_rows: Optional[torch.Tensor] = None
    min_stop_mask: Optional[torch.Tensor] = None  # [rows, vocab] bool
    grammars: Optional[list[Optional[TokenMask]]] = None
    # Custom logit processors: (processor, rows, row index tensor) per distinct processor string,
    # and every row's custom_params (None for rows without a processor).
    custom_groups: Optional[list[tuple[Any, list[int], torch.Tensor]]] = None
    custom_params: Optional[list[Optional[dict]]] = None

    @classmethod
    def from_reqs(
        cls,
        reqs: Sequence[tuple[SamplingParams, Sequence[int], Sequence[int]]],
        vocab_size: int,
        device: torch.device | str = "cpu",
        eos_token_ids: Sequence[int] = (),
        grammars: Optional[Sequence[Optional[TokenMask]]] = None,
        processors: Optional[Sequence[Optional[CustomProcessorRow]]] = None,
    ) -> "SamplingBatchInfo":
        """reqs: (params, output ids so far, prompt ids) for each request of the batch, in order;
        processors: per row, None or (processor string, loaded processor, custom_params)."""
        device = torch.device(device)
        params = [r[0] for r in reqs]
        f32 = lambda xs: torch.tensor(xs, dtype=torch.float32, device=device)  # noqa: E731
        i64 = lambda xs: torch.tensor(xs, dtype=torch.int64, device=device)  # noqa: E731
        top_ks = [vocab_size if p.top_k < 0 else min(p.top_k, vocab_size) for p in params]
        info = cls(
            vocab_size=vocab_size,
            device=device,
            temperatures=f32([[p.temperature] for p in params]),
            top_ps=f32([p.top_p for p in params]),
            top_ks=i64(top_ks),
            min_ps=f32([p.min_p for p in params]),
            all_greedy=all(k == 1 for k in top_ks),
            cut_rows=None,
            free_rows=None,
            seeded_rows=None,
            seeded_u=None,
        )
        cut = [i for i, p in enumerate(params) if top_ks[i] < vocab_size or p.top_p < 1.0]
        if cut:
            info.cut_rows = i64(cut)
        if len(cut) < len(params):
            cut_set = set(cut)
            info.free_rows = i64([i for i in range(len(params)) if i not in cut_set])
        seeded = [
            (i, seeded_uniform(p.seed, len(out)))
            for i, (p, out, _) in enumerate(reqs)
            if p.seed is not None and top_ks[i] != 1
        ]
        if seeded:
            info.seeded_rows = i64([i for i, _ in seeded])
            info.seeded_u = f32([u for _, u in seeded])

        rep = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
        if rep:
            info.rep_rows = i64(rep)
            seqs = [list(reqs[i][2]) + list(reqs[i][1]) for i in rep]
            info.rep_seen = token_counts(seqs, vocab_size, device) > 0
            info.rep_penalty = f32([params[i].repetition_penalty for i in rep])
        freq = [
            i for i, p in enumerate(params) if p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        ]
        if freq:
            info.freq_rows = i64(freq)
            info.freq_counts = token_counts([reqs[i][1] for i in freq], vocab_size, device)
            info.freq_penalty = f32([params[i].frequency_penalty for i in freq])
            info.pres_penalty = f32([params[i].presence_penalty for i in freq])

        biased = [i for i, p in enumerate(params) if p.logit_bias]
        if biased:
            info.bias_rows = i64(biased)
            info.bias = torch.zeros((len(biased), vocab_size), dtype=torch.float32, device=device)
            for j, i in enumerate(biased):
                ids = list(params[i].logit_bias)
                info.bias[j, i64(ids)] = f32([params[i].logit_bias[t] for t in ids])

        below = [i for i, (p, out, _) in enumerate(reqs) if len(out) < p.min_new_tokens]
        if below:
            info.min_rows = i64(below)
            banned = [list(eos_token_ids) + list(params[i].stop_token_ids) for i in below]
            info.min_stop_mask = token_counts(banned, vocab_size, device) > 0

        if grammars is not None and any(g is not None for g in grammars):
            info.grammars = list(grammars)
        if processors is not None and any(p is not None for p in processors):
            groups: dict[str, tuple[Any, list[int]]] = {}
            for i, row in enumerate(processors):
                if row is not None:
                    groups.setdefault(row[0], (row[1], []))[1].append(i)
            info.custom_groups = [(proc, rows, i64(rows)) for proc, rows in groups.values()]
            info.custom_params = [None if p is None else p[2] for p in processors]
        return info

    # ------------------------------------------------------------------ the step

    def sample(self, logits: torch.Tensor, return_logprobs: bool = False) -> SampleOutput:
        """logits: [bs, vocab] (float32 preferred) at each request's next position."""
        raw = logits.float()
        work = raw
        failed: dict[int, str] = {}
        if self._changes_logits():
            work = raw.clone()
            if self.bias_rows is not None:
                work[self.bias_rows] += self.bias
            if self.rep_rows is not None:
                apply_repetition(work, self.rep_rows, self.rep_seen, self.rep_penalty)
            if self.freq_rows is not None:
                apply_frequency_presence(
                    work, self.freq_rows, self.freq_counts, self.freq_penalty, self.pres_penalty
                )
            self._apply_masks(work)
            if self.custom_groups is not None:  # after penalties and masks, before temperature
                failed = apply_processors(work, self.custom_groups, self.custom_params)

        # A row is usable when its largest logit is not NaN and not -inf (every token masked);
        # one reduction finds both. Unusable rows get INVALID_TOKEN and never reach the draw.
        usable = work.amax(dim=-1) > float("-inf")
        if self.all_greedy:
            next_ids = torch.argmax(work, dim=-1)
        else:
            next_ids = self._draw(self._scaled(work, usable))
        next_ids = torch.where(usable, next_ids, INVALID_TOKEN)

        if not return_logprobs:
            return SampleOutput(next_ids, failed_rows=failed or None)
        lse = torch.logsumexp(raw, dim=-1, keepdim=True)
        full = raw - lse
        chosen = full.gather(1, next_ids.clamp(min=0)[:, None]).squeeze(1)
        return SampleOutput(next_ids, chosen, full, failed or None)

    def _scaled(self, logits: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
        """logits / temperature, safe for softmax: +inf (a tiny repetition penalty or temperature
        overflowed float32) becomes the largest float, still the likeliest token; unusable rows
        become zeros so the draw stays in range (their ids are discarded)."""
        scaled = (logits / self.temperatures).clamp_(max=torch.finfo(torch.float32).max)
        return torch.where(usable[:, None], scaled, 0.0)

    def _changes_logits(self) -> bool:
        return any(
            x is not None
            for x in (self.bias_rows, self.rep_rows, self.freq_rows, self.min_rows, self.grammars,
                      self.custom_groups)
        )

    def _apply_masks(self, logits: torch.Tensor) -> None:
        if self.grammars is not None:
            from nlcli.engine.sampling.grammar import apply_grammar_masks

            apply_grammar_masks(logits, self.grammars)
        if self.min_rows is not None:
            sub = logits[self.min_rows]
            masked = sub.masked_fill(self.min_stop_mask, float("-inf"))
            # A grammar that allows only EOS wins over min_new_tokens rather than leave no token.
            dead = torch.isneginf(masked).all(dim=-1, keepdim=True)
            logits[self.min_rows] = torch.where(dead, sub, masked)

    def _draw(self, scaled: torch.Tensor) -> torch.Tensor:
        """Token ids drawn from logits already divided by the temperature."""
        probs = torch.softmax(scaled, dim=-1)
        u = torch.rand(scaled.shape[0], device=scaled.device)
        if self.seeded_rows is not None:
            u[self.seeded_rows] = self.seeded_u
        if self.free_rows is None:
            return draw_truncated(probs, self.top_ks, self.top_ps, self.min_ps, u)
        if self.cut_rows is None:
            return draw_unsorted(probs, self.min_ps, u)
        out = torch.empty(scaled.shape[0], dtype=torch.int64, device=scaled.device)
        c, f = self.cut_rows, self.free_rows
        out[c] = draw_truncated(probs[c], self.top_ks[c], self.top_ps[c], self.min_ps[c], u[c])
        out[f] = draw_unsorted(probs[f], self.min_ps[f], u[f])
        return out
