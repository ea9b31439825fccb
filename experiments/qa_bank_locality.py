"""Locality the other way round (README "Locality"): a bank of question-answer entries, cloze edits added to it.

The run's every entry that has a subject, an object and a relation with a natural question is rewritten in
question-answer form ("Where was Basim born? Cairo .", with ``memcli memory replace``'s code, in memory only), then
the CounterFact-format edits of EDITS are added with ``memcli memory add``'s code and scored as ``compare editing
--edits-file`` scores them: reliability, generalisation (paraphrase prompts) and locality (neighbourhood prompts,
other subjects of the same relation: answers unchanged from before the additions).

    python experiments/qa_bank_locality.py out/real data/edits/counterfact-1000.jsonl [--num 200] [--setups memory,off]
        [--anchor subject] [--json OUT]
"""

import argparse
import json

from memcli.data.forms import load_forms
from memcli.eval.edit_file import read_edits, score_edits
from memcli.explicit import store
from memcli.runs import load_run


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run")
    ap.add_argument("edits")
    ap.add_argument("--num", type=int, default=200)
    ap.add_argument("--setups", default="memory,rag minilm,rag bm25,rag hybrid,in prompt,off")
    ap.add_argument("--anchor", choices=("subject", "word"), default=None, help="model.anchor instead of the run's")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    raw = read_edits(args.edits)
    run = load_run(args.run)
    mem, tok, bank = run.model, run.tok, run.bank
    mem.eval()
    mem.cfg.anchor = args.anchor or mem.cfg.anchor
    forms = load_forms()
    qa = []
    for e in bank.entries:
        fm = forms.get(e.get("predicate") or "")
        if e.get("uuid") and e.get("subject") and e.get("object") and fm and fm.question:
            qa.append({k: v for k, v in e.items() if k != "row"} |
                      {"sentence": f"{fm.question.replace('[X]', e['subject'])} {e['object']} ."})
    store.replace_entries(mem, bank, tok, qa)
    res = score_edits(mem, tok, bank, raw, args.num, 0, tuple(s for s in args.setups.split(",") if s))
    res.pop("answers")
    res.update(run=args.run, edits_file=args.edits, rewritten_to_questions=len(qa), anchor=mem.cfg.anchor)
    text = json.dumps(res, indent=1)
    print(text)
    if args.json:
        open(args.json, "w").write(text)


if __name__ == "__main__":
    main()
