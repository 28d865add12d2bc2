"""Tensor parallelism on torch.distributed: the group (parallel_state), how layers split their
work (split), rank 0's per-step broadcast and the loop of ranks > 0 (step_sync), weight updates
across ranks (weight_sync), the process of a rank > 0 (worker), and the launcher's view of this
node's ranks (node)."""
