"""Test helpers: tiny random models of each supported architecture, saved in HF format with
SmolLM2's real tokenizer, and `EngineDriver`, which drives a ModelRunner the way a scheduler does
(rows, slots, req_to_token, ForwardBatch.create) so engine tests need no scheduler.

Other test modules import this: `build_tiny_model(arch, dir)`, `smollm2_tokenizer_dir()`,
`randomize_weights(model)`, `copy_model_with(src, dst, change)`, `perturbed_copy(src, dst)`,
`make_runner(path, **server_args)`, `EngineDriver(runner)`.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional, Sequence

import torch

from nlcli.engine.args import ServerArgs
from nlcli.engine.forward_batch import ForwardBatch

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")

_TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    rms_norm_eps=1e-6,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def smollm2_tokenizer_dir() -> str:
    """HF-format dir with SmolLM2's tokenizer (converted once from the embedded GGUF, then cached)."""
    from nlcli.engine.configs.model_source import resolve_model_source

    return resolve_model_source(None).local_dir


def tiny_config(arch: str, vocab_size: int):
    import transformers

    kw = dict(_TINY, vocab_size=vocab_size)
    if arch == "llama":
        # Llama 3.x-style rope scaling, untied head: exercises both code paths.
        kw["rope_parameters"] = dict(
            rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
            high_freq_factor=4.0, original_max_position_embeddings=64,
        )
        return transformers.LlamaConfig(head_dim=16, tie_word_embeddings=False, **kw)
    if arch == "mistral":
        return transformers.MistralConfig(sliding_window=None, tie_word_embeddings=False, **kw)
    if arch == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=True, **kw)
    if arch == "qwen3":
        return transformers.Qwen3Config(head_dim=32, tie_word_embeddings=True, **kw)
    raise ValueError(arch)


def randomize_weights(model: torch.nn.Module) -> None:
    """Redraw a model's weights larger than transformers' default init (std 0.02).

    The default gives near-uniform logits and near-zero scores; larger weights make greedy choices
    decisive and scores sizeable, so comparisons test the engine rather than float noise.
    Seed the global generator first for reproducible weights.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.15)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)


def build_tiny_model(arch: str, out_dir: str, seed: int = 0, max_shard_size: Optional[str] = None,
                     **config_changes) -> str:
    """Save a random tiny `arch` model (float32 safetensors) + SmolLM2 tokenizer into out_dir;
    `config_changes` override the tiny config (e.g. num_key_value_heads)."""
    import transformers

    tok_dir = smollm2_tokenizer_dir()
    tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
    config = tiny_config(arch, len(tok))
    for key, value in config_changes.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_weights(model)
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out_dir, **kw)
    for name in TOKENIZER_FILES:
        src = os.path.join(tok_dir, name)
        if os.path.isfile(src):
            shutil.copy(src, out_dir)
    return out_dir


def copy_model_with(src_dir: str, out_dir: str, change) -> str:
    """An HF dir like src_dir whose tensors are `change(name, tensor)` (None drops the tensor)."""
    from safetensors.torch import load_file, save_file

    os.makedirs(out_dir, exist_ok=True)
    tensors = load_file(os.path.join(src_dir, "model.safetensors"))
    changed = {n: change(n, t) for n, t in tensors.items()}
    save_file({n: t.contiguous() for n, t in changed.items() if t is not None},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    for name in ("config.json", "generation_config.json") + TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy(os.path.join(src_dir, name), out_dir)
    return out_dir


def perturbed_copy(src_dir: str, out_dir: str) -> str:
    """Same architecture and shapes, every tensor moved by 0.1 * N(0, 1) (seeded): new weights
    for a hot update that visibly change the output."""
    gen = torch.Generator().manual_seed(1)
    return copy_model_with(src_dir, out_dir,
                           lambda n, t: t + 0.1 * torch.randn(t.shape, generator=gen))


def make_runner(model_path: str, **overrides):
    from nlcli.engine.model_executor.model_runner import ModelRunner

    kw = dict(model_path=model_path, dtype="float32", device="cpu", max_total_tokens=4096, max_running_requests=32)
    kw.update(overrides)
    return ModelRunner(ServerArgs(**kw))


class EngineDriver:
    """Scheduler-like bookkeeping over a ModelRunner: each request owns a row and its slots."""

    def __init__(self, runner):
        self.runner = runner
        self.rows: dict[int, int] = {}  # request id -> req_to_token row
        self.lens: dict[int, int] = {}  # request id -> tokens in the KV cache
        self._next = 0

    def new_request(self) -> int:
        rid, self._next = self._next, self._next + 1
        row = self.runner.req_to_token_pool.alloc(1)
        assert row is not None, "out of request rows"
        self.rows[rid], self.lens[rid] = row[0], 0
        return rid

    def forward(self, rids: Sequence[int], new_ids: Sequence[Sequence[int]], return_all_logits: bool = False):
        """Append new_ids[i] to request rids[i] in one batch; returns the LogitsOutput."""
        r = self.runner
        slots = r.token_to_kv_pool_allocator.alloc(sum(len(x) for x in new_ids))
        assert slots is not None, "out of KV slots"
        start = 0
        for rid, ids in zip(rids, new_ids):
            pre = self.lens[rid]
            r.req_to_token_pool.req_to_token[self.rows[rid], pre : pre + len(ids)] = slots[start : start + len(ids)]
            start += len(ids)
        batch = ForwardBatch.create(
            new_ids, [self.lens[rid] for rid in rids], [self.rows[rid] for rid in rids], slots,
            r.device, return_all_logits=return_all_logits,
        )
        out = r.forward(batch)
        for rid, ids in zip(rids, new_ids):
            self.lens[rid] += len(ids)
        return out

    def free(self, rid: int) -> None:
        r = self.runner
        row, n = self.rows.pop(rid), self.lens.pop(rid)
        r.token_to_kv_pool_allocator.free(r.req_to_token_pool.req_to_token[row, :n].clone())
        r.req_to_token_pool.free([row])

    def free_all(self) -> None:
        for rid in list(self.rows):
            self.free(rid)

    def generate_greedy(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """Prefill all prompts in one extend batch, then decode them together."""
        rids = [self.new_request() for _ in prompts]
        try:
            out = self.forward(rids, [list(p) for p in prompts])
            tokens = [[t] for t in out.next_token_logits.argmax(-1).tolist()]
            for _ in range(max_new_tokens - 1):
                out = self.forward(rids, [[t[-1]] for t in tokens])
                for t, nxt in zip(tokens, out.next_token_logits.argmax(-1).tolist()):
                    t.append(nxt)
            return tokens
        finally:
            for rid in rids:
                self.free(rid)
