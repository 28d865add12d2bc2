"""Runs the model: weights, KV pools, attention backend, and the device/dtype/thread choice."""
