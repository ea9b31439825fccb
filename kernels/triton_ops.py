"""Triton kernels for the memory hot paths, each matching an op of ``reference.py``.

* ``product_key_select_triton``: both halves' top-``kh`` and the pruned Cartesian top-``k`` in one
  program per token. The kernel only *selects* (indices); scores are re-gathered from ``s1, s2`` in
  PyTorch, so the backward to the half scores is an exact gather-gradient and needs no kernel.
* ``token_bag_triton``: the memory read ``sum_c w[t,c] * mean_{real l} emb[bank[cell, l]]`` without
  materialising ``[T, k, L, D]``; fp32 accumulation. Backward to the embedding table sorts the
  (row, token, coefficient) triples by row and gives each row segment to one program, so every
  gradient row is written once, without atomics; backward to the weights is a per-candidate dot.

All arithmetic is fp32 (inputs of any float dtype are cast on load; outputs are cast back in
PyTorch), which also keeps the kernels runnable under ``TRITON_INTERPRET=1`` (no bf16 arithmetic
there). Selection ties resolve to the lowest index, as ``argmax`` does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def _p2(n: int) -> int:
    return max(1, triton.next_power_of_2(int(n)))


# --------------------------------------------------------------------------- product-key select

@triton.jit
def _pk_select_kernel(s1_ptr, s2_ptr, valid_ptr, oa_ptr, ob_ptr, ok_ptr, S, st1, st2,
                      K: tl.constexpr, KH: tl.constexpr, KH_P: tl.constexpr, BLOCK_S: tl.constexpr,
                      HAS_VALID: tl.constexpr, PRUNE: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_S)
    m = offs < S
    x1 = tl.load(s1_ptr + t * st1 + offs, mask=m, other=float("-inf")).to(tl.float32)
    x2 = tl.load(s2_ptr + t * st2 + offs, mask=m, other=float("-inf")).to(tl.float32)
    r = tl.arange(0, KH_P)
    v1 = tl.full([KH_P], float("-inf"), tl.float32)
    v2 = tl.full([KH_P], float("-inf"), tl.float32)
    i1 = tl.zeros([KH_P], tl.int32)
    i2 = tl.zeros([KH_P], tl.int32)
    # per-half top-KH by repeated argmax (KH is small: 16-64), values kept in registers
    for a in tl.static_range(KH):
        j1 = tl.argmax(x1, 0)
        j2 = tl.argmax(x2, 0)
        v1 = tl.where(r == a, tl.max(x1, 0), v1)
        v2 = tl.where(r == a, tl.max(x2, 0), v2)
        i1 = tl.where(r == a, j1, i1)
        i2 = tl.where(r == a, j2, i2)
        x1 = tl.where(offs == j1, float("-inf"), x1)
        x2 = tl.where(offs == j2, float("-inf"), x2)
    ra = r[:, None]
    rb = r[None, :]
    use = (ra < KH) & (rb < KH)
    if PRUNE:
        use = use & ((ra + 1) * (rb + 1) <= K)
    if HAS_VALID:
        cell = i1[:, None].to(tl.int64) * S + i2[None, :]
        vv = tl.load(valid_ptr + cell, mask=use, other=0)
        use = use & (vv != 0)
    key = tl.reshape(tl.where(use, v1[:, None] + v2[None, :], float("-inf")), [KH_P * KH_P])
    rf = tl.arange(0, KH_P * KH_P)
    avail = rf >= 0
    for c in tl.static_range(K):
        kk = tl.where(avail, key, float("-inf"))
        mx = tl.max(kk, 0)
        # when nothing finite is left (excluded cells), take the first pair not yet taken: no repeats
        j = tl.where(mx > float("-inf"), tl.argmax(kk, 0), tl.min(tl.where(avail, rf, KH_P * KH_P), 0))
        ia = tl.sum(tl.where(r == j // KH_P, i1, 0), 0)
        ib = tl.sum(tl.where(r == j % KH_P, i2, 0), 0)
        tl.store(oa_ptr + t * K + c, ia)
        tl.store(ob_ptr + t * K + c, ib)
        tl.store(ok_ptr + t * K + c, (mx > float("-inf")).to(tl.int8))
        avail = avail & (rf != j)


def product_key_select_triton(s1: torch.Tensor, s2: torch.Tensor, k: int, kh: int | None = None,
                              valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``product_key_select_ref``: ``(scores [T, k], cells [T, k])``."""
    shape = s1.shape[:-1]
    S = s1.shape[-1]
    a1 = s1.reshape(-1, S).contiguous()
    a2 = s2.reshape(-1, S).contiguous()
    T = a1.shape[0]
    KH = min(kh or k, S)
    if valid is None:
        npairs = sum(1 for a in range(KH) for b in range(KH) if (a + 1) * (b + 1) <= k)
    else:
        npairs = KH * KH
    K = min(k, npairs)
    dev = s1.device
    oa = torch.empty(T, K, dtype=torch.int32, device=dev)
    ob = torch.empty(T, K, dtype=torch.int32, device=dev)
    ok = torch.empty(T, K, dtype=torch.int8, device=dev)
    vptr = valid.to(torch.int8).contiguous() if valid is not None else oa  # dummy pointer when absent
    if T:
        _pk_select_kernel[(T,)](a1.detach(), a2.detach(), vptr, oa, ob, ok, S, a1.stride(0), a2.stride(0),
                                K=K, KH=KH, KH_P=_p2(KH), BLOCK_S=_p2(S), HAS_VALID=valid is not None,
                                PRUNE=valid is None)
    ia, ib = oa.long(), ob.long()
    scores = a1.gather(1, ia) + a2.gather(1, ib)  # differentiable: the backward is a gather-gradient
    if valid is not None:
        scores = scores.masked_fill(ok == 0, float("-inf"))
    cells = ia * S + ib
    return scores.reshape(*shape, K), cells.reshape(*shape, K)


# --------------------------------------------------------------------------- token bag

@triton.jit
def _bag_fwd_kernel(ids_ptr, cells_ptr, w_ptr, emb_ptr, out_ptr, D, L, pad_id, st_ids, st_emb,
                    K: tl.constexpr, L_P: tl.constexpr, BLOCK_D: tl.constexpr, HAS_W: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    offs_l = tl.arange(0, L_P)
    ml = offs_l < L
    acc = tl.zeros([BLOCK_D], tl.float32)
    for c in range(K):
        cell = tl.load(cells_ptr + t * K + c).to(tl.int64)
        ids = tl.load(ids_ptr + cell * st_ids + offs_l, mask=ml, other=pad_id).to(tl.int64)
        real = ml & (ids != pad_id)
        cnt = tl.maximum(tl.sum(real.to(tl.float32), 0), 1.0)
        if HAS_W:
            w = tl.load(w_ptr + t * K + c).to(tl.float32)
        else:
            w = 1.0 / K
        rows = tl.load(emb_ptr + ids[:, None] * st_emb + offs_d[None, :], mask=real[:, None] & md[None, :], other=0.0)
        acc += tl.sum(rows.to(tl.float32), 0) * (w / cnt)
    tl.store(out_ptr + t * D + offs_d, acc, mask=md)


@triton.jit
def _bag_dw_kernel(ids_ptr, cells_ptr, emb_ptr, g_ptr, dw_ptr, D, L, pad_id, st_ids, st_emb,
                   K: tl.constexpr, L_P: tl.constexpr, BLOCK_D: tl.constexpr):
    # dw[t, c] = <g[t], mean_l emb[ids[l]]>
    pid = tl.program_id(0).to(tl.int64)  # = t * K + c
    t = pid // K
    cell = tl.load(cells_ptr + pid).to(tl.int64)
    offs_l = tl.arange(0, L_P)
    ml = offs_l < L
    ids = tl.load(ids_ptr + cell * st_ids + offs_l, mask=ml, other=pad_id).to(tl.int64)
    real = ml & (ids != pad_id)
    cnt = tl.maximum(tl.sum(real.to(tl.float32), 0), 1.0)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        rows = tl.load(emb_ptr + ids[:, None] * st_emb + offs_d[None, :], mask=real[:, None] & md[None, :], other=0.0)
        g = tl.load(g_ptr + t * D + offs_d, mask=md, other=0.0).to(tl.float32)
        acc += tl.sum(rows.to(tl.float32), 0) * g
    tl.store(dw_ptr + pid, tl.sum(acc, 0) / cnt)


@triton.jit
def _bag_demb_kernel(rows_ptr, start_ptr, tok_ptr, coef_ptr, g_ptr, out_ptr, D,
                     BLOCK_D: tl.constexpr):
    # one program per (unique embedding row, D block): sums its sorted segment, writes the row once
    s = tl.program_id(0)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    lo = tl.load(start_ptr + s)
    hi = tl.load(start_ptr + s + 1)
    row = tl.load(rows_ptr + lo).to(tl.int64)
    acc = tl.zeros([BLOCK_D], tl.float32)
    for e in range(lo, hi):
        tok = tl.load(tok_ptr + e).to(tl.int64)
        cf = tl.load(coef_ptr + e)
        acc += cf * tl.load(g_ptr + tok * D + offs_d, mask=md, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs_d, acc, mask=md)


def _block_d(D: int) -> int:
    return min(_p2(D), 128)


class _TokenBag(torch.autograd.Function):
    @staticmethod
    def forward(ctx, token_ids, cells, weights, emb, pad_id):
        T, K = cells.shape
        L = token_ids.shape[1]
        D = emb.shape[1]
        ids = token_ids.contiguous()
        cl = cells.contiguous()
        e = emb.contiguous()
        w = weights.contiguous() if weights is not None else None
        out = torch.empty(T, D, dtype=torch.float32, device=emb.device)
        if T:
            BD = _block_d(D)
            _bag_fwd_kernel[(T, triton.cdiv(D, BD))](ids, cl, w if w is not None else out, e, out, D, L, int(pad_id),
                                                     ids.stride(0), e.stride(0), K=K, L_P=_p2(L), BLOCK_D=BD,
                                                     HAS_W=w is not None)
        ctx.save_for_backward(ids, cl, e)
        ctx.has_w = w is not None
        ctx.pad_id = int(pad_id)
        ctx.w = w  # plain tensor (no grad graph needed): the coefficients of the emb backward
        return out.to(emb.dtype)

    @staticmethod
    def backward(ctx, g):
        ids, cl, e = ctx.saved_tensors
        T, K = cl.shape
        L = ids.shape[1]
        D = e.shape[1]
        g = g.contiguous().float()
        BD = _block_d(D)
        dw = demb = None
        if ctx.has_w and ctx.needs_input_grad[2] and T:
            dw = torch.empty(T * K, dtype=torch.float32, device=g.device)
            _bag_dw_kernel[(T * K,)](ids, cl, e, g, dw, D, L, ctx.pad_id, ids.stride(0), e.stride(0),
                                     K=K, L_P=_p2(L), BLOCK_D=BD)
            dw = dw.view(T, K).to(ctx.w.dtype)
        if ctx.needs_input_grad[3]:
            demb = torch.zeros(e.shape, dtype=torch.float32, device=g.device)
            tok_rows = ids[cl.reshape(-1)].long()  # [T*K, L]
            real = tok_rows != ctx.pad_id
            cnt = real.sum(-1, keepdim=True).clamp_min(1).float()
            w = ctx.w.float().reshape(-1, 1) if ctx.has_w else torch.full((T * K, 1), 1.0 / K, device=g.device)
            coef = (w / cnt).expand(-1, L)[real]
            rows = tok_rows[real]
            tok = torch.arange(T, device=g.device).repeat_interleave(K).unsqueeze(1).expand(-1, L)[real]
            if rows.numel():
                rows, order = torch.sort(rows, stable=True)
                coef, tok = coef[order].contiguous(), tok[order].contiguous()
                _, counts = torch.unique_consecutive(rows, return_counts=True)
                start = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=g.device)
                start[1:] = counts.cumsum(0)
                _bag_demb_kernel[(counts.numel(), triton.cdiv(D, BD))](rows.contiguous(), start, tok, coef, g, demb, D,
                                                                        BLOCK_D=BD)
            demb = demb.to(e.dtype)
        return None, None, dw, demb, None


def token_bag_triton(token_ids, cells, weights, emb, pad_id):
    """Same contract as ``token_bag_ref``: ``[T, D]`` in ``emb.dtype``."""
    return _TokenBag.apply(token_ids, cells, weights, emb, pad_id)


def entry_pool_triton(token_ids, cells, emb, pad_id):
    """Per-candidate pooled entries ``[T, k, D]``: the token bag with one candidate per bag."""
    T, k = cells.shape
    return _TokenBag.apply(token_ids, cells.reshape(T * k, 1), None, emb, pad_id).reshape(T, k, -1)
