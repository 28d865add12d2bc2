"""Logprobs through a live `nl serve` on a tiny random Llama (float32), against transformers.

Prompt and output logprobs must equal log-softmax of transformers' logits at the same positions,
whether the prompt was prefilled in chunks (--chunked-prefill-size 16) or partly cached; entry
counts follow API_SPEC 2.1; scoring prompt+output with max_new_tokens 0 reproduces a
generation's output logprobs; streaming carries cumulative lists.
"""

import json
import random

import httpx
import pytest
import torch

from tests.test_scheduler_fakes import LiveServer
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow  # one server start per module

TOL = 1e-4


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_tiny_model("llama", str(tmp_path_factory.mktemp("tiny_lp")))


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("srv_lp")), [
        "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "4096",
        "--chunked-prefill-size", "16", "--context-length", "512"], model_path=model_dir)
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir)


def ref_logprobs(hf, ids):
    """[len(ids), vocab] log-softmax: row i is the distribution of token i+1."""
    with torch.no_grad():
        logits = hf[0](torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


def gen(server, body):
    r = httpx.post(server.url + "/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def _prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


def test_output_logprobs_and_tops_match_transformers(server, hf):
    prompt = _prompt(40, 1)  # three prefill chunks
    out = gen(server, {"input_ids": prompt, "return_logprob": True, "top_logprobs_num": 3,
                       "return_text_in_logprobs": True,
                       "sampling_params": {"temperature": 0.8, "seed": 7, "max_new_tokens": 8,
                                           "ignore_eos": True}})
    meta = out["meta_info"]
    entries = meta["output_token_logprobs"]
    assert len(entries) == meta["completion_tokens"] == 8
    ids = [e[1] for e in entries]
    ref = ref_logprobs(hf, prompt + ids)
    tok = hf[1]
    for j, (lp, tid, text) in enumerate(entries):
        assert abs(lp - ref[len(prompt) - 1 + j, tid].item()) < TOL
        assert text == tok.decode([tid])
    assert meta["input_token_logprobs"] == []
    for j, tops in enumerate(meta["output_top_logprobs"]):
        vals, top_ids = torch.topk(ref[len(prompt) - 1 + j], 3)
        assert [t[1] for t in tops] == top_ids.tolist()
        assert all(abs(t[0] - v) < TOL for t, v in zip(tops, vals.tolist()))


def test_prompt_logprobs_across_chunks_and_cache(server, hf):
    prompt = _prompt(45, 2)
    ref = ref_logprobs(hf, prompt)
    want = [ref[i, prompt[i + 1]].item() for i in range(len(prompt) - 1)]
    gen(server, {"input_ids": prompt, "sampling_params": {"max_new_tokens": 1}})  # now cached
    for k in (0, 5, 30):
        meta = gen(server, {"input_ids": prompt, "return_logprob": True, "logprob_start_len": k,
                            "top_logprobs_num": 2,
                            "sampling_params": {"max_new_tokens": 1}})["meta_info"]
        got = meta["input_token_logprobs"]
        assert meta["cached_tokens"] <= k  # positions from k on were recomputed
        # SGLang: prompt_tokens - k entries, the first (token k) with a null logprob.
        assert len(got) == meta["prompt_tokens"] - k == len(prompt) - k
        assert got[0] == [None, prompt[k], None] and meta["input_top_logprobs"][0] is None
        got, tops = got[1:], meta["input_top_logprobs"][1:]
        assert [e[1] for e in got] == prompt[k + 1:]
        assert max(abs(e[0] - w) for e, w in zip(got, want[k:])) < TOL
        assert len(tops) == len(got) and all(len(t) == 2 for t in tops)
        assert abs(meta["normalized_prompt_logprob"] - sum(want[k:]) / len(want[k:])) < TOL


def test_scoring_reproduces_generation_logprobs(server):
    prompt = _prompt(20, 3)
    meta = gen(server, {"input_ids": prompt, "return_logprob": True,
                        "sampling_params": {"temperature": 1.0, "seed": 11, "max_new_tokens": 10,
                                            "ignore_eos": True}})["meta_info"]
    outs = meta["output_token_logprobs"]
    full = prompt + [e[1] for e in outs]
    score = gen(server, {"input_ids": full, "return_logprob": True, "logprob_start_len": 0,
                         "sampling_params": {"max_new_tokens": 0}})
    smeta = score["meta_info"]
    assert score["text"] == "" and smeta["completion_tokens"] == 0
    assert smeta["output_token_logprobs"] == []
    scored = smeta["input_token_logprobs"][len(prompt):]
    assert [e[1] for e in scored] == [e[1] for e in outs]
    assert max(abs(a[0] - b[0]) for a, b in zip(scored, outs)) < 1e-3


def test_streaming_logprobs_are_cumulative(server):
    body = {"input_ids": _prompt(12, 4), "return_logprob": True, "logprob_start_len": 3,
            "top_logprobs_num": 1, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert len(events) >= 2
    for ev in events:
        meta = ev["meta_info"]
        assert len(meta["output_token_logprobs"]) == meta["completion_tokens"]
        assert len(meta["output_top_logprobs"]) == meta["completion_tokens"]
        assert len(meta["input_token_logprobs"]) == 12 - 3
    final = events[-1]["meta_info"]
    for ev in events[:-1]:
        part = ev["meta_info"]["output_token_logprobs"]
        assert part == final["output_token_logprobs"][:len(part)]
    body["stream"] = False
    assert gen(server, body)["meta_info"]["output_token_logprobs"] == final["output_token_logprobs"]


@pytest.mark.parametrize("extra,field", [
    ({"logprob_start_len": 13}, "logprob_start_len"),  # 12 (== P) is an empty list, as SGLang
    ({"logprob_start_len": -2}, "logprob_start_len"),
    ({"top_logprobs_num": 10_000}, "top_logprobs_num"),
    ({"return_logprob": "yes"}, "return_logprob"),
])
def test_bad_logprob_args_are_400(server, extra, field):
    body = {"input_ids": _prompt(12, 5), "return_logprob": True, **extra}
    r = httpx.post(server.url + "/generate", json=body, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"]["message"]
