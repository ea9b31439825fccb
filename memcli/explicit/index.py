"""A product-key index fitted to a trained run's content keys (``memcli memory index``).

Exact search scores every entry for every query: its cost grows with the bank. A fitted index searches
product keys instead, as an inverted multi-index: the content keys ``W_k(f(entry))`` (what exact search
scores) are split in two halves, each half is clustered into sqrt(N) centroids (the half keys), and every
entry is filed under the cell (best row centroid, best column centroid) of its key; a cell holds any number
of entries. A query scores the 2 x sqrt(N) half keys, walks the cells of their Cartesian product best first
and re-ranks the first ``pool`` entries it finds by the exact score. Nothing is trained: a run trained with
exact search is indexed as it is, and re-fitted in seconds when its bank grows. (Giving every entry a cell of
its own, build-keys' balanced assignment, placed the trained keys of real facts far worse: measured in the
README.)

Rows written after the fit (``memcli memory add|replace|remove``, ``inspect-memory --edit``) are marked and
searched exactly at every query until the next fit, so an edit is found by its new content at once.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn as nn

from memcli.errors import MemcliError
from memcli.explicit.model import MemoryAugmentedLM

POOL = 1024  # entries re-ranked per query
PROBE = 64  # best half keys per half (the cells walked are among probe ** 2)
FILE = "index.safetensors"  # in the run's memory/ part, beside memory.safetensors (which holds the half keys)


def fitted(mem: MemoryAugmentedLM) -> bool:
    return mem.cfg.index_pool > 0


def fit(mem: MemoryAugmentedLM, pool: int = POOL, probe: int = PROBE, seed: int = 0) -> dict:
    """Fit the index of every memory layer to the current content keys; the run retrieves through it from then on."""
    from memcli.data.keys import kmeans

    N = mem.cfg.knowledge_num
    S = math.isqrt(N)
    if pool < 1 or probe < 1:
        raise MemcliError(f"index: pool {pool} and probe {probe} must be at least 1")
    if not mem.cfg.rerank:
        raise MemcliError("index: this run has no content keys (model.rerank=false), nothing to fit an index to")
    probe = min(probe, S)
    t0 = time.perf_counter()
    valid = mem.valid.cpu()
    fit_on = valid if int(valid.sum()) >= S else torch.ones_like(valid)
    for layer in mem.cfg.memory_layers:
        gate = mem.gates[str(layer)]
        with torch.no_grad():
            _, keys = gate._all_keys(mem.bank, mem.embed_weight(), mem.cfg.pad_id,
                                     torch.arange(N, device=mem.bank.device), mem.entry_feats(layer), torch.float32)
        keys = keys.cpu()
        h = keys.shape[1] // 2
        halves = [kmeans(keys[fit_on, :h], S, seed), kmeans(keys[fit_on, h:], S, seed + 1)]
        row_cell = (keys[:, :h] @ halves[0].T).argmax(1) * S + (keys[:, h:] @ halves[1].T).argmax(1)
        dev = gate.log_scale.device
        # fitted, not trained: kept as they are (a trained run's half keys are unit vectors; these are centroids)
        gate.keys = nn.Parameter(torch.stack(halves).to(dev), requires_grad=False)
        _set(gate, row_cell.to(dev), torch.zeros(N, dtype=torch.bool, device=dev), pool, probe)
    mem.cfg.retrieval, mem.cfg.index_pool, mem.cfg.topk_per_half = "product", pool, probe
    g = mem.gates[str(mem.cfg.memory_layers[0])]
    return {"entries": int(mem.valid.sum()), "cells": N, "cells_used": int((g.cell_count > 0).sum()),
            "largest_cell": int(g.cell_count.max()), "pool": pool, "probe": probe,
            "fit_s": round(time.perf_counter() - t0, 1)}


def drop(mem: MemoryAugmentedLM) -> None:
    """Back to exact search over every entry."""
    if not mem.cfg.rerank:
        raise MemcliError("index --exact: this run has no content keys (model.rerank=false) to search exactly")
    for layer in mem.cfg.memory_layers:
        gate = mem.gates[str(layer)]
        for name in ("row_cell", "members", "cell_start", "cell_count", "stale"):
            setattr(gate, name, None)
        gate.index_pool, gate.retrieval = 0, "exact"
    mem.cfg.retrieval, mem.cfg.index_pool = "exact", 0


def mark_written(mem: MemoryAugmentedLM, rows: torch.Tensor) -> None:
    """Rows whose content changed since the fit: searched exactly until the next fit."""
    for gate in mem.gates.values():
        if gate.stale is not None:
            gate.stale[rows.to(gate.stale.device)] = True


def written(mem: MemoryAugmentedLM) -> int:
    gate = mem.gates[str(mem.cfg.memory_layers[0])]
    return 0 if gate.stale is None else int((gate.stale & mem.valid.to(gate.stale.device)).sum())


def tensors(mem: MemoryAugmentedLM) -> dict[str, torch.Tensor]:
    """What ``FILE`` holds: per memory layer, each row's cell and the rows written since the fit."""
    out = {}
    for layer in mem.cfg.memory_layers:
        gate = mem.gates[str(layer)]
        if gate.row_cell is not None:
            out[f"{layer}.row_cell"] = gate.row_cell
            out[f"{layer}.stale"] = gate.stale.to(torch.uint8)
    return out


def load(mem: MemoryAugmentedLM, parts: dict[str, torch.Tensor], where) -> None:
    N = mem.cfg.knowledge_num
    for layer in mem.cfg.memory_layers:
        cr, st = parts.get(f"{layer}.row_cell"), parts.get(f"{layer}.stale")
        if cr is None or st is None or cr.shape != (N,) or st.shape != (N,) or int(cr.min()) < 0 or int(cr.max()) >= N:
            raise MemcliError(f"{where}: no valid index for layer {layer} of a bank of {N} entries "
                              "(run 'memcli memory index' on this run again)")
        gate = mem.gates[str(layer)]
        _set(gate, cr.long().to(gate.log_scale.device), st.bool().to(gate.log_scale.device), mem.cfg.index_pool,
             mem.cfg.topk_per_half or PROBE)


def self_recall(mem: MemoryAugmentedLM, sample: int = 2000, seed: int = 0) -> float:
    """Share of (sampled) entries that the index ranks first when queried by their own content key; exact search
    ranks each first by construction (a cosine of 1), so this is how much of exact search the index keeps."""
    layer = mem.cfg.memory_layers[0]
    gate = mem.gates[str(layer)]
    rows = torch.nonzero(mem.valid).flatten()
    rows = rows[torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed))[:sample]]
    emb, ef = mem.embed_weight(), mem.entry_feats(layer)
    hits = 0
    with torch.no_grad():
        _, keys = gate._all_keys(mem.bank, emb, mem.cfg.pad_id, torch.arange(mem.cfg.knowledge_num,
                                                                              device=mem.bank.device), ef, torch.float32)
        for s in range(0, len(rows), 256):
            r = rows[s: s + 256].to(mem.bank.device)
            rec = gate._indexed(keys[r], mem.bank, emb, mem.cfg.pad_id, mem.valid, ef, False, None)
            hits += int((rec["cells"][:, 0] == r).sum())
    return hits / max(1, len(rows))


def _set(gate, row_cell: torch.Tensor, stale: torch.Tensor, pool: int, probe: int) -> None:
    """The index's buffers on ``gate``: each row's cell, and derived from it the rows in cell order (stable) with each
    cell's start and count."""
    count = torch.bincount(row_cell, minlength=gate.num_keys ** 2)
    gate.row_cell, gate.stale, gate.cell_count = row_cell, stale, count
    gate.members = torch.argsort(row_cell, stable=True)
    gate.cell_start = count.cumsum(0) - count
    gate.index_pool, gate.topk_per_half, gate.retrieval, gate.rerank = pool, probe, "product", True
