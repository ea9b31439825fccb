"""Triton kernels against their PyTorch references, under the Triton interpreter on CPU.

Odd shapes (non-power-of-two S, L, D; num_candidates that divides nothing), entries of all padding,
excluded cells, ties, fp32 and bf16 (cast to fp32 inside the kernels), outputs and gradients.

``MEMCLI_KERNEL_TEST_DEVICE=cuda`` runs the same checks with the compiled kernels on a GPU: inputs
are built on the CPU as here, each kernel call moves them to the GPU and its outputs back (the
copies are differentiable, so the gradient checks cover the GPU backward too).
"""

import importlib
import os
import sys

import pytest
import torch

ON_GPU = os.environ.get("MEMCLI_KERNEL_TEST_DEVICE", "cpu") == "cuda"
if ON_GPU and not torch.cuda.is_available():
    raise RuntimeError("MEMCLI_KERNEL_TEST_DEVICE=cuda, but torch sees no CUDA device")
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the @triton.jit decorations
triton = pytest.importorskip("triton")
if "memcli.kernels.triton_ops" in sys.modules:  # imported earlier without the interpreter
    importlib.reload(sys.modules["memcli.kernels.triton_ops"])
from memcli.kernels import dispatch  # noqa: E402
from memcli.kernels.reference import (entry_pool_ref, product_key_select_bruteforce,  # noqa: E402
                                      product_key_select_ref, token_bag_materialised, token_bag_ref)
from memcli.kernels import triton_ops  # noqa: E402


def _on_device(fn):
    """``fn`` as the tests call it: on the CPU under the interpreter, or through the GPU."""
    if not ON_GPU:
        return fn

    def run(*args):
        out = fn(*(a.cuda() if isinstance(a, torch.Tensor) else a for a in args))
        return tuple(o.cpu() for o in out) if isinstance(out, tuple) else out.cpu()
    return run


product_key_select_triton = _on_device(triton_ops.product_key_select_triton)
token_bag_triton = _on_device(triton_ops.token_bag_triton)
entry_pool_triton = _on_device(triton_ops.entry_pool_triton)

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1e-2)}


def _halves(T, S, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bfloat16:
        # bf16 sums of random floats tie often; integer scores a + S*b are distinct and exact (S*S <= 256)
        assert S * S <= 256
        s1 = torch.stack([torch.randperm(S, generator=g) for _ in range(T)]).to(dtype).requires_grad_()
        s2 = torch.stack([torch.randperm(S, generator=g) * S for _ in range(T)]).to(dtype).requires_grad_()
        return s1, s2
    s1 = torch.randn(T, S, generator=g).to(dtype).requires_grad_()
    s2 = torch.randn(T, S, generator=g).to(dtype).requires_grad_()
    return s1, s2


@pytest.mark.parametrize("T,S,k,kh,dtype", [(5, 13, 6, None, torch.float32), (3, 7, 16, None, torch.float32),
                                             (4, 11, 5, 3, torch.float32), (2, 32, 16, 16, torch.float32),
                                             (5, 13, 6, None, torch.bfloat16), (3, 11, 9, 4, torch.bfloat16)])
def test_product_key_select_matches_reference(T, S, k, kh, dtype):
    s1, s2 = _halves(T, S, dtype)
    v, c = product_key_select_triton(s1, s2, k, kh)
    vr, cr = product_key_select_ref(s1, s2, k, kh)
    assert v.shape == vr.shape and v.dtype == dtype
    torch.testing.assert_close(v.float(), vr.float(), **TOL[dtype])
    assert torch.equal(c, cr)  # distinct scores: the same cells in the same order
    if kh is None:  # kh = k is exact: the brute-force top-k over all S*S cells
        vb, _ = product_key_select_bruteforce(s1.float(), s2.float(), min(k, v.shape[-1]))
        torch.testing.assert_close(v.float(), vb, **TOL[dtype])
    # backward to the half scores
    g = torch.randn(v.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    d1, d2 = torch.autograd.grad(v, (s1, s2), g)
    r1, r2 = torch.autograd.grad(vr, (s1, s2), g)
    torch.testing.assert_close(d1.float(), r1.float(), **TOL[dtype])
    torch.testing.assert_close(d2.float(), r2.float(), **TOL[dtype])


def test_product_key_select_excluded_cells():
    s1, s2 = _halves(4, 9, torch.float32, seed=3)
    valid = torch.rand(81, generator=torch.Generator().manual_seed(4)) > 0.6
    v, c = product_key_select_triton(s1, s2, 7, 4, valid)
    vr, cr = product_key_select_ref(s1, s2, 7, 4, valid)
    fin = torch.isfinite(vr)
    assert torch.equal(torch.isfinite(v), fin)
    torch.testing.assert_close(v[fin], vr[fin])
    assert torch.equal(c[fin], cr[fin])
    assert valid[c[fin]].all()
    for row in c:  # even the padded slots never repeat a cell
        assert len(set(row.tolist())) == row.numel()


def test_product_key_select_all_excluded_is_minus_inf():
    s1, s2 = _halves(2, 5, torch.float32)
    v, _ = product_key_select_triton(s1, s2, 4, None, torch.zeros(25, dtype=torch.bool))
    assert torch.isneginf(v).all()


def test_product_key_select_ties():
    s1 = torch.zeros(3, 8)
    s2 = torch.zeros(3, 8)
    s1[:, 5] = 1.0
    s2[1, 2] = 2.0
    v, c = product_key_select_triton(s1, s2, 5)
    vb, _ = product_key_select_bruteforce(s1, s2, 5)
    torch.testing.assert_close(v, vb)  # same top values whichever tied cell is taken
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(-2)
    torch.testing.assert_close(full.gather(1, c), v)  # and each cell really scores that
    assert all(len(set(r.tolist())) == 5 for r in c)


def _bank(N, L, V, pad, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (N, L), generator=g)
    ids[:, L - 2:] = pad  # trailing padding on every entry
    ids[2] = pad  # an entry of all padding reads as zeros
    ids[5, 0] = pad  # padding not only at the end
    return ids


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,k,N,L,D,weighted", [(6, 5, 19, 7, 37, True), (3, 3, 9, 4, 130, True),
                                                 (4, 6, 11, 5, 24, False)])
def test_token_bag_matches_reference(T, k, N, L, D, weighted, dtype):
    V, pad = 13, 0
    ids = _bank(N, L, V, pad)
    g = torch.Generator().manual_seed(7)
    emb = torch.randn(V, D, generator=g).to(dtype).requires_grad_()
    cells = torch.randint(0, N, (T, k), generator=g)
    cells[0, 0] = 2
    cells[1, :2] = 4  # the same entry twice for one token
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(dtype).requires_grad_() if weighted else None
    out = token_bag_triton(ids, cells, w, emb, pad)
    ref = token_bag_ref(ids, cells, w, emb, pad)
    seed_style = token_bag_materialised(ids, cells, None if w is None else w.float(), emb.float(), pad)
    assert out.dtype == dtype and out.shape == (T, D)
    torch.testing.assert_close(out.float(), ref.float(), **TOL[dtype])
    torch.testing.assert_close(out.float(), seed_style, **TOL[dtype])
    gout = torch.randn(T, D, generator=g).to(dtype)
    inputs = (emb, w) if weighted else (emb,)
    got = torch.autograd.grad(out, inputs, gout)
    want = torch.autograd.grad(ref, inputs, gout)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **TOL[dtype])


def test_token_bag_frozen_embedding_and_entry_pool():
    ids = _bank(10, 6, 11, 0)
    emb = torch.randn(11, 19)
    cells = torch.randint(0, 10, (5, 4), generator=torch.Generator().manual_seed(2))
    w = torch.rand(5, 4, requires_grad=True)
    out = token_bag_triton(ids, cells, w, emb, 0)
    (dw,) = torch.autograd.grad(out.square().sum(), w)
    (dwr,) = torch.autograd.grad(token_bag_ref(ids, cells, w, emb, 0).square().sum(), w)
    torch.testing.assert_close(dw, dwr)
    torch.testing.assert_close(entry_pool_triton(ids, cells, emb, 0), entry_pool_ref(ids, cells, emb, 0))


def test_dispatcher_switch(monkeypatch):
    s1, s2 = _halves(2, 6, torch.float32)
    if ON_GPU:  # forced Triton then runs on these tensors' device, which must be the GPU there
        s1, s2 = s1.detach().cuda(), s2.detach().cuda()
    monkeypatch.setenv("MEMCLI_KERNELS", "triton")
    assert dispatch._use_triton(s1)  # forced, and runnable here under the interpreter
    v, c = dispatch.product_key_select(s1, s2, 4)
    vr, cr = product_key_select_ref(s1, s2, 4)
    torch.testing.assert_close(v, vr)
    assert torch.equal(c, cr)
    monkeypatch.setenv("MEMCLI_KERNELS", "reference")
    assert not dispatch._use_triton(s1)
    monkeypatch.setenv("MEMCLI_KERNELS", "auto")
    assert dispatch._use_triton(s1) == ON_GPU  # auto: Triton for CUDA tensors, the reference for CPU ones
    from memcli.errors import MemcliError

    monkeypatch.setenv("MEMCLI_KERNELS", "triron")  # a typo is an error, not a silent auto
    with pytest.raises(MemcliError, match="MEMCLI_KERNELS='triron': expected one of auto, reference, triton"):
        dispatch.product_key_select(s1, s2, 4)


@pytest.mark.parametrize("rerank", [True, False])
def test_memory_model_forward_backward_same_with_kernels(monkeypatch, default_data, rerank):
    """The explicit memory model with product retrieval: Triton path == reference path (loss, grads)."""
    from memcli.explicit.io import build_model

    torch.manual_seed(0)
    model, tok, _ = build_model("tiny", default_data / "cache", default_data / "keys", memory_layers=[1],
                                num_candidates=6, retrieval="product", rerank=rerank)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # open the zero-initialised fusion so the memory read reaches the loss
        for f in model.fusions.values():
            f.out.weight.copy_(torch.randn(f.out.weight.shape, generator=g) * 0.05)
    x = tok(["Where was Qir born?"], return_tensors="pt", add_special_tokens=False)["input_ids"]
    if ON_GPU:
        model, x = model.cuda(), x.cuda()
    calls = []
    for name in ("product_key_select_triton", "token_bag_triton", "entry_pool_triton"):
        fn = getattr(triton_ops, name)
        monkeypatch.setattr(triton_ops, name, lambda *a, _fn=fn, _n=name: calls.append(_n) or _fn(*a))
    res = {}
    for mode in ("reference", "triton"):
        monkeypatch.setenv("MEMCLI_KERNELS", mode)
        model.zero_grad()
        out = model(input_ids=x, labels=x)
        out.loss.backward()
        res[mode] = (out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    used = {"product_key_select_triton", "entry_pool_triton" if rerank else "token_bag_triton"}
    assert used <= set(calls)  # the kernels really ran
    torch.testing.assert_close(res["triton"][0], res["reference"][0])
    assert res["triton"][1].keys() == res["reference"][1].keys()
    assert any(n.startswith("gates") for n in res["reference"][1])
    for n, grad in res["reference"][1].items():
        torch.testing.assert_close(res["triton"][1][n], grad, atol=1e-5, rtol=1e-4, msg=n)


def test_kernel_bench_harness(cli):
    import json

    code, out, err = cli("compare", "bench", "--suite", "kernels", "--quick", "--json")
    assert code == 0, err
    rows = json.loads(out)
    paths = {(r["bench"].split()[0], r["path"]) for r in rows}
    assert ("pk-select", "reference (topk + pruned pairs)") in paths
    assert ("token-bag", "seed-style (materialise [T,k,L,D])") in paths
    for r in rows:
        if r["path"].startswith("reference"):
            assert r["ratio"] == 1.0 and r["median_ms"] > 0
    if not torch.cuda.is_available():  # the Triton rows say why they are absent instead of a number
        assert any(r["path"] == "triton" and "CUDA" in r["note"] for r in rows)
