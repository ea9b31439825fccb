"""``MemoryNorm`` and ``GatedMemoryFusion``: how a memory read enters the hidden state.

``h' = h + W_out( silu(W_gate [norm(h); m]) * W_up m )``. ``W_out`` starts at zero, so a freshly
wrapped model reproduces the base model's logits exactly. ``fusion_rank > 0`` makes the inner
width low-rank (few parameters for large backbones).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class MemoryNorm(nn.Module):
    """RMS norm of the pooled memory read (pooled token embeddings have an arbitrary scale)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.norm = nn.RMSNorm(dim, eps=eps)

    def forward(self, m: torch.Tensor) -> torch.Tensor:
        return self.norm(m)


class GatedMemoryFusion(nn.Module):
    def __init__(self, hidden_size: int, fusion_rank: int = 0):
        super().__init__()
        inner = fusion_rank if fusion_rank and fusion_rank > 0 else hidden_size
        self.h_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.gate = nn.Linear(2 * hidden_size, inner, bias=False)
        self.up = nn.Linear(hidden_size, inner, bias=False)
        self.out = nn.Linear(inner, hidden_size, bias=False)
        nn.init.zeros_(self.out.weight)  # identity at start

    def forward(self, h: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        g = self.gate(torch.cat([self.h_norm(h), m], dim=-1))
        return h + self.out(nn.functional.silu(g) * self.up(m))
