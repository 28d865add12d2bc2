"""Logprob fields against a tiny transformers model: each prompt token's logprob recomputed from its
own prefix, entry counts per logprob_start_len, and scoring reproducing generation logprobs."""

import pytest
import torch

from nlcli.engine.sampling.logprobs import (
    MAX_TOP_LOGPROBS_NUM,
    input_logprob_rows,
    input_logprobs,
    output_logprobs,
    top_logprobs_of,
    verify_logprob_args,
)
from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.sampling.sampler import SamplingBatchInfo


@pytest.fixture(scope="module")
def model():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(cfg).float().eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float()


def _text(ids):
    return [f"<{i}>" for i in ids]


PROMPT = [5, 17, 3, 44, 90, 8, 61, 23]


def test_input_logprobs_match_prefix_by_prefix_reference(model):
    full = _logits(model, PROMPT)
    ref = [torch.log_softmax(_logits(model, PROMPT[:j])[-1], -1)[PROMPT[j]].item()
           for j in range(1, len(PROMPT))]
    out = input_logprobs(PROMPT, full, 0, top_logprobs_num=3, to_text=_text)
    entries = out["input_token_logprobs"]
    assert len(entries) == len(PROMPT)
    assert entries[0] == [None, PROMPT[0], "<5>"]
    assert [e[1] for e in entries] == PROMPT and [e[2] for e in entries] == _text(PROMPT)
    assert [e[0] for e in entries[1:]] == pytest.approx(ref, abs=1e-4)
    assert out["normalized_prompt_logprob"] == pytest.approx(sum(ref) / len(ref), abs=1e-4)
    tops = out["input_top_logprobs"]
    assert len(tops) == len(PROMPT) and tops[0] is None
    for j, top in enumerate(tops[1:], start=1):
        lp = torch.log_softmax(_logits(model, PROMPT[:j])[-1], -1)
        vals, ids = torch.topk(lp, 3)
        assert [t[1] for t in top] == ids.tolist()
        assert [t[0] for t in top] == pytest.approx(vals.tolist(), abs=1e-4)
        assert [t[2] for t in top] == _text(ids.tolist())


@pytest.mark.parametrize("k", [1, 3, 6])
def test_start_k_entry_count_and_values(model, k):
    full = _logits(model, PROMPT)
    whole = input_logprobs(PROMPT, full, 0)["input_token_logprobs"]
    out = input_logprobs(PROMPT, full, k)
    entries = out["input_token_logprobs"]
    assert len(PROMPT) == k + 1 + len(entries)  # the spec's invariant
    assert entries == whole[k + 1:]
    assert all(e[2] is None for e in entries)  # text only when asked for
    # A scheduler that keeps only the rows it needs gets the same answer.
    first, last = input_logprob_rows(len(PROMPT), k)
    assert input_logprobs(PROMPT, full[first:last], k, row_offset=first) == out


def test_start_minus_one_is_empty(model):
    out = input_logprobs(PROMPT, torch.empty(0, 97), -1, top_logprobs_num=2)
    assert out == {"input_token_logprobs": [], "input_top_logprobs": [],
                   "normalized_prompt_logprob": 0.0}


def test_generation_logprobs_and_scoring_agree(model):
    """Greedy decode with the sampler; then score prompt+output with start 0 like max_new_tokens=0."""
    params = SamplingParams.from_dict({"temperature": 0})
    ids, lps, tops = list(PROMPT), [], []
    for _ in range(6):
        logits = _logits(model, ids)[-1:]
        info = SamplingBatchInfo.from_reqs([(params, ids[len(PROMPT):], PROMPT)], 97)
        out = info.sample(logits, return_logprobs=True)
        ids.append(out.next_token_ids.item())
        lps.append(out.next_token_logprobs.item())
        tops += top_logprobs_of(out.logprobs, [0], [2])
        ref = torch.log_softmax(logits[0], -1)
        assert lps[-1] == pytest.approx(ref.max().item(), abs=1e-5)  # greedy picks the mode
    gen = ids[len(PROMPT):]
    res = output_logprobs(gen, lps, tops, to_text=_text)
    assert [e[1] for e in res["output_token_logprobs"]] == gen
    assert all(top[0][1] == tok for top, tok in zip(res["output_top_logprobs"], gen))

    scored = input_logprobs(ids, _logits(model, ids), 0)["input_token_logprobs"]
    assert [e[0] for e in scored[len(PROMPT):]] == pytest.approx(lps, abs=1e-4)


def test_logprobs_ignore_temperature_and_penalties(model):
    logits = _logits(model, PROMPT)[-1:]
    hot = SamplingParams.from_dict({"temperature": 1.7, "repetition_penalty": 1.3, "seed": 3})
    out = SamplingBatchInfo.from_reqs([(hot, [], PROMPT)], 97).sample(logits, True)
    raw = torch.log_softmax(logits[0], -1)
    assert out.next_token_logprobs.item() == pytest.approx(raw[out.next_token_ids.item()].item())
    torch.testing.assert_close(out.logprobs[0], raw)


@pytest.mark.parametrize("args,msg", [
    ((-2, 0), "logprob_start_len must be -1 or at least 0, got -2."),
    ((0, -1), f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS_NUM}], got -1."),
    ((0, MAX_TOP_LOGPROBS_NUM + 1),
     f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS_NUM}], got {MAX_TOP_LOGPROBS_NUM + 1}."),
    ((5, 0, 5), "logprob_start_len (5) must be less than the number of prompt tokens (5)."),
    (("1", 0), "logprob_start_len must be an integer, got '1'."),
])
def test_verify_logprob_args(args, msg):
    with pytest.raises(ValueError) as e:
        verify_logprob_args(*args)
    assert str(e.value) == msg
    verify_logprob_args(4, MAX_TOP_LOGPROBS_NUM, 5)
