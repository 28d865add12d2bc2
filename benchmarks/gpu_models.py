"""Shared by the GPU check scripts: random Llama checkpoints, a scheduler-like request driver, and
the memory bandwidth of known GPUs.

- `save_random_llama(dir, shape, dtype, device)`: an HF directory (config + safetensors, no
  tokenizer: the engine needs none) with random weights of one of `SHAPES`.
- `Requests(runner, prompts)`: rows, slots and `ForwardBatch`es for a set of requests, the way the
  scheduler builds them; `.step(new_ids)` runs one forward, `.decode()` feeds back the greedy tokens.
- `peak_bandwidth(device_name)`: bytes/s from `NL_PEAK_BW_GBPS` if set, else from `PEAK_GBPS`.
"""

from __future__ import annotations

import os
import time
from typing import Optional, Sequence

import torch

SHAPES = {
    # Llama-3.2-1B's shape (random weights): what the speed table is measured on.
    "llama-3.2-1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                         tie_word_embeddings=True, rope_theta=500000.0),
    # Small enough for a CPU test, same code paths (GQA, tied embeddings).
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=128, vocab_size=512, tie_word_embeddings=True),
    # The parity check's model: big enough to mean something, small enough for seconds.
    "parity": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, intermediate_size=512, vocab_size=2048,
                   tie_word_embeddings=False),
}

# Peak HBM/GDDR bandwidth in GB/s by a substring of torch.cuda.get_device_name(); first match wins.
PEAK_GBPS = [
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("H800", 3350),
    ("GH200", 4000), ("B200", 8000), ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935),
    ("A100", 1555), ("L40S", 864), ("L40", 864), ("L4", 300), ("A10G", 600), ("A10", 600),
    ("RTX 4090", 1008), ("RTX 3090", 936), ("V100", 900), ("T4", 320),
]


def peak_bandwidth(device_name: str) -> Optional[float]:
    """Bytes per second, or None when neither the override nor the table knows the device."""
    if os.environ.get("NL_PEAK_BW_GBPS"):
        return float(os.environ["NL_PEAK_BW_GBPS"]) * 1e9
    for key, gbps in PEAK_GBPS:
        if key in device_name:
            return gbps * 1e9
    return None


def save_random_llama(out_dir: str, shape: str, dtype: torch.dtype, device: str = "cpu",
                      seed: int = 0, weight_std: Optional[float] = None) -> str:
    """Save a random Llama of `shape`; `weight_std` redraws the matrices (decisive logits)."""
    import transformers

    config = transformers.LlamaConfig(max_position_embeddings=8192, eos_token_id=2, bos_token_id=1,
                                      **SHAPES[shape])
    torch.manual_seed(seed)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    if weight_std is not None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() > 1:
                    p.normal_(0, weight_std)
                elif "norm" in name:
                    p.uniform_(0.8, 1.2)
    model.save_pretrained(out_dir)
    return out_dir


def make_runner(model_dir: str, device: str, dtype: str, graphs: bool, max_total_tokens: int,
                max_running_requests: int = 64):
    from nlcli.engine.args import ServerArgs
    from nlcli.engine.model_executor.model_runner import ModelRunner

    args = ServerArgs(model_path=model_dir, device=device, dtype=dtype, random_seed=0,
                      disable_cuda_graph=not graphs, max_total_tokens=max_total_tokens,
                      max_running_requests=max_running_requests,
                      cuda_graph_max_bs=max_running_requests)
    return ModelRunner(args)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Requests:
    """Requests as the scheduler holds them: a req_to_token row each and its KV slots."""

    def __init__(self, runner, prompts: Sequence[Sequence[int]]):
        self.runner = runner
        self.rows = runner.req_to_token_pool.alloc(len(prompts))
        assert self.rows is not None, "out of request rows"
        self.lens = [0] * len(prompts)
        self.last: list[int] = []
        self.logits = self.step(prompts)

    def step(self, new_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        """One forward adding new_ids[i] to request i; returns next-token logits, sets `.last`."""
        from nlcli.engine.forward_batch import ForwardBatch

        r = self.runner
        slots = r.token_to_kv_pool_allocator.alloc(sum(len(x) for x in new_ids))
        assert slots is not None, "out of KV slots"
        start = 0
        for i, ids in enumerate(new_ids):
            row, pre = self.rows[i], self.lens[i]
            r.req_to_token_pool.req_to_token[row, pre: pre + len(ids)] = slots[start: start + len(ids)]
            start += len(ids)
        batch = ForwardBatch.create(new_ids, list(self.lens), self.rows, slots, r.device)
        logits = r.forward(batch).next_token_logits
        self.lens = [n + len(ids) for n, ids in zip(self.lens, new_ids)]
        self.last = logits.argmax(-1).tolist()  # the step's one host sync, as the sampler's
        return logits

    def decode(self) -> torch.Tensor:
        return self.step([[t] for t in self.last])

    def timed_decode(self, steps: int) -> float:
        """Seconds per decode step, over `steps` steps."""
        sync(self.runner.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.decode()
        sync(self.runner.device)
        return (time.perf_counter() - start) / steps

    def free(self) -> None:
        r = self.runner
        for row, n in zip(self.rows, self.lens):
            r.token_to_kv_pool_allocator.free(r.req_to_token_pool.req_to_token[row, :n].clone())
        r.req_to_token_pool.free(self.rows)
