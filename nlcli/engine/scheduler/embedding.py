"""The scheduler's side of embedding and reward models: one extend per request, then done.

An embedding request is scheduled like a prefill. Its forward returns an `EmbeddingPoolerOutput`
(a pooled vector, or a reward head's scores) instead of logits; nothing is decoded, so each
request that finished its extend is released at once and its row goes back to the API process in
a `BatchEmbeddingOut`. Encoders (`uses_kv_cache` False) and decoders whose pooling needs every
token's state must see each input whole: no radix-cache prefix and no chunked prefill.
"""

from __future__ import annotations

import logging

from nlcli.engine.io_struct import BatchEmbeddingOut

logger = logging.getLogger("nlcli.scheduler")

# What a finished embedding request reports: no token was generated.
EMBEDDING_FINISH = {"type": "length", "length": 0}


def takes_whole_inputs(model) -> bool:
    """True when each input must be one whole extend (no cached prefix, no chunking)."""
    if model is None:
        return False
    if getattr(model, "uses_kv_cache", True) is False:
        return True
    pooler = getattr(model, "pooler", None)
    pooling = getattr(getattr(pooler, "pooling", None), "value", "last")
    # Only the last token's state survives a cached prefix or an earlier chunk.
    return pooling != "last"


def is_embedding_output(out) -> bool:
    return hasattr(out, "embeddings") and not hasattr(out, "next_token_logits")


def finish_embedding_batch(sched, batch_reqs: list, out, num_tokens: int, cached: int) -> bool:
    """After an embedding forward: keep chunked requests going, release and report the rest."""
    done = []
    for r in batch_reqs:
        if r.is_chunked:
            sched.mem.cache_chunk(r)
        else:
            done.append(r)
    if done:
        rows = [batch_reqs.index(r) for r in done]
        vectors = out.embeddings[rows].float().cpu().tolist()
        msg = BatchEmbeddingOut([], [], [], [])
        for r, vec in zip(done, vectors):
            r.finished_reason = dict(EMBEDDING_FINISH)
            sched.mem.release(r)
            sched.reqs.pop(r.rid, None)
            msg.rids.append(r.rid)
            msg.embeddings.append(vec)
            msg.prompt_tokens.append(len(r.origin_input_ids))
            msg.cached_tokens.append(r.cached_tokens or 0)
        sched.send(msg)
    sched._log_prefill(len(batch_reqs), num_tokens, cached)
    return True
