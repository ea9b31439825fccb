"""The thinking residual: the gated mix of a sampled token's embedding and a latent thinking vector.

``r = sigmoid(thinking_residual_gate_r(e))``, ``i = sigmoid(thinking_residual_gate_i(e))``,
``a = exp(-c * softplus(-Lambda) * r)`` (c = 8) and the next input is ``a * e + sqrt(1 - a^2) * (i * h)``.
``Lambda`` starts so that ``a`` lies in ``[r_min, r_max]`` (0.99 / 0.999): the model begins almost
token-only and learns how much latent signal to let through. ``h`` is the probability-weighted
embedding ``(p @ W_embed) / ||p||_2`` or, with ``source="projection"``, a learnable
``thinking_projection`` of the last hidden state (``Linear(D, D, bias=False)``, normal init with a small std),
L2-normalised (``projection_norm=unit``, the design's) or rescaled to the embedding rows' mean norm (``embedding``).
"""

from __future__ import annotations

import math
import torch
import torch.nn as nn
import torch.nn.functional as F

from memcli.hrpo.config import HrpoConfig

C = 8.0


class ThinkingResidual(nn.Module):
    def __init__(self, cfg: HrpoConfig, embed_row_norm: float = 1.0):
        super().__init__()
        D = cfg.hidden_size
        self.cfg = cfg
        self.thinking_residual_gate_r = nn.Linear(D, D)
        self.thinking_residual_gate_i = nn.Linear(D, D)
        # a at r = 1 is uniform in [r_min, r_max]; softplus(-Lambda) = -log(a) / c
        a0 = torch.empty(D).uniform_(cfg.thinking_r_min, cfg.thinking_r_max)
        y = -torch.log(a0) / C
        self.thinking_residual_Lambda = nn.Parameter(-torch.log(torch.expm1(y)))
        self.thinking_projection = None
        if cfg.thinking_source == "projection":
            self.thinking_projection = nn.Linear(D, D, bias=False)
            std = cfg.projection_init_std if cfg.projection_init_std is not None else 0.02 / math.sqrt(D)
            nn.init.normal_(self.thinking_projection.weight, std=std)
        self.register_buffer("embed_row_norm", torch.tensor(float(embed_row_norm)), persistent=True)
        self.force_a: float | None = None  # tests: a = 1 gives plain token inputs

    def gate(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ef = e.float()
        r = torch.sigmoid(self.thinking_residual_gate_r(ef))
        i = torch.sigmoid(self.thinking_residual_gate_i(ef))
        a = torch.exp(-C * F.softplus(-self.thinking_residual_Lambda) * r)
        if self.force_a is not None:
            a = torch.full_like(a, self.force_a)
        return a, i

    def mix(self, e: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mixed input in e's dtype, a)."""
        a, i = self.gate(e)
        # sqrt(1 - a^2) has an infinite slope at a = 1, which float32 reaches once the gate closes (Lambda grown by
        # a fast lambda_lr): 0 * inf made the gradient NaN. The where() keeps the value 0 there and the gradient 0.
        v = 1 - a * a
        out = a * e.float() + torch.where(v > 0, torch.sqrt(v.clamp_min(1e-20)), torch.zeros_like(v)) * (i * h.float())
        return out.to(e.dtype), a

    @staticmethod
    def probs_vector(p: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``(p @ W) / ||p||_2``: the probability-weighted embedding, rescaled so a one-hot p gives its row."""
        return (p.float() @ weight.float()) / p.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """The thinking vector of the last hidden states ``[..., D]``: projected, then normalised (only its direction
        is learned; a small init std does not make it small)."""
        h = self.thinking_projection(hidden.float())
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return h * self.embed_row_norm if self.cfg.projection_norm == "embedding" else h
