"""Which placement of a retrieved entry a chat model reads best (README "The read where the model reads").

For the held-out facts of a run (only in its bank, never asked in training), each asked as a natural question in the
trained wording and in two held-out wordings: the answer with the fact's sentence written into the prompt at each
placement (memory off: the model's ceiling there), with memory on at each placement, and with memory off. Ranked
(five options) and generated (the first line states the object). Nothing is edited.

    python experiments/placement_probe.py out/real data/smollm2-135m [--num 205]     # about 25 min on 2 cores
"""

import argparse
import json

from memcli.data.forms import load_forms
from memcli.eval.editing import bank_facts, case, held_out_uuids, predict, right
from memcli.retrieval.placement import PLACEMENTS
from memcli.runs import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("data")
    ap.add_argument("--num", type=int, default=None)
    ap.add_argument("--placements", default=",".join(PLACEMENTS))
    args = ap.parse_args()
    run = load_run(args.run)
    mem, tok, bank = run.model, run.tok, run.bank
    mem.eval()
    forms = load_forms()
    held = held_out_uuids(args.data)
    facts = [f for f in bank_facts(bank, forms, 0, held) if bank.entries[f.row]["uuid"] in held][: args.num]
    out = {"run": args.run, "facts": len(facts)}
    for form in ("question", "held-out question"):
        cases = [c for i, f in enumerate(facts) if (c := case(tok, bank, forms, f, form, 0, i)) is not None]
        off = [right(c, p) for c, p in zip(cases, predict(mem, tok, cases, "off", desc=f"{form} off"))]
        res = {"n": len(cases), "off": [sum(x[k] for x in off) / len(cases) for k in (0, 1)]}
        for placement in args.placements.split(","):
            mem.cfg.placement = placement
            for mode in ("in prompt", "memory"):
                preds = predict(mem, tok, cases, mode, desc=f"{form} {mode} {placement}")
                flags = [right(c, p) for c, p in zip(cases, preds)]
                res[f"{mode}: {placement}"] = [sum(x[k] for x in flags) / len(cases) for k in (0, 1)]
            print(form, placement, {k: v for k, v in res.items() if placement in k}, flush=True)
        out[form] = res
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
