"""Structured output through a live `nl serve` on the embedded SmolLM2-135M-Instruct.

JSON-schema outputs parse and validate, regex and EBNF outputs match in full, constrained and free
requests run side by side, and an invalid grammar is a 400 from the API process (the server keeps
serving).
"""

import asyncio
import json
import re

import httpx
import pytest

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow  # one SmolLM2 server per module

CITY = {"type": "object", "properties": {"name": {"type": "string"},
                                         "population": {"type": "integer"}},
        "required": ["name", "population"], "additionalProperties": False}
EBNF = 'root ::= "The colour is " ("red" | "green" | "blue") "."'
EBNF_RE = r"The colour is (red|green|blue)\."
CITIES = ["Paris", "Tokyo", "Lima", "Oslo", "Cairo", "Delhi", "Rome", "Quito", "Accra", "Hanoi"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from nlcli.engine.configs.model_source import resolve_model_source

    srv = LiveServer(str(tmp_path_factory.mktemp("srv_gr")),
                     ["--max-total-tokens", "8192", "--context-length", "1024"],
                     model_path=resolve_model_source(None).model_path)
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


def prompt(text):
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"


def city_body(i, **sp):
    return {"text": prompt(f"Describe {CITIES[i % len(CITIES)]} as JSON with its name and "
                           f"population."),
            "sampling_params": {"json_schema": json.dumps(CITY), "max_new_tokens": 64,
                                "temperature": 0.7, "seed": i, **sp}}


def check_city(out):
    assert out["meta_info"]["finish_reason"]["type"] == "stop", out
    obj = json.loads(out["text"])
    assert set(obj) == {"name", "population"}
    assert isinstance(obj["name"], str)
    assert isinstance(obj["population"], int) and not isinstance(obj["population"], bool)


def run_all(server, bodies):
    async def go():
        async with httpx.AsyncClient(timeout=600) as client:
            rs = await asyncio.gather(*(client.post(server.url + "/generate", json=b)
                                        for b in bodies))
        return rs

    rs = asyncio.run(go())
    assert all(r.status_code == 200 for r in rs), [r.text for r in rs if r.status_code != 200]
    return [r.json() for r in rs]


def test_json_schema_outputs_validate(server):
    for out in run_all(server, [city_body(i) for i in range(20)]):
        check_city(out)


def test_regex_and_ebnf_match_in_full(server):
    bodies = [{"text": prompt(f"Is {c} a capital city? Answer Yes or No."),
               "sampling_params": {"regex": "(Yes|No)", "max_new_tokens": 8, "seed": i}}
              for i, c in enumerate(CITIES[:5])]
    bodies += [{"text": prompt("Name a colour."),
                "sampling_params": {"ebnf": EBNF, "max_new_tokens": 16, "seed": i}}
               for i in range(4)]
    outs = run_all(server, bodies)
    assert all(re.fullmatch("Yes|No", o["text"]) for o in outs[:5]), [o["text"] for o in outs]
    assert all(re.fullmatch(EBNF_RE, o["text"]) for o in outs[5:]), [o["text"] for o in outs]


def test_mixed_constrained_and_free_concurrently(server):
    bodies = []
    for i in range(40):
        kind = i % 4
        if kind == 0:
            bodies.append(city_body(i))
        elif kind == 1:
            bodies.append({"text": prompt("Answer Yes or No: is water wet?"),
                           "sampling_params": {"regex": "(Yes|No)", "seed": i}})
        elif kind == 2:
            bodies.append({"text": prompt("Name a colour."),
                           "sampling_params": {"ebnf": EBNF, "max_new_tokens": 16, "seed": i}})
        else:
            bodies.append({"text": prompt(f"Tell me about {CITIES[i % 10]}."),
                           "sampling_params": {"max_new_tokens": 24, "seed": i}})
    outs = run_all(server, bodies)
    for i, out in enumerate(outs):
        kind = i % 4
        if kind == 0:
            check_city(out)
        elif kind == 1:
            assert re.fullmatch("Yes|No", out["text"])
        elif kind == 2:
            assert re.fullmatch(EBNF_RE, out["text"])
        else:
            assert out["meta_info"]["finish_reason"]["type"] in ("stop", "length")
            assert out["meta_info"]["completion_tokens"] > 0


@pytest.mark.parametrize("sp,message", [
    ({"regex": "(Yes|No"}, "Invalid regex"),
    ({"json_schema": "{not json"}, "Invalid json_schema"),
    ({"ebnf": "root ::= (("}, "Invalid ebnf"),
    ({"regex": "a", "ebnf": EBNF}, "Only one of regex, json_schema, or ebnf can be set."),
])
def test_invalid_grammar_is_400_and_server_keeps_serving(server, sp, message):
    r = httpx.post(server.url + "/generate", timeout=60,
                   json={"text": "hi", "sampling_params": {"max_new_tokens": 4, **sp}})
    assert r.status_code == 400 and message in r.json()["error"]["message"]
    ok = httpx.post(server.url + "/generate", timeout=120,
                    json={"text": "hi", "sampling_params": {"max_new_tokens": 2}})
    assert ok.status_code == 200
