"""EMA token update of the bank (ExplicitLM Experiment 1.4.6), vectorised.

Every ``ema_update_freq`` steps, entries that were selected move toward the mean of the hidden
features that selected them, position by position in embedding space, and are re-encoded to token
ids through the output head. Padding stays padding; a frozen set of rows is never touched.
"""

from __future__ import annotations

import torch


class EmaAccumulator:
    def __init__(self, num_entries: int, dim: int, device=None):
        self.sum = torch.zeros(num_entries, dim, device=device)
        self.count = torch.zeros(num_entries, device=device)

    @torch.no_grad()
    def add(self, cells: torch.Tensor, weights: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> None:
        """``cells, weights [T, k]``, ``feats [T, D]``, ``mask [T]``: weighted features per selected entry."""
        w = (weights * mask.unsqueeze(1)).float()  # [T, k]
        flat = cells.reshape(-1)
        self.sum.index_add_(0, flat, (w.unsqueeze(-1) * feats.float().unsqueeze(1)).reshape(-1, feats.shape[-1]))
        self.count.index_add_(0, flat, w.reshape(-1))

    def reset(self) -> None:
        self.sum.zero_()
        self.count.zero_()


@torch.no_grad()
def ema_update(bank: torch.Tensor, emb: torch.Tensor, head: torch.Tensor, acc: EmaAccumulator, decay: float,
               frozen: torch.Tensor, pad_id: int, chunk: int = 256) -> torch.Tensor:
    """Update ``bank [N, L]`` in place; return the rows that were updated (one host sync in all)."""
    rows = torch.nonzero((acc.count > 0) & ~frozen).flatten()
    for s in range(0, rows.numel(), chunk):
        r = rows[s: s + chunk]
        target = acc.sum[r] / acc.count[r].unsqueeze(1)  # [R, D]
        ids = bank[r].long()  # [R, L]
        e = emb[ids].float()  # [R, L, D]
        e_new = decay * e + (1 - decay) * target.unsqueeze(1)
        new_ids = (e_new @ head.float().T).argmax(-1)  # nearest token through the output head
        bank[r] = torch.where(ids != pad_id, new_ids, ids).to(bank.dtype)
    acc.reset()
    return rows


def ema_update_reference(bank, emb, head, sums, counts, decay, frozen, pad_id):
    """Per-entry, per-position loop (the seed's shape); the vectorised path is tested against it."""
    out = bank.clone()
    for i in range(bank.shape[0]):
        if counts[i].item() <= 0 or frozen[i].item():
            continue
        target = sums[i] / counts[i]
        for l in range(bank.shape[1]):
            t = int(bank[i, l].item())
            if t == pad_id:
                continue
            e = decay * emb[t].float() + (1 - decay) * target
            out[i, l] = int((head.float() @ e).argmax().item())
    return out


def frozen_rows(num_entries: int, freeze_ratio: float, seed: int = 0) -> torch.Tensor:
    """A fixed random subset of ``freeze_ratio * N`` rows that EMA never updates."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(num_entries, dtype=torch.bool)
    n = int(round(num_entries * freeze_ratio))
    if n:
        mask[torch.randperm(num_entries, generator=g)[:n]] = True
    return mask
