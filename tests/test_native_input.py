"""Request parsing (api/native_input.py): the batch forms of /generate, rid lists, n expansion
(rids `<rid>-<j>`, seed + j, prompt-major as SGLang orders them), and bad types rejected with a
ValueError naming the field; `gen_items` (the OpenAI layer's typed entry) equals parse_generate
on the same request."""

from __future__ import annotations

import pytest

from nlcli.engine.api.native_input import GenItem, LogprobArgs, gen_items, parse_generate


def parse(**body):
    return parse_generate(body)


@pytest.mark.parametrize("body,batch,prompts", [
    ({"text": "hi"}, False, [("hi", None)]),
    ({"text": ["a", "b"]}, True, [("a", None), ("b", None)]),
    ({"text": ["solo"]}, True, [("solo", None)]),
    ({"input_ids": [1, 2]}, False, [(None, [1, 2])]),
    ({"input_ids": [[1], [2, 3]]}, True, [(None, [1]), (None, [2, 3])]),
    ({"text": "x", "input_ids": [5]}, False, [(None, [5])]),  # input_ids win
])
def test_batch_forms(body, batch, prompts):
    items, is_batch, stream = parse_generate(body)
    assert is_batch is batch and stream is False
    assert [(it.text, it.input_ids) for it in items] == prompts
    assert len({it.rid for it in items}) == len(items)


def test_rids_single_and_batch():
    (one,), _, _ = parse(text="a", rid="mine")
    assert one.rid == "mine"
    items, _, _ = parse(text=["a", "b"], rid=["r1", "r2"])
    assert [it.rid for it in items] == ["r1", "r2"]
    for bad, field in [({"text": ["a", "b"], "rid": "r"}, "rid"),
                       ({"text": ["a", "b"], "rid": ["r1"]}, "rid"),
                       ({"text": ["a", "b"], "rid": ["r", "r"]}, "rid"),
                       ({"text": "a", "rid": 7}, "rid")]:
        with pytest.raises(ValueError, match=field):
            parse_generate(bad)


def test_n_expands_prompt_major_with_numbered_rids_and_seeds():
    items, is_batch, _ = parse(text=["p", "q"], rid=["a", "b"],
                               sampling_params={"n": 2, "seed": 10, "temperature": 0.5})
    assert is_batch  # n > 1 answers a list even for one prompt
    assert [(it.text, it.rid) for it in items] == [("p", "a-0"), ("p", "a-1"), ("q", "b-0"), ("q", "b-1")]
    assert [it.sampling["seed"] for it in items] == [10, 11, 10, 11]
    assert all("n" not in it.sampling and it.sampling["temperature"] == 0.5 for it in items)
    single, is_batch, _ = parse(text="p", sampling_params={"n": 3})
    assert is_batch and len(single) == 3
    assert [it.rid for it in single] == [f"{single[0].rid[:-2]}-{j}" for j in range(3)]


def test_per_prompt_sampling_and_logprob_lists():
    items, _, _ = parse(text=["a", "b"], sampling_params=[{"max_new_tokens": 1}, {"max_new_tokens": 2}],
                        return_logprob=[True, False], top_logprobs_num=[2, 0])
    assert [it.sampling["max_new_tokens"] for it in items] == [1, 2]
    assert [(it.return_logprob, it.top_logprobs_num) for it in items] == [(True, 2), (False, 0)]


@pytest.mark.parametrize("body,field", [
    ({"text": 5}, "text"),
    ({"text": ""}, "text"),
    ({"text": []}, "text"),
    ({"input_ids": [1, "a"]}, "input_ids"),
    ({"input_ids": []}, "input_ids"),
    ({"input_ids": [[1], []]}, "input_ids"),
    ({"text": "a", "sampling_params": "greedy"}, "sampling_params"),
    ({"text": ["a", "b"], "sampling_params": [{}]}, "sampling_params"),
    ({"text": "a", "sampling_params": {"n": 0}}, "n"),
    ({"text": "a", "sampling_params": {"n": True}}, "n"),
    ({"text": ["a", "b"], "sampling_params": [{"n": 1}, {"n": 2}]}, "n"),
    ({"text": "a", "stream": "yes"}, "stream"),
    ({"text": "a", "return_logprob": 1}, "return_logprob"),
    ({"text": "a", "top_logprobs_num": "3"}, "top_logprobs_num"),
    ({"text": "a", "logprob_start_len": 1.5}, "logprob_start_len"),
    ({"text": ["a", "b"], "return_logprob": [True]}, "return_logprob"),
    ({"text": "a", "sampling_params": {"n": 2}, "top_logprobs_num": [1, 1]}, "top_logprobs_num"),
    ({"text": ["a", "b"], "input_ids": [[1]]}, "same number"),
    ({"sampling_params": {}}, "text, input_ids"),
    ({"text": "a", "input_embeds": [[0.1]]}, "input_embeds"),
    ("text", "JSON object"),
])
def test_bad_input_names_the_field(body, field):
    with pytest.raises(ValueError, match=field):
        parse_generate(body)


@pytest.mark.parametrize("prompts", [["a", "b"], [[1, 2], [3]]])
def test_gen_items_equal_parse_generate(prompts):
    sp = {"n": 2, "seed": 3, "max_new_tokens": 4}
    lp = LogprobArgs(return_logprob=True, logprob_start_len=0, top_logprobs_num=2,
                     return_text_in_logprobs=True)
    key = "text" if isinstance(prompts[0], str) else "input_ids"
    ref, _, _ = parse_generate({key: prompts, "sampling_params": sp, "rid": ["x", "y"],
                                "return_logprob": True, "logprob_start_len": 0,
                                "top_logprobs_num": 2, "return_text_in_logprobs": True})
    assert gen_items(prompts, sp, ["x", "y"], lp) == ref
    assert all(isinstance(it, GenItem) for it in ref)
    with pytest.raises(ValueError, match="text must not be empty"):
        gen_items([""], {}, ["z"])
