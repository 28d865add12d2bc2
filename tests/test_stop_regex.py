"""stop_regex: the pattern's worst-case length against the regex parser's own width, the engine's
StopChecker against a full-decode `re.search` at every prefix (SmolLM2's tokenizer and a
byte-level one), SamplingParams' caps and messages, and the wire behaviour through the real app on
the fake engine (it writes "The capital of France is Paris."): /generate and /v1 report the
pattern as `matched_stop`, text is cut only where the pattern text itself appears (SGLang's
literal trim), and a bad pattern is a 400 naming the field."""

from __future__ import annotations

import re
from types import SimpleNamespace

import httpx
import openai
import pytest

from nlcli.engine.detokenizer import StopChecker
from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.sampling.stop_regex import MAX_REGEX_LOOKBACK, max_match_len
from tests.app_server import AppServer
from tests.test_scheduler_fakes import write_byte_tokenizer
from tests.tiny_models import smollm2_tokenizer_dir

TEXT = "It is 42 degrees in Paris; the year 2024 ended. Call 555-0199 now! 深度学习 ok"


@pytest.mark.parametrize("pattern,width", [("abc", 3), (r"\d{2,5}x", 6), ("a|bcd", 3),
                                           (r"(ab){3}", 6), (r"^foo\b", 3), ("[a-z]{3}-?[0-9]", 5),
                                           ("x?y", 2), (r"(?<=a)b{2}", 2), ("(?:ab|c){1,4}", 8),
                                           (r"(a)\1", 2)])
def test_bounded_patterns_look_back_their_longest_match(pattern, width):
    assert max_match_len(pattern) == width


@pytest.mark.parametrize("pattern", [r"\d+", "a.*b", "(ab)+c", "x{3,}"])
def test_unbounded_patterns_look_back_the_cap(pattern):
    assert max_match_len(pattern) == MAX_REGEX_LOOKBACK


@pytest.fixture(scope="module", params=["smollm2", "bytes"])
def tok(request, tmp_path_factory):
    from transformers import AutoTokenizer

    if request.param == "smollm2":
        return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir())
    return AutoTokenizer.from_pretrained(write_byte_tokenizer(str(tmp_path_factory.mktemp("b"))))


@pytest.mark.parametrize("patterns", [[r"\d{4}"], ["zzz", r"Par\w+"], [r"\d+-\d+"],
                                      [r"深度"], [r"(?<=year )\d\d"], [r"[!?]"], ["nomatch"]])
def test_checker_fires_at_the_first_token_whose_text_matches(tok, patterns):
    ids = tok.encode(TEXT, add_special_tokens=False)
    sp = SimpleNamespace(skip_special_tokens=True, spaces_between_special_tokens=True, stop=[],
                         stop_regex=patterns)
    checker = StopChecker(tok, [], sp)
    fired = next((k for k in range(1, len(ids) + 1) if checker.add(ids[k - 1]) is not None), None)
    first = next((k for k in range(1, len(ids) + 1)
                  if any(re.search(p, tok.decode(ids[:k])) for p in patterns)), None)
    assert fired == first
    if first is not None:
        # The reported pattern is the first (in request order) that matches at that token.
        assert checker.matched == next(p for p in patterns if re.search(p, tok.decode(ids[:first])))


def test_stop_strings_win_over_patterns_on_the_same_token(tok):
    ids = tok.encode(TEXT, add_special_tokens=False)
    sp = SimpleNamespace(skip_special_tokens=True, spaces_between_special_tokens=True,
                         stop=["Paris"], stop_regex=[r"Par"])
    checker = StopChecker(tok, [], sp)
    matched = next(m for m in (checker.add(t) for t in ids) if m is not None)
    # "Par" appears no later than "Paris": a token completing both reports the string.
    k = next(k for k in range(1, len(ids) + 1) if "Par" in tok.decode(ids[:k]))
    assert matched == ("Paris" if "Paris" in tok.decode(ids[:k]) else "Par")


def test_sampling_params_caps_and_messages():
    assert SamplingParams.from_dict({"stop_regex": "a+"}).stop_regex == ["a+"]
    assert SamplingParams.from_dict({"stop_regex": ["a", "b"]}).stop_regex == ["a", "b"]
    with pytest.raises(ValueError, match=r"^at most 32 stop_regex patterns are allowed, got 33$"):
        SamplingParams.from_dict({"stop_regex": ["a"] * 33})
    with pytest.raises(ValueError, match=r"^stop_regex is 257 bytes, over the 256-byte limit$"):
        SamplingParams.from_dict({"stop_regex": "é" * 128 + "a"})
    with pytest.raises(ValueError, match=r"^invalid stop_regex '\(ab': missing \)"):
        SamplingParams.from_dict({"stop_regex": "(ab"})
    with pytest.raises(ValueError, match="stop_regex must be a string or a list of strings"):
        SamplingParams.from_dict({"stop_regex": 5})


@pytest.fixture(scope="module")
def app():
    with AppServer() as srv:
        yield srv


def _generate(app, sp, **body):
    sp = {"temperature": 0, **sp}
    return httpx.post(app.url + "/generate", json={"text": "Q:", "sampling_params": sp, **body},
                      timeout=60)


def test_generate_stops_at_the_pattern_and_reports_it(app):
    out = _generate(app, {"max_new_tokens": 64, "stop_regex": [r"Fr\w+ce"]}).json()
    # The text ends at the token completing the match, which stays (the pattern text is not in it).
    assert out["text"] == "The capital of France"
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"Fr\w+ce"}
    # A pattern that is its own literal text is cut from the output, as SGLang's literal trim does.
    out = _generate(app, {"max_new_tokens": 64, "stop_regex": "capital"}).json()
    assert out["text"] == "The " and out["meta_info"]["finish_reason"]["matched"] == "capital"
    kept = _generate(app, {"max_new_tokens": 64, "stop_regex": "capital", "no_stop_trim": True})
    assert kept.json()["text"] == "The capital"


def test_generate_streaming_ends_at_the_pattern(app):
    body = {"text": "Q:", "stream": True,
            "sampling_params": {"max_new_tokens": 64, "temperature": 0, "stop_regex": r"\bis\b"}}
    last = None
    with httpx.stream("POST", app.url + "/generate", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                last = line
    import json

    final = json.loads(last[6:])
    assert final["text"] == "The capital of France is"
    assert final["meta_info"]["finish_reason"] == {"type": "stop", "matched": r"\bis\b"}


def test_bad_pattern_is_a_400_naming_the_field(app):
    r = _generate(app, {"stop_regex": "(unclosed"})
    assert r.status_code == 400 and "invalid stop_regex '(unclosed'" in r.json()["error"]["message"]
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="x")
    with pytest.raises(openai.BadRequestError, match="stop_regex"):
        client.completions.create(model="m", prompt="Q:", extra_body={"stop_regex": "[z"})


def test_v1_completions_and_chat_report_matched_stop(app):
    client = openai.OpenAI(base_url=app.url + "/v1", api_key="x")
    c = client.completions.create(model="m", prompt="Q:", max_tokens=64, temperature=0,
                                  extra_body={"stop_regex": [r"\d", r"Fr\w+"]})
    choice = c.choices[0]
    assert choice.text == "The capital of Fra" and choice.finish_reason == "stop"  # \w+ needs one
    assert choice.model_extra["matched_stop"] == r"Fr\w+"
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Hi"}],
                                          max_tokens=64, temperature=0,
                                          extra_body={"stop_regex": r"of \w"})
    assert chat.choices[0].message.content == "The capital of F"
    assert chat.choices[0].model_extra["matched_stop"] == r"of \w"
