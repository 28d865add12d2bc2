"""nl: a small LLM serving runtime, wire-compatible with SGLang's native API and the OpenAI API."""

__version__ = "0.1.0"
