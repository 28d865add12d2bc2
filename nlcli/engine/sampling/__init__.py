"""Sampling parameters, penalties, the batched sampler, logprobs and grammar constraints."""
