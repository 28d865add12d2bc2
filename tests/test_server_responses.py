"""/v1/responses through the official `openai` SDK against a live `nl serve` (fake paging runner,
byte-level tokenizer, a plain chat template): greedy output equals the chat completion of the same
messages (instructions as a system message, previous_response_id as the earlier turns), the
streamed event sequence, retrieve by id, and SGLang's errors for bad and unknown ids."""

from __future__ import annotations

import os

import httpx
import openai
import pytest

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow  # one server start per module

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp("resp"))
    template = os.path.join(tmp, "template.jinja")
    with open(template, "w") as f:
        f.write(TEMPLATE)
    srv = LiveServer(tmp, ["--context-length", "512", "--chat-template", template],
                     env={"NL_FAKE_STEP_DELAY": "0.002"})
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=60)


def chat(client, server, messages, n=24):
    out = client.chat.completions.create(model=server.model_path, messages=messages,
                                         temperature=0, max_tokens=n)
    return out.choices[0].message.content, out


def test_create_equals_chat_completion(client, server):
    r = client.responses.create(model=server.model_path, input="Tell me a story", temperature=0,
                                max_output_tokens=24, instructions="Be brief.")
    want, completion = chat(client, server, [{"role": "system", "content": "Be brief."},
                                             {"role": "user", "content": "Tell me a story"}])
    assert r.output_text == want and r.id.startswith("resp_") and r.object == "response"
    reason = completion.choices[0].finish_reason
    assert r.status == ("incomplete" if reason == "length" else "completed")
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens"
    u = completion.usage
    assert (r.usage.input_tokens, r.usage.output_tokens, r.usage.total_tokens) == (
        u.prompt_tokens, u.completion_tokens, u.total_tokens)
    msg = r.output[0]
    assert msg.type == "message" and msg.role == "assistant" and msg.id.startswith("msg_")
    assert client.responses.retrieve(r.id).output_text == want


def test_message_list_input_and_chaining(client, server):
    first = client.responses.create(
        model=server.model_path, temperature=0, max_output_tokens=16,
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Hi"}]}])
    second = client.responses.create(model=server.model_path, temperature=0, max_output_tokens=16,
                                     input="And then?", previous_response_id=first.id)
    want, _ = chat(client, server, [{"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": first.output_text},
                                    {"role": "user", "content": "And then?"}], 16)
    assert second.output_text == want and second.previous_response_id == first.id


def test_stream_event_sequence(client, server):
    events = list(client.responses.create(model=server.model_path, input="Stream it",
                                          temperature=0, max_output_tokens=20, stream=True))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    want, completion = chat(client, server, [{"role": "user", "content": "Stream it"}], 20)
    done = "response.incomplete" if completion.choices[0].finish_reason == "length" else "response.completed"
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", done]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == want == events[-4].text
    final = events[-1].response
    assert final.output_text == want
    assert final.usage.output_tokens == completion.usage.completion_tokens
    assert client.responses.retrieve(final.id).output_text == want
    # The SDK's stream helper accumulates the same events into the final response.
    with client.responses.stream(model=server.model_path, input="Stream it", temperature=0,
                                 max_output_tokens=20) as stream:
        assert stream.get_final_response().output_text == want


def test_errors(client, server):
    with pytest.raises(openai.NotFoundError) as e:
        client.responses.create(model=server.model_path, input="x", previous_response_id="resp_nope")
    assert "resp_nope" in str(e.value)
    with pytest.raises(openai.BadRequestError, match="begins with 'resp'"):
        client.responses.create(model=server.model_path, input="x", previous_response_id="bad")
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve("resp_unknown")
    r = httpx.post(server.url + "/v1/responses", json={"input": "x", "reasoning": {"effort": "low"}})
    assert r.status_code == 400 and "reasoning" in r.json()["error"]["message"]
    r = httpx.post(server.url + "/v1/responses", json={"input": "x", "tools": [{"type": "function"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    r = httpx.post(server.url + "/v1/responses", json={"input": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"


def test_store_false_and_bound(server):
    from nlcli.engine.api.openai.responses_protocol import ResponseStore

    r = httpx.post(server.url + "/v1/responses", json={"input": "x", "store": False,
                                                       "max_output_tokens": 2}).json()
    assert httpx.get(server.url + f"/v1/responses/{r['id']}").status_code == 404
    store = ResponseStore(limit=2)
    for i in range(3):
        store.put({"id": f"resp_{i}"}, [])
    assert store.get("resp_0") is None and store.get("resp_2") is not None
