"""Loads weights (safetensors, GGUF) into nl's models, and swaps them in place for weight updates."""
