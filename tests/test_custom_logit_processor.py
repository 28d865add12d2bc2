"""Custom logit processors: SGLang's wire format (dill, JSON "callable"), a class serialized by
value as a client script's would be, pickles made against SGLang's base class, the sampler's
placement (after logit_bias and penalties, before temperature; per-row params; one failing
processor ends only its rows), and the server gate through the real app on the fake engine:
off by default with SGLang's message on /generate and /v1, on with the flag."""

from __future__ import annotations

import json
import sys

import httpx
import openai
import pytest
import torch

from nlcli.engine.sampling.custom_logit_processor import (DISABLED_MESSAGE, CustomLogitProcessor,
                                                          DisallowedTokensLogitsProcessor,
                                                          check_wire_format, load_processor)
from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.sampling.sampler import SamplingBatchInfo
from tests.app_server import AppServer

# Processors as a client script defines them (module __main__, so dill sends them by value).
FORCE_SRC = '''
from nlcli.engine.sampling.custom_logit_processor import CustomLogitProcessor

class ForceToken(CustomLogitProcessor):
    """Every row emits its custom_params["token_id"] (plus the number of tokens it has made when
    "count" is set, read through SGLang's "__req__")."""

    def __call__(self, logits, custom_param_list=None):
        for i, p in enumerate(custom_param_list):
            tok = p["token_id"] + (len(p["__req__"].output_ids) if p.get("count") else 0)
            logits[i, :] = float("-inf")
            logits[i, tok] = 0.0
        return logits
'''


def client_class(src: str, name: str, base_module: dict | None = None) -> type:
    ns = {"__name__": "__main__", **(base_module or {})}
    exec(compile(src, "<client script>", "exec"), ns)
    return ns[name]


def force_token_str() -> str:
    return client_class(FORCE_SRC, "ForceToken").to_str()


def test_wire_format_is_sglangs_and_loads_by_value():
    s = force_token_str()
    data = json.loads(s)
    assert list(data) == ["callable"] and bytes.fromhex(data["callable"])
    proc = CustomLogitProcessor.from_str(s)
    assert isinstance(proc, CustomLogitProcessor) and type(proc).__name__ == "ForceToken"
    out = proc(torch.zeros(2, 6), [{"token_id": 4}, {"token_id": 1}])
    assert out.argmax(-1).tolist() == [4, 1]


def test_a_pickle_made_against_sglangs_base_class_loads(tmp_path, monkeypatch):
    """A client with SGLang installed pickles its subclass with the base by reference to
    SGLang's module; here a stand-in module at that path (with SGLang's to_str) plays it."""
    pkg = tmp_path / "sglang" / "srt" / "sampling"
    pkg.mkdir(parents=True)
    for d in (pkg, pkg.parent, pkg.parent.parent):
        (d / "__init__.py").write_text("")
    (pkg / "custom_logit_processor.py").write_text(
        "import json\nfrom abc import ABC\nimport dill\n\n"
        "class CustomLogitProcessor(ABC):\n"
        "    @classmethod\n"
        "    def to_str(cls):\n"
        "        return json.dumps({'callable': dill.dumps(cls).hex()})\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    src = FORCE_SRC.replace("from nlcli.engine.sampling.custom_logit_processor import",
                            "from sglang.srt.sampling.custom_logit_processor import")
    s = client_class(src, "ForceToken").to_str()
    assert b"sglang.srt.sampling" in bytes.fromhex(json.loads(s)["callable"])  # by reference
    for name in [n for n in sys.modules if n == "sglang" or n.startswith("sglang.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    proc = CustomLogitProcessor.from_str(s)  # the base resolves to nl's class
    assert isinstance(proc, CustomLogitProcessor)
    assert proc(torch.zeros(1, 4), [{"token_id": 3}]).argmax(-1).tolist() == [3]


def test_wire_and_load_errors():
    for bad in ["not json", '{"x": 1}', '{"callable": "zz"}', "[1]"]:
        with pytest.raises(ValueError, match="CustomLogitProcessor.to_str"):
            check_wire_format(bad)
    with pytest.raises(ValueError, match="^" + DISABLED_MESSAGE.replace("(", r"\(")[:40]):
        load_processor(force_token_str(), enabled=False)
    with pytest.raises(ValueError, match="could not be loaded"):
        load_processor(json.dumps({"callable": "00ff"}), enabled=True)


def _info(params, processors, vocab=8):
    return SamplingBatchInfo.from_reqs([(p, [], [1, 2]) for p in params], vocab,
                                       processors=processors)


def test_sampler_applies_processors_after_bias_and_only_to_their_rows():
    seen = {}

    class Record(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list=None):
            seen["logits"], seen["params"] = logits.clone(), custom_param_list
            logits[:, custom_param_list[0]["token_id"]] = 1e9
            return logits

    logits = torch.randn(3, 8)
    params = [SamplingParams(temperature=0, logit_bias={5: 3.0}, custom_params={"token_id": 2}),
              SamplingParams(temperature=0),
              SamplingParams(temperature=0.7, top_k=3, custom_params={"token_id": 6})]
    proc = Record()
    rows = [("rec", proc, {"token_id": 2}), None, ("rec", proc, {"token_id": 6})]
    out = _info(params, rows).sample(logits.clone())
    want_seen = logits[[0, 2]].clone()
    want_seen[0, 5] += 3.0  # the bias was applied before the processor ran
    torch.testing.assert_close(seen["logits"], want_seen)
    assert seen["params"] == [{"token_id": 2}, {"token_id": 6}]
    assert out.next_token_ids[0] == 2 and out.next_token_ids[2] == 2  # row 2 forced by row 0's id
    assert out.next_token_ids[1] == logits[1].argmax()  # untouched row
    assert out.failed_rows is None


def test_a_failing_processor_ends_only_its_rows():
    class Broken(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list=None):
            raise RuntimeError("boom")

    class WrongShape(CustomLogitProcessor):
        def __call__(self, logits, custom_param_list=None):
            return logits[:, :3]

    logits = torch.randn(3, 8)
    rows = [("b", Broken(), None), None, ("w", WrongShape(), None)]
    out = _info([SamplingParams(temperature=0)] * 3, rows).sample(logits.clone())
    assert set(out.failed_rows) == {0, 2} and "boom" in out.failed_rows[0]
    assert "expected (1, 8)" in out.failed_rows[2]
    assert out.next_token_ids[1] == logits[1].argmax()


def test_disallowed_tokens_builtin():
    logits = torch.zeros(2, 5)
    out = DisallowedTokensLogitsProcessor()(logits, [{"token_ids": [1, 3]}] * 2)
    assert torch.isneginf(out[:, [1, 3]]).all() and (out[:, [0, 2, 4]] == 0).all()


@pytest.fixture(scope="module")
def apps():
    with AppServer() as off, AppServer(enable_custom_logit_processor=True) as on:
        yield off, on


def _generate(url, **extra):
    body = {"text": "Q:", "sampling_params": {"temperature": 0, "max_new_tokens": 6,
                                              "custom_params": {"token_id": ord("z")}}, **extra}
    return httpx.post(url + "/generate", json=body, timeout=60)


def test_off_by_default_with_sglangs_message(apps):
    off, _ = apps
    r = _generate(off.url, custom_logit_processor=force_token_str())
    assert r.status_code == 400 and r.json()["error"]["message"] == DISABLED_MESSAGE
    client = openai.OpenAI(base_url=off.url + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError, match="--enable-custom-logit-processor"):
        client.completions.create(model="m", prompt="Q:", max_tokens=4,
                                  extra_body={"custom_logit_processor": force_token_str()})
    assert _generate(off.url).status_code == 200  # custom_params alone are fine


def test_on_with_the_flag_on_generate_and_v1(apps):
    _, on = apps
    r = _generate(on.url, custom_logit_processor=force_token_str())
    assert r.status_code == 200 and r.json()["text"] == "zzzzzz"
    client = openai.OpenAI(base_url=on.url + "/v1", api_key="x")
    c = client.completions.create(model="m", prompt="Q:", max_tokens=4, temperature=0, extra_body={
        "custom_logit_processor": force_token_str(),
        "custom_params": {"token_id": ord("a"), "count": True}})
    assert c.choices[0].text == "abcd"  # "__req__" gives the processor the request's output
    chat = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=3, temperature=0,
        extra_body={"custom_logit_processor": force_token_str(), "custom_params": {"token_id": 81}})
    assert chat.choices[0].message.content == "QQQ"
    bad = _generate(on.url, custom_logit_processor="not a processor")
    assert bad.status_code == 400 and "CustomLogitProcessor.to_str" in bad.text
