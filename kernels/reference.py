"""Plain PyTorch references for the memory ops (the ground truth the fast paths are tested against)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def product_key_select_ref(s1: torch.Tensor, s2: torch.Tensor, k: int, kh: int | None = None,
                           valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key top-k from half scores ``s1, s2 [T, S]``.

    Per-half top-``kh``, Cartesian combination, final top-``k`` of ``s1[i] + s2[j]``. Returns
    ``(scores [T, k], cells [T, k])`` with ``cell = i * S + j``; scores carry gradient to s1, s2.
    A pair of per-half ranks (a, b) can only reach the final top-k when (a+1)(b+1) <= k, so
    ``kh = k`` is exact. ``valid [S*S]`` (bool) excludes cells (e.g. padding rows of the bank).
    """
    S = s1.shape[-1]
    kh = min(kh or k, S)
    v1, i1 = s1.topk(kh, dim=-1)
    v2, i2 = s2.topk(kh, dim=-1)
    a, b = _pairs(kh, k if valid is None else kh * kh, s1.device)
    comb = v1[..., a] + v2[..., b]
    cells = i1[..., a] * S + i2[..., b]
    if valid is not None:
        comb = comb.masked_fill(~valid[cells], float("-inf"))
    v, j = comb.topk(min(k, comb.shape[-1]), dim=-1)
    return v, cells.gather(-1, j)


_PAIRS: dict = {}


def _pairs(kh: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank pairs (a, b) with (a+1)(b+1) <= k: the only ones that can reach the final top-k
    (each has at least (a+1)(b+1)-1 pairs scoring higher). About k·ln k pairs instead of kh²."""
    key = (kh, k, str(device))
    if key not in _PAIRS:
        ab = [(a, b) for a in range(kh) for b in range(kh) if (a + 1) * (b + 1) <= k]
        _PAIRS[key] = (torch.tensor([p[0] for p in ab], device=device), torch.tensor([p[1] for p in ab], device=device))
    return _PAIRS[key]


def product_key_select_grid(s1, s2, k: int):
    """The seed-style selection: top-k per half and the full k x k grid (for comparisons)."""
    S = s1.shape[-1]
    v1, i1 = s1.topk(k, dim=-1)
    v2, i2 = s2.topk(k, dim=-1)
    comb = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)
    cells = (i1.unsqueeze(-1) * S + i2.unsqueeze(-2)).flatten(-2)
    v, j = comb.topk(k, dim=-1)
    return v, cells.gather(-1, j)


def product_key_select_bruteforce(s1: torch.Tensor, s2: torch.Tensor, k: int,
                                  valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over all S*S product scores (the slow truth for tests and benchmarks)."""
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    if valid is not None:
        full = full.masked_fill(~valid, float("-inf"))
    return full.topk(k, dim=-1)


def token_bag_ref(token_ids: torch.Tensor, cells: torch.Tensor, weights: torch.Tensor | None,
                  emb: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Memory read: for each token t, ``sum_c w[t,c] * mean_{real l} emb[bank[cells[t,c], l]]``.

    ``token_ids [N, L]`` bank, ``cells [T, k]``, ``weights [T, k]`` (None: mean over candidates).
    Uses ``embedding_bag`` so ``[T, k, L, D]`` is never materialised; accumulates in fp32.
    """
    T, k = cells.shape
    ids = token_ids[cells.reshape(-1)].long()  # [T*k, L] (ints only)
    L = ids.shape[1]
    real = (ids != pad_id).to(torch.float32)
    cnt = real.sum(-1, keepdim=True).clamp_min(1.0)
    w = weights.to(torch.float32).reshape(-1, 1) if weights is not None else torch.full((T * k, 1), 1.0 / k, device=ids.device)
    psw = (real / cnt * w).reshape(T, k * L)
    out = F.embedding_bag(ids.reshape(T, k * L), emb.to(torch.float32) if emb.dtype != torch.float32 else emb,
                          per_sample_weights=psw, mode="sum")
    return out.to(emb.dtype)


def entry_pool_ref(token_ids: torch.Tensor, cells: torch.Tensor, emb: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Per-candidate pooled entries ``[T, k, D]``: mean of each entry's real-token embeddings.

    ``embedding_bag`` over ``[T*k, L]`` bags: ``[T, k, L, D]`` is never built.
    """
    T, k = cells.shape
    ids = token_ids[cells.reshape(-1)].long()
    real = (ids != pad_id).to(torch.float32)
    psw = real / real.sum(-1, keepdim=True).clamp_min(1.0)
    w = emb if emb.dtype == torch.float32 else emb.float()
    return F.embedding_bag(ids, w, per_sample_weights=psw, mode="sum").reshape(T, k, -1).to(emb.dtype)


def token_bag_materialised(token_ids, cells, weights, emb, pad_id):
    """The seed-style read: gather ``[T, k, L, D]``, masked mean, weighted sum (for comparisons only)."""
    ids = token_ids[cells].long()  # [T, k, L]
    e = emb[ids]  # [T, k, L, D]
    real = (ids != pad_id).unsqueeze(-1).to(e.dtype)
    pooled = (e * real).sum(2) / real.sum(2).clamp_min(1)
    w = weights.unsqueeze(-1) if weights is not None else torch.full_like(pooled[..., :1], 1.0 / cells.shape[1])
    return (pooled * w).sum(1)
