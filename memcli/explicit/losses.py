"""Memory losses and usage statistics. All losses are differentiable; statistics stay on device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from memcli.explicit.gate import scaled


def router_loss(rec: dict, positions: torch.Tensor, target_cells: torch.Tensor, target_weights: torch.Tensor,
                num_keys: int, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """Push the product-key halves (and the candidate re-rank) toward labelled entries.

    ``positions [P]`` index flattened tokens of ``rec``; ``target_cells [P, m]`` (labelled entries,
    -1 = none) with soft weights ``target_weights [P, m]`` (normalised target_scores). Cross-entropy
    of each half's scores against the labels' row / column, plus cross-entropy of the candidate
    scores when a label is among the candidates.
    """
    keep = target_cells >= 0
    w = torch.where(keep, target_weights, torch.zeros_like(target_weights))
    w = w / w.sum(-1, keepdim=True).clamp_min(1e-9)
    tc = target_cells.clamp_min(0)
    if "full_scores" in rec:  # exact search: one softmax over every entry
        logits = scaled(rec["full_scores"][positions], scale)
        t_all = torch.zeros_like(logits).scatter_add_(1, tc, w)
        return -(t_all * _finite(F.log_softmax(logits, -1))).sum(-1).mean()
    s1, s2 = rec["s1"][positions].float(), rec["s2"][positions].float()
    t_row = torch.zeros_like(s1).scatter_add_(1, tc // num_keys, w)
    t_col = torch.zeros_like(s2).scatter_add_(1, tc % num_keys, w)
    loss = -(t_row * F.log_softmax(s1, -1)).sum(-1) - (t_col * F.log_softmax(s2, -1)).sum(-1)
    cand = rec["cells"][positions]  # [P, k]
    hit = (cand.unsqueeze(-1) == target_cells.unsqueeze(1)) & keep.unsqueeze(1)  # [P, k, m]
    t_c = (hit.float() * w.unsqueeze(1)).sum(-1)  # [P, k]
    has = t_c.sum(-1) > 0
    rerank = -(t_c * _finite(F.log_softmax(rec["scores"][positions].float(), -1))).sum(-1)
    loss = loss + torch.where(has, rerank, torch.zeros_like(rerank))
    return loss.mean()


def _finite(logp: torch.Tensor) -> torch.Tensor:
    """Log-probabilities with the excluded entries' -inf set to 0: they carry no target weight, and 0 * -inf is NaN."""
    return torch.where(torch.isfinite(logp), logp, torch.zeros_like(logp))


def entry_usage(rec: dict, num_entries: int) -> torch.Tensor:
    """Differentiable usage distribution over entries from the selection weights (real tokens only)."""
    m = rec["mask"].to(rec["weights"].dtype).unsqueeze(1)
    u = torch.zeros(num_entries, device=rec["weights"].device, dtype=rec["weights"].dtype)
    u = u.index_add(0, rec["cells"].reshape(-1), (rec["weights"] * m).reshape(-1))
    return u / u.sum().clamp_min(1e-9)


def gini(p: torch.Tensor) -> torch.Tensor:
    """Gini coefficient of a non-negative vector (0 = uniform, -> 1 = one entry takes all)."""
    n = p.numel()
    s, _ = torch.sort(p.float())
    idx = torch.arange(1, n + 1, device=p.device, dtype=torch.float32)
    total = s.sum().clamp_min(1e-12)
    return (2 * (idx * s).sum() / (n * total)) - (n + 1) / n


def balance_loss(rec: dict, num_entries: int, form: str = "soft") -> torch.Tensor:
    """Push the entries' usage toward uniform.

    ``soft`` (memcli's): KL(usage || uniform) + Gini(usage) on the soft selection weights (differentiable).
    ``seed`` (ExplicitLM's): ``kl_div(log P, U)`` = KL(U || P) over hard selection counts; its value is the
    seed's, and a straight-through term lets its gradient reach the gate through the soft weights (hard counts
    alone would carry none).
    """
    p = entry_usage(rec, num_entries)
    if form == "seed":
        m = rec["mask"].to(p.dtype).unsqueeze(1).expand_as(rec["cells"]).reshape(-1)
        counts = torch.zeros_like(p).index_add(0, rec["cells"].reshape(-1), m)
        hard = counts / counts.sum().clamp_min(1e-9)
        st = hard + p - p.detach()
        u = torch.full_like(p, 1.0 / num_entries)
        return F.kl_div((st + 1e-12).log(), u, reduction="sum")
    kl = (p * (p.clamp_min(1e-12) * num_entries).log()).sum()
    return kl + gini(p)


def similarity_loss(rec: dict, gate) -> torch.Tensor:
    """1 - cos(query, key of its weighted candidates): pulls queries and chosen keys together."""
    keys = gate.cell_keys(rec["cells"])  # [T, k, kd]
    target = (rec["weights"].unsqueeze(-1) * keys).sum(1)
    cos = F.cosine_similarity(rec["q"].float(), target.float(), dim=-1)
    m = rec["mask"].float()
    return ((1 - cos) * m).sum() / m.sum().clamp_min(1)


def diversity_loss(rec: dict, gate) -> torch.Tensor:
    """Mean pairwise cosine between the keys of one token's candidates (lower = more diverse)."""
    k = F.normalize(gate.cell_keys(rec["cells"]).float(), dim=-1)  # [T, c, kd]
    sim = k @ k.transpose(1, 2)
    c = sim.shape[-1]
    off = (sim.sum((1, 2)) - sim.diagonal(dim1=1, dim2=2).sum(-1)) / max(1, c * (c - 1))
    m = rec["mask"].float()
    return (off * m).sum() / m.sum().clamp_min(1)


@torch.no_grad()
def usage_stats(usage: torch.Tensor, valid: torch.Tensor | None = None, hot: int = 10) -> dict:
    """Coverage, dead entries, Gini and the hottest entries from accumulated usage (one sync, at the end)."""
    u = usage[valid] if valid is not None else usage
    rows = torch.nonzero(valid).flatten() if valid is not None else torch.arange(usage.numel())
    total = u.sum()
    used = (u > 0).sum()
    top_v, top_i = u.topk(min(hot, u.numel()))
    res = torch.stack([used.float() / max(1, u.numel()), (u.numel() - used).float(), gini(u), total])
    r = res.tolist()
    return {
        "entries": int(u.numel()),
        "coverage": r[0],
        "dead": int(r[1]),
        "gini": r[2],
        "total_weight": r[3],
        "hottest": [(int(rows[i]), float(v)) for v, i in zip(top_v.tolist(), top_i.tolist())],
    }
