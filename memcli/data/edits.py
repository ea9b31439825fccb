"""``memcli gen-data edits``: edit sets in the field's standard records, made from T-REx facts and memcli's questions.

Each edit rewrites a fact no bank entry holds (its subject is in no excluded knowledge base) to another object of
its relation, so no model can know the new answer. ZsRE records ask the relation's trained natural question
(``src``), one of its held-out wordings (``rephrase``) and, for locality, the natural question of another fact that
is neither edited nor in the bank (``loc``, ``loc_ans``). CounterFact records carry the relation's canonical template
as the rewrite prompt, its held-out templates as paraphrases, and other subjects with the same relation and true
object as the neighbourhood. No locality question or neighbourhood prompt names the subject of an edit of the
same file (its answer should change with the file). An edit whose entry would not fit the excluded bank's entries
(its cache's tokenizer and ``knowledge_length``) is skipped, so the file can be added whole to a run of that bank.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from memcli.data.forms import cloze_prefix, load_forms
from memcli.data.knowledge import trex_dir, usable
from memcli.errors import MemcliError
from memcli.records import atomic_write_text, read_json_list

FORMATS = ("zsre", "counterfact")


def _triples(trex) -> dict[str, list[dict]]:
    d = trex_dir(trex)
    out = {}
    for p in sorted((d / "triples").glob("P*.jsonl")):
        rows = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        out[p.stem] = [r for r in rows if usable(r["sub_label"], r["obj_label"])]
    return out


def _excluded(paths: list[Path]) -> set[str]:
    """Subjects of the knowledge bases in ``paths`` (a data directory or its sentence_trex_data.json)."""
    from memcli.records import KNOWLEDGE

    out = set()
    for p in paths:
        f = Path(p) / "sentence_trex_data.json" if Path(p).is_dir() else Path(p)
        out |= {it["target"][0].get("subject") for it in read_json_list(f, KNOWLEDGE)}
    return out


def _fits(exclude: list[Path]):
    """Whether an entry text fits the excluded bank's entries (its cache's tokenizer and knowledge_length), so that
    the edits can be added to a run of that bank; None when no excluded directory holds a cache."""
    for p in exclude:
        meta = Path(p) / "cache" / "meta.json"
        if meta.is_file():
            from memcli.backbone import load_tokenizer

            m = json.loads(meta.read_text(encoding="utf-8"))
            tok, L = load_tokenizer(m["tokenizer"]), int(m["knowledge_length"])
            return lambda text: len(tok(text, add_special_tokens=False)["input_ids"]) <= L
    return None


def _away_from_edits(records: list[dict], locs, used: set, forms) -> None:
    """A locality question or neighbourhood prompt that names the subject of any edit of the file (one chosen after
    it, or a longer name holding it) is about an edited fact, not unrelated: a ZsRE record takes the next unrelated
    question instead (or is dropped when none is left), a CounterFact record keeps its other neighbours."""
    from memcli.retrieval.lexical import namer

    touched = namer(sorted({r.get("subject") or r["requested_rewrite"]["subject"] for r in records}))
    for r in list(records):
        if "requested_rewrite" in r:
            r["neighborhood_prompts"] = [p for p in r["neighborhood_prompts"] if not touched(p)]
        elif touched(r["loc"]):
            for lp, lr in locs:
                q = forms[lp].question.replace("[X]", lr["sub_label"])
                if lr["sub_label"] not in used and not touched(q):
                    used.add(lr["sub_label"])
                    r["loc"], r["loc_ans"] = q, lr["obj_label"]
                    break
            else:
                records.remove(r)


def make_edits(out: str | Path, fmt: str = "zsre", n: int = 200, seed: int = 0, trex: str | Path = "builtin",
               exclude: list[Path] = ()) -> dict:
    if fmt not in FORMATS:
        raise MemcliError(f"--format '{fmt}': expected one of {', '.join(FORMATS)}")
    if n < 1:
        raise MemcliError(f"-n got {n}, expected a positive integer")
    forms = load_forms(trex)
    taken = _excluded(list(exclude))
    fits = _fits(list(exclude)) or (lambda text: True)
    rng = random.Random(seed)
    rels = {}
    for pid, rows in _triples(trex).items():
        fm = forms.get(pid)
        ok = fm and (fm.question and fm.heldout_questions if fmt == "zsre" else cloze_prefix(fm.canonical, "X"))
        objects = sorted({r["obj_label"] for r in rows})
        if ok and len(objects) > 1:
            rels[pid] = ([r for r in rows if r["sub_label"] not in taken], objects)
    pool = [(pid, r) for pid, (rows, _) in sorted(rels.items()) for r in rows]
    rng.shuffle(pool)
    used, records = set(taken), []
    locs = iter(pool[::-1])  # locality questions come from the other end of the same shuffled pool
    for pid, r in pool:
        if len(records) == n:
            break
        s, true = r["sub_label"], r["obj_label"]
        if s in used:
            continue
        others = [o for o in rels[pid][1] if o != true and o not in s and s not in o]
        if not others:
            continue
        new = rng.choice(others)
        fm = forms[pid]
        entry = f"{fm.question.replace('[X]', s)} {new} ." if fmt == "zsre" else \
            f"{cloze_prefix(fm.canonical, s)} {new} ."
        if not fits(entry):  # an edit is one entry of the bank it is meant for
            continue
        if fmt == "zsre":
            loc = next(((lp, lr) for lp, lr in locs if lr["sub_label"] not in used and lr["sub_label"] != s), None)
            if loc is None:
                break
            lp, lr = loc
            used |= {s, lr["sub_label"]}
            records.append({"subject": s, "src": fm.question.replace("[X]", s), "alt": new, "answers": [true],
                            "rephrase": rng.choice(fm.heldout_questions).replace("[X]", s),
                            "loc": forms[lp].question.replace("[X]", lr["sub_label"]), "loc_ans": lr["obj_label"]})
        else:
            used.add(s)
            para = [cloze_prefix(t, s) for t in fm.heldout]
            near = [x["sub_label"] for x in rels[pid][0] if x["obj_label"] == true and x["sub_label"] not in used][:5]
            records.append({"case_id": len(records), "requested_rewrite": {
                "prompt": cloze_prefix(fm.canonical, "{}"), "subject": s, "relation_id": pid,
                "target_new": {"str": new}, "target_true": {"str": true}},
                "paraphrase_prompts": [p for p in para if p][:2],
                "neighborhood_prompts": [cloze_prefix(fm.canonical, x) for x in near]})
    _away_from_edits(records, locs, used, forms)
    if len(records) < n:
        raise MemcliError(f"{trex_dir(trex)}: only {len(records)} edits can be made ({n} asked): too few facts outside "
                          "the excluded knowledge bases")
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    return {"edits": len(records), "format": fmt, "out": str(out), "excluded_subjects": len(taken)}
