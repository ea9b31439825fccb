"""Core of ``memcli inspect-memory``: entries, retrieval for a query, usage statistics, edits."""

from __future__ import annotations


import torch

from memcli.errors import MemcliError
from memcli.explicit.losses import usage_stats


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
    """Per query token and memory layer: the top entries retrieved, with their softmax weights
    (``read=prefix``: one retrieval for the whole text)."""
    enc = tok(query, return_tensors="pt", add_special_tokens=False)
    if enc["input_ids"].numel() == 0:
        raise MemcliError("--query is empty")
    ids = enc["input_ids"]
    if model.cfg.read == "prefix":  # one query for the whole text: the mean of its states at the memory layer
        if query.rstrip().endswith("?"):  # asked as chat asks a question: in the chat template
            from memcli.retrieval.placement import chat_prompt_ids

            ids = torch.tensor([chat_prompt_ids(tok, query)])
        rec = model.retrieve(model.prompt_features(ids, torch.ones_like(ids)), ids, torch.ones_like(ids))
        rows = rec["cells"][0, :top].tolist()
        read = int(model.chosen_rows(rec)[0, 0])
        return [{"layer": rec["layer"], "position": "all", "token": query,
                 "read": read if read >= 0 else None,  # what the model is shown (None: retrieval abstains)
                 "entries": [{"row": r, "weight": round(float(x), 4), "text": t}
                             for r, x, t in zip(rows, rec["weights"][0, :top].tolist(), bank.decode(tok, rows))]}]
    records = model(**enc, collect=True).memory_records
    pieces = [tok.decode([t]) for t in ids[0].tolist()]
    out = []
    for rec in records:
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
