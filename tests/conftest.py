"""Shared pytest fixtures: tiny random models of each architecture (built once per session) and
a CPU-friendly torch setup. Fixtures are lazy, so tests that need no model pay nothing."""

from __future__ import annotations

import os

import pytest

# Several test processes may share two cores; oversubscribed OpenMP threads spin and crawl.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """tiny_model_dir(arch) -> path of a saved tiny random `arch` model (llama/mistral/qwen2/qwen3)."""
    from tests.tiny_models import build_tiny_model

    built: dict[str, str] = {}

    def get(arch: str) -> str:
        if arch not in built:
            built[arch] = build_tiny_model(arch, str(tmp_path_factory.mktemp(f"tiny-{arch}")))
        return built[arch]

    return get


@pytest.fixture(scope="session")
def smollm2_hf():
    """transformers' own load of the embedded SmolLM2 GGUF (float32, eval): the reference several
    modules compare against. Loaded once per session: dequantizing the file takes ~25 s here."""
    import torch
    import transformers

    from nlcli.engine.configs.model_source import resolve_model_source

    folder, name = os.path.split(resolve_model_source(None).weight_files[0])
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name,
                                                             dtype=torch.float32).eval()
