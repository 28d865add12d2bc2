"""The scheduler's side of embedding and reward models: one extend per request, then done.

An embedding request is scheduled like a prefill. Its forward returns an `EmbeddingPoolerOutput`
(a pooled vector, or a reward head's scores) instead of logits; nothing is decoded, so each
request that finished its extend is released at once and its row goes back to the API process in
a `BatchEmbeddingOut`. Encoders (`uses_kv_cache` False) and decoders whose pooling needs every
token's state must see each input whole: no radix-cache prefix and no chunked prefill.
"""

from __future__ import annotations

from nlcli.engine.layers.pooler import EmbeddingPoolerOutput, PoolingType
from nlcli.engine.models.base import EngineModel
from nlcli.engine.scheduler.cache import KVMemory
from nlcli.engine.scheduler.output import OutputProcessor
from nlcli.engine.scheduler.req import Req

# What a finished embedding request reports: no token was generated.
EMBEDDING_FINISH = {"type": "length", "length": 0}


def takes_whole_inputs(model: EngineModel) -> bool:
    """True when each input must be one whole extend (no cached prefix, no chunking)."""
    if not model.uses_kv_cache:
        return True
    # Only the last token's state survives a cached prefix or an earlier chunk.
    return model.pooler is not None and model.pooler.pooling is not PoolingType.LAST


def is_embedding_output(out) -> bool:
    return isinstance(out, EmbeddingPoolerOutput)


def finish_embedding_batch(batch_reqs: list[Req], out: EmbeddingPoolerOutput, mem: KVMemory,
                           outputs: OutputProcessor) -> None:
    """After an embedding forward: keep chunked requests going, release and report the rest."""
    done = [i for i, r in enumerate(batch_reqs) if not r.is_chunked]
    for r in batch_reqs:
        if r.is_chunked:
            mem.cache_prefill(r)
    if not done:
        return
    vectors = out.embeddings[done].float().cpu().tolist()
    reqs = [batch_reqs[i] for i in done]
    for r in reqs:
        r.finished_reason = dict(EMBEDDING_FINISH)
    outputs.finish_embeddings(reqs, vectors)
