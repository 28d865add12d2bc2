"""Decoder-only embedding and sequence-classification (reward) heads against transformers.

Tiny random Llama / Mistral / Qwen2 / Qwen3 models built from transformers config classes; our
heads run through the real KV pools and torch attention backend (driven like a scheduler would,
including a cached prefix and a decode-shaped batch) and must match transformers within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nlcli.engine.layers.attention import TorchAttentionBackend
from nlcli.engine.mem_cache.pool import ReqToTokenPool, TokenToKVPool, TokenToKVPoolAllocator
from nlcli.engine.models import decoder_embedding, sequence_classification
from tests.tiny_models import ARCHITECTURES, EngineDriver, randomize_weights, tiny_config

VOCAB = 96
LENGTHS = (9, 1, 17)
CLASSIFIERS = {
    "llama": sequence_classification.LlamaForSequenceClassification,
    "mistral": sequence_classification.MistralForSequenceClassification,
    "qwen2": sequence_classification.Qwen2ForSequenceClassification,
    "qwen3": sequence_classification.Qwen3ForSequenceClassification,
}
EMBEDDERS = {
    "llama": decoder_embedding.LlamaEmbeddingModel,
    "mistral": decoder_embedding.MistralEmbeddingModel,
    "qwen2": decoder_embedding.Qwen2EmbeddingModel,
    "qwen3": decoder_embedding.Qwen3EmbeddingModel,
}


class _Runner:
    """The slice of ModelRunner that EngineDriver uses, around a model built in the test."""

    def __init__(self, model, cfg, size: int = 256):
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.model, self.device = model, torch.device("cpu")
        self.req_to_token_pool = ReqToTokenPool(8, 128)
        self.token_to_kv_pool = TokenToKVPool(
            size, torch.float32, cfg.num_key_value_heads, head_dim, cfg.num_hidden_layers
        )
        self.token_to_kv_pool_allocator = TokenToKVPoolAllocator(size)
        self.attn_backend = TorchAttentionBackend(self.req_to_token_pool, self.token_to_kv_pool)

    def forward(self, batch):
        batch.plan_attention(self.attn_backend)
        return self.model(batch.input_ids, batch.positions, batch)


def _randomize(model) -> None:
    # Default init (std 0.02) gives near-zero scores; larger weights make 1e-4 a real test.
    torch.manual_seed(0)
    randomize_weights(model)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    # Ids from 3 up: never the pad id (2), which transformers' classifier would skip over.
    return [torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in LENGTHS]


def _load(ours, state: dict) -> None:
    loaded = ours.load_weights(state.items())
    # The loader's contract: every parameter accounted for.
    assert loaded == set(dict(ours.named_parameters()))
    ours.eval()


def _run_batched_and_with_prefix(ours, cfg, prompts):
    """Scores/embeddings from one extend batch, and from prefix + (decode or extend) steps."""
    driver = EngineDriver(_Runner(ours, cfg))
    rids = [driver.new_request() for _ in prompts]
    whole = driver.forward(rids, prompts).embeddings
    driver.free_all()
    # Same prompts again in two steps: all but the last token, then the last token alone
    # (a decode-shaped batch on top of the cached prefix); the 1-token prompt goes in whole.
    rids = [driver.new_request() for _ in prompts]
    split = [p for p in prompts if len(p) > 1]
    split_rids = [r for r, p in zip(rids, prompts) if len(p) > 1]
    driver.forward(split_rids, [p[:-1] for p in split])
    step = driver.forward(rids, [p[-1:] if len(p) > 1 else p for p in prompts]).embeddings
    driver.free_all()
    assert driver.runner.token_to_kv_pool_allocator.available_size() == 256
    return whole, step


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_reward_head_matches_transformers(arch):
    import transformers

    cfg = tiny_config(arch, VOCAB)
    cfg.num_labels = 3
    hf = transformers.AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float32)
    _randomize(hf)
    hf.eval()
    ours = CLASSIFIERS[arch](cfg)
    _load(ours, hf.state_dict())
    prompts = _prompts()
    with torch.no_grad():
        want = torch.cat([hf(input_ids=torch.tensor([p])).logits for p in prompts])
    whole, step = _run_batched_and_with_prefix(ours, cfg, prompts)
    assert whole.shape == (len(prompts), 3) and whole.dtype == torch.float32
    torch.testing.assert_close(whole, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_decoder_embedding_matches_transformers(arch):
    import transformers

    cfg = tiny_config(arch, VOCAB)
    hf = transformers.AutoModel.from_config(cfg, dtype=torch.float32)  # bare *Model: names lack "model."
    _randomize(hf)
    hf.eval()
    ours = EMBEDDERS[arch](cfg)
    assert (ours.pooler.pooling.value, ours.pooler.normalize) == ("last", True)
    _load(ours, hf.state_dict())
    prompts = _prompts()
    with torch.no_grad():
        last = torch.cat([hf(input_ids=torch.tensor([p])).last_hidden_state[:, -1] for p in prompts])
    want = F.normalize(last, dim=-1)
    whole, step = _run_batched_and_with_prefix(ours, cfg, prompts)
    torch.testing.assert_close(whole, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(step, want, atol=1e-4, rtol=1e-4)


def test_decoder_embedding_loads_a_causal_lm_checkpoint():
    """gte-Qwen2 ships as Qwen2ForCausalLM: `model.`-prefixed names plus an lm_head to ignore."""
    import transformers

    cfg = tiny_config("llama", VOCAB)  # untied: the checkpoint really has lm_head.weight
    hf = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    _randomize(hf)
    hf.eval()
    state = hf.state_dict()
    assert "lm_head.weight" in state
    ours = decoder_embedding.LlamaEmbeddingModel(cfg)
    _load(ours, state)
    prompts = _prompts()
    with torch.no_grad():
        want = torch.cat([
            F.normalize(hf.model(input_ids=torch.tensor([p])).last_hidden_state[:, -1], dim=-1)
            for p in prompts
        ])
    whole, _ = _run_batched_and_with_prefix(ours, cfg, prompts)
    torch.testing.assert_close(whole, want, atol=1e-4, rtol=1e-4)


def test_mean_pooling_decoder_refuses_a_cached_prefix():
    from nlcli.engine.configs.embedding_config import EmbeddingConfig

    cfg = tiny_config("qwen2", VOCAB)
    ours = decoder_embedding.Qwen2EmbeddingModel(cfg, EmbeddingConfig("mean", True))
    _randomize(ours)
    driver = EngineDriver(_Runner(ours, cfg))
    rid = driver.new_request()
    driver.forward([rid], [[5, 6, 7]])
    with pytest.raises(ValueError, match="cached prefix"):
        driver.forward([rid], [[8]])
