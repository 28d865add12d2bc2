"""`token_ids_logprob`, `output_ids`, `logprob_start_len` edges, duplicate rids and `/v1/score`
through a live `nl serve` on a tiny random Llama (float32), against transformers' log-softmax.

Shapes follow current SGLang: `input_token_ids_logprobs` has one entry per prompt position from
logprob_start_len (the first null), `output_token_ids_logprobs` one per generated token (one for
max_new_tokens 0), each entry `[logprob, id, text]` in the asked order.
"""

import json
import random

import httpx
import pytest
import torch

# The same tiny Llama, server flags and transformers reference as the logprob tests.
from tests.test_server_logprobs import TOL, hf, model_dir, ref_logprobs, server  # noqa: F401

pytestmark = pytest.mark.slow  # one server start per module


def post(server, body, route="/generate"):
    return httpx.post(server.url + route, json=body, timeout=120)


def gen(server, body):
    r = post(server, body)
    assert r.status_code == 200, r.text
    return r.json()


def _prompt(n, seed):
    rng = random.Random(seed)
    return [rng.randrange(100, 40000) for _ in range(n)]


LABELS = [7, 1234, 40000, 3]


def _check_rows(rows, ref, positions, labels):
    """Each row is [[lp, id, text], ...] for `labels`, equal to ref[position, id]."""
    assert len(rows) == len(positions)
    for row, pos in zip(rows, positions):
        assert [e[1] for e in row] == labels
        got = torch.tensor([e[0] for e in row])
        assert torch.allclose(got, ref[pos, labels], atol=TOL), (pos, got, ref[pos, labels])


@pytest.mark.parametrize("k", [0, 5])
def test_token_ids_logprob_input_and_output(server, hf, k):
    prompt = _prompt(30, 1)  # two prefill chunks
    out = gen(server, {"input_ids": prompt, "return_logprob": True, "logprob_start_len": k,
                       "token_ids_logprob": LABELS, "return_text_in_logprobs": True,
                       "sampling_params": {"temperature": 0, "max_new_tokens": 5,
                                           "ignore_eos": True}})
    meta = out["meta_info"]
    assert out["output_ids"] == [e[1] for e in meta["output_token_logprobs"]]
    ref = ref_logprobs(hf, prompt + out["output_ids"])
    inp = meta["input_token_ids_logprobs"]
    assert len(inp) == len(prompt) - k and inp[0] is None
    # Entry j (prompt position k+j) is the distribution of that token given the ones before.
    _check_rows(inp[1:], ref, range(k, len(prompt) - 1), LABELS)
    outs = meta["output_token_ids_logprobs"]
    _check_rows(outs, ref, range(len(prompt) - 1, len(prompt) + 4), LABELS)
    assert [e[2] for e in outs[0]] == [hf[1].decode([t]) for t in LABELS]


def test_token_ids_logprob_per_batch_item_and_scoring(server, hf):
    prompts = [_prompt(9, 2), _prompt(13, 3)]
    lists = [[5, 6], [9000]]
    outs = gen(server, {"input_ids": prompts, "return_logprob": True, "token_ids_logprob": lists,
                        "sampling_params": {"max_new_tokens": 0}})
    for out, prompt, labels in zip(outs, prompts, lists):
        meta = out["meta_info"]
        assert out["output_ids"] == [] and meta["input_token_ids_logprobs"] == []
        # max_new_tokens 0 still reports the next-token distribution once (SGLang; /v1/score).
        _check_rows(meta["output_token_ids_logprobs"], ref_logprobs(hf, prompt),
                    [len(prompt) - 1], labels)
        assert all(e[2] is None for e in meta["output_token_ids_logprobs"][0])
    # No token_ids_logprob: no such keys.
    meta = gen(server, {"input_ids": prompts[0], "return_logprob": True,
                        "sampling_params": {"max_new_tokens": 1}})["meta_info"]
    assert "output_token_ids_logprobs" not in meta and "input_token_ids_logprobs" not in meta


def test_streamed_token_ids_logprobs_and_output_ids_are_cumulative(server):
    body = {"input_ids": _prompt(10, 4), "return_logprob": True, "token_ids_logprob": [11, 12],
            "logprob_start_len": 2, "stream": True,
            "sampling_params": {"temperature": 0, "max_new_tokens": 6, "ignore_eos": True}}
    events = []
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[6:]))
    assert len(events) >= 2
    final = events[-1]
    for ev in events:
        meta = ev["meta_info"]
        assert len(ev["output_ids"]) == meta["completion_tokens"]
        assert ev["output_ids"] == final["output_ids"][:len(ev["output_ids"])]
        assert len(meta["output_token_ids_logprobs"]) == meta["completion_tokens"]
        assert len(meta["input_token_ids_logprobs"]) == 10 - 2
    body["stream"] = False
    again = gen(server, body)
    assert again["output_ids"] == final["output_ids"]
    assert again["meta_info"]["output_token_ids_logprobs"] == \
        final["meta_info"]["output_token_ids_logprobs"]


@pytest.mark.parametrize("extra,msg", [
    ({"token_ids_logprob": [1, 10 ** 6]}, "out-of-vocabulary token id 1000000"),
    ({"token_ids_logprob": [-1]}, "out-of-vocabulary token id -1"),
    ({"token_ids_logprob": ["a"]}, "token_ids_logprob"),
    ({"token_ids_logprob": [[1], [2]]}, "token_ids_logprob"),  # two lists, one prompt
    ({"token_ids_logprob": [1], "return_logprob": False}, "return_logprob"),
    ({"logprob_start_len": 13}, "logprob_start_len=13 is higher than the number of input tokens"),
])
def test_bad_token_ids_logprob_is_400(server, extra, msg):
    r = post(server, {"input_ids": _prompt(12, 5), "return_logprob": True, **extra})
    assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text


def test_batch_shape_must_match(server):
    r = post(server, {"input_ids": [_prompt(4, 6), _prompt(4, 7)], "return_logprob": True,
                      "token_ids_logprob": [[1], [2], [3]]})
    assert r.status_code == 400 and "token_ids_logprob has 3 lists" in r.json()["error"]["message"]


def test_start_len_equal_to_prompt_is_empty(server):
    prompt = _prompt(12, 8)
    meta = gen(server, {"input_ids": prompt, "return_logprob": True, "logprob_start_len": 12,
                        "token_ids_logprob": [4],
                        "sampling_params": {"max_new_tokens": 1}})["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["input_token_ids_logprobs"] == []
    assert len(meta["output_token_logprobs"]) == 1


def test_duplicate_rid_says_so(server):
    r = post(server, {"input_ids": [[1, 2], [3, 4]], "rid": ["same", "same"]})
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("Duplicate request ID detected")
    body = {"input_ids": _prompt(8, 9), "rid": "busy", "stream": True,
            "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
    with httpx.stream("POST", server.url + "/generate", json=body, timeout=120) as s:
        lines = s.iter_lines()  # kept: a collected iterator closes the stream (an abort)
        first = next(lines)  # in flight now
        assert s.status_code == 200 and '"finish_reason":null' in first, first
        r = post(server, {**body, "stream": False})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"].startswith("Duplicate request ID detected: busy")


# ---- /v1/score (SGLang's scoring API) ---------------------------------------------------------
def _next_logprobs(hf, ids):
    return ref_logprobs(hf, ids)[-1]


def test_score_token_ids_against_transformers(server, hf):
    query, items = _prompt(6, 10), [_prompt(3, 11), _prompt(5, 12)]
    labels = [17, 2048, 33]
    r = post(server, {"query": query, "items": items, "label_token_ids": labels,
                      "return_token_logprobs": True}, "/v1/score")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "scoring" and body["model"] == "default"
    assert body["pooled_hidden_states"] is None
    assert body["usage"] == {"prompt_tokens": 6 + 3 + 6 + 5, "total_tokens": 20,
                             "completion_tokens": 0, "prompt_tokens_details": None,
                             "reasoning_tokens": 0, "completion_tokens_details": None}
    for item, row, lps in zip(items, body["scores"], body["token_logprobs"]):
        want = _next_logprobs(hf, query + item)[labels]
        assert torch.allclose(torch.tensor(lps), want, atol=TOL)
        assert torch.allclose(torch.tensor(row), want.exp(), atol=TOL)
    # item_first puts the item before the query; apply_softmax normalizes over the labels only.
    r = post(server, {"query": query, "items": items, "label_token_ids": labels,
                      "item_first": True, "apply_softmax": True, "temperature": 0.5}, "/v1/score")
    for item, row in zip(items, r.json()["scores"]):
        want = torch.softmax(_next_logprobs(hf, item + query)[labels] / 0.5, -1)
        assert torch.allclose(torch.tensor(row), want, atol=TOL)


def test_score_text_and_per_item_labels(server, hf):
    tok = hf[1]
    query, items = "The capital of France is", [" Paris", " a city"]
    labels = [[tok.encode(" is")[0], 5], [9]]
    r = post(server, {"query": query, "items": items, "label_token_ids": labels,
                      "model": "m"}, "/v1/score")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "m" and body["token_logprobs"] is None
    for item, ids, row in zip(items, labels, body["scores"]):
        want = _next_logprobs(hf, tok.encode(query + item))[ids].exp()
        assert torch.allclose(torch.tensor(row), want, atol=TOL)
    assert post(server, {"items": [], "label_token_ids": [1]}, "/v1/score").json()["scores"] == []


@pytest.mark.parametrize("body,msg", [
    ({"query": "a", "items": ["b"]}, "label_token_ids is required"),
    ({"query": "a", "label_token_ids": [1]}, "items must be provided"),
    ({"query": "a", "items": ["b"], "label_token_ids": []}, "label_token_ids must be a nonempty list"),
    ({"query": "a", "items": ["b", "c"], "label_token_ids": [[1]]}, "one list per item"),
    ({"query": "a", "items": ["b"], "label_token_ids": [[]]}, "nonempty candidate list"),
    ({"query": "a", "items": ["b"], "label_token_ids": [-1]}, "nonnegative integers"),
    ({"query": "a", "items": ["b"], "label_token_ids": [2, 2]}, "duplicate tokens"),
    ({"query": "a", "items": ["b"], "label_token_ids": [10 ** 6]}, "Token ID 1000000 is out of vocab"),
    ({"query": [1, 2], "items": ["b"], "label_token_ids": [1]}, "Invalid combination"),
    ({"query": "a", "items": ["b"], "label_token_ids": [1], "temperature": 2.0}, "apply_softmax"),
    ({"query": "a", "items": ["b"], "label_token_ids": [1], "score_extraction_token": "x"},
     "score_extraction_token"),
])
def test_score_validation_is_400(server, body, msg):
    r = post(server, body, "/v1/score")
    assert r.status_code == 400 and msg in r.json()["message"], r.text
    assert r.json()["object"] == "error"
