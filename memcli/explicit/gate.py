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
                 freeze_keys: bool = False, temperature: float | None = None, rerank: bool = True,
                 retrieval: str = "product"):
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
        # unit half-keys: build-keys' pooled embeddings are tiny (norm ~0.03), which would make every
        # half score ~0 at start and starve the router loss of signal; only directions matter
        self.keys = nn.Parameter(F.normalize(keys.clone().float(), dim=-1), requires_grad=not freeze_keys)
        self.retrieval = retrieval
        self.rerank = rerank or retrieval == "exact"
        if self.rerank:
            self.content_norm = nn.RMSNorm(hidden_size, eps=1e-6)  # pooled embeddings have an arbitrary scale
            self.content = nn.Linear(hidden_size, knowledge_dim, bias=False)  # W_k: pooled entry -> content key
        # learnable inverse temperature of the candidate softmax, started at 1/sqrt(d) scaling
        t = temperature if temperature is not None else math.sqrt(knowledge_dim)
        self.log_scale = nn.Parameter(torch.tensor([-math.log(t)]))  # shape [1]: DeepSpeed cannot broadcast 0-d params

    def half_scores(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``h [T, D]`` -> query ``[T, kd]``, half scores ``s1, s2 [T, S]``."""
        q = self.query(self.norm(h))
        half = self.knowledge_dim // 2
        k = self.keys.to(q.dtype)
        return q, q[:, :half] @ k[0].T, q[:, half:] @ k[1].T

    def forward(self, h: torch.Tensor, bank: torch.Tensor, emb: torch.Tensor, pad_id: int,
                valid: torch.Tensor | None = None) -> dict:
        """Retrieve for ``h [T, D]``: cells, softmax weights, scores, half scores, query and the read ``m [T, D]``."""
        if self.retrieval == "exact":
            return self._exact(h, bank, emb, pad_id, valid)
        q, s1, s2 = self.half_scores(h)
        coarse, cells = product_key_select(s1, s2, self.num_candidates, self.topk_per_half, valid)
        if self.rerank:
            pooled = entry_pool(bank, cells, emb, pad_id).to(h.dtype)  # [T, k, D]
            ck = self.content(self.content_norm(pooled))  # [T, k, kd]
            scores = (q.unsqueeze(1) * ck).sum(-1)
            scores = scores.masked_fill(~torch.isfinite(coarse), float("-inf"))  # excluded cells stay out
            weights = F.softmax(scores.float() * self.log_scale.exp(), dim=-1)
            m = (weights.to(pooled.dtype).unsqueeze(-1) * pooled).sum(1)
        else:
            scores = coarse
            weights = F.softmax(scores.float() * self.log_scale.exp(), dim=-1)
            m = token_bag(bank, cells, weights, emb, pad_id)
        return {"cells": cells, "weights": weights, "scores": scores, "s1": s1, "s2": s2, "q": q, "m": m}

    def _exact(self, h, bank, emb, pad_id, valid) -> dict:
        """Exact search by content key over every entry (small banks): top-k of ``q · W_k(pooled entry)``.

        Content keys are recomputed from the bank each forward, so they follow edits, counterfactual
        rows and a training backbone; ``full_scores [T, N]`` feed the router loss.
        """
        q = self.query(self.norm(h))
        N = bank.shape[0]
        all_rows = torch.arange(N, device=bank.device).unsqueeze(0)
        pooled_all = entry_pool(bank, all_rows, emb, pad_id)[0].to(h.dtype)  # [N, D]
        ck = self.content(self.content_norm(pooled_all))  # [N, kd]
        full = q @ ck.T  # [T, N]
        if valid is not None:
            full = full.masked_fill(~valid.unsqueeze(0), float("-inf"))
        scores, cells = full.topk(min(self.num_candidates, N), dim=-1)
        weights = F.softmax(scores.float() * self.log_scale.exp(), dim=-1)
        m = (weights.to(pooled_all.dtype).unsqueeze(-1) * pooled_all[cells]).sum(1)
        return {"cells": cells, "weights": weights, "scores": scores, "full_scores": full, "q": q, "m": m}

    def cell_keys(self, cells: torch.Tensor) -> torch.Tensor:
        """Full key vectors of cells ``[...] -> [..., kd]``."""
        S = self.num_keys
        return torch.cat([self.keys[0][cells // S], self.keys[1][cells % S]], dim=-1)
