"""SamplingParams.from_dict: normalization, and rejections with the spec's exact messages."""

import pickle

import pytest

from nlcli.engine.sampling import params as P
from nlcli.engine.sampling.params import SamplingParams


def test_defaults_match_spec():
    p = SamplingParams.from_dict({})
    assert (p.max_new_tokens, p.min_new_tokens, p.temperature, p.top_p, p.top_k, p.min_p) == (
        128, 0, 1.0, 1.0, -1, 0.0)
    assert (p.frequency_penalty, p.presence_penalty, p.repetition_penalty) == (0.0, 0.0, 1.0)
    assert p.stop == [] and p.stop_token_ids == [] and p.n == 1 and p.seed is None
    assert p.skip_special_tokens and p.spaces_between_special_tokens
    assert not (p.ignore_eos or p.no_stop_trim) and p.grammar is None
    assert SamplingParams.from_dict(None) == p


def test_normalization():
    p = SamplingParams.from_dict({"stop": "\n", "temperature": 1e-7, "sampling_seed": 7,
                                  "max_new_tokens": None, "json_schema": '{"type": "integer"}',
                                  "top_p": None})
    assert p.stop == ["\n"]
    assert p.is_greedy and p.temperature == 1.0 and p.top_k == 1
    assert p.seed == 7 and p.max_new_tokens is None and p.top_p == 1.0
    assert p.grammar == ("json_schema", '{"type": "integer"}')
    assert SamplingParams.from_dict({"max_new_tokens": 5.0}).max_new_tokens == 5
    assert not SamplingParams.from_dict({"temperature": 0.5}).is_greedy
    assert pickle.loads(pickle.dumps(p)) == p


@pytest.mark.parametrize("d,msg", [
    ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
    ({"min_new_tokens": -2}, "min_new_tokens must be in (0, max_new_tokens], got -2."),
    ({"min_new_tokens": 9, "max_new_tokens": 4},
     "min_new_tokens must be in (0, max_new_tokens(4)], got 9."),
    ({"temperature": -0.5}, "temperature must be non-negative, got -0.5."),
    ({"top_p": 0}, "top_p must be in (0, 1], got 0."),
    ({"top_p": 1.5}, "top_p must be in (0, 1], got 1.5."),
    ({"top_k": 0}, "top_k must be -1 (disable), or at least 1, got 0."),
    ({"top_k": -3}, "top_k must be -1 (disable), or at least 1, got -3."),
    ({"min_p": 1.1}, "min_p must be in [0, 1], got 1.1."),
    ({"frequency_penalty": 2.5}, "frequency_penalty must be in [-2, 2], got 2.5."),
    ({"presence_penalty": -3}, "presence_penalty must be in [-2, 2], got -3."),
    ({"repetition_penalty": 2.1}, "repetition_penalty must be in (0, 2], got 2.1."),
    ({"repetition_penalty": 0}, "repetition_penalty must be in (0, 2], got 0."),
    ({"regex": "a", "json_schema": "{}"}, "Only one of regex, json_schema, or ebnf can be set."),
    ({"regex": "a", "ebnf": "root ::= \"a\""}, "Only one of regex, json_schema, or ebnf can be set."),
    ({"bogus": 1}, "Unknown sampling parameter: 'bogus'"),
    ({"temperature": float("nan")}, "temperature must be a finite number, got nan."),
    ({"top_p": float("inf")}, "top_p must be a finite number, got inf."),
    ({"temperature": "hot"}, "temperature must be a number, got 'hot'."),
    ({"top_k": 2.5}, "top_k must be an integer, got 2.5."),
    ({"max_new_tokens": True}, "max_new_tokens must be an integer, got True."),
    ({"ignore_eos": "yes"}, "ignore_eos must be a boolean, got 'yes'."),
    ({"json_schema": {"type": "object"}}, "json_schema must be a JSON string, not an object."),
    ({"stop": 5}, "stop must be a string or a list of strings, got 5."),
    ({"stop": [""]}, "stop strings must be non-empty."),
    ({"stop_token_ids": [-1]}, "stop_token_ids must be non-negative, got -1."),
    ({"stop_token_ids": "2"}, "stop_token_ids must be a list of integers, got '2'."),
    ({"n": 0}, f"n must be in [1, {P.MAX_N}], got 0."),
    ({"n": P.MAX_N + 1}, f"n must be in [1, {P.MAX_N}], got {P.MAX_N + 1}."),
    ({"stop": ["x"] * (P.MAX_STOP_STRINGS + 1)},
     f"stop must have at most {P.MAX_STOP_STRINGS} strings, got {P.MAX_STOP_STRINGS + 1}."),
    ({"stop": ["x" * (P.MAX_STOP_STRING_LEN + 1)]},
     f"stop strings must be at most {P.MAX_STOP_STRING_LEN} characters, "
     f"got {P.MAX_STOP_STRING_LEN + 1}."),
    ({"stop_token_ids": [1] * (P.MAX_STOP_TOKEN_IDS + 1)},
     f"stop_token_ids must have at most {P.MAX_STOP_TOKEN_IDS} ids, "
     f"got {P.MAX_STOP_TOKEN_IDS + 1}."),
    ({"seed": -1}, "seed must be in [0, 2**63 - 1], got -1."),
    ({"seed": 1, "sampling_seed": 2}, "sampling_seed conflicts with seed; set only one."),
    ({"logit_bias": {"5": 101}}, "logit_bias values must be in [-100, 100], got 101.0."),
    ({"logit_bias": {"five": 1}}, "logit_bias keys must be token ids, got 'five'."),
])
def test_rejections_exact(d, msg):
    with pytest.raises(ValueError) as e:
        SamplingParams.from_dict(d)
    assert str(e.value) == msg


def test_boundaries_accepted():
    for d in ({"top_p": 1}, {"top_k": -1}, {"min_p": 0}, {"min_p": 1}, {"frequency_penalty": -2},
              {"presence_penalty": 2}, {"repetition_penalty": 2}, {"temperature": 0},
              {"min_new_tokens": 4, "max_new_tokens": 4}, {"max_new_tokens": 0}, {"n": P.MAX_N}):
        SamplingParams.from_dict(d)


def test_not_a_dict():
    with pytest.raises(ValueError, match="sampling_params must be an object"):
        SamplingParams.from_dict([1, 2])


def test_verify_token_ids():
    p = SamplingParams.from_dict({"stop_token_ids": [3, 99], "logit_bias": {"7": 1}})
    p.verify_token_ids(100)
    with pytest.raises(ValueError) as e:
        p.verify_token_ids(99)
    assert str(e.value) == "stop_token_ids contains 99, which is out of the vocabulary (size 99)."
    with pytest.raises(ValueError, match=r"^logit_bias contains token id 7"):
        SamplingParams.from_dict({"logit_bias": {"7": 1}}).verify_token_ids(5)

