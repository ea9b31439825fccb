"""Which retrieval reads the right entry, and reads nothing when no entry is about the question
(README "One retrieval core" and "Locality"). Retrieval only: no answer is generated.

For a trained run: its held-out facts asked four ways (the entry's own words, a held-out template, the trained
natural question, a held-out wording), facts no entry holds asked as natural questions ("unrelated"), and after
question-answer edits are added to the bank (``gen-data edits``, ZsRE records) their rephrased questions and their
unrelated questions (an outside fact whose subject an edit now holds is left out after the edits, and counted).
For each setting (the router alone; fused with BM25 and a sentence encoder at some weights; plain RAG over
MiniLM / BM25 / both; anchored abstention at some document frequencies): recall@1 of the right entry, and the
share of questions that read an entry at all.

    python experiments/retrieval_sweep.py out/real data/smollm2-135m EDITS.jsonl [--num 205] [--rule word]
    # minutes on 2 cores; --rule: the anchor rule the anchored columns use (the run's default: subject)
"""

import argparse
import itertools
import json

import torch

from memcli.backbone import left_pad
from memcli.data.forms import load_forms
from memcli.eval.edit_file import build, read_edits
from memcli.eval.editing import bank_facts, case, held_out_uuids, outside_facts
from memcli.runs import load_run

SETTINGS = {
    "router": dict(router=1.0, dense=0.0, lexical=0.0),
    "router+bm25 0.5": dict(router=1.0, dense=0.0, lexical=0.5),
    "router+bm25 1": dict(router=1.0, dense=0.0, lexical=1.0),
    "router+minilm 1": dict(router=1.0, dense=1.0, lexical=0.0),
    "router+minilm 1+bm25 1": dict(router=1.0, dense=1.0, lexical=1.0),
    "router+minilm 0.5+bm25 0.5": dict(router=1.0, dense=0.5, lexical=0.5),
    "router+minilm 2+bm25 1": dict(router=1.0, dense=2.0, lexical=1.0),
    "rag minilm": dict(router=0.0, dense=1.0, lexical=0.0),
    "rag bm25": dict(router=0.0, dense=0.0, lexical=1.0),
    "rag hybrid": dict(router=0.0, dense=1.0, lexical=1.0),
}


@torch.no_grad()
def measure(mem, sets: dict, setting: dict, anchors, rule: str) -> dict:
    out = {}
    for name, (prompts, rows, feats) in sets.items():
        ids, att = left_pad(prompts, mem.cfg.pad_id)
        for anchor in anchors:
            with mem.retrieval_setting(**setting, anchor_df=anchor, abstain_below=None, anchor=rule):
                chosen = mem.chosen_rows(mem.retrieve(feats, ids, att))[:, 0]
            key = f"{name} (anchor {anchor})" if anchor else name
            out[key] = {"read": float((chosen >= 0).float().mean())}
            if rows is not None:
                out[key]["recall@1"] = float((chosen == torch.tensor(rows)).float().mean())
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("data")
    ap.add_argument("edits")
    ap.add_argument("--num", type=int, default=205)
    ap.add_argument("--trex", default="builtin")
    ap.add_argument("--encoder", default="minilm")
    ap.add_argument("--anchors", default="0,1,2,3,5,10")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--rule", choices=("subject", "word"), default="subject",
                    help="the anchor rule (model.anchor): the question names the entry's subject, or a rare word")
    args = ap.parse_args()
    anchors = [int(a) or None for a in args.anchors.split(",")]
    run = load_run(args.run)
    mem, tok, bank = run.model, run.tok, run.bank
    mem.eval()
    mem.cfg.encoder = args.encoder
    forms = load_forms(args.trex)
    held = held_out_uuids(args.data)
    facts = [f for f in bank_facts(bank, forms, 0, held) if bank.entries[f.row]["uuid"] in held][: args.num]

    def prepared(cases, rows):
        prompts = [c.prompt for c in cases]
        ids, att = left_pad(prompts, mem.cfg.pad_id)
        return prompts, rows, mem.prompt_features(ids, att)

    sets = {}
    for form in ("own words", "held-out template", "question", "held-out question"):
        cs = [(c, f.row) for i, f in enumerate(facts) if (c := case(tok, bank, forms, f, form, 0, i)) is not None]
        sets[form] = prepared([c for c, _ in cs], [r for _, r in cs])
    away = outside_facts(bank, forms, args.trex, args.num, 0)
    cs = [c for i, f in enumerate(away) if (c := case(tok, bank, forms, f, "held-out question", 0, i)) is not None]
    sets["unrelated question"] = prepared(cs, None)
    cs = [c for f in away if (c := case(tok, bank, forms, f, "own words", 0)) is not None]
    sets["unrelated cloze"] = prepared(cs, None)
    results = {"before the edits": {}}
    names = args.settings.split(",")
    for s in names:
        results["before the edits"][s] = measure(mem, sets, SETTINGS[s], anchors, args.rule)
        print(s, json.dumps(results["before the edits"][s]), flush=True)
    # question-answer edits added as entries (the memory add path), then their rephrasings and unrelated questions
    from memcli.data.facts import fact_uuid
    from memcli.explicit import store

    edits = [build(tok, w, r) for w, r in read_edits(args.edits)]
    entries = list({e.entry: {"uuid": fact_uuid(e.entry), "sentence": e.entry, "subject": e.subject, "predicate": None,
                              "object": None} for e in edits}.values())
    mem, bank, _ = store.add(mem, bank, tok, entries)
    mem.eval()
    row_of = bank.row_of_uuid()
    sets = {k: v for k, v in sets.items()}  # features of the same prompts do not change with the bank
    # an outside fact about a subject some edit now holds (another relation of it) is no longer unrelated: left out
    from memcli.retrieval.lexical import namer

    touched, about_edited = namer(sorted({e.subject for e in edits if e.subject})), {}
    for name in ("unrelated question", "unrelated cloze"):
        prompts, rows, feats = sets[name]
        keep = [i for i, p in enumerate(prompts) if not touched(tok.decode(p))]
        about_edited[name] = len(prompts) - len(keep)
        sets[name] = ([prompts[i] for i in keep], rows, feats[keep])
    gen = [(a, row_of[fact_uuid(e.entry)]) for e in edits for a in e.gen[:1]]
    sets["edit rephrased"] = prepared([a for a, _ in gen], [r for _, r in gen])
    sets["edit unrelated"] = prepared([a for e in edits for a in e.loc], None)
    results["after the edits"] = {}
    for s in names:
        results["after the edits"][s] = measure(mem, sets, SETTINGS[s], anchors, args.rule)
        print("after", s, json.dumps(results["after the edits"][s]), flush=True)
    print(json.dumps({"run": args.run, "rule": args.rule, "edits": len(edits), "unrelated_about_edited": about_edited, "facts": len(facts), **results}, indent=1))


if __name__ == "__main__":
    main()
