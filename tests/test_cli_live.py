"""The `nl` CLI as real subprocesses against a live `nl serve` on the embedded SmolLM2 (with an API
key): the answers a user sees, the --json contract and the exit codes, end to end."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.test_openai_api import KEY, start_server

pytestmark = pytest.mark.slow  # one SmolLM2 server for the module

NL = os.path.join(os.path.dirname(sys.executable), "nl")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nlcli.engine.configs.model_source import resolve_model_source

    srv = start_server(str(tmp_path_factory.mktemp("cli-live")),
                       ["--max-total-tokens", "4096", "--context-length", "1024", "--api-key", KEY],
                       model_path=resolve_model_source(None).model_path)
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


def nl(server, *args, key: str | None = KEY, stdin: str | None = None, timeout: float = 300):
    env = {k: v for k, v in os.environ.items() if k not in ("NL_URL", "NL_API_KEY")}
    env.update(NL_URL=server.url, NO_COLOR="1")
    if key is not None:
        env["NL_API_KEY"] = key
    return subprocess.run([NL, *args], input=stdin, capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_chat_answers_paris(server):
    r = nl(server, "generate", "What is the capital of France?", "--chat", "--temperature", "0",
           "--max-new-tokens", "32")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout
    assert KEY not in r.stdout + r.stderr  # the key is never printed


def test_piped_prompt_with_json_is_one_parseable_object(server):
    r = nl(server, "generate", "--json", "--max-new-tokens", "8", "--temperature", "0", stdin="hi\n")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["meta_info"]["completion_tokens"] >= 1 and isinstance(out["text"], str)


def test_generate_equals_the_native_api(server):
    import httpx

    prompt = "The capital of France is"
    body = {"text": prompt, "sampling_params": {"temperature": 0, "max_new_tokens": 12}}
    native = httpx.post(server.url + "/generate", json=body, timeout=300,
                        headers={"Authorization": f"Bearer {KEY}"}).json()
    r = nl(server, "generate", prompt, "--json", "--temperature", "0", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == native["text"]


def test_health_info_and_flush(server):
    assert nl(server, "health").returncode == 0
    assert nl(server, "health", "--generate").returncode == 0
    info = nl(server, "info", "--json")
    assert info.returncode == 0, info.stderr
    assert KEY not in info.stdout
    r = nl(server, "flush-cache", "--json")
    assert r.returncode == 0, r.stderr


def test_exit_codes_for_errors(server):
    bad = nl(server, "generate", "hi", "--temperature", "-1", "--json")
    assert bad.returncode == 1
    err = json.loads(bad.stdout)
    assert err["ok"] is False and err["status"] == 400 and "temperature" in str(err["error"])
    wrong_key = nl(server, "generate", "hi", "--json", key="not-the-key")
    assert wrong_key.returncode == 5 and json.loads(wrong_key.stdout)["status"] == 401
    usage = nl(server, "generate", "hi", "--max-new-tokens", "lots")
    assert usage.returncode == 2


def test_update_weights_to_a_missing_path_is_an_error(server, tmp_path):
    r = nl(server, "update-weights", str(tmp_path / "nowhere"), "--json")
    assert r.returncode == 1
    assert "Failed to get weights iterator" in r.stdout
