"""One LoCoMo table from the answers files of several ``memcli compare locomo --answers`` runs (e.g. the design
conversations 1-5 and the held-out 6-10, each sampled): token F1 per category with its standard error, BLEU-1,
the share of evidence turns in the prompt, and the paired difference between setups.

    python tools/locomo_table.py A.jsonl [B.jsonl ...] [--markdown FILE] [--by-setup]

Files of other questions add rows. Files that answer the same questions in other setups (a frozen backbone
and a trained HIPPO run, say) go side by side: ``FILE=LABEL`` names that file's setups ``LABEL:setup``, and a
question's row gathers its answers from every file.

    python tools/locomo_table.py frozen.jsonl hippo.jsonl=hippo-run
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop"}


def mean_se(v: list[float]) -> tuple[float, float]:
    mu = sum(v) / len(v)
    se = math.sqrt(sum((x - mu) ** 2 for x in v) / (len(v) - 1) / len(v)) if len(v) > 1 else 0.0
    return mu, se


def grid(rows: list[dict]) -> tuple[list[str], list[str], dict]:
    """(line names, setups, {(line, setup): cell}): F1 ± standard error per category, BLEU-1, evidence share."""
    setups = [k[:-3] for k in rows[0] if k.endswith("_f1")]
    groups = [(f"{n}", [r for r in rows if r["category"] == c]) for c, n in CATEGORIES.items()]
    scored = [r for r in rows if r["category"] in CATEGORIES]
    groups += [("**overall 1-4**", scored), ("adversarial (5)", [r for r in rows if r["category"] == 5])]
    lines, cell = [], {}
    for name, sub in groups:
        if sub:
            lines.append(f"{name} ({len(sub)})")
            for s in setups:
                m, e = mean_se([r[f"{s}_f1"] for r in sub])
                cell[lines[-1], s] = f"{m:.3f} ± {e:.3f}"
    lines += ["BLEU-1 overall 1-4", "evidence turns in the prompt"]
    for s in setups:
        cell[lines[-2], s] = f"{mean_se([r[f'{s}_bleu1'] for r in scored])[0]:.3f}"
        # questions without evidence turns have None
        cell[lines[-1], s] = f"{mean_se([v for r in scored if (v := r[f'{s}_evidence_in_prompt']) is not None])[0]:.3f}"
    return lines, setups, cell


def table(rows: list[dict], by_setup: bool = False) -> str:
    """Lines x setups (``by_setup``: setups x lines), then every paired difference over categories 1-4."""
    lines, setups, cell = grid(rows)
    if by_setup:
        head, body = ["setup", *lines], [[s, *(cell[x, s] for x in lines)] for s in setups]
    else:
        head, body = ["category (questions)", *setups], [[x, *(cell[x, s] for s in setups)] for x in lines]
    md = "| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|\n"
    md += "".join("| " + " | ".join(b) + " |\n" for b in body)
    scored = [r for r in rows if r["category"] in CATEGORIES]
    pairs = [(b, a) for i, a in enumerate(setups) for b in setups[i + 1:]]
    diff = "\n".join(f"- {a} - {b}, paired over the {len(scored)} questions: {m:+.3f} ± {e:.3f}" for a, b in pairs
                     for m, e in [mean_se([r[f"{a}_f1"] - r[f"{b}_f1"] for r in scored])])
    return md + "\nToken F1 ± standard error.\n\n" + diff + "\n"


QUESTION_KEYS = ("sample_id", "category", "question", "gold", "evidence")


def read_rows(spec: str) -> list[dict]:
    """The rows of ``PATH`` or ``PATH=LABEL`` (setup columns renamed ``LABEL:setup``)."""
    path, _, label = spec.partition("=")
    if not Path(path).is_file():
        raise SystemExit(f"{path}: no such answers file (memcli compare locomo --answers FILE writes one)")
    rows = [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    if label:
        rows = [{(k if k in QUESTION_KEYS else f"{label}:{k}"): v for k, v in r.items()} for r in rows]
    return rows


def gather(files: list[list[dict]]) -> list[dict]:
    """One row per question over every file, in first-seen order: a question answered in several files gets
    the setups of each (the same setup name twice is refused: label one file)."""
    out: dict[tuple, dict] = {}
    for rows in files:
        seen: dict[tuple, int] = {}  # a conversation may ask the same question twice: match them in order
        for r in rows:
            q = (r["sample_id"], r["category"], r["question"])
            seen[q] = seen.get(q, 0) + 1
            key = (*q, seen[q])
            row = out.setdefault(key, {})
            clash = [k for k in r if k.endswith("_f1") and k in row]
            if clash:
                raise SystemExit(f"setup '{clash[0][:-3]}' answers '{r['question']}' twice: label a file as FILE=LABEL")
            row.update(r)
    merged = list(out.values())
    setups = {k for r in merged for k in r if k.endswith("_f1")}
    partial = [r for r in merged if not setups <= set(r)]
    if partial:
        raise SystemExit(f"{len(partial)} questions lack some setup's answer (e.g. '{partial[0]['question']}'): "
                         "the files must answer the same questions")
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("answers", nargs="+", help="answers JSONL files; FILE=LABEL prefixes that file's setups")
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--by-setup", action="store_true", help="one line per setup (for many setups)")
    a = ap.parse_args()
    rows = gather([read_rows(spec) for spec in a.answers])
    md = f"{len({r['sample_id'] for r in rows})} conversations, {len(rows)} questions\n\n" + table(rows, a.by_setup)
    if a.markdown:
        a.markdown.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
