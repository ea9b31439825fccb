"""Core of ``memcli inspect-memory``: entries, retrieval for a query, usage statistics, edits."""

from __future__ import annotations

from pathlib import Path

import torch

from memcli.errors import MemcliError
from memcli.explicit.losses import usage_stats


def newest_run(out_dir: str | Path = "out", kind: str | None = None) -> Path:
    """The most recently written checkpoint under ``out_dir`` (a run dir holding checkpoint.json)."""
    import json

    root = Path(out_dir)
    cands = []
    if root.is_dir():
        for p in list(root.glob("*/checkpoint.json")) + list(root.glob("*/model/checkpoint.json")):
            try:
                k = json.loads(p.read_text()).get("kind")
            except (OSError, ValueError):
                continue
            if kind is None or k == kind:
                cands.append(p)
    if not cands:
        stage = "hippo" if kind == "hippo" else "memory"
        what = "HIPPO checkpoint" if kind == "hippo" else "checkpoint"
        raise MemcliError(f"{root}: no {what} found (train one with 'memcli train {stage}', or pass --model-path/--checkpoint)")
    best = max(cands, key=lambda p: p.stat().st_mtime).parent
    return best.parent if best.name == "model" else best


def parse_rows(spec: str, n: int) -> range:
    try:
        if ":" in spec:
            a, b = spec.split(":", 1)
            lo, hi = int(a or 0), int(b or n)
        else:
            lo = int(spec)
            hi = lo + 1
    except ValueError:
        raise MemcliError(f"--rows '{spec}': expected START:END (e.g. 100:120) or a row number") from None
    if not (0 <= lo < hi <= n):
        raise MemcliError(f"--rows '{spec}': expected 0 <= START < END <= {n}")
    return range(lo, hi)


def entries_view(model, bank, tok, rows) -> list[dict]:
    texts = bank.decode(tok, rows)
    out = []
    for r, text in zip(rows, texts):
        out.append({"row": r, "text": text, "uuid": bank.entries[r].get("uuid"),
                    "usage": round(float(model.usage[r]), 4), "last_updated": int(model.last_updated[r])})
    return out


def search_rows(bank, tok, needle: str, limit: int = 50) -> list[int]:
    needle_l = needle.lower()
    rows = [i for i, e in enumerate(bank.entries) if needle_l in (e.get("sentence") or "").lower()]
    if not rows:  # the stored text may have been changed by EMA: search the decoded bank too
        rows = [i for i, t in enumerate(bank.decode(tok, range(bank.knowledge_num))) if needle_l in t.lower()]
    return rows[:limit]


@torch.no_grad()
def query_view(model, bank, tok, query: str, top: int = 5) -> list[dict]:
    """Per query token and memory layer: the top entries retrieved, with their softmax weights."""
    enc = tok(query, return_tensors="pt", add_special_tokens=False)
    if enc["input_ids"].numel() == 0:
        raise MemcliError("--query is empty")
    model(**enc, collect=True)
    pieces = [tok.decode([t]) for t in enc["input_ids"][0].tolist()]
    out = []
    for rec in model.ctx["records"]:
        cells, w = rec["cells"], rec["weights"]
        for t, piece in enumerate(pieces):
            rows = cells[t, :top].tolist()
            out.append({
                "layer": rec["layer"], "position": t, "token": piece,
                "entries": [{"row": r, "weight": round(float(x), 4), "text": s}
                            for r, x, s in zip(rows, w[t, :top].tolist(), bank.decode(tok, rows))],
            })
    return out


def stats_view(model) -> dict:
    s = usage_stats(model.usage, model.valid)
    counts = model.usage[model.valid]
    hist, edges = torch.histogram(counts.float().cpu(), bins=10)
    s["histogram"] = {"counts": [int(c) for c in hist.tolist()], "edges": [round(float(e), 4) for e in edges.tolist()]}
    return s


def plot_usage(model, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    u = model.usage[model.valid].cpu().numpy()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].hist(u, bins=40, color="#3b75af")
    axes[0].set_xlabel("usage (summed selection weight)")
    axes[0].set_ylabel("entries")
    axes[0].set_title("Usage histogram")
    axes[1].plot(sorted(u, reverse=True), color="#c44e52")
    axes[1].set_yscale("symlog")
    axes[1].set_xlabel("entry rank")
    axes[1].set_ylabel("usage")
    axes[1].set_title("Usage by rank")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path: str | Path) -> None:
    """PNG written atomically (a half-written picture is never left behind)."""
    import io

    import matplotlib.pyplot as plt

    from memcli.records import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
