"""Model building blocks: attention over the paged KV pool, norms, rotary embeddings, MLPs."""
