"""The OpenAI-compatible /v1 routes, built on the same request path as the native API."""
