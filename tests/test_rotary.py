"""RotaryEmbedding.rotate (q and k heads in one pass, tables gathered once per forward) against
transformers' apply_rotary_pos_emb, in float32, for full and partial rotary."""

from __future__ import annotations

import pytest
import torch

from nlcli.engine.layers.rotary import RotaryEmbedding


def reference(x, positions, rope: RotaryEmbedding, base: float):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    r = rope.rotary_dim
    inv_freq = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    freqs = torch.outer(positions.float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    rot, _ = apply_rotary_pos_emb(x[..., :r].transpose(0, 1), x[..., :r].transpose(0, 1),
                                  emb.cos(), emb.sin(), unsqueeze_dim=0)
    return torch.cat((rot.transpose(0, 1), x[..., r:]), dim=-1)


@pytest.mark.parametrize("rotary_dim", [None, 32])
def test_rotate_matches_transformers(rotary_dim):
    gen = torch.Generator().manual_seed(0)
    rope = RotaryEmbedding(64, 4096, {"rope_theta": 10000.0, "rope_type": "default"}, rotary_dim)
    positions = torch.tensor([0, 1, 7, 300, 4095])
    x = torch.randn(5, 9 + 3, 64, generator=gen)  # q heads and k heads together
    got = rope.rotate(x, rope.cos_sin(positions, x.dtype))
    want = reference(x, positions, rope, 10000.0)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
