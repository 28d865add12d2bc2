"""/v1/embeddings `dimensions` on the embedded all-MiniLM-L6-v2 served as a Matryoshka model
(`--json-model-override-args '{"is_matryoshka": true}'`, which also shows the override reaching
the API process): vectors equal sentence-transformers' `truncate_dim` output, normalised again;
SGLang's four 400s, in its order, from the config's Matryoshka fields."""

from __future__ import annotations

import base64
import json
from types import SimpleNamespace

import httpx
import numpy as np
import pytest
import torch

from nlcli.engine.configs.embedding_config import check_matryoshka_dimensions, truncate_embedding
from tests.test_scheduler_fakes import LiveServer
from tests.test_server_embedding import SENTENCES, _minilm_dir

TEXTS = SENTENCES[:6]


@pytest.mark.parametrize("cfg,dims,message", [
    (SimpleNamespace(hidden_size=384), 64,
     "Model 'M' does not support matryoshka representation, changing output dimensions will "
     "lead to poor results."),
    (SimpleNamespace(hidden_size=384, is_matryoshka=True), 0,
     "Requested dimensions must be greater than 0"),
    (SimpleNamespace(hidden_size=384, matryoshka_dimensions=[64, 128]), -1,
     "Requested dimensions must be greater than 0"),
    (SimpleNamespace(hidden_size=384, matryoshka_dimensions=[64, 128]), 100,
     "Model 'M' only supports [64, 128] matryoshka dimensions, using other output dimensions "
     "will lead to poor results."),
    (SimpleNamespace(hidden_size=384, is_matryoshka=True), 385,
     "Provided dimensions are greater than max embedding dimension: 384"),
])
def test_sglang_checks_in_order(cfg, dims, message):
    with pytest.raises(ValueError) as e:
        check_matryoshka_dimensions(cfg, "M", dims)
    assert str(e.value) == message


def test_allowed_values_pass_and_truncation_renormalises():
    check_matryoshka_dimensions(SimpleNamespace(hidden_size=8, matryoshka_dimensions=[4, 8]), "M", 4)
    check_matryoshka_dimensions(SimpleNamespace(hidden_size=8, is_matryoshka=True), "M", 8)
    assert truncate_embedding([3.0, 4.0, 12.0], 2, True) == [0.6, 0.8]
    assert truncate_embedding([3.0, 4.0, 12.0], 2, False) == [3.0, 4.0]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = LiveServer(str(tmp_path_factory.mktemp("emb_dims")),
                     ["--is-embedding", "--dtype", "float32", "--max-total-tokens", "4096",
                      "--json-model-override-args", json.dumps({"is_matryoshka": True})],
                     model_path=_minilm_dir())
    yield srv
    srv.stop()


def _embed(server, **body):
    return httpx.post(server.url + "/v1/embeddings", json={"model": "m", **body}, timeout=120)


@pytest.mark.parametrize("dims", [32, 128, 384])
def test_dimensions_equal_sentence_transformers_truncate_dim(server, dims):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(_minilm_dir(), device="cpu", truncate_dim=dims)
    want = st.encode(TEXTS, convert_to_tensor=True, normalize_embeddings=True).float()
    r = _embed(server, input=TEXTS, dimensions=dims)
    assert r.status_code == 200, r.text
    got = torch.tensor([d["embedding"] for d in r.json()["data"]])
    assert got.shape == (len(TEXTS), dims)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)
    assert torch.allclose(got.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6)


def test_dimensions_with_base64_and_the_full_vector(server):
    b64 = _embed(server, input="hello there", dimensions=16, encoding_format="base64").json()
    floats = _embed(server, input="hello there", dimensions=16).json()
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, floats["data"][0]["embedding"], atol=1e-7)
    full = _embed(server, input="hello there").json()["data"][0]["embedding"]
    assert len(full) == 384  # no `dimensions`: the whole vector


def test_out_of_range_dimensions_are_400s(server):
    for dims, message in [(0, "Requested dimensions must be greater than 0"),
                          (385, "Provided dimensions are greater than max embedding dimension: 384")]:
        r = _embed(server, input="x", dimensions=dims)
        assert r.status_code == 400 and r.json()["message"] == message
