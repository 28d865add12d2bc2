"""The /v1 API on the embedded SmolLM2-135M-Instruct, through the official `openai` SDK: greedy chat
equals /generate on the same templated prompt (the model's own chat_template.jinja), structured
output (json_schema validates, json_object parses), and lm-eval-shaped loglikelihood requests
against transformers' log-probabilities on the same GGUF."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

from tests.test_openai_api import start_server

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
PERSON = {"type": "object",
          "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}


@pytest.fixture(scope="module")
def source():
    from nlcli.engine.configs.model_source import resolve_model_source

    return resolve_model_source(None)


@pytest.fixture(scope="module")
def tok(source):
    return source.load_tokenizer()


@pytest.fixture(scope="module")
def server(tmp_path_factory, source):
    # An explicit float32: compared against transformers' float32 forward, so no quantized
    # matmuls (`--dtype auto` may pick the GGUF's own 4-bit kernels, which compute in bfloat16).
    srv = start_server(str(tmp_path_factory.mktemp("oai-smol")),
                       ["--max-total-tokens", "2048", "--context-length", "1024", "--dtype", "float32"],
                       keyed=False, model_path=source.model_path)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=300)


def test_greedy_chat_equals_generate(client, server, tok):
    r = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=24,
                                       temperature=0)
    ids = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=True,
                                  return_dict=True)["input_ids"]
    native = httpx.post(server.url + "/generate", timeout=300, json={
        "input_ids": ids, "sampling_params": {"temperature": 0, "max_new_tokens": 24}}).json()
    assert r.choices[0].message.content == native["text"]
    assert "Paris" in native["text"]
    assert r.usage.prompt_tokens == len(ids)


def test_response_format_json_schema_and_json_object(client):
    msgs = [{"role": "user", "content": "Describe a person as JSON with a name and an age."}]
    r = client.chat.completions.create(
        model="smollm2", messages=msgs, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"name", "age"} and isinstance(obj["name"], str) and isinstance(obj["age"], int)
    r = client.chat.completions.create(model="smollm2", messages=msgs, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_lm_eval_loglikelihood_matches_transformers(client, tok, smollm2_hf):
    # lm-eval's local-completions loglikelihood request, reproduced exactly (lm-eval itself is too
    # heavy for the test environment): token-id prompts, echo, max_tokens 1, logprobs 1, then
    # sum(token_logprobs[ctxlen:-1]) and a greedy check against top_logprobs.
    pairs = [("The capital of France is", " Paris"), ("2 + 2 =", " 4"), ("Water is", " wet")]
    prompts = [tok.encode(c) + tok.encode(x) for c, x in pairs]
    ctxlens = [len(tok.encode(c)) for c, _ in pairs]
    r = client.completions.create(model="smollm2", prompt=prompts, temperature=0, max_tokens=1,
                                  logprobs=1, seed=1234, echo=True)
    if r.choices[0].logprobs is None:
        pytest.skip("the engine does not return logprobs yet (tokenizer manager hook pending)")
    model = smollm2_hf
    for choice, ids, ctxlen in zip(sorted(r.choices, key=lambda c: c.index), prompts, ctxlens):
        lp = choice.logprobs
        got = sum(lp.token_logprobs[ctxlen:-1])
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0].float()
        ref = torch.log_softmax(logits, -1)[torch.arange(ctxlen - 1, len(ids) - 1),
                                            torch.tensor(ids[ctxlen:])].sum().item()
        assert got == pytest.approx(ref, abs=1e-3)
        greedy = all(t == max(top.values()) for t, top in
                     zip(lp.token_logprobs[ctxlen:-1], lp.top_logprobs[ctxlen:-1]))
        ref_greedy = bool((logits[ctxlen - 1:len(ids) - 1].argmax(-1) == torch.tensor(ids[ctxlen:])).all())
        assert greedy == ref_greedy
