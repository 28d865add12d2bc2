"""A live `nl serve --is-embedding` on a tiny random Qwen2ForCausalLM checkpoint (served as a
gte-Qwen2-style last-token embedder): /encode against transformers' last hidden state, through a
cached prefix and through chunked prefill, and the context-length 400."""

from __future__ import annotations

import httpx
import pytest
import torch

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is Paris.",
    "Embeddings map text to vectors.",
    "x",
    # Longer than the 16-token prefill chunks the server is started with.
    "A decoder embedder pools the state of the last token, which has seen all the others. " * 3,
]
CONTEXT = 128


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("qwen2")


@pytest.fixture(scope="module")
def server(tmp_path_factory, model_dir):
    srv = LiveServer(str(tmp_path_factory.mktemp("emb-dec")),
                     ["--is-embedding", "--dtype", "float32", "--max-total-tokens", "2048",
                      "--context-length", str(CONTEXT), "--chunked-prefill-size", "16"],
                     model_path=model_dir)
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


@pytest.fixture(scope="module")
def reference(model_dir):
    """transformers' Qwen2Model on the same checkpoint: last token's state, L2-normalised."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf = transformers.AutoModel.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {}
    with torch.no_grad():
        for text in TEXTS:
            ids = tok(text)["input_ids"]
            h = hf(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
            out[text] = (ids, torch.nn.functional.normalize(h, dim=-1))
    return out


def _encode(server, body):
    r = httpx.post(server.url + "/encode", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def test_batched_encode_matches_transformers(server, reference):
    outs = _encode(server, {"text": TEXTS})
    for text, o in zip(TEXTS, outs):
        ids, want = reference[text]
        assert o["meta_info"]["prompt_tokens"] == len(ids)
        torch.testing.assert_close(torch.tensor(o["embedding"]), want, atol=1e-4, rtol=1e-4)
    assert len(reference[TEXTS[-1]][0]) > 16  # the last one really was chunked


def test_cached_prefix_and_singles_match(server, reference):
    for _ in range(2):  # the second round extends prefixes the radix cache kept from the first
        for text in TEXTS:
            out = _encode(server, {"text": text})
            torch.testing.assert_close(torch.tensor(out["embedding"]), reference[text][1],
                                       atol=1e-4, rtol=1e-4)
    ids, want = reference[TEXTS[0]]
    out = _encode(server, {"input_ids": ids})
    torch.testing.assert_close(torch.tensor(out["embedding"]), want, atol=1e-4, rtol=1e-4)


def test_over_long_input_is_refused(server):
    r = httpx.post(server.url + "/encode", json={"input_ids": [5] * (CONTEXT + 3)}, timeout=60)
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        f"The input ({CONTEXT + 3} tokens) is longer than the model's context length "
        f"({CONTEXT} tokens).")
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 200
