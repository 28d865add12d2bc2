"""Weight updates to a checkpoint of another size. A model whose hidden size and head count both
differ (the brief notebook's Llama-3.2-1B -> 3B pair: hidden 2048 -> 3072, 32 -> 24 heads, more
layers) is refused with torch's own words for the first mismatching tensor, exactly the string the
notebook asserts; the notebook's update-weights cells pass unchanged against a live server. A
checkpoint with extra layers is refused, at start and on update, saying which layers are extra.

The pair keeps the notebook's hidden sizes (so the asserted text holds literally) and is tiny
elsewhere: a 260-token byte vocabulary, head_dim 8, intermediate size 16, 1 and 2 layers.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from nlcli.engine.model_loader.weight_update import update_weights_from_disk
from tests.test_scheduler_fakes import VOCAB, LiveServer, write_byte_tokenizer
from tests.tiny_models import copy_model_with, make_runner, perturbed_copy

NOTEBOOK_MESSAGE = (
    "Failed to update weights: The size of tensor a (2048) must match "
    "the size of tensor b (3072) at non-singleton dimension 1.\n"
    "Rolling back to original weights."
)


def _save_llama(path: str, hidden: int, heads: int, layers: int, seed: int) -> str:
    import transformers

    write_byte_tokenizer(path)  # tokenizer files; config.json is replaced below
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=8,
        head_dim=8, intermediate_size=16, num_hidden_layers=layers, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=1, eos_token_id=256)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("sizes")
    small = _save_llama(str(root / "llama-1b-like"), hidden=2048, heads=32, layers=1, seed=0)
    return {
        "small": small,
        "same": perturbed_copy(small, str(root / "llama-1b-like-tuned")),
        "big": _save_llama(str(root / "llama-3b-like"), hidden=3072, heads=24, layers=2, seed=1),
    }


@pytest.fixture(scope="module")
def two_layers(tmp_path_factory):
    root = tmp_path_factory.mktemp("layers")
    served = _save_llama(str(root / "two"), hidden=64, heads=8, layers=2, seed=0)
    deeper = _save_llama(str(root / "three"), hidden=64, heads=8, layers=3, seed=1)
    return served, deeper


def test_other_size_is_refused_in_torch_words(pair):
    runner = make_runner(pair["small"], max_total_tokens=256)
    assert update_weights_from_disk(runner, pair["big"]) == (False, NOTEBOOK_MESSAGE)
    assert update_weights_from_disk(runner, pair["same"]).success


def test_extra_layers_refused_on_update_saying_what_is_extra(two_layers):
    served, deeper = two_layers
    runner = make_runner(served, max_total_tokens=256)
    ok, message = update_weights_from_disk(runner, deeper)
    assert not ok
    assert message == ("Failed to update weights: the checkpoint has 3 layers, the served model 2: "
                       "extra tensors model.layers.2.*.\nRolling back to original weights.")


def test_extra_layers_refused_at_start_saying_what_is_extra(two_layers, tmp_path):
    served, deeper = two_layers
    # The config says 2 layers, the tensors hold 3.
    path = copy_model_with(deeper, str(tmp_path / "inconsistent"), lambda n, t: t)
    with open(os.path.join(served, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(Exception) as err:
        make_runner(path, max_total_tokens=256)
    assert "the checkpoint has 3 layers, the served model 2: extra tensors model.layers.2.*" in str(
        err.value)


@pytest.mark.slow
def test_notebook_update_weights_cells(pair, tmp_path):
    import requests

    srv = LiveServer(str(tmp_path), ["--dtype", "float32", "--max-total-tokens", "512"],
                     model_path=pair["small"])
    try:
        # In [9]: successful update with same architecture and size (as the notebook runs it)
        url = f"{srv.url}/update_weights"
        data = {"model_path": pair["same"]}

        response = requests.post(url, json=data)
        assert response.json()["success"] is True
        assert response.json()["message"] == "Succeeded to update model weights."
        assert response.json().keys() == {"success", "message"}

        # In [10]: failed update with different parameter size
        url = f"{srv.url}/update_weights"
        data = {"model_path": pair["big"]}

        response = requests.post(url, json=data)
        response_json = response.json()
        assert response_json["success"] is False
        assert response_json["message"] == (
            "Failed to update weights: The size of tensor a (2048) must match "
            "the size of tensor b (3072) at non-singleton dimension 1.\n"
            "Rolling back to original weights."
        )
        assert response.status_code == 400
    finally:
        srv.stop()
    assert "leak" not in srv.log().lower()
