"""Tensor parallelism on torch.distributed: the group (parallel_state), how layers split their
work (split), and the per-step broadcast from rank 0 plus the loop of ranks > 0 (step_sync)."""
