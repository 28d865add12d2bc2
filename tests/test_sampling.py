"""The batched sampler: each parameter's effect, penalties against their formulas, seeds, and the
sampled distribution against softmax(logits / T) after filtering (chi-square)."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.sampling.sampler import SamplingBatchInfo

V = 64


def _sp(**kw) -> SamplingParams:
    return SamplingParams.from_dict(kw)


def _sample(logits, params, outputs=None, prompts=None, **kw):
    bs = logits.shape[0]
    outputs = outputs or [[] for _ in range(bs)]
    prompts = prompts or [[] for _ in range(bs)]
    info = SamplingBatchInfo.from_reqs(
        list(zip(params, outputs, prompts)), logits.shape[1], "cpu", **kw
    )
    return info.sample(logits)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, V, generator=g) * 3


def test_greedy_equivalents(logits):
    greedy = logits.argmax(-1)
    for params in ({"temperature": 0}, {"top_k": 1, "temperature": 1.3}, {"top_p": 1e-6}):
        for trial in range(3):
            torch.manual_seed(trial)
            out = _sample(logits, [_sp(**params)] * 8)
            assert torch.equal(out.next_token_ids, greedy), params


def test_greedy_row_inside_sampled_batch(logits):
    params = [_sp(temperature=0) if i % 2 else _sp(temperature=2.0) for i in range(8)]
    out = _sample(logits, params)
    assert torch.equal(out.next_token_ids[1::2], logits.argmax(-1)[1::2])


def test_top_k_and_min_p_prune(logits):
    torch.manual_seed(0)
    rows = logits[:1].repeat(400, 1)
    top3 = set(torch.topk(logits[0], 3).indices.tolist())
    got = set(_sample(rows, [_sp(top_k=3, temperature=5.0)] * 400).next_token_ids.tolist())
    assert got == top3  # high temperature: all three show up, nothing else does

    flat = logits[:1] / 3  # flatter, so several tokens pass the min_p bar
    probs = torch.softmax(flat[0], -1)
    allowed = set(torch.nonzero(probs >= 0.2 * probs.max()).flatten().tolist())
    got = set(_sample(flat.repeat(400, 1), [_sp(min_p=0.2)] * 400).next_token_ids.tolist())
    assert got <= allowed and len(allowed) > 1 and len(got) > 1
    assert len(allowed) < V  # min_p did prune something


def test_logprobs_are_raw_model_distribution(logits):
    info = SamplingBatchInfo.from_reqs(
        [(_sp(temperature=0.3, repetition_penalty=1.5), [], [1, 2, 3])] * 8, V)
    out = info.sample(logits, return_logprobs=True)
    ref = torch.log_softmax(logits, -1).gather(1, out.next_token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.next_token_logprobs, ref)


def _processed_logits(logits, params, outputs, prompts):
    """The penalized logits, through the same penalty calls `sample` makes."""
    info = SamplingBatchInfo.from_reqs(list(zip(params, outputs, prompts)), logits.shape[1])
    work = logits.clone()
    if info.rep_rows is not None:
        from nlcli.engine.sampling.penalties import apply_repetition
        apply_repetition(work, info.rep_rows, info.rep_seen, info.rep_penalty)
    if info.freq_rows is not None:
        from nlcli.engine.sampling.penalties import apply_frequency_presence
        apply_frequency_presence(work, info.freq_rows, info.freq_counts, info.freq_penalty,
                                 info.pres_penalty)
    return work


def test_penalties_follow_formulas(logits):
    prompt, output = [5, 6, 6], [7, 7, 7, 6, 9]
    params = [_sp(frequency_penalty=0.5, presence_penalty=0.25), _sp(repetition_penalty=1.5),
              _sp()]
    rows = logits[:3].clone()
    rows[1, 5], rows[1, 7] = 2.0, -2.0  # one positive and one negative seen logit
    got = _processed_logits(rows, params, [output] * 3, [prompt] * 3)

    want = rows.clone()
    for tok in set(output):  # OpenAI: over generated tokens only
        want[0, tok] -= output.count(tok) * 0.5 + 0.25
    for tok in set(prompt + output):  # CTRL: prompt + output, divide positive, multiply negative
        x = rows[1, tok]
        want[1, tok] = x / 1.5 if x > 0 else x * 1.5
    torch.testing.assert_close(got, want)
    assert got[1, 5] == pytest.approx(2.0 / 1.5) and got[1, 7] == pytest.approx(-3.0)


def test_penalty_changes_greedy_choice():
    logits = torch.zeros(1, V)
    logits[0, 3], logits[0, 4] = 2.0, 1.5
    assert _sample(logits, [_sp(temperature=0)]).next_token_ids.item() == 3
    out = _sample(logits, [_sp(temperature=0, frequency_penalty=1.0)], outputs=[[3]])
    assert out.next_token_ids.item() == 4
    out = _sample(logits, [_sp(temperature=0, repetition_penalty=2.0)], prompts=[[3]])
    assert out.next_token_ids.item() == 4  # 2.0 / 2 < 1.5


def test_logit_bias_is_additive():
    logits = torch.zeros(1, V)
    logits[0, 3] = 1.0
    out = _sample(logits, [_sp(temperature=0, logit_bias={"9": 5.0})])
    assert out.next_token_ids.item() == 9


def test_min_new_tokens_suppresses_eos_and_stop_ids():
    logits = torch.zeros(1, V)
    logits[0, 2], logits[0, 11], logits[0, 4] = 9.0, 8.0, 1.0  # 2 = EOS, 11 = a stop id
    p = _sp(temperature=0, min_new_tokens=3, stop_token_ids=[11])
    for n_out, want in ((0, 4), (2, 4), (3, 2)):
        out = _sample(logits, [p], outputs=[[7] * n_out], eos_token_ids=[2])
        assert out.next_token_ids.item() == want, n_out
    # Sampled (not greedy) too: never EOS or the stop id while below the minimum.
    torch.manual_seed(0)
    rows = logits.repeat(300, 1)
    p = _sp(temperature=1.0, min_new_tokens=3, stop_token_ids=[11])
    ids = _sample(rows, [p] * 300, outputs=[[7]] * 300, eos_token_ids=[2]).next_token_ids
    assert not ({2, 11} & set(ids.tolist()))


@pytest.mark.parametrize("target_kw", [{"top_p": 0.95}, {"min_p": 0.02}, {}])
def test_seed_reproducible_alone_and_in_batch_of_16(target_kw):
    g = torch.Generator().manual_seed(1)
    batch = torch.randn(16, V, generator=g)
    target = 7
    mix = [{"top_p": 0.9}, {"top_k": 5}, {}, {"temperature": 0}, {"min_p": 0.1},
           {"frequency_penalty": 0.5}, {"top_k": 40, "top_p": 0.8}]
    params = [_sp(**mix[i % len(mix)]) for i in range(16)]
    params[target] = _sp(temperature=1.0, seed=1234, **target_kw)
    outputs = [[1] * (i % 5) for i in range(16)]
    for step in range(6):
        outputs[target] = [1] * step
        alone = _sample(batch[target:target + 1], [params[target]], outputs=[outputs[target]])
        for trial in range(3):
            torch.manual_seed(100 + trial)  # the rest of the batch draws differently each time
            got = _sample(batch, params, outputs=outputs).next_token_ids[target]
            assert got.item() == alone.next_token_ids.item()
    # Different seeds must not collapse to a single choice.
    draws = {
        _sample(batch[:1], [_sp(seed=s, **target_kw)]).next_token_ids.item() for s in range(40)
    }
    assert len(draws) > 5


@pytest.mark.parametrize("seeded", [False, True])
def test_top_p_nucleus_wider_than_candidates(seeded):
    # Two tokens hold 0.6 of the mass, 1000 small distinct ones the rest: the 0.9 nucleus spans
    # ~750 small tokens, past the topk candidates, so the probability-bar path draws it.
    from nlcli.engine.sampling.draw import TOP_P_CANDIDATES

    small = np.linspace(0.0, 0.5, 1000)
    logits = np.concatenate([[np.log(0.3 / 0.0004)] * 2, small])
    expected = _filtered_distribution(logits, 1.0, 9999, 0.9, 0.0)
    assert (expected > 0).sum() > TOP_P_CANDIDATES + 100
    n = 2000
    rows = torch.tensor(logits, dtype=torch.float32).repeat(n, 1)
    params = [_sp(top_p=0.9, seed=s) if seeded else _sp(top_p=0.9) for s in range(n)]
    torch.manual_seed(0)
    ids = _sample(rows, params).next_token_ids.numpy()
    counts = np.bincount(ids, minlength=len(logits))
    assert counts[expected == 0].sum() == 0
    groups = [counts[0], counts[1], counts[2:].sum()]
    want = [expected[0] * n, expected[1] * n, expected[2:].sum() * n]
    assert chisquare(groups, want).pvalue > 1e-3, (groups, want)


def _filtered_distribution(logits, t, top_k, top_p, min_p):
    """Reference in numpy: softmax(logits / T), then top-k, top-p, min-p, renormalized."""
    p = np.exp((logits - logits.max()) / t)
    p /= p.sum()
    order = np.argsort(-p, kind="stable")
    keep = np.zeros_like(p, dtype=bool)
    mass = 0.0
    for rank, i in enumerate(order):
        if rank >= top_k or mass >= top_p or p[i] < min_p * p[order[0]]:
            break
        keep[i] = True
        mass += p[i]
    q = np.where(keep, p, 0.0)
    return q / q.sum()


FILTERS = [  # (temperature, top_k, top_p, min_p): the top-candidates path and the whole-vocab path
    (0.8, 7, 0.9, 0.08),
    (0.6, -1, 0.75, 0.0),
    (1.3, -1, 1.0, 0.05),
    (1.0, -1, 1.0, 0.0),
]


@pytest.mark.parametrize("seeded", [False, True])
@pytest.mark.parametrize("filters", FILTERS)
def test_sampled_frequencies_match_filtered_softmax(seeded, filters):
    logits = np.array([2.0, 1.6, 1.2, 1.0, 0.7, 0.2, -0.5, -1.0, -3.0, 0.9])
    t, top_k, top_p, min_p = filters
    expected = _filtered_distribution(logits, t, top_k if top_k > 0 else 99, top_p, min_p)
    n = 2000
    rows = torch.tensor(logits, dtype=torch.float32).repeat(n, 1)
    kw = dict(temperature=t, top_k=top_k, top_p=top_p, min_p=min_p)
    params = [_sp(**kw, seed=s) if seeded else _sp(**kw) for s in range(n)]
    torch.manual_seed(0)
    ids = _sample(rows, params).next_token_ids.numpy()
    counts = np.bincount(ids, minlength=len(logits))
    assert counts[expected == 0].sum() == 0
    nz = expected > 0
    stat = chisquare(counts[nz], expected[nz] * n)
    assert stat.pvalue > 1e-3, (counts, expected * n)


def test_filters_each_prune_in_chi_square_setups():
    logits = np.array([2.0, 1.6, 1.2, 1.0, 0.7, 0.2, -0.5, -1.0, -3.0, 0.9])
    kept = [(_filtered_distribution(logits, t, k if k > 0 else 99, p, m) > 0).sum()
            for t, k, p, m in FILTERS]
    assert kept[0] < 7 and kept[1] < 10 and kept[2] < 10 and kept[3] == 10


def test_all_masked_but_eos_picks_eos():
    # A grammar that only allows EOS beats min_new_tokens instead of leaving no token at all.
    class OnlyEos:
        def fill_bitmask(self, bitmask, row):
            bitmask[row] = 0
            bitmask[row, 0] = 1 << 2

    logits = torch.randn(2, V)
    out = _sample(logits, [_sp(temperature=0.7, min_new_tokens=5)] * 2, eos_token_ids=[2],
                  grammars=[OnlyEos(), None])
    assert out.next_token_ids[0].item() == 2
    assert out.next_token_ids[1].item() != 2
