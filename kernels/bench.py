"""Benchmarks of the memory kernels: Triton (on CUDA) vs the PyTorch reference vs the seed-style path.

Forward and forward+backward medians at the seed's shapes (knowledge_num 1,048,576, knowledge_length
16, num_candidates 16, dim 512 and 2560), the ratio of each path to the reference, and the achieved
memory bandwidth of the token bag against the device's peak (spec sheet on CUDA where known, and a
measured large-copy bandwidth on any device).

    python -m memcli.kernels.bench            # all kernels
    python -m memcli.kernels.bench_select     # product-key select only
    python -m memcli.kernels.bench_token_bag  # token bag only
    memcli compare bench --suite kernels      # the same rows in memcli's table
"""

from __future__ import annotations

import json
import math
import sys

import torch

from memcli.bench.timer import measure

from memcli.kernels.reference import product_key_select_grid, product_key_select_ref, token_bag_materialised, token_bag_ref

# spec-sheet HBM bandwidth (bytes/s) by device-name fragment
_PEAK = {"H200": 4.8e12, "H100 PCIe": 2.0e12, "H100": 3.35e12, "A100": 2.0e12, "L40S": 0.864e12, "A10": 0.6e12}


def _time(fn, dev, repeats: int, warmup: int = 1) -> tuple[float, float]:
    t = measure(fn, repeats, warmup)
    return t.median_s, t.spread_s


def _triton_ok(dev) -> str | None:
    """None when the Triton kernels can run on ``dev``, else the reason they are skipped."""
    if dev.type != "cuda":
        return "skipped: Triton needs a CUDA device (CPU runs only the interpreter, for tests)"
    try:
        import triton  # noqa: F401

        from memcli.kernels import triton_ops  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        return f"skipped: {type(e).__name__}: {e}"
    return None


def peak_bandwidth(dev) -> tuple[float | None, float]:
    """(spec-sheet peak or None, measured copy bandwidth) in bytes/s."""
    n = (256 << 20) // 4 if dev.type == "cuda" else (64 << 20) // 4
    x = torch.empty(n, device=dev)
    y = torch.empty(n, device=dev)
    t, _ = _time(lambda: y.copy_(x), dev, 5)
    measured = 2 * n * 4 / t  # read + write
    spec = None
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
        spec = next((v for k, v in _PEAK.items() if k in name), None)
    return spec, measured


def _row(bench, path, t, sp, ref_t, note=""):
    return {"bench": bench, "path": path, "median_ms": t * 1e3, "spread_ms": sp * 1e3,
            "ratio": (t / ref_t) if ref_t else 1.0, "note": note}


def bench_select(dev=None, T: int | None = None, N: int = 1 << 20, k: int = 16, repeats: int = 10) -> list[dict]:
    """Product-key select (forward, forward+backward to the half scores)."""
    dev = torch.device(dev or ("cuda" if torch.cuda.is_available() else "cpu"))
    T = T or (4096 if dev.type == "cuda" else 512)
    S = math.isqrt(N)
    g = torch.Generator(device="cpu").manual_seed(0)
    s1 = torch.randn(T, S, generator=g).to(dev).requires_grad_()
    s2 = torch.randn(T, S, generator=g).to(dev).requires_grad_()
    paths = [("reference (topk + pruned pairs)", lambda: product_key_select_ref(s1, s2, k)),
             ("seed-style (k x k grid)", lambda: product_key_select_grid(s1, s2, k))]
    why = _triton_ok(dev)
    if why is None:
        from memcli.kernels.triton_ops import product_key_select_triton

        paths.insert(1, ("triton (fused select)", lambda: product_key_select_triton(s1, s2, k)))
        same = bool(torch.equal(product_key_select_triton(s1, s2, k)[1], product_key_select_ref(s1, s2, k)[1]))
    rows = []
    name = f"pk-select N={N:,} T={T} k={k}"
    times = {}
    for label, fn in paths:
        def fb(fn=fn):
            v, _ = fn()
            v.sum().backward()
        with torch.no_grad():
            times[(label, "fwd")] = _time(fn, dev, repeats)
        times[(label, "fwd+bwd")] = _time(fb, dev, repeats)
    ref = "reference (topk + pruned pairs)"
    for phase in ("fwd", "fwd+bwd"):
        for label, _ in paths:
            t, sp = times[(label, phase)]
            note = ""
            if label.startswith("triton"):
                note = f"same cells as reference: {same}"
            rows.append(_row(f"{name} {phase}", label, t, sp, times[(ref, phase)][0], note))
    if why is not None:
        rows.append({"bench": f"{name}", "path": "triton", "median_ms": None, "spread_ms": None,
                     "ratio": None, "note": why})
    return rows


def bench_token_bag(dev=None, D: int = 512, T: int | None = None, N: int = 1 << 20, L: int = 16, k: int = 16,
                    V: int | None = None, repeats: int = 10, dtype=torch.float32) -> list[dict]:
    """Token bag forward and forward+backward (to the embedding table and the weights)."""
    dev = torch.device(dev or ("cuda" if torch.cuda.is_available() else "cpu"))
    T = T or (4096 if dev.type == "cuda" else 256)
    V = V or (32768 if D <= 1024 else 151936)
    g = torch.Generator(device="cpu").manual_seed(0)
    bank = torch.randint(1, V, (N, L), generator=g, dtype=torch.int32)
    bank[:, 12:] = 0  # a padded tail, as real entries have
    bank = bank.to(dev)
    emb = torch.randn(V, D, generator=g).to(dev, dtype).requires_grad_()
    cells = torch.randint(0, N, (T, k), generator=g).to(dev)
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(dev, dtype).requires_grad_()
    paths = [("reference (embedding_bag)", token_bag_ref)]
    if T * k * L * D * 4 <= (4 << 30):  # the seed-style [T, k, L, D] gather must fit
        paths.append(("seed-style (materialise [T,k,L,D])", token_bag_materialised))
    why = _triton_ok(dev)
    if why is None:
        from memcli.kernels.triton_ops import token_bag_triton

        paths.insert(1, ("triton (fused bag)", token_bag_triton))
    name = f"token-bag N={N:,} L={L} k={k} D={D} T={T} {str(dtype).replace('torch.', '')}"
    times = {}
    for label, fn in paths:
        def f(fn=fn):
            return fn(bank, cells, w, emb, 0)

        def fb(f=f):
            f().float().sum().backward()
        with torch.no_grad():
            times[(label, "fwd")] = _time(f, dev, repeats)
        emb.grad = w.grad = None
        times[(label, "fwd+bwd")] = _time(fb, dev, repeats)
        emb.grad = w.grad = None
    spec, copy_bw = peak_bandwidth(dev)
    # bytes a fused read must move at least: ids + gathered embedding rows + weights + output
    esz = emb.element_size()
    moved = T * k * (L * 4 + L * D * esz + 4) + T * D * esz
    ref = "reference (embedding_bag)"
    rows = []
    for phase in ("fwd", "fwd+bwd"):
        for label, _ in paths:
            t, sp = times[(label, phase)]
            note = ""
            if phase == "fwd":
                bw = moved / t
                note = f"{bw / 1e9:.0f} GB/s = {100 * bw / copy_bw:.0f}% of measured copy"
                if spec:
                    note += f", {100 * bw / spec:.0f}% of spec peak"
            rows.append(_row(f"{name} {phase}", label, t, sp, times[(ref, phase)][0], note))
    if why is not None:
        rows.append({"bench": name, "path": "triton", "median_ms": None, "spread_ms": None,
                     "ratio": None, "note": why})
    return rows


def run_kernels(quick: bool = False, which: str = "all") -> list[dict]:
    if quick:
        kw = dict(N=4096, repeats=2)
        rows = bench_select(T=16, **kw) if which in ("all", "select") else []
        return rows + (bench_token_bag(T=16, D=64, V=1000, **kw) if which in ("all", "token_bag") else [])
    rows = []
    if which in ("all", "select"):
        rows += bench_select()
    if which in ("all", "token_bag"):
        for D in (512, 2560):
            rows += bench_token_bag(D=D)
            if torch.cuda.is_available():
                rows += bench_token_bag(D=D, dtype=torch.bfloat16)
    return rows


def main(which: str = "all") -> None:  # noqa: D103
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    rows = run_kernels("--quick" in sys.argv, which)
    if "--json" in sys.argv:
        print(json.dumps({"device": torch.cuda.get_device_name() if dev == "cuda" else "cpu", "rows": rows}, indent=1))
        return
    print(f"device: {torch.cuda.get_device_name() if dev == 'cuda' else 'cpu'}; ratio = time / reference (lower is faster)")
    for r in rows:
        if r["median_ms"] is None:
            print(f"{r['bench']:<58} {r['path']:<36} {'-':>10}     {r['note']}")
        else:
            print(f"{r['bench']:<58} {r['path']:<36} {r['median_ms']:>10.3f} ms  x{r['ratio']:.2f}  {r['note']}")


if __name__ == "__main__":
    main()
