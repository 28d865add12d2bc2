"""Every registered model class satisfies EngineModel (models/base.py) with plain attributes, and
what the engine derives from them (whole inputs, the context cap) matches each model's nature."""

from __future__ import annotations

import pytest
import transformers

from nlcli.engine.layers.pooler import Pooler, PoolingType
from nlcli.engine.models import registry
from nlcli.engine.models.base import EngineModel
from nlcli.engine.scheduler.embedding import takes_whole_inputs
from tests.tiny_models import tiny_config

ENCODER_CONFIG = dict(vocab_size=120, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                      intermediate_size=64, max_position_embeddings=64, pad_token_id=1)


def _config(arch: str):
    encoder = arch.replace("ForSequenceClassification", "Model")
    if encoder in ("BertModel", "RobertaModel", "XLMRobertaModel"):  # cross-encoders too
        return getattr(transformers, encoder.replace("Model", "Config"))(num_labels=1,
                                                                         **ENCODER_CONFIG)
    family = next(f for f in ("Llama", "Mistral", "Qwen2", "Qwen3") if arch.startswith(f))
    cfg = tiny_config(family.lower(), 96)
    cfg.num_labels = 2
    return cfg


def _build(arch: str, is_embedding: bool):
    return registry.resolve_model_class([arch], is_embedding)(_config(arch))


ALL = [(a, False) for a in registry.supported_architectures(False)] + [
    (a, True) for a in registry.supported_architectures(True)]


@pytest.mark.parametrize("arch,is_embedding", ALL)
def test_every_model_defines_the_engine_attributes(arch, is_embedding):
    model = _build(arch, is_embedding)
    assert isinstance(model, EngineModel)
    for name in ("uses_kv_cache", "max_positions", "pooler"):
        assert name in dir(model), name
    assert isinstance(model.uses_kv_cache, bool)
    assert model.max_positions is None or isinstance(model.max_positions, int)
    assert model.pooler is None or isinstance(model.pooler, Pooler)
    encoder = arch.replace("ForSequenceClassification", "Model") in (
        "BertModel", "RobertaModel", "XLMRobertaModel")
    assert model.uses_kv_cache is not encoder
    assert (model.max_positions is not None) is encoder
    # Embedders and cross-encoders (CLS into the classifier) pool; generators and decoder score
    # heads read the last token without a pooler.
    pools = is_embedding and ("SequenceClassification" not in arch or encoder)
    assert (model.pooler is not None) is pools
    assert takes_whole_inputs(model) is (encoder or (
        pools and model.pooler.pooling is not PoolingType.LAST))


def test_encoder_position_cap_follows_the_position_table():
    # RoBERTa numbers positions from padding_idx + 1, so its table holds 2 fewer inputs than BERT's.
    bert, roberta = _build("BertModel", True), _build("RobertaModel", True)
    assert bert.max_positions == ENCODER_CONFIG["max_position_embeddings"]
    assert roberta.max_positions == ENCODER_CONFIG["max_position_embeddings"] - 2
