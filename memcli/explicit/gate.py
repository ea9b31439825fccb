"""``MemoryGate``: retrieval of bank entries for each query position.

The query at position t is a projection of the memory layer's hidden state at t only (``query=token``)
or of the causal running mean of those states up to t (``query=mean``, standardised), so retrieval
is causal by construction. Selection returns indices *and* scores; the scores feed the candidate
weights and the router loss, so the gate learns.

Entries are scored by *content keys* ``W_k(f(entry))``, a function of what the entry says, so
entries never asked about in training are found and an edited entry is found by its new content.
``f`` is the mean of the entry's input token embeddings (``entry_key=embeddings``, computed every
forward) or the mean of the entry's own hidden states at the memory layer (``entry_key=hidden``,
standardised; computed by the base model, DESIGN.md's last lessons: the keys a frozen pretrained
model can find). Small banks are searched exactly; large ones through product keys, whose coarse
candidates are re-ranked by content key.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from memcli.backbone import Standardise
from memcli.kernels import entry_pool, product_key_select, token_bag


def scaled(scores: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scores * scale`` in fp32 with excluded entries (-inf) kept at -inf and out of the scale's gradient
    (0 * -inf would make it NaN)."""
    s = scores.float()
    ok = torch.isfinite(s)
    return torch.where(ok, torch.where(ok, s, torch.zeros_like(s)) * scale, torch.full_like(s, float("-inf")))


class MemoryGate(nn.Module):
    def __init__(self, hidden_size: int, knowledge_num: int, knowledge_dim: int, num_candidates: int = 16,
                 topk_per_half: int | None = None, gate_rank: int = 0, keys: torch.Tensor | None = None,
                 freeze_keys: bool = False, temperature: float | None = None, rerank: bool = True,
                 retrieval: str = "product", query: str = "token", entry_key: str = "embeddings",
                 index_pool: int = 0):
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
        self.entry_key = entry_key
        # mean queries against hidden-state keys live in one space (standardised states of one layer): they are
        # compared by cosine, and the key map starts as the query map, so retrieval starts at the untrained cosine
        # of the states (measured on SmolLM2: 97.6% held-out recall@1 before any training)
        self.cosine = query == "mean" and entry_key == "hidden"
        # token queries: RMS norm of one state; mean queries: standardised mean of many (a fixed affine map)
        self.norm = nn.RMSNorm(hidden_size, eps=1e-6) if query == "token" else Standardise(hidden_size)
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
        self.rerank = rerank or retrieval == "exact" or index_pool > 0
        # a product-key index fitted to the content keys (memcli/explicit/index.py; set by memcli memory index):
        # entries re-ranked per query, each row's cell, the rows in cell order with each cell's start and count, and
        # the rows written since the fit (searched exactly)
        self.index_pool = index_pool
        for name in ("row_cell", "members", "cell_start", "cell_count", "stale"):
            self.register_buffer(name, None, persistent=False)
        if self.rerank:
            # pooled embeddings have an arbitrary scale (RMS norm); hidden-state means need centring (standardise)
            self.content_norm = nn.RMSNorm(hidden_size, eps=1e-6) if entry_key == "embeddings" else Standardise(hidden_size)
            self.content = nn.Linear(hidden_size, knowledge_dim, bias=False)  # W_k: entry feature -> content key
            if self.cosine and gate_rank == 0:
                with torch.no_grad():
                    self.content.weight.copy_(self.query.weight)
        # learnable inverse temperature of the candidate softmax, started at 1/sqrt(d) scaling (cosine: 1/0.05)
        t = temperature if temperature is not None else (0.05 if self.cosine else math.sqrt(knowledge_dim))
        self.log_scale = nn.Parameter(torch.tensor([-math.log(t)]))  # shape [1]: DeepSpeed cannot broadcast 0-d params

    # ------------------------------------------------------------------ queries and keys
    def queries(self, h: torch.Tensor) -> torch.Tensor:
        """``h [T, D]`` (a state, or a running mean for ``query=mean``) -> queries ``[T, kd]``."""
        q = self.query(self.norm(h))
        return F.normalize(q, dim=-1) if self.cosine else q

    def content_keys(self, feats: torch.Tensor) -> torch.Tensor:
        """Entry features ``[..., D]`` -> content keys ``[..., kd]``."""
        k = self.content(self.content_norm(feats))
        return F.normalize(k, dim=-1) if self.cosine else k

    def half_scores(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        half = self.knowledge_dim // 2
        k = self.keys.to(q.dtype)
        return q[:, :half] @ k[0].T, q[:, half:] @ k[1].T

    def _features(self, bank, emb, pad_id, rows, entry_feats):
        """Entry features of ``rows`` (any shape) -> ``[*rows.shape, D]``."""
        if self.entry_key == "hidden":
            return entry_feats[rows]
        flat = rows.reshape(1, -1) if rows.dim() == 1 else rows
        return entry_pool(bank, flat, emb, pad_id).reshape(*rows.shape, emb.shape[1])

    # ------------------------------------------------------------------ retrieval
    def forward(self, h: torch.Tensor, bank: torch.Tensor, emb: torch.Tensor, pad_id: int,
                valid: torch.Tensor | None = None, entry_feats: torch.Tensor | None = None,
                read: bool = True, fresh: torch.Tensor | None = None) -> dict:
        """Retrieve for ``h [T, D]``: cells, softmax weights, scores, query and (``read``) the pooled read ``m [T, D]``.
        ``fresh``: rows whose content differs from the bank's for this call (counterfactual overrides); a fitted
        index searches them exactly, as it does rows written since its fit."""
        q = self.queries(h)
        if self.retrieval == "exact":
            return self._exact(q, bank, emb, pad_id, valid, entry_feats, read)
        if self.row_cell is not None:
            return self._indexed(q, bank, emb, pad_id, valid, entry_feats, read, fresh)
        s1, s2 = self.half_scores(q)
        coarse, cells = product_key_select(s1, s2, self.num_candidates, self.topk_per_half, valid)
        rec = {"cells": cells, "s1": s1, "s2": s2, "q": q}
        if self.rerank:
            feats = self._features(bank, emb, pad_id, cells, entry_feats).to(q.dtype)  # [T, k, D]
            scores = (q.unsqueeze(1) * self.content_keys(feats)).sum(-1)
            scores = scores.masked_fill(~torch.isfinite(coarse), float("-inf"))  # excluded cells stay out
            weights = F.softmax(scaled(scores, self.log_scale.exp()), dim=-1)
            rec.update(scores=scores, weights=weights)
            if read:
                pooled = feats if self.entry_key == "embeddings" else entry_pool(bank, cells, emb, pad_id).to(q.dtype)
                rec["m"] = (weights.to(pooled.dtype).unsqueeze(-1) * pooled).sum(1)
        else:
            weights = F.softmax(scaled(coarse, self.log_scale.exp()), dim=-1)
            rec.update(scores=coarse, weights=weights)
            if read:
                rec["m"] = token_bag(bank, cells, weights, emb, pad_id)
        return rec

    def _indexed(self, q, bank, emb, pad_id, valid, entry_feats, read, fresh) -> dict:
        """Search through a fitted index (an inverted multi-index): the product-key best cells that hold a live
        entry, their entries in that order up to ``index_pool``, plus every row written since the fit, re-ranked by
        content key (the exact score) -> the top ``num_candidates``."""
        T, N, P = q.shape[0], bank.shape[0], self.index_pool
        exact = self.stale.clone()
        if fresh is not None:
            exact[fresh.to(exact.device)] = True
        ok = torch.ones(N, dtype=torch.bool, device=bank.device) if valid is None else valid
        live = ok & ~exact
        cell_live = torch.zeros_like(self.cell_count).index_add_(0, self.row_cell, live.long()) > 0
        s1, s2 = self.half_scores(q)
        coarse, cells = product_key_select(s1, s2, P, self.topk_per_half, cell_live)  # best cells first
        cnt = self.cell_count[cells].masked_fill(~torch.isfinite(coarse), 0)
        cum = cnt.cumsum(1)
        j = torch.arange(P, device=q.device).expand(T, -1)
        ci = torch.searchsorted(cum, j.contiguous(), right=True).clamp_max(cells.shape[1] - 1)  # the cell of slot j
        pos = self.cell_start[cells.gather(1, ci)] + j - (cum.gather(1, ci) - cnt.gather(1, ci))
        rows = self.members[pos.clamp(0, N - 1)]
        extra = torch.nonzero(exact & ok).flatten()
        rows = torch.cat([rows, extra.expand(T, -1)], 1)  # [T, pool + written]
        live_c = torch.cat([(j < cum[:, -1:]) & live[rows[:, :P]],
                            torch.ones(T, len(extra), dtype=torch.bool, device=q.device)], 1)
        if fresh is None and not torch.is_grad_enabled():  # a stable bank: every key kept once, candidates gathered
            _, keys_all = self._all_keys(bank, emb, pad_id, torch.arange(N, device=bank.device), entry_feats,
                                         q.dtype)
            keys = keys_all[rows]
        else:  # keys of the candidates alone (a batch-local override changes features at every call)
            keys = self.content_keys(self._features(bank, emb, pad_id, rows, entry_feats).to(q.dtype))
        scores = (q.unsqueeze(1) * keys).sum(-1).masked_fill(~live_c, float("-inf"))
        scores, top = scores.topk(min(self.num_candidates, scores.shape[1]), dim=-1)
        cells = rows.gather(1, top)
        weights = F.softmax(scaled(scores, self.log_scale.exp()), dim=-1)
        rec = {"cells": cells, "weights": weights, "scores": scores, "q": q, "indexed": True}
        if read:
            pooled = self._features(bank, emb, pad_id, cells, entry_feats) if self.entry_key == "embeddings" else \
                entry_pool(bank, cells, emb, pad_id)
            rec["m"] = (weights.to(q.dtype).unsqueeze(-1) * pooled.to(q.dtype)).sum(1)
        return rec

    def _exact(self, q, bank, emb, pad_id, valid, entry_feats, read) -> dict:
        """Exact search by content key over every entry (small banks): top-k of ``q · W_k(f(entry))``.

        Content keys are recomputed each forward, so they follow edits, counterfactual rows and a
        training backbone; ``full_scores [T, N]`` feed the router loss.
        """
        N = bank.shape[0]
        all_rows = torch.arange(N, device=bank.device)
        feats_all, keys_all = self._all_keys(bank, emb, pad_id, all_rows, entry_feats, q.dtype)
        full = q @ keys_all.T  # [T, N]
        if valid is not None:
            full = full.masked_fill(~valid.unsqueeze(0), float("-inf"))
        scores, cells = full.topk(min(self.num_candidates, N), dim=-1)
        weights = F.softmax(scaled(scores, self.log_scale.exp()), dim=-1)
        rec = {"cells": cells, "weights": weights, "scores": scores, "full_scores": full, "q": q}
        if read:
            pooled = feats_all if self.entry_key == "embeddings" else entry_pool(bank, all_rows[None], emb, pad_id)[0].to(q.dtype)
            rec["m"] = (weights.to(pooled.dtype).unsqueeze(-1) * pooled[cells]).sum(1)
        return rec

    def _all_keys(self, bank, emb, pad_id, all_rows, entry_feats, dtype):
        """Features and content keys of every entry, ``([N, D], [N, kd])``. Without autograd they are kept and reused
        while every tensor they come from is the same object at the same version (an edit, a refit, an optimizer
        step or an override's copy makes them new), so a query costs one ``[T, N]`` product, not N key projections."""
        deps = ((entry_feats,) if self.entry_key == "hidden" else (bank, emb)) + tuple(self.content.parameters()) + \
            tuple(self.content_norm.parameters()) + tuple(self.content_norm.buffers())
        try:
            stamp = (dtype,) + tuple(t._version for t in deps)
        except RuntimeError:  # inference-mode tensors keep no version: nothing can tell that they changed
            stamp, self._keys_cache = None, None
        cached = getattr(self, "_keys_cache", None)
        if (not torch.is_grad_enabled() and cached is not None and cached[1] == stamp
                and len(cached[0]) == len(deps) and all(a is b for a, b in zip(cached[0], deps))):
            return cached[2], cached[3]
        feats = self._features(bank, emb, pad_id, all_rows, entry_feats).to(dtype)  # [N, D]
        keys = self.content_keys(feats)
        self._keys_cache = None if (torch.is_grad_enabled() or stamp is None) else (deps, stamp, feats, keys)
        return feats, keys

    def cell_keys(self, cells: torch.Tensor) -> torch.Tensor:
        """Full key vectors of cells ``[...] -> [..., kd]``."""
        S = self.num_keys
        return torch.cat([self.keys[0][cells // S], self.keys[1][cells % S]], dim=-1)
