"""Fusion of scorers: each scorer's scores z-normalised over the entries per query, then summed with weights. Scores
on different scales (a cosine, a BM25 sum, a trained router's dot product) become comparable, and a scorer that
cannot tell entries apart for a query (all equal) adds nothing."""

from __future__ import annotations

import torch


def zscore(s: torch.Tensor) -> torch.Tensor:
    """``[Q, n]`` scores standardised along the entries (0 for fewer than two entries or no spread); entries scored
    -inf (excluded) stay -inf and are left out of the mean and spread."""
    ok = torch.isfinite(s)
    if s.shape[-1] < 2:
        return torch.zeros_like(s)
    if bool(ok.all()):
        return (s - s.mean(-1, keepdim=True)) / s.std(-1, keepdim=True).clamp_min(1e-6)
    x = torch.where(ok, s, torch.zeros_like(s))
    n = ok.sum(-1, keepdim=True).clamp_min(1)
    mean = x.sum(-1, keepdim=True) / n
    var = (torch.where(ok, s - mean, torch.zeros_like(s)) ** 2).sum(-1, keepdim=True) / (n - 1).clamp_min(1)
    return torch.where(ok, (s - mean) / var.sqrt().clamp_min(1e-6), s)


def fuse(parts: list[tuple[torch.Tensor, float]]) -> torch.Tensor:
    """``sum_i w_i * zscore(s_i)`` over the parts with a weight other than 0; an entry excluded (-inf) by any part
    is excluded from the sum."""
    used = [(s.float(), w) for s, w in parts if w]
    if not used:
        raise ValueError("fuse: no part with a weight")
    return sum(w * zscore(s) for s, w in used)
