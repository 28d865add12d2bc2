"""Logprob fields against a tiny transformers model, through the live path: the engine's collector
(scheduler/logprobs.py) fills a Req from an extend's logits and the sampler's output, its deltas
go to the API's LogprobAccumulator, and the rendered meta_info is compared with each prompt token's
logprob recomputed from its own prefix; entry counts per logprob_start_len; chunked prefill; and
scoring reproducing generation logprobs."""

import pytest
import torch

from nlcli.engine.api.logprobs import LogprobAccumulator
from nlcli.engine.sampling.logprobs import MAX_TOP_LOGPROBS_NUM, verify_logprob_args
from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.sampling.sampler import SamplingBatchInfo
from nlcli.engine.scheduler.logprobs import (collect_input_logprobs, collect_output_logprobs,
                                             logprob_delta)
from nlcli.engine.scheduler.req import Req


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


class _Tok:
    """What the accumulator needs of a tokenizer: one text per single-token list."""

    def batch_decode(self, seqs, skip_special_tokens=False):
        return [_text(s)[0] for s in seqs]


PROMPT = [5, 17, 3, 44, 90, 8, 61, 23]


def _req(ids, start, top=0, max_new_tokens=0):
    sp = SamplingParams.from_dict({"temperature": 0, "max_new_tokens": max_new_tokens})
    return Req("r", ids, sp, return_logprob=True, logprob_start_len=start, top_logprobs_num=top)


def _prompt_meta(req, logits, chunks=None, text=False):
    """Run the collector over `logits` (all rows of the prompt) as one extend, or as chunked
    prefill with the given chunk sizes, then render the engine's delta in the API process."""
    chunks = chunks or [len(req.origin_input_ids)]
    start = 0
    for ext in chunks:
        req.prefix_indices = torch.zeros(start, dtype=torch.int64)  # prefix_len = start
        collect_input_logprobs([req], [ext], logits[start: start + ext])
        start += ext
    acc = LogprobAccumulator(_Tok(), req.top_logprobs_num, return_text=text)
    acc.add(logprob_delta(req), [])
    return acc.meta()


def test_input_logprobs_match_prefix_by_prefix_reference(model):
    full = _logits(model, PROMPT)
    ref = [torch.log_softmax(_logits(model, PROMPT[:j])[-1], -1)[PROMPT[j]].item()
           for j in range(1, len(PROMPT))]
    out = _prompt_meta(_req(PROMPT, 0, top=3), full, text=True)
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
    whole = _prompt_meta(_req(PROMPT, 0), full)["input_token_logprobs"]
    out = _prompt_meta(_req(PROMPT, k), full)
    entries = out["input_token_logprobs"]
    assert len(PROMPT) == k + len(entries)  # SGLang's invariant: positions k .. P-1
    assert entries[0] == [None, PROMPT[k], None]  # its row is not computed, as SGLang
    assert entries[1:] == whole[k + 1:]
    assert all(e[2] is None for e in entries)  # text only when asked for
    # Chunked prefill hands the collector the prompt's rows over several forwards: same answer.
    for chunks in ([3, 3, 2], [1] * len(PROMPT), [k, len(PROMPT) - k]):
        assert _prompt_meta(_req(PROMPT, k), full, chunks) == out


def test_start_minus_one_is_empty(model):
    req = _req(PROMPT, -1, top=2)
    assert not req.needs_input_logprobs and not req.return_all_logits
    out = _prompt_meta(req, torch.empty(0, 97), chunks=[0])
    assert {k: out[k] for k in ("input_token_logprobs", "input_top_logprobs",
                                "normalized_prompt_logprob")} == {
        "input_token_logprobs": [], "input_top_logprobs": [], "normalized_prompt_logprob": 0.0}


def test_generation_logprobs_and_scoring_agree(model):
    """Greedy decode with the sampler and the engine's output collector; then score prompt+output
    with start 0 like max_new_tokens=0."""
    req = _req(PROMPT, -1, top=2, max_new_tokens=6)
    acc = LogprobAccumulator(_Tok(), 2, return_text=True)
    for _ in range(6):
        logits = _logits(model, req.all_ids)[-1:]
        info = SamplingBatchInfo.from_reqs([(req.sampling_params, req.output_ids, PROMPT)], 97)
        out = info.sample(logits, return_logprobs=True)
        collect_output_logprobs([req], out)
        req.output_ids.append(out.next_token_ids.item())
        acc.add(logprob_delta(req), req.output_ids[req.num_sent:])
        req.num_sent = len(req.output_ids)
        ref = torch.log_softmax(logits[0], -1)
        assert req.output_token_logprobs[-1] == pytest.approx(ref.max().item(), abs=1e-5)
    gen = req.output_ids
    res = acc.meta()
    assert [e[1] for e in res["output_token_logprobs"]] == gen
    assert [e[2] for e in res["output_token_logprobs"]] == _text(gen)
    assert all(top[0][1] == tok for top, tok in zip(res["output_top_logprobs"], gen))
    lps = [e[0] for e in res["output_token_logprobs"]]

    ids = PROMPT + gen
    scored = _prompt_meta(_req(ids, 0), _logits(model, ids))["input_token_logprobs"]
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
    ((6, 0, 5), "logprob_start_len=6 is higher than the number of input tokens (5). Please use a "
                "smaller logprob_start_len."),
    (("1", 0), "logprob_start_len must be an integer, got '1'."),
])
def test_verify_logprob_args(args, msg):
    with pytest.raises(ValueError) as e:
        verify_logprob_args(*args)
    assert str(e.value) == msg
    verify_logprob_args(5, MAX_TOP_LOGPROBS_NUM, 5)  # k == P: an empty list, as SGLang
