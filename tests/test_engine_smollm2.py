"""The embedded SmolLM2-135M-Instruct GGUF through our loader and engine, against transformers
loading the same GGUF in float32; and HF-format copies of it (single file and sharded) loading to
exactly the weights our GGUF path produces."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny_models import EngineDriver, make_runner

pytestmark = pytest.mark.slow

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smollm2():
    from nlcli.engine.configs.model_source import resolve_model_source

    source = resolve_model_source(None)
    runner = make_runner(None, max_total_tokens=1024, max_running_requests=8)
    tok = source.load_tokenizer()
    text = tok.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    prompt = tok(text, add_special_tokens=False).input_ids
    return source, runner, tok, prompt


@pytest.fixture(scope="module")
def hf_reference(smollm2_hf):
    """transformers' own GGUF load of the same file (float32; conftest, once per session)."""
    return smollm2_hf


def test_answers_paris_like_transformers(smollm2, hf_reference):
    source, runner, tok, prompt = smollm2
    got = EngineDriver(runner).generate_greedy([prompt], 16)[0]
    assert "Paris" in tok.decode(got, skip_special_tokens=True)
    with torch.no_grad():
        expected = hf_reference.generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False)[0, len(prompt) :]
    eos = set(source.eos_token_ids())
    cut = next((i + 1 for i, t in enumerate(got) if t in eos), len(got))
    assert got[:cut] == expected.tolist()[:cut]
    assert runner.token_to_kv_pool_allocator.available_size() == runner.max_total_num_tokens


def test_sharded_and_single_file_copies_load_to_the_gguf_weights(smollm2, hf_reference, tmp_path):
    import transformers

    source, runner, _, _ = smollm2
    # A GGUF-loaded model refuses save_pretrained: copy its weights into a plain model first.
    plain = transformers.LlamaForCausalLM(hf_reference.config)
    plain.load_state_dict(hf_reference.state_dict())
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    plain.save_pretrained(single)
    plain.save_pretrained(sharded, max_shard_size="100MB")
    del plain
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (single / "model.safetensors.index.json").is_file()
    for d in (single, sharded):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            (d / f).write_bytes(open(os.path.join(source.local_dir, f), "rb").read())

    expected = {k: v.clone() for k, v in runner.model.state_dict().items()}
    for d in (single, sharded):
        other = make_runner(str(d), max_total_tokens=16, max_running_requests=1)
        got = other.model.state_dict()
        assert got.keys() == expected.keys()
        for k in expected:
            assert torch.equal(got[k], expected[k]), k
        del other
