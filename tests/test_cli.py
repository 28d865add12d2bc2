"""The client commands through Typer's CliRunner, against the real app on a fake engine
(tests/app_server.py).

References are direct HTTP calls to the same server, so these tests hold for a real `nl serve` too.
"""

from __future__ import annotations

import json
import uuid

import httpx
import pytest
from typer.testing import CliRunner

from nlcli.cli import app
from tests.app_server import (  # noqa: F401  (fixtures)
    TEST_API_KEY,
    auth_server_url,
    embed_server_url,
    free_port,
    server_url,
)

GREEDY = ["--temperature", "0", "--max-new-tokens", "16"]


def nl(*args: str, input: str | None = None, env: dict | None = None):
    env = {"NL_URL": None, "NL_API_KEY": None, "COLUMNS": "100", **(env or {})}
    return CliRunner().invoke(app, list(args), input=input, env=env)


def one_json(stdout: str) -> dict:
    """stdout must be exactly one JSON object."""
    obj = json.loads(stdout)
    assert isinstance(obj, dict)
    return obj


def unique_prompt() -> str:
    return "Tell me about " + " ".join(uuid.uuid4().hex[i : i + 4] for i in range(0, 16, 4))


def reference_generate(url: str, prompt: str) -> dict:
    body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 16}}
    return httpx.post(f"{url}/generate", json=body, timeout=120).json()


@pytest.mark.parametrize("mode", [[], ["--no-stream"]])
def test_generate_prints_text_then_counts(server_url, mode):
    prompt = unique_prompt()
    ref = reference_generate(server_url, prompt)
    r = nl("generate", prompt, "--url", server_url, *GREEDY, *mode)
    assert r.exit_code == 0, r.output
    assert r.stdout == ref["text"] + "\n"  # streamed deltas add up to the whole text
    meta = ref["meta_info"]
    # Counts and finish reason go to the human console (stderr when stdout is not a terminal).
    assert f"prompt {meta['prompt_tokens']}" in r.stderr
    assert f"completion {meta['completion_tokens']}" in r.stderr
    assert meta["finish_reason"]["type"] in r.stderr


def test_generate_json_is_the_server_object(server_url):
    prompt = unique_prompt()
    ref = reference_generate(server_url, prompt)
    r = nl("generate", prompt, "--json", "--url", server_url, *GREEDY)
    assert r.exit_code == 0, r.output
    out = one_json(r.stdout)
    assert out["text"] == ref["text"]
    assert out["meta_info"]["completion_tokens"] == ref["meta_info"]["completion_tokens"]


def test_generate_reads_prompt_from_stdin(server_url):
    prompt = unique_prompt()
    from_arg = one_json(nl("generate", prompt, "--json", "--url", server_url, *GREEDY).stdout)
    r = nl("generate", "--json", "--url", server_url, *GREEDY, input=prompt + "\n")
    assert r.exit_code == 0, r.output
    from_stdin = one_json(r.stdout)
    assert from_stdin["text"] == from_arg["text"]
    assert from_stdin["meta_info"]["prompt_tokens"] == from_arg["meta_info"]["prompt_tokens"]


def test_generate_without_prompt_is_a_usage_error(server_url):
    r = nl("generate", "--url", server_url, input="")
    assert r.exit_code == 2


def test_stop_string_ends_the_text(server_url):
    prompt = unique_prompt()
    full = reference_generate(server_url, prompt)["text"]
    stop = full.split()[1]  # a word the greedy output is known to contain
    r = nl("generate", prompt, "--json", "--stop", stop, "--url", server_url, *GREEDY)
    out = one_json(r.stdout)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == full[: full.index(stop)]


@pytest.mark.parametrize("stream", [[], ["--no-stream"]])
def test_chat_uses_openai_route(server_url, stream):
    prompt = unique_prompt()
    body = {"model": "default", "messages": [{"role": "user", "content": prompt}],
            "temperature": 0, "max_tokens": 16}
    ref = httpx.post(f"{server_url}/v1/chat/completions", json=body, timeout=120).json()
    text = ref["choices"][0]["message"]["content"]
    r = nl("generate", prompt, "--chat", "--url", server_url, *GREEDY, *stream)
    assert r.exit_code == 0, r.output
    assert r.stdout == text + "\n"
    assert f"prompt {ref['usage']['prompt_tokens']}" in r.stderr
    j = one_json(nl("generate", prompt, "--chat", "--json", "--url", server_url, *GREEDY).stdout)
    assert j["object"] == "chat.completion" and j["choices"][0]["message"]["content"] == text


@pytest.mark.parametrize("flag", [["--top-p", "2"], ["--top-k", "0"], ["--max-new-tokens", "-1"]])
def test_server_rejection_exits_1_with_its_message(server_url, flag):
    param = flag[0][2:].replace("-", "_")  # the spec's messages name the sampling parameter
    r = nl("generate", "hi", "--url", server_url, *flag)
    assert r.exit_code == 1
    assert "HTTP 400" in r.stderr and param in r.stderr
    r = nl("generate", "hi", "--json", "--url", server_url, *flag)
    assert r.exit_code == 1
    out = one_json(r.stdout)
    assert out["ok"] is False and out["status"] == 400 and param in out["error"]


def test_usage_error_with_json_is_one_json_object(server_url):
    r = nl("generate", "hi", "--temperature", "warm", "--json", "--url", server_url)
    assert r.exit_code == 2
    out = one_json(r.stdout)
    assert out["ok"] is False and "--temperature" in out["error"]


def test_unreachable_exits_3():
    url = f"http://127.0.0.1:{free_port()}"
    for cmd in (["health"], ["generate", "hi"], ["info"], ["flush-cache"]):
        r = nl(*cmd, "--url", url)
        assert r.exit_code == 3, (cmd, r.output)
    out = one_json(nl("generate", "hi", "--json", "--url", url).stdout)
    assert out["ok"] is False and out["status"] is None and url in out["error"]


def test_api_key_wrong_missing_and_right(auth_server_url):
    for key in (["--api-key", "wrong"], []):
        r = nl("generate", "hi", "--url", auth_server_url, *key)
        assert r.exit_code == 5, r.output
    out = one_json(nl("info", "--json", "--url", auth_server_url, "--api-key", "wrong").stdout)
    assert out == {"ok": False, "status": 401, "error": out["error"]}
    r = nl("generate", "hi", "--url", auth_server_url, env={"NL_API_KEY": TEST_API_KEY})
    assert r.exit_code == 0, r.output
    r = nl("info", "--url", auth_server_url, "--api-key", TEST_API_KEY)
    assert r.exit_code == 0 and TEST_API_KEY not in r.output  # the server args hold the key
    j = one_json(nl("info", "--json", "--url", auth_server_url, "--api-key", TEST_API_KEY).stdout)
    assert TEST_API_KEY not in json.dumps(j)


def test_health_is_exempt_from_the_key(auth_server_url):
    r = nl("health", "--url", auth_server_url)
    assert r.exit_code == 0
    # Only /health: /health_generate runs the model, so it needs the key (README, compatibility).
    out = one_json(nl("health", "--generate", "--json", "--url", auth_server_url).stdout)
    assert out["ok"] is False and out["status"] == 401
    out = one_json(nl("health", "--generate", "--json", "--url", auth_server_url,
                      "--api-key", TEST_API_KEY).stdout)
    assert out["ok"] is True and out["endpoint"] == "/health_generate"


def test_global_options_before_or_after_the_command(server_url):
    before = nl("--url", server_url, "--json", "health")
    after = nl("health", "--url", server_url, "--json")
    from_env = nl("health", "--json", env={"NL_URL": server_url})
    for r in (before, after, from_env):
        assert r.exit_code == 0, r.output
        assert one_json(r.stdout)["ok"] is True
    # The command's flag wins over the root's.
    r = nl("--url", f"http://127.0.0.1:{free_port()}", "health", "--url", server_url)
    assert r.exit_code == 0


def test_info_shows_args_model_and_pool(server_url):
    out = one_json(nl("info", "--json", "--url", server_url).stdout)
    model = httpx.get(f"{server_url}/get_model_info").json()
    assert out["model_info"] == model
    assert isinstance(out["memory_pool_size"], int) and out["memory_pool_size"] > 0
    assert "schedule_policy" in out["server_args"]
    human = nl("info", "--url", server_url, env={"COLUMNS": "300"})  # long paths stay whole
    assert human.exit_code == 0
    assert model["model_path"] in human.stderr and str(out["memory_pool_size"]) in human.stderr


def test_flush_cache_resets_cached_tokens(server_url):
    prompt = unique_prompt()
    run = lambda: one_json(nl("generate", prompt, "--json", "--url", server_url, *GREEDY).stdout)
    run()
    second = run()["meta_info"]
    assert second["cached_tokens"] == second["prompt_tokens"] - 1
    r = nl("flush-cache", "--url", server_url)
    assert r.exit_code == 0 and "Cache flushed." in r.stderr
    assert run()["meta_info"]["cached_tokens"] == 0
    out = one_json(nl("flush-cache", "--json", "--url", server_url).stdout)
    assert out["ok"] is True and out["message"].startswith("Cache flushed.")


def test_update_weights_failure_keeps_model(server_url, tmp_path):
    before = httpx.get(f"{server_url}/get_model_info").json()["model_path"]
    missing = str(tmp_path / "no-such-model")
    r = nl("update-weights", missing, "--url", server_url)
    assert r.exit_code == 1 and missing in r.stderr
    out = one_json(nl("update-weights", missing, "--json", "--url", server_url).stdout)
    assert out["ok"] is False and out["status"] == 400 and missing in out["error"]
    assert httpx.get(f"{server_url}/get_model_info").json()["model_path"] == before


@pytest.mark.parametrize("cmd,route", [("encode", "/encode"), ("classify", "/classify")])
def test_embeddings_json_match_the_server(embed_server_url, cmd, route, tmp_path):
    texts = ["a quick brown fox", "hello"]
    ref = httpx.post(f"{embed_server_url}{route}", json={"text": texts}).json()
    r = nl(cmd, *texts, "--json", "--url", embed_server_url)
    assert r.exit_code == 0, r.output
    data = one_json(r.stdout)["data"]
    assert [d["text"] for d in data] == texts
    assert [d["embedding"] for d in data] == [x["embedding"] for x in ref]
    lines = tmp_path / "texts.txt"
    lines.write_text("\n".join(texts) + "\n\n")
    from_file = one_json(nl(cmd, "--file", str(lines), "--json", "--url", embed_server_url).stdout)
    assert from_file["data"] == data
    table = nl(cmd, *texts, "--url", embed_server_url)
    assert table.exit_code == 0 and "hello" in table.stderr and table.stdout == ""


def test_encode_on_a_generation_server_exits_1(server_url):
    r = nl("encode", "hi", "--url", server_url)
    assert r.exit_code == 1 and "--is-embedding" in r.stderr


def test_encode_without_texts_is_a_usage_error(embed_server_url):
    assert nl("encode", "--url", embed_server_url).exit_code == 2
