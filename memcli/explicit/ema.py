"""EMA token update of the bank (ExplicitLM Experiment 1.4.6), vectorised and sparse.

Every ``ema_update_freq`` steps, entries that were selected move toward the mean of the hidden
features that selected them, position by position in embedding space, and are re-encoded to token
ids through the output head. Padding stays padding; a frozen set of rows is never touched.

The accumulator keeps sums only for the rows read since the last update (the seed moved from a
dense ``[N, hidden]`` buffer, 10.7 GB at 1M x 2,560, to a sparse cache for this reason): a row ->
slot index over the bank (4 bytes per entry) and ``[touched, hidden]`` sums on the model's device.
"""

from __future__ import annotations

import torch


class EmaAccumulator:
    def __init__(self, num_entries: int, dim: int, device=None):
        self.num_entries, self.dim = num_entries, dim
        self._alloc(torch.device(device) if device is not None else None)

    def _alloc(self, device) -> None:
        self.device = device
        self.slot = torch.full((self.num_entries,), -1, dtype=torch.int32, device=device)  # row -> slot (-1: none)
        self.rows = torch.zeros(0, dtype=torch.long, device=device)
        self.sum = torch.zeros(0, self.dim, device=device)
        self.count = torch.zeros(0, device=device)

    def _ensure(self, rows: torch.Tensor) -> None:
        """Give every row of ``rows`` a slot (new rows are appended with zero sums)."""
        new = torch.unique(rows[self.slot[rows] < 0])
        if new.numel():
            self.slot[new] = torch.arange(len(self.rows), len(self.rows) + len(new), device=new.device, dtype=torch.int32)
            self.rows = torch.cat([self.rows, new])
            self.sum = torch.cat([self.sum, self.sum.new_zeros(len(new), self.dim)])
            self.count = torch.cat([self.count, self.count.new_zeros(len(new))])

    @torch.no_grad()
    def add(self, cells: torch.Tensor, weights: torch.Tensor, feats: torch.Tensor, mask: torch.Tensor) -> None:
        """``cells, weights [T, k]``, ``feats [T, D]``, ``mask [T]``: weighted features per selected entry."""
        if self.device != feats.device:  # follows the model (accelerate may move it after the accumulator was made)
            self._alloc(feats.device)
        w = (weights * mask.unsqueeze(1)).float()  # [T, k]
        flat = cells.reshape(-1).long()
        self._ensure(flat)
        idx = self.slot[flat].long()
        self.sum.index_add_(0, idx, (w.unsqueeze(-1) * feats.float().unsqueeze(1)).reshape(-1, self.dim))
        self.count.index_add_(0, idx, w.reshape(-1))

    def touched(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, sums, counts)`` of the rows read since the last reset."""
        return self.rows, self.sum, self.count

    @torch.no_grad()
    def all_reduce(self) -> None:
        """Sum the accumulators of every rank (DDP): all ranks end with the same rows (sorted) and sums."""
        d = torch.distributed
        n = torch.tensor([len(self.rows)], device=self.rows.device)
        sizes = [torch.zeros_like(n) for _ in range(d.get_world_size())]
        d.all_gather(sizes, n)
        width = int(max(int(x) for x in sizes))
        padded = torch.full((width,), -1, dtype=torch.long, device=self.rows.device)
        padded[: len(self.rows)] = self.rows
        every = [torch.empty_like(padded) for _ in sizes]
        d.all_gather(every, padded)
        union = torch.unique(torch.cat(every))
        union = union[union >= 0]
        pos = torch.searchsorted(union, self.rows)
        s = self.sum.new_zeros(len(union), self.dim).index_add_(0, pos, self.sum)
        c = self.count.new_zeros(len(union)).index_add_(0, pos, self.count)
        d.all_reduce(s)
        d.all_reduce(c)
        self.slot[self.rows] = -1
        self.rows, self.sum, self.count = union, s, c
        self.slot[union] = torch.arange(len(union), device=union.device, dtype=torch.int32)

    def reset(self) -> None:
        self.slot[self.rows] = -1
        self.rows = self.rows[:0]
        self.sum = self.sum[:0]
        self.count = self.count[:0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.slot, self.rows, self.sum, self.count))


@torch.no_grad()
def ema_update(bank: torch.Tensor, emb: torch.Tensor, head: torch.Tensor, acc: EmaAccumulator, decay: float,
               frozen: torch.Tensor, pad_id: int, chunk: int = 256) -> torch.Tensor:
    """Update ``bank [N, L]`` in place; return the rows that were updated."""
    rows, sums, counts = acc.touched()
    keep = (counts > 0) & ~frozen[rows]
    rows, sums, counts = rows[keep], sums[keep], counts[keep]
    for s in range(0, rows.numel(), chunk):
        r = rows[s: s + chunk]
        target = sums[s: s + chunk] / counts[s: s + chunk].unsqueeze(1)  # [R, D]
        ids = bank[r].long()  # [R, L]
        e = emb[ids].float()  # [R, L, D]
        e_new = decay * e + (1 - decay) * target.unsqueeze(1)
        new_ids = (e_new @ head.float().T).argmax(-1)  # nearest token through the output head
        bank[r] = torch.where(ids != pad_id, new_ids, ids).to(bank.dtype)
    acc.reset()
    return rows


def ema_update_reference(bank, emb, head, sums, counts, decay, frozen, pad_id):
    """Per-entry, per-position loop (the seed's shape) over dense ``sums [N, D]`` / ``counts [N]``; the vectorised
    path is tested against it."""
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
