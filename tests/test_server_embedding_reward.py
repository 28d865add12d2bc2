"""A live `nl serve` on a tiny random LlamaForSequenceClassification (a reward model), started
without --is-embedding (a reward head can only be served as one, so nl switches it on):
/classify scores chats the client templated, one score per chat and in order, equal to
transformers' `logits` on the same text."""

from __future__ import annotations

import os
import shutil

import httpx
import pytest
import torch

from tests.test_scheduler_fakes import LiveServer
from tests.tiny_models import TOKENIZER_FILES, smollm2_tokenizer_dir, tiny_config

pytestmark = pytest.mark.slow

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "I think it is Berlin, but I am not sure."}],
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved random tiny reward model (one label) with SmolLM2's tokenizer and chat template."""
    import transformers

    out = str(tmp_path_factory.mktemp("tiny-reward"))
    tok_dir = smollm2_tokenizer_dir()
    cfg = tiny_config("llama", len(transformers.AutoTokenizer.from_pretrained(tok_dir)))
    cfg.num_labels = 1
    torch.manual_seed(0)
    model = transformers.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # default init gives near-zero scores; these make 1e-4 a real test
        for name, p in model.named_parameters():
            p.normal_(0, 0.15) if p.dim() > 1 else p.uniform_(0.8, 1.2)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tok_dir, name)):
            shutil.copy(os.path.join(tok_dir, name), out)
    return out


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = LiveServer(str(tmp_path_factory.mktemp("reward")),
                     ["--dtype", "float32", "--max-total-tokens", "2048",
                      "--context-length", "256"], model_path=model_dir)
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


def test_reward_model_is_served_as_embedding_without_the_flag(server):
    info = httpx.get(server.url + "/get_model_info", timeout=30).json()
    assert info["is_generation"] is False
    assert httpx.get(server.url + "/get_server_args", timeout=30).json()["is_embedding"] is True


def test_reward_scores_of_templated_chats(server, model_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    texts = [tok.apply_chat_template(c, tokenize=False) for c in CHATS]
    r = httpx.post(server.url + "/classify", json={"text": texts}, timeout=120)
    assert r.status_code == 200, r.text
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == 2
    hf = transformers.AutoModelForSequenceClassification.from_pretrained(
        model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [hf(input_ids=torch.tensor([tok(t)["input_ids"]])).logits[0] for t in texts]
    assert abs(float(want[0][0] - want[1][0])) > 1e-3  # distinct scores, so order is tested
    for o, w, text in zip(outs, want, texts):
        assert len(o["embedding"]) == 1  # one score per chat
        torch.testing.assert_close(torch.tensor(o["embedding"]), w, atol=1e-4, rtol=1e-4)
        assert o["meta_info"]["prompt_tokens"] == len(tok(text)["input_ids"])
    # The older route name answers alike, and a single chat gives a single object.
    one = httpx.post(server.url + "/judge", json={"text": texts[1]}, timeout=120).json()
    torch.testing.assert_close(torch.tensor(one["embedding"]), want[1], atol=1e-4, rtol=1e-4)
