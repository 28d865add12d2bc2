"""Greedy parity with transformers in bfloat16 on a small random Llama, through the engine's GPU
path (Triton kernels, CUDA-graph decode).

The check, for each of 6 prompts decoded together as one batch (so decode runs padded, from the
batch-8 graph):
- the prefill's next-token logits: max |ours - transformers| <= LOGIT_TOL x max |transformers|;
- the first 16 greedy tokens are transformers' `generate` tokens, wherever transformers' own
  top-1 / top-2 margin at that step exceeds MARGIN_TOL x max |logits| (a closer call may legitimately
  go either way in bfloat16: the comparison of that prompt stops there, and is reported).
Exit code 0 when all hold. `--device cpu` runs the same check on the CPU (torch attention).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gpu_models import Requests, make_runner, save_random_llama  # noqa: E402

LOGIT_TOL = 0.03  # of the largest reference logit
MARGIN_TOL = 0.02  # a top-1 / top-2 gap below this fraction of the largest logit is a near-tie
NEW_TOKENS = 16


def reference(model, prompt: list[int], device: str):
    """transformers' greedy tokens and each step's logits (float32, [steps, vocab])."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt], device=device), max_new_tokens=NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True,
                             eos_token_id=None, pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.stack([step[0].float() for step in out.logits])


def check(model_dir: str, device: str, dtype: torch.dtype) -> list[str]:
    import transformers

    ref_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device)
    ref_model.eval()
    runner = make_runner(model_dir, device, str(dtype).replace("torch.", ""), graphs=True,
                         max_total_tokens=4096, max_running_requests=16)
    gen = torch.Generator().manual_seed(1)
    vocab = runner.model_config.vocab_size
    prompts = [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in (1, 5, 9, 17, 33, 70)]
    reqs = Requests(runner, prompts)
    ours = [[t] for t in reqs.last]
    first_logits = reqs.logits.float()
    for _ in range(NEW_TOKENS - 1):
        reqs.decode()
        for toks, t in zip(ours, reqs.last):
            toks.append(t)
    reqs.free()

    failures = []
    for i, prompt in enumerate(prompts):
        want, logits = reference(ref_model, prompt, device)
        scale = float(logits[0].abs().max())
        diff = float((first_logits[i] - logits[0]).abs().max())
        status = f"prompt {i} ({len(prompt)} tokens): logits max diff {diff:.4f} ({diff / scale:.2%})"
        if diff > LOGIT_TOL * scale:
            failures.append(status + f" > {LOGIT_TOL:.0%} of {scale:.2f}")
        for step, (a, b) in enumerate(zip(ours[i], want)):
            top2 = logits[step].topk(2).values
            margin = float(top2[0] - top2[1]) / float(logits[step].abs().max())
            if a != b:
                if margin > MARGIN_TOL:
                    failures.append(f"prompt {i}: token {step} is {a}, transformers says {b} "
                                    f"(margin {margin:.2%} > {MARGIN_TOL:.0%})")
                else:
                    status += f"; near-tie at token {step} (margin {margin:.2%}), compared up to it"
                break
        else:
            status += f"; {NEW_TOKENS} greedy tokens equal"
        print(status)
    graphed = runner.cuda_graph_runner is not None and 8 in runner.cuda_graph_runner.graphs
    print("decode through CUDA graphs:", graphed)
    if device == "cuda" and not graphed:
        failures.append("decode did not run from CUDA graphs")
    return failures


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_llama(tmp, "parity", torch.bfloat16, weight_std=0.05)
        failures = check(tmp, a.device, torch.bfloat16)
    for f in failures:
        print("FAIL:", f)
    print("parity:", "FAIL" if failures else "ok",
          f"(bfloat16; logits within {LOGIT_TOL:.0%} of max |logit|, greedy tokens equal)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
