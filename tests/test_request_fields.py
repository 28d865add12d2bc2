"""Nothing silently ignored (issue 12 item 1): every request field and `nl serve` flag is either
honoured or refused, and the walk tests fail when someone adds one without wiring it.

How the walks fail on an unwired addition:
- /generate: `parse_generate` is run on a body holding every honoured field, through a dict that
  records which keys the parser reads. A new `body.get("x")` in the parser without
  `GENERATE.honour("x")` is read-but-not-honoured (and at runtime refused before it is read), so
  `test_generate_parser_reads_exactly_the_honoured_fields` fails; honouring a field the parser
  never reads fails it too (that field would be silently ignored).
- /v1: every pydantic request model (every RequestModel subclass in the API package) must have a
  policy in request_fields.OPENAI_POLICIES, and each declared field must be listed there as
  honoured or unsupported; a new `foo: int = 0` on CompletionRequest is in neither and fails
  `test_every_v1_model_field_is_classified`. Each honoured field must also be read by the /v1 code
  (`req.foo` or the name in a key tuple), or `test_honoured_v1_fields_are_read` fails.
- flags: a new ServerArgs field that no module outside args.py reads (nor a ServerArgs method the
  engine calls: the device-dependent defaults, the secrets' `<name>_file` read by with_secrets),
  and that is neither in the compatibility group nor restricted with `only`, fails
  `test_every_flag_is_read_or_compat`.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import pathlib
import pkgutil
import re

import httpx
import openai
import pytest
from pydantic import BaseModel

import nlcli.engine.api as api_pkg
from nlcli.engine.api.native_input import parse_generate
from nlcli.engine.api.openai.protocol import RequestModel
from nlcli.engine.api.request_fields import ENCODE, GENERATE, OPENAI_POLICIES
from nlcli.engine.args import COMPAT_GROUP, ServerArgs

ROOT = pathlib.Path(__file__).resolve().parents[1]


class RecordingDict(dict):
    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.read: set[str] = set()

    def get(self, key, default=None):
        self.read.add(key)
        return super().get(key, default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key):
        self.read.add(key)
        return super().__contains__(key)


def _all_request_models() -> set[type]:
    for mod in pkgutil.walk_packages(api_pkg.__path__, api_pkg.__name__ + "."):
        importlib.import_module(mod.name)
    found, todo = set(), [RequestModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.model_fields and not sub.__name__.startswith("_"):
                found.add(sub)
    return found


# ---- the walks -------------------------------------------------------------------------------
def test_generate_parser_reads_exactly_the_honoured_fields():
    body = RecordingDict({"text": "hi", "input_ids": [1, 2], "rid": "r", "stream": False,
                          "sampling_params": {"max_new_tokens": 1}, "return_logprob": True,
                          "logprob_start_len": 0, "top_logprobs_num": 1,
                          "return_text_in_logprobs": True, "custom_logit_processor": None,
                          "token_ids_logprob": None})
    assert set(body) == GENERATE.honoured, "the body must carry every honoured field"
    body.read.clear()
    parse_generate(body)
    assert body.read == GENERATE.honoured


def test_generate_table_is_sglangs_field_list():
    # Spot checks against SGLang 0.5.23's GenerateReqInput (facts file, section 7).
    for name in ("session_id", "input_embeds", "image_data", "token_ids_logprob",
                 "return_hidden_states", "lora_path", "custom_logit_processor", "bootstrap_room",
                 "priority", "return_prompt_token_ids", "cache_salt", "kv_hints"):
        assert name in GENERATE.known(), name
    assert not GENERATE.honoured & set(GENERATE.unsupported)


def test_every_v1_model_field_is_classified():
    models = _all_request_models()
    assert {m.__name__ for m in models} >= {"CompletionRequest", "ChatCompletionRequest",
                                            "EmbeddingRequest"}
    for model in models:
        policy = OPENAI_POLICIES.get(model.__name__)
        assert policy is not None, f"{model.__name__} has no policy in request_fields.py"
        missing = set(model.model_fields) - policy.known()
        assert not missing, f"{model.__name__} fields neither honoured nor refused: {missing}"


def test_honoured_v1_fields_are_read():
    code = "\n".join(p.read_text() for p in (ROOT / "nlcli/engine/api/openai").glob("*.py"))
    for name, policy in OPENAI_POLICIES.items():
        for field in policy.honoured:
            assert re.search(rf"req\.{field}\b|\"{field}\"", code), f"{name}.{field} is never read"


def _reads(field: str, code: str) -> bool:
    return re.search(rf"\b(args|server_args|self\.args|a)\.{field}\b|\"{field}\"", code) is not None


def _server_args_methods() -> str:
    """The source of ServerArgs' methods (not its field definitions, which name every flag)."""
    src = (ROOT / "nlcli" / "engine" / "args.py").read_text()
    cls = next(n for n in ast.parse(src).body
               if isinstance(n, ast.ClassDef) and n.name == "ServerArgs")
    return "\n".join(ast.get_source_segment(src, n) for n in cls.body
                     if isinstance(n, ast.FunctionDef))


def test_every_parsed_request_model_refuses_what_it_ignores():
    """Every model a route hands to `parse_request` either keeps unknown keys for a field policy
    (a RequestModel, walked above) or forbids them outright (a 400). A new route whose model
    ignored extras (pydantic's default) would fail here."""
    _all_request_models()  # imports every api module, so each model class exists
    names = set()
    for path in pathlib.Path(api_pkg.__path__[0]).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and getattr(node.func, "id", None) == "parse_request"
                    and len(node.args) == 2):
                arg = node.args[1]
                name = arg.attr if isinstance(arg, ast.Attribute) else getattr(arg, "id", "")
                if name[:1].isupper():  # a class, not a helper's `model` parameter
                    names.add(name)
    assert names >= {"TokenizeRequest", "ScoringRequest", "RerankRequest", "ResponsesRequest"}
    by_name = {}
    todo = [BaseModel]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            by_name.setdefault(sub.__name__, sub)
    lax = sorted(n for n in names if not issubclass(by_name[n], RequestModel)
                 and by_name[n].model_config.get("extra") != "forbid")
    assert lax == []


def test_every_flag_is_read_or_compat():
    code = "\n".join(p.read_text() for p in (ROOT / "nlcli").rglob("*.py")
                     if p.name != "args.py")
    methods = _server_args_methods()
    secrets = {f.name for f in dataclasses.fields(ServerArgs) if f.metadata.get("secret")}
    for f in dataclasses.fields(ServerArgs):
        if f.metadata.get("group") == COMPAT_GROUP or "only" in f.metadata:
            continue
        by_method = re.search(rf"\bself\.{f.name}\b", methods) or (
            f.name.endswith("_file") and f.name[:-5] in secrets and 'name + "_file"' in methods)
        assert _reads(f.name, code) or by_method, \
            f"--{f.name.replace('_', '-')} is neither read nor compat-only"


def test_refused_flags():
    assert ServerArgs().refused_flags() == []
    assert ServerArgs(tp_size=2, dp_size=2).refused_flags() == []  # both are served
    assert ServerArgs(dp_size=0).refused_flags() == ["--dp-size 0 (must be at least 1)"]
    refused = ServerArgs(load_balance_method="total_tokens").refused_flags()
    assert len(refused) == 1 and refused[0].startswith("--load-balance-method total_tokens (nl ")


# ---- the policy itself -----------------------------------------------------------------------
@pytest.mark.parametrize("body,message", [
    ({"text": "x", "lora_path": "a"}, "lora_path is not supported by this server."),
    ({"text": "x", "input_embeds": [[0.1]]}, "input_embeds is not supported by this server."),
    ({"text": "x", "log_metrics": False}, "log_metrics is not supported by this server."),
    ({"text": "x", "sampling_param": {}}, "Unknown field: 'sampling_param'"),
    ({"text": "x", "return_hidden_states": True},
     "return_hidden_states is not supported by this server."),
])
def test_generate_refusals(body, message):
    with pytest.raises(ValueError) as e:
        parse_generate(body)
    assert str(e.value) == message


def test_generate_neutral_values_pass():
    parse_generate({"text": "x", "return_hidden_states": False, "log_metrics": True,
                    "lora_path": None, "background": False, "routed_experts_start_len": 0})


def test_encode_policy():
    ENCODE.check({"text": "x", "rid": "a", "log_metrics": True})
    with pytest.raises(ValueError, match="^dimensions is not supported by this server.$"):
        ENCODE.check({"text": "x", "dimensions": 8})


# ---- live: the real app on the fake engine ----------------------------------------------------
@pytest.fixture(scope="module")
def url():
    from tests.app_server import AppServer

    with AppServer() as srv:
        yield srv.url


@pytest.fixture(scope="module")
def embed_url():
    from tests.app_server import AppServer

    with AppServer(is_embedding=True) as srv:
        yield srv.url


def test_live_generate_names_the_field(url):
    r = httpx.post(url + "/generate", json={"text": "Hi", "session_params": {"id": "s"}})
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "session_params is not supported by this server."}}
    r = httpx.post(url + "/generate", json={"text": "Hi", "retrun_logprob": True})
    assert r.status_code == 400 and r.json()["error"]["message"] == "Unknown field: 'retrun_logprob'"
    r = httpx.post(url + "/generate", json={"text": "Hi", "return_hidden_states": False,
                                            "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 200


@pytest.mark.parametrize("route,extra,field", [
    ("/v1/completions", {"prompt": "Hi", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "Hi", "suffix": "end"}, "suffix"),
    ("/v1/completions", {"prompt": "Hi", "return_hidden_states": True}, "return_hidden_states"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}],
                              "tool_choice": "required"}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "store": True},
     "store"),
])
def test_live_v1_names_the_field(url, route, extra, field):
    r = httpx.post(url + route, json={"model": "m", "max_tokens": 2, **extra})
    assert r.status_code == 400, r.text
    body = r.json()
    assert body["message"] == f"{field} is not supported by this server."
    assert body["param"] == field and body["object"] == "error" and body["code"] == 400


def test_live_v1_extra_body_through_the_sdk(url):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    msgs = [{"role": "user", "content": "Hi"}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="m", messages=msgs, max_tokens=2,
                                       extra_body={"lora_path": "my-adapter"})
    assert "lora_path is not supported by this server." in str(e.value)
    # Neutral values ask for nothing nl lacks: accepted.
    out = client.chat.completions.create(model="m", messages=msgs, max_tokens=2, store=False,
                                         parallel_tool_calls=True, tool_choice="auto",
                                         extra_body={"lora_path": None, "best_of": None,
                                                     # SGLang's defaults; sglang-router sends them
                                                     "separate_reasoning": True,
                                                     "stream_reasoning": True})
    assert out.choices[0].finish_reason == "length"
    out = client.completions.create(model="m", prompt="Hi", max_tokens=2, best_of=1)
    assert out.choices[0].finish_reason == "length"


def test_live_embeddings_refuse_what_they_ignore(embed_url):
    r = httpx.post(embed_url + "/v1/embeddings", json={"model": "m", "input": "Hi",
                                                        "dimensions": 8})
    assert r.status_code == 400 and r.json()["param"] == "dimensions"
    r = httpx.post(embed_url + "/v1/embeddings", json={"model": "m", "input": "Hi",
                                                        "encoding_format": "int8"})
    assert r.status_code == 400 and r.json()["param"] == "encoding_format"
    r = httpx.post(embed_url + "/encode", json={"text": "Hi", "lora_path": "a"})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "lora_path is not supported by this server."
