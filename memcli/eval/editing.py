"""``memcli compare editing``: the knowledge-editing table of one explicit-memory run.

Edits rewrite a fact's object to another object of its relation (its entry's sentence with the new
object). They are written into the loaded run's bank one after another, in a fixed order, with the code of
``memcli memory replace`` (the run directory is not changed), and after T = 1, 10, 100, ... edits
everything is scored:

- **efficacy**: an edited fact asked in its entry's own words (the sentence cut before its object);
- **generalisation**: the same fact asked with a held-out LPAQA paraphrase of its relation (never used
  in training, ``memcli.data.forms``) and as a natural question in the chat template;
- **locality, neighbours**: facts of the edited relations whose entries were not edited: the share whose
  answer is the one given before any edit;
- **locality, outside the bank**: T-REx facts that are not in the bank (no entry with their subject and
  relation) which the model answers with memory off: the share still answered with memory on.

Each is scored two ways: the five options ranked by log-likelihood (the gold or edited object against
four other objects of the relation), and greedy generation after normalisation (case, punctuation and
articles ignored): a cloze's continuation must start with the object and end there or at a word boundary
(exact match); a question's answer must state the object in its first line (an instruct model restates
the question: "Basim was born in Cairo."; PopQA's criterion). Beside the memory's figure: the same question with the (edited) sentence written in the
prompt where the memory would put it, memory off (the ceiling of reading it), and memory off alone.

Writes are independent of each other (no training, each row's features depend on its own text only), so
the bank after T sequential writes equals the bank after writing them at once; order: the run's held-out
facts (``omcq_val.json`` of ``--data``) first, then the others, each shuffled with ``seed``.
"""

from __future__ import annotations

import json
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli.backbone import left_pad
from memcli.console import progress
from memcli.data.bank import tokenize_entries
from memcli.data.forms import Forms, cloze_prefix, load_forms
from memcli.data.knowledge import object_pools, trex_dir, usable
from memcli.errors import MemcliError
from memcli.eval.explicit import _retrieved_rows, option_logprobs
from memcli.explicit import store
from memcli.explicit.io import separator_ids
from memcli.explicit.items import answer_ids, cloze_ids, prompt_ids

FORMS = ("own words", "held-out template", "question")
MODES = ("memory", "in prompt", "off")
SHORT = {"memory": "mem", "in prompt": "ctx", "off": "off"}
MEASURES = {  # row label -> what it is (README and --help say the same)
    "efficacy": "edited fact, its entry's own words",
    "paraphrase": "edited fact, a held-out LPAQA template (generalisation)",
    "question": "edited fact, a natural question in the chat template (generalisation)",
    "neighbours": "unedited facts of edited relations: answer unchanged (locality)",
    "outside bank": "facts not in the bank: right answers (locality; memory on vs off)",
}
SCORINGS = ("rank", "gen")
N_OPTIONS = 5
QUESTION_ROOM = 16  # tokens beyond the answer a chat answer may take to state it


@dataclass
class Fact:
    row: int | None  # bank row (None: a fact outside the bank)
    subject: str
    predicate: str
    sentence: str
    options: list[str]  # the gold object first
    new: int = 1  # the option an edit rewrites the object to

    def with_object(self, k: int) -> str:
        gold = self.options[0]
        at = self.sentence.rfind(gold)
        return self.sentence[:at] + self.options[k] + self.sentence[at + len(gold):]


@dataclass
class Case:
    fact: Fact
    form: str
    prompt: list[int]
    answers: list[list[int]]  # per option
    target: int  # the option that counts as right
    context: list[int] = field(default_factory=list)  # the sentence the "in prompt" mode writes before the prompt


def normalise(text: str) -> str:
    """Lower case, punctuation as spaces, no articles, single spaces (SQuAD-style)."""
    text = re.sub(r"[^\w\s]", " ", text.lower())
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def exact_match(generated: str, answer: str) -> bool:
    """The generated text starts with ``answer`` and ends there or at a word boundary (both normalised)."""
    g, a = normalise(generated), normalise(answer)
    return bool(a) and (g == a or g.startswith(a + " "))


def answer_match(generated: str, answer: str) -> bool:
    """A chat answer's first line holds ``answer`` as whole words (normalised): an instruct model restates the
    question ("Basim was born in Cairo."), so the object need not come first (PopQA's criterion)."""
    a = normalise(answer)
    return bool(a) and f" {a} " in f" {normalise(generated.strip().split(chr(10))[0])} "


# --------------------------------------------------------------------------- the facts and their questions

def _fact(row, e: dict, pool: list[str], rng: random.Random) -> Fact | None:
    others = [o for o in pool if o != e["object"] and o not in e["sentence"]]
    if len(others) < N_OPTIONS - 1:
        return None
    return Fact(row, e["subject"], e["predicate"], e["sentence"], [e["object"], *rng.sample(others, N_OPTIONS - 1)])


def bank_facts(bank, forms: dict[str, Forms], seed: int, first: set[str] = frozenset()) -> list[Fact]:
    """Every bank entry that can be asked and edited (subject, object and a relation with forms), in edit order:
    entries whose uuid is in ``first`` (the held-out facts), then the rest, each shuffled with ``seed``."""
    rng = random.Random(seed)
    pools = object_pools([{"target": [e]} for e in bank.entries])
    out = []
    for row, e in enumerate(bank.entries):
        if not (e.get("uuid") and e.get("subject") and e.get("object") and e.get("predicate") in forms):
            continue
        at = e["sentence"].rfind(e["object"])
        if at <= 0 or e["subject"] not in e["sentence"][:at]:
            continue
        f = _fact(row, e, pools[e["predicate"]], rng)
        if f is not None:
            out.append((e["uuid"] not in first, f))
    order = list(range(len(out)))
    rng.shuffle(order)
    return [out[i][1] for i in sorted(order, key=lambda i: out[i][0])]


def outside_facts(bank, forms: dict[str, Forms], trex: str | Path, n: int, seed: int) -> list[Fact]:
    """Up to ``n`` T-REx facts whose (subject, relation) no bank entry holds, asked in their relation's canonical
    words; options from the relation's objects in the T-REx directory."""
    d = trex_dir(trex)
    held = {(e.get("subject"), e.get("predicate")) for e in bank.entries if e.get("uuid")}
    rng = random.Random(seed + 1)
    cand, pools = [], {}
    for p in sorted((d / "triples").glob("P*.jsonl")):
        if p.stem not in forms:
            continue
        rows = [json.loads(x) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()]
        pools[p.stem] = sorted({r["obj_label"] for r in rows})
        canon = forms[p.stem].canonical
        cand += [dict(subject=r["sub_label"], predicate=p.stem, object=r["obj_label"],
                      sentence=canon.replace("[X]", r["sub_label"]).replace("[Y]", r["obj_label"]))
                 for r in rows if usable(r["sub_label"], r["obj_label"]) and (r["sub_label"], p.stem) not in held
                 and cloze_prefix(canon, r["sub_label"]) is not None]
    rng.shuffle(cand)
    out = []
    for e in cand:
        f = _fact(None, e, pools[e["predicate"]], rng)
        if f is not None:
            out.append(f)
        if len(out) == n:
            break
    return out


def case(tok, bank, forms: dict[str, Forms], f: Fact, form: str, target: int, index: int = 0) -> Case | None:
    """``f`` asked in ``form`` with option ``target`` counted right (0: the fact, ``f.new``: its edit)."""
    fm = forms[f.predicate]
    if form == "question":
        if not fm.question:
            return None
        prompt = prompt_ids(tok, fm.question.replace("[X]", f.subject))
        answers = [answer_ids(tok, o) for o in f.options]
    else:
        if form == "own words":
            text = f.sentence[: f.sentence.rfind(f.options[0])].rstrip()
        elif fm.heldout:
            text = cloze_prefix(fm.heldout[index % len(fm.heldout)], f.subject)
        else:
            return None
        pairs = [cloze_ids(tok, text, o) for o in f.options]
        prompt, answers = pairs[0][0], [a for _, a in pairs]
    ctx = tokenize_entries(tok, [f.with_object(target)], bank.knowledge_length, bank.pad_id)[0][0].tolist()
    return Case(f, form, prompt, answers, target, [t for t in ctx if t != bank.pad_id])


# --------------------------------------------------------------------------- scoring

@torch.no_grad()
def predict(mem, tok, cases: list[Case], mode: str, chunk: int = 32, desc: str = "") -> list[tuple[int, str]]:
    """(ranked option, greedy text) per case; ``mode``: memory on, fact ``in prompt`` (memory off), or ``off``."""
    if mode not in MODES:
        raise MemcliError(f"mode '{mode}': expected one of {', '.join(MODES)}")
    was = mem.memory_enabled
    mem.memory_enabled = mode == "memory"
    sep = separator_ids(tok)
    pad = mem.cfg.pad_id
    dev = mem.bank.device
    out: list[tuple[int, str]] = []
    try:
        with progress() as bar:
            task = bar.add_task(desc or mode, total=len(cases))
            for s in range(0, len(cases), chunk):
                part = cases[s: s + chunk]
                prompts = [c.context + sep + c.prompt if mode == "in prompt" else c.prompt for c in part]
                rows = _retrieved_rows(mem, prompts) if (mode == "memory" and mem.cfg.read == "prefix") else None
                lps = option_logprobs(mem, prompts, [c.answers for c in part], rows)
                ids, att = left_pad(prompts, pad)
                new = max(budget(c) for c in part)
                gen = mem.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), rows=rows, max_new_tokens=new,
                                   do_sample=False, pad_token_id=pad)[:, ids.shape[1]:]
                # each case's answer is cut at its own budget, so it does not depend on what it was batched with
                texts = tok.batch_decode([g[: budget(c)] for g, c in zip(gen, part)],
                                         skip_special_tokens=True)
                out += [(int(lp.argmax()), t) for lp, t in zip(lps, texts)]
                bar.advance(task, len(part))
    finally:
        mem.memory_enabled = was
    return out


def budget(c: Case) -> int:
    """Tokens generated for ``c``: its longest option and one more (a cloze), room for a sentence (a question)."""
    return max(len(a) for a in c.answers) + (QUESTION_ROOM if c.form == "question" else 1)


def right(c: Case, pred: tuple[int, str]) -> tuple[bool, bool]:
    """(ranked right, generated right) of a prediction for ``c``: a cloze's continuation must start with the object
    (``exact_match``), a question's answer must state it (``answer_match``)."""
    gold = c.fact.options[c.target]
    return pred[0] == c.target, (answer_match if c.form == "question" else exact_match)(pred[1], gold)


def share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


# --------------------------------------------------------------------------- the table

def _key(mode: str, c: Case) -> tuple:
    return mode, c.fact.row if c.fact.row is not None else c.fact.subject, c.fact.predicate, c.form, c.target


@dataclass
class Editing:
    """One ``compare editing`` run: the loaded model, and the predictions that do not change with edits."""
    mem: object
    tok: object
    cache: dict = field(default_factory=dict)  # _key -> prediction (modes without memory, and memory before edits)
    answers: list = field(default_factory=list)  # one record per case and mode, for --answers

    def predictions(self, cases: list[Case], mode: str, label: str, T: int, cached: bool) -> list[tuple[int, str]]:
        if not cached:
            preds = predict(self.mem, self.tok, cases, mode, desc=f"T={T} {label} ({mode})")
        else:
            todo = [c for c in cases if _key(mode, c) not in self.cache]
            for c, p in zip(todo, predict(self.mem, self.tok, todo, mode, desc=f"{label} ({mode})")):
                self.cache[_key(mode, c)] = p
            preds = [self.cache[_key(mode, c)] for c in cases]
        for c, p in zip(cases, preds):
            self.answers.append({"T": T, "measure": label, "mode": mode, "subject": c.fact.subject,
                                 "relation": c.fact.predicate, "prompt": self.tok.decode(c.prompt, skip_special_tokens=True),
                                 "answer": c.fact.options[c.target], "ranked": c.fact.options[p[0]], "generated": p[1],
                                 "rank_right": right(c, p)[0], "gen_right": right(c, p)[1]})
        return preds

    def row(self, label: str, cases: list[Case], T: int, modes=MODES) -> dict:
        """Both scorings in ``modes`` for ``cases``: memory scored now, the other modes once per case."""
        res = {"T": T, "measure": label, "n": len(cases)}
        for mode in MODES:
            flags = ([right(c, p) for c, p in zip(cases, self.predictions(cases, mode, label, T, mode != "memory"))]
                     if mode in modes and cases else [])
            for k, s in enumerate(SCORINGS):
                res[f"{s}: {mode}"] = share([f[k] for f in flags])
        return res

    def unchanged(self, cases: list[Case], T: int) -> dict:
        """Locality among neighbours: the share of answers (memory on) equal to those before any edit."""
        label = "neighbours"
        before = [self.cache[_key("before", c)] for c in cases]
        after = self.predictions(cases, "memory", label, T, False)
        res = {"T": T, "measure": label, "n": len(cases)}
        for mode in MODES:
            for s in SCORINGS:
                res[f"{s}: {mode}"] = None
        res["rank: memory"] = share([a[0] == b[0] for a, b in zip(after, before)])
        res["gen: memory"] = share([normalise(a[1]) == normalise(b[1]) for a, b in zip(after, before)])
        return res


def _sample(items: list, n: int | None, seed: int) -> list:
    if n is None or len(items) <= n:
        return list(items)
    return random.Random(seed).sample(items, n)


def _neighbours(facts: list[Fact], T: int, n: int | None, seed: int) -> list[Fact]:
    """Facts not edited after T writes, of a relation some edit touched."""
    rels = {f.predicate for f in facts[:T]}
    return _sample([f for f in facts[T:] if f.predicate in rels], n, seed + T)


def _edit(mem, bank, tok, facts: list[Fact]) -> None:
    entries = []
    for f in facts:
        e = dict(bank.entries[f.row])
        e.pop("row", None)
        entries.append(dict(e, sentence=f.with_object(f.new), object=f.options[f.new]))
    if entries:
        store.replace_entries(mem, bank, tok, entries)


def held_out_uuids(data: Path | None) -> set[str]:
    p = Path(data) / "omcq_val.json" if data else None
    if p is None or not p.is_file():
        return set()
    from memcli.records import OMCQ, read_json_list

    return {q["target"][0].get("uuid") for q in read_json_list(p, OMCQ)}


def compare_editing(path: Path, data: Path | None = None, edits: tuple[int, ...] = (1, 10, 100, 1000),
                    num_samples: int | None = 200, trex: str | Path = "builtin", seed: int = 0,
                    abstain_below: float | None = None, lexical_weight: float | None = None) -> dict:
    """The editing table of the run at ``path`` (see the module docstring); returns rows, counts and timing."""
    from memcli import kinds
    from memcli.rundir import require_kind
    from memcli.runs import load_run

    require_kind(path, kinds.EXPLICIT)
    t0 = time.perf_counter()
    run = load_run(path)
    mem, tok, bank = run.model, run.tok, run.bank
    mem.eval()
    if abstain_below is not None:  # measure a threshold without retraining (it only changes which rows are read)
        c = mem.cfg
        if not (c.read == "prefix" and c.query == "mean" and c.entry_key == "hidden" and -1 <= abstain_below <= 1):
            raise MemcliError(f"--abstain-below {abstain_below}: expected a cosine in [-1, 1] for a run with read=prefix, "
                              f"query=mean, entry_key=hidden ({path} has read={c.read}, query={c.query}, "
                              f"entry_key={c.entry_key})")
        c.abstain_below = abstain_below
    if lexical_weight is not None:  # likewise: the words only re-order the candidates
        if not (mem.cfg.read == "prefix" and lexical_weight >= 0):
            raise MemcliError(f"--lexical-weight {lexical_weight}: expected a weight >= 0 for a run with read=prefix "
                              f"({path} has read={mem.cfg.read})")
        mem.cfg.lexical_weight = lexical_weight
    forms = load_forms(trex)
    facts = bank_facts(bank, forms, seed, held_out_uuids(data))
    if not edits or min(edits) < 1 or max(edits) > len(facts):
        raise MemcliError(f"--edits {','.join(map(str, edits))}: expected counts from 1 to {len(facts)}, the facts of "
                          f"{path}'s bank that can be edited (a subject, an object and a relation with templates)")
    ed = Editing(mem, tok)
    outside = [c for f in outside_facts(bank, forms, trex, num_samples or 200, seed)
               if (c := case(tok, bank, forms, f, "own words", 0)) is not None]
    neigh = {T: [case(tok, bank, forms, f, "own words", 0) for f in _neighbours(facts, T, num_samples, seed)]
             for T in edits}
    todo = {}
    for cs in neigh.values():
        for c in cs:
            todo.setdefault(_key("before", c), c)
    for c, p in zip(todo.values(), predict(mem, tok, list(todo.values()), "memory", desc="neighbours before any edit")):
        ed.cache[_key("before", c)] = p
    rows, written = [], 0
    for T in sorted(set(edits)):
        _edit(mem, bank, tok, facts[written:T])
        written = T
        scored = _sample(facts[:T], num_samples, seed + T)
        for form, label in (("own words", "efficacy"), ("held-out template", "paraphrase"), ("question", "question")):
            cases = [c for i, f in enumerate(scored) if (c := case(tok, bank, forms, f, form, f.new, i)) is not None]
            rows.append(ed.row(label, cases, T))
        rows.append(ed.unchanged(neigh[T], T))
        rows.append(ed.row("outside bank", outside, T))
    return {"run": str(path), "data": str(data) if data else None, "edits": sorted(set(edits)), "facts": len(facts),
            "bank": bank.knowledge_num, "num_samples": num_samples, "seed": seed, "abstain_below": mem.cfg.abstain_below,
            "lexical_weight": mem.cfg.lexical_weight,
            "order": "held-out facts first, then the others, each shuffled with the seed; scored after T writes",
            "rows": rows, "seconds": round(time.perf_counter() - t0, 1), "answers": ed.answers}
