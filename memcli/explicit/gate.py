"""``MemoryGate``: per-token product-key retrieval over the bank.

The query at position t is a projection of that position's normalised hidden state only, so
retrieval is causal by construction (no sequence averaging, no look-ahead). Selection returns
indices *and* scores; the scores feed the fusion weights and the router loss, so the gate learns.

With ``rerank`` (the default) the product-key candidates are re-scored by a *content key*
``W_k(mean of the entry's token embeddings)``: a function of what the entry says, so entries never
asked about in training can be found and an edited entry is found by its new content (DESIGN.md,
third measured lesson). The pooled candidates are reused for the read.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from memcli.kernels import entry_pool, product_key_select, token_bag


class MemoryGate(nn.Module):
    def __init__(self, hidden_size: int, knowledge_num: int, knowledge_dim: int, num_candidates: int = 16,
                 topk_per_half: int | None = None, gate_rank: int = 0, keys: torch.Tensor | None = None,
                 freeze_keys: bool = False, temperature: float | None = None, rerank: bool = True):
        super().__init__()
        S = math.isqrt(knowledge_num)
        if S * S != knowledge_num:
            raise ValueError(f"knowledge_num {knowledge_num} is not a perfect square")
        if knowledge_dim % 2:
            raise ValueError(f"knowledge_dim {knowledge_dim} must be even")
        self.num_keys = S
        self.knowledge_dim = knowledge_dim
        self.num_candidates = num_candidates
        self.topk_per_half = topk_per_half or num_candidates
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6)
        if gate_rank and gate_rank > 0:
            self.query = nn.Sequential(nn.Linear(hidden_size, gate_rank, bias=False),
                                       nn.Linear(gate_rank, knowledge_dim, bias=False))
        else:
            self.query = nn.Linear(hidden_size, knowledge_dim, bias=False)
        if keys is None:
            keys = torch.randn(2, S, knowledge_dim // 2) / math.sqrt(knowledge_dim // 2)
        if tuple(keys.shape) != (2, S, knowledge_dim // 2):
            raise ValueError(f"keys have shape {list(keys.shape)}, expected [2, {S}, {knowledge_dim // 2}]")
        self.keys = nn.Parameter(keys.clone().float(), requires_grad=not freeze_keys)
        self.rerank = rerank
        if rerank:
            self.content = nn.Linear(hidden_size, knowledge_dim, bias=False)  # W_k: pooled entry -> content key
        # learnable inverse temperature of the candidate softmax, started at 1/sqrt(d) scaling
        t = temperature if temperature is not None else math.sqrt(knowledge_dim)
        self.log_scale = nn.Parameter(torch.tensor(-math.log(t)))

    def half_scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h [T, D]`` -> query ``[T, kd]``, half scores ``s1, s2 [T, S]``."""
        q = self.query(self.norm(h))
        half = self.knowledge_dim // 2
        k = self.keys.to(q.dtype)
        return q, q[:, :half] @ k[0].T, q[:, half:] @ k[1].T

    def forward(self, h: torch.Tensor, bank: torch.Tensor, emb: torch.Tensor, pad_id: int,
                valid: torch.Tensor | None = None) -> dict:
        """Retrieve for ``h [T, D]``: cells, softmax weights, scores, half scores, query and the read ``m [T, D]``."""
        q, s1, s2 = self.half_scores(h)
        coarse, cells = product_key_select(s1, s2, self.num_candidates, self.topk_per_half, valid)
        if self.rerank:
            pooled = entry_pool(bank, cells, emb, pad_id).to(h.dtype)  # [T, k, D]
            ck = self.content(pooled)  # [T, k, kd]
            scores = (q.unsqueeze(1) * ck).sum(-1)
            scores = scores.masked_fill(~torch.isfinite(coarse), float("-inf"))  # excluded cells stay out
            weights = F.softmax(scores.float() * self.log_scale.exp(), dim=-1)
            m = (weights.to(pooled.dtype).unsqueeze(-1) * pooled).sum(1)
        else:
            scores = coarse
            weights = F.softmax(scores.float() * self.log_scale.exp(), dim=-1)
            m = token_bag(bank, cells, weights, emb, pad_id)
        return {"cells": cells, "weights": weights, "scores": scores, "s1": s1, "s2": s2, "q": q, "m": m}

    def cell_keys(self, cells: torch.Tensor) -> torch.Tensor:
        """Full key vectors of cells ``[...] -> [..., kd]``."""
        S = self.num_keys
        return torch.cat([self.keys[0][cells // S], self.keys[1][cells % S]], dim=-1)
