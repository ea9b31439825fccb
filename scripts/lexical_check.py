"""``model.lexical_weight`` on a trained run, without and with, on the same edited facts (README "Words as well as
states"): T edits written into the bank as ``memcli compare editing`` writes them, then for 100 of the edited facts
asked in the entry's own words, with a held-out template and as a question: router recall@1 of the edited entry
and the ranked / generated answers, memory on with weight 0 and W, beside the in-prompt ceiling.

    python scripts/lexical_check.py RUN T SEED [--weight 1.0] [--num-samples 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path


def check(path: Path, T: int, seed: int, weight: float, n: int) -> list[str]:
    import torch

    from memcli.backbone import left_pad
    from memcli.eval import editing as ed
    from memcli.runs import load_run

    run = load_run(path)
    mem, tok, bank = run.model.eval(), run.tok, run.bank
    forms = ed.load_forms("builtin")
    facts = ed.bank_facts(bank, forms, seed, ed.held_out_uuids(None))
    ed._edit(mem, bank, tok, facts[:T])
    scored = ed._sample(facts[:T], n, seed + T)
    lines = []
    for form in ("own words", "held-out template", "question"):
        cases = [c for i, f in enumerate(scored) if (c := ed.case(tok, bank, forms, f, form, f.new, i)) is not None]
        ids, att = left_pad([c.prompt for c in cases], mem.cfg.pad_id)
        rows = torch.tensor([c.fact.row for c in cases])
        out = [form, str(len(cases))]
        for w in (0.0, weight):
            mem.cfg.lexical_weight = w
            with torch.no_grad():
                rec = mem.retrieve(mem.prompt_features(ids, att), ids, att)
            pr = [ed.right(c, p) for c, p in zip(cases, ed.predict(mem, tok, cases, "memory"))]
            out.append(f"w={w}: recall@1 {(rec['cells'][:, 0] == rows).float().mean():.2f} "
                       f"ranked {sum(a for a, _ in pr) / len(pr):.2f} generated {sum(b for _, b in pr) / len(pr):.2f}")
        ctx = [ed.right(c, p) for c, p in zip(cases, ed.predict(mem, tok, cases, "in prompt"))]
        out.append(f"ceiling ranked {sum(a for a, _ in ctx) / len(ctx):.2f} generated {sum(b for _, b in ctx) / len(ctx):.2f}")
        lines.append(" | ".join(out))
        print(lines[-1], flush=True)
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("edits", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--num-samples", type=int, default=100)
    a = ap.parse_args()
    check(a.run, a.edits, a.seed, a.weight, a.num_samples)


if __name__ == "__main__":
    main()
