"""Abstention thresholds for a trained run with cosine retrieval (``model.abstain_below``), all in one pass.

For the run's own facts asked in the entry's words, with a held-out template and as a question (their entries
are in the bank: reading helps), and for T-REx facts that are not in the bank (reading the nearest entry may
hurt): each question's best cosine, and whether it is answered right with memory on and off (ranked among
five options and generated, as ``memcli compare editing`` scores them). A threshold C reads the entry when its
cosine is >= C and answers as memory off otherwise, so every C is scored from the same two passes.

    python scripts/abstain_sweep.py RUN [--data DATA_DIR] [--num-samples 100] [--markdown FILE]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

THRESHOLDS = [None, 0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9]  # None: always read (today's default)


def groups(run, data: Path | None, n: int, seed: int) -> dict:
    from memcli.eval import editing as ed

    forms = ed.load_forms("builtin")
    facts = ed.bank_facts(run.bank, forms, seed, ed.held_out_uuids(data))[:n]  # held-out facts first
    out = {}
    for form, label in (("own words", "efficacy"), ("held-out template", "paraphrase"), ("question", "question")):
        out[label] = [c for i, f in enumerate(facts) if (c := ed.case(run.tok, run.bank, forms, f, form, 0, i)) is not None]
    out["outside bank"] = [c for f in ed.outside_facts(run.bank, forms, "builtin", n, seed)
                           if (c := ed.case(run.tok, run.bank, forms, f, "own words", 0)) is not None]
    return out


def best_cosine(mem, cases) -> list[float]:
    import torch

    from memcli.backbone import left_pad

    out = []
    with torch.no_grad():
        for s in range(0, len(cases), 64):
            ids, att = left_pad([c.prompt for c in cases[s: s + 64]], mem.cfg.pad_id)
            out += mem.retrieve(mem.prompt_features(ids, att))["scores"][:, 0].float().tolist()
    return out


def sweep(path: Path, data: Path | None, n: int, seed: int) -> list[dict]:
    from memcli.eval import editing as ed
    from memcli.runs import load_run

    run = load_run(path)
    mem = run.model.eval()
    mem.cfg.abstain_below = None
    rows = []
    for label, cases in groups(run, data, n, seed).items():
        cos = best_cosine(mem, cases)
        on = [ed.right(c, p) for c, p in zip(cases, ed.predict(mem, run.tok, cases, "memory", desc=f"{label}: on"))]
        off = [ed.right(c, p) for c, p in zip(cases, ed.predict(mem, run.tok, cases, "off", desc=f"{label}: off"))]
        for t in THRESHOLDS:
            read = [t is None or x >= t for x in cos]
            pick = [a if r else b for a, b, r in zip(on, off, read)]
            rows.append({"questions": label, "n": len(cases), "abstain_below": t, "read": sum(read) / len(read),
                         "ranked": sum(p[0] for p in pick) / len(pick), "generated": sum(p[1] for p in pick) / len(pick)})
        rows.append({"questions": label, "n": len(cases), "abstain_below": "off", "read": 0.0,
                     "ranked": sum(p[0] for p in off) / len(off), "generated": sum(p[1] for p in off) / len(off),
                     "cosine_mean": sum(cos) / len(cos)})
    return rows


def markdown(rows: list[dict]) -> str:
    labels = list(dict.fromkeys(r["questions"] for r in rows))
    cols = [str(t) for t in THRESHOLDS[1:]]
    md = "| questions | always read | " + " | ".join(f"C = {c}" for c in cols) + " | memory off |\n"
    md += "|---" * (len(cols) + 3) + "|\n"
    for lab in labels:
        cells = {str(r["abstain_below"]): r for r in rows if r["questions"] == lab}
        fmt = lambda r: f"{r['ranked']:.0%} / {r['generated']:.0%} ({r['read']:.0%} read)"  # noqa: E731
        md += f"| {lab} ({cells['None']['n']}) | " + " | ".join(fmt(cells[k]) for k in ["None", *cols, "off"]) + " |\n"
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--data", type=Path, default=None, help="the run's data directory (its held-out facts first)")
    ap.add_argument("--num-samples", type=int, default=100)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--markdown", type=Path, default=None)
    a = ap.parse_args()
    rows = sweep(a.run, a.data, a.num_samples, a.seed)
    for r in rows:
        print(json.dumps(r), flush=True)
    md = markdown(rows)
    if a.markdown:
        a.markdown.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
