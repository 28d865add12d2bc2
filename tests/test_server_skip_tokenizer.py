"""`nl serve --skip-tokenizer-init` (token in, token out) on a tiny random Llama whose directory has
no tokenizer files at all, so the server cannot have loaded one.

Greedy `output_ids` must equal transformers' `generate`; streamed `output_ids` are cumulative (SGLang's
default); no `text` key anywhere; whatever needs text is a 400 that says why.
"""

import json
import os

import httpx
import pytest
import torch

from tests.test_scheduler_fakes import LiveServer
from tests.tiny_models import TOKENIZER_FILES, build_tiny_model

pytestmark = pytest.mark.slow  # one server start per module

PROMPT = [101, 2000, 345, 77, 9001, 12, 560]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = build_tiny_model("llama", str(tmp_path_factory.mktemp("tiny_notok")))
    for name in TOKENIZER_FILES:
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))
    return path


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("srv_notok")), [
        "--dtype", "float32", "--device", "cpu", "--max-total-tokens", "2048",
        "--context-length", "256", "--skip-tokenizer-init"], model_path=model_dir)
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


@pytest.fixture(scope="module")
def hf(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


def post(server, body, route="/generate"):
    return httpx.post(server.url + route, json=body, timeout=120)


def _greedy(hf, prompt, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          min_new_tokens=n, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_ids_in_ids_out(server, hf):
    body = {"input_ids": PROMPT, "sampling_params": {"temperature": 0, "max_new_tokens": 8,
                                                     "ignore_eos": True}}
    r = post(server, body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert "text" not in out and set(out) == {"output_ids", "meta_info"}
    assert out["output_ids"] == _greedy(hf, PROMPT, 8)
    assert out["meta_info"]["completion_tokens"] == 8
    batch = post(server, {**body, "input_ids": [PROMPT, PROMPT[:4]]}).json()
    assert [o["output_ids"] for o in batch] == [out["output_ids"], _greedy(hf, PROMPT[:4], 8)]


def test_streamed_output_ids_are_cumulative(server):
    body = {"input_ids": PROMPT, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert len(events) >= 2 and all("text" not in ev for ev in events)
    final = events[-1]["output_ids"]
    for ev in events:
        assert len(ev["output_ids"]) == ev["meta_info"]["completion_tokens"]
        assert ev["output_ids"] == final[:len(ev["output_ids"])]
    body["stream"] = False
    assert post(server, body).json()["output_ids"] == final


def test_logprobs_and_token_ids_logprob_work_without_tokenizer(server, hf):
    labels = [3, 500]
    out = post(server, {"input_ids": PROMPT, "return_logprob": True, "token_ids_logprob": labels,
                        "logprob_start_len": 0,
                        "sampling_params": {"temperature": 0, "max_new_tokens": 2}}).json()
    meta = out["meta_info"]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([PROMPT + out["output_ids"]])).logits[0], -1)
    assert all(e[2] is None for e in meta["output_token_logprobs"])
    first = meta["output_token_ids_logprobs"][0]
    assert [e[1] for e in first] == labels
    assert max(abs(e[0] - ref[len(PROMPT) - 1, e[1]].item()) for e in first) < 1e-4
    assert len(meta["input_token_ids_logprobs"]) == len(PROMPT)


def test_min_new_tokens_and_stop_token_ids_still_work(server):
    out = post(server, {"input_ids": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 5, "min_new_tokens": 5}}).json()
    assert len(out["output_ids"]) == 5
    stop_at = out["output_ids"][2]
    cut = post(server, {"input_ids": PROMPT, "sampling_params": {
        "temperature": 0, "max_new_tokens": 5, "stop_token_ids": [stop_at]}}).json()
    assert cut["output_ids"][-1] == stop_at and cut["meta_info"]["finish_reason"] == {
        "type": "stop", "matched": stop_at}


@pytest.mark.parametrize("body,msg", [
    ({"text": "hello"}, "cannot accept text prompts"),
    ({"input_ids": PROMPT, "sampling_params": {"stop": ["x"]}}, "stop=['x'] is unavailable"),
    ({"input_ids": PROMPT, "sampling_params": {"regex": "a+"}}, "regex is unavailable"),
    ({"input_ids": PROMPT, "return_logprob": True, "return_text_in_logprobs": True},
     "return_text_in_logprobs is unavailable"),
])
def test_text_needing_requests_are_400(server, body, msg):
    r = post(server, body)
    assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


@pytest.mark.parametrize("route,body", [
    ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}]}),
    ("/v1/completions", {"model": "m", "prompt": PROMPT}),
])
def test_text_routes_are_400(server, route, body):
    r = post(server, body, route)
    assert r.status_code == 400
    assert "--skip-tokenizer-init" in r.json()["message"] and r.json()["object"] == "error"


def test_score_with_token_ids_needs_no_tokenizer(server, hf):
    items, labels = [[5, 6], [7]], [3, 500]
    r = post(server, {"query": PROMPT, "items": items, "label_token_ids": labels}, "/v1/score")
    assert r.status_code == 200, r.text
    for item, row in zip(items, r.json()["scores"]):
        with torch.no_grad():
            ref = torch.softmax(hf(torch.tensor([PROMPT + item])).logits[0, -1], -1)[labels]
        assert torch.allclose(torch.tensor(row), ref, atol=1e-4)
    r = post(server, {"query": "a", "items": ["b"], "label_token_ids": labels}, "/v1/score")
    assert r.status_code == 400 and "cannot accept text prompts" in r.json()["message"]
