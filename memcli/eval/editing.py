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

import contextlib
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
from memcli.retrieval.placement import place

FORMS = ("own words", "held-out template", "question", "held-out question")
QUESTION_FORMS = ("question", "held-out question")  # asked in the chat template, scored by answer_match
# what a user would use instead, over the same bank and the same read: a plain RAG that always reads its top entry
RAG = {"rag minilm": dict(router=0.0, dense=1.0, lexical=0.0), "rag bm25": dict(router=0.0, dense=0.0, lexical=1.0),
       "rag hybrid": dict(router=0.0, dense=1.0, lexical=1.0)}
RETRIEVING = ("memory", *RAG)  # modes that read the bank: scored again after every edit
MODES = (*RETRIEVING, "in prompt", "off")
SHORT = {"memory": "mem", "rag minilm": "minilm", "rag bm25": "bm25", "rag hybrid": "hybrid", "in prompt": "ctx",
         "off": "off"}
MEASURES = {  # row label -> what it is (README and --help say the same)
    "efficacy": "edited fact, its entry's own words",
    "paraphrase": "edited fact, a held-out LPAQA template (generalisation)",
    "question": "edited fact, a natural question in the chat template (generalisation)",
    "other question": "edited fact, a natural question in other words than the trained one (generalisation)",
    "neighbours": "unedited facts of edited relations: answer unchanged (locality)",
    "outside bank": "facts not in the bank: right answers (locality; memory on vs off)",
    "unrelated": "natural questions about facts no entry holds: answer unchanged from before the edits (locality)",
}
SCORINGS = ("rank", "gen")
# locality compares two answers to one question: each is generated alone, so neither depends on what the questions
# batched beside it read (a longer neighbour changes the padding, and greedy decoding can flip on the difference)
LOCALITY_CHUNK = 1
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
    if form in QUESTION_FORMS:
        q = fm.question if form == "question" else (fm.heldout_questions[index % len(fm.heldout_questions)]
                                                      if fm.heldout_questions else None)
        if not q:
            return None
        prompt = prompt_ids(tok, q.replace("[X]", f.subject))
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

@contextlib.contextmanager
def setup(mem, mode: str, placement: str | None = None):
    """The model as ``mode`` reads: memory as the run retrieves (or at ``placement``), a plain RAG over the same bank
    (no router, no abstention), or memory off (``in prompt`` writes the fact itself, ``off`` nothing)."""
    if mode not in MODES:
        raise MemcliError(f"mode '{mode}': expected one of {', '.join(MODES)}")
    was, where = mem.memory_enabled, mem.cfg.placement
    mem.memory_enabled = mode in RETRIEVING
    mem.cfg.placement = placement or where
    try:
        if mode in RAG:
            with mem.retrieval_setting(**RAG[mode], anchor_df=None, abstain_below=None):
                yield mem
        else:
            yield mem
    finally:
        mem.memory_enabled, mem.cfg.placement = was, where


@torch.no_grad()
def predict(mem, tok, cases: list[Case], mode: str, chunk: int = 32, desc: str = "",
            placement: str | None = None) -> list[tuple[int, str, bool]]:
    """(ranked option, greedy text, whether an entry was read) per case, as ``mode`` reads (``setup``). The fact
    ``in prompt`` is written where memory writes an entry (the run's placement, or ``placement``)."""
    sep = separator_ids(tok)
    pad = mem.cfg.pad_id
    dev = mem.bank.device
    out: list[tuple[int, str, bool]] = []
    with setup(mem, mode, placement), progress() as bar:
        task = bar.add_task(desc or mode, total=len(cases))
        for s in range(0, len(cases), chunk):
            part = cases[s: s + chunk]
            prompts = [place(tok, c.prompt, [c.context], mem.cfg.placement, sep)
                       if mode == "in prompt" else c.prompt for c in part]
            rows = _retrieved_rows(mem, prompts) if (mode in RETRIEVING and mem.cfg.read == "prefix") else None
            lps = option_logprobs(mem, prompts, [c.answers for c in part], rows)
            ids, att = left_pad(prompts, pad)
            new = max(budget(c) for c in part)
            gen = mem.generate(input_ids=ids.to(dev), attention_mask=att.to(dev), rows=rows, max_new_tokens=new,
                               do_sample=False, pad_token_id=pad)[:, ids.shape[1]:]
            # each case's answer is cut at its own budget, so it does not depend on what it was batched with
            texts = tok.batch_decode([g[: budget(c)] for g, c in zip(gen, part)], skip_special_tokens=True)
            read = [bool((r >= 0).any()) for r in rows] if rows is not None else [mode == "in prompt"] * len(part)
            out += [(int(lp.argmax()), t, r) for lp, t, r in zip(lps, texts, read)]
            bar.advance(task, len(part))
    return out


def budget(c: Case) -> int:
    """Tokens generated for ``c``: its longest option and one more (a cloze), room for a sentence (a question)."""
    return max(len(a) for a in c.answers) + (QUESTION_ROOM if c.form in QUESTION_FORMS else 1)


def right(c: Case, pred: tuple[int, str]) -> tuple[bool, bool]:
    """(ranked right, generated right) of a prediction for ``c``: a cloze's continuation must start with the object
    (``exact_match``), a question's answer must state it (``answer_match``)."""
    gold = c.fact.options[c.target]
    return pred[0] == c.target, (answer_match if c.form in QUESTION_FORMS else exact_match)(pred[1], gold)


def share(flags: list[bool]) -> float | None:
    return sum(flags) / len(flags) if flags else None


# --------------------------------------------------------------------------- the table

def _key(mode: str, c: Case) -> tuple:
    return mode, c.fact.row if c.fact.row is not None else c.fact.subject, c.fact.predicate, c.form, c.target


@dataclass
class Editing:
    """One ``compare editing`` run: the loaded model, the modes scored, and the predictions that do not change with
    edits (memory off, the fact in the prompt, and every retrieving mode's answers before any edit)."""
    mem: object
    tok: object
    modes: tuple = MODES
    cache: dict = field(default_factory=dict)  # _key -> prediction
    answers: list = field(default_factory=list)  # one record per case and mode, for --answers

    def predictions(self, cases: list[Case], mode: str, label: str, T: int, cached: bool, chunk: int = 32) -> list[tuple]:
        if not cached:
            preds = predict(self.mem, self.tok, cases, mode, chunk=chunk, desc=f"T={T} {label} ({mode})")
        else:
            todo = [c for c in cases if _key(mode, c) not in self.cache]
            for c, p in zip(todo, predict(self.mem, self.tok, todo, mode, desc=f"{label} ({mode})")):
                self.cache[_key(mode, c)] = p
            preds = [self.cache[_key(mode, c)] for c in cases]
        for c, p in zip(cases, preds):
            self.answers.append({"T": T, "measure": label, "mode": mode, "subject": c.fact.subject,
                                 "relation": c.fact.predicate, "prompt": self.tok.decode(c.prompt, skip_special_tokens=True),
                                 "answer": c.fact.options[c.target], "ranked": c.fact.options[p[0]], "generated": p[1],
                                 "read": p[2], "rank_right": right(c, p)[0], "gen_right": right(c, p)[1]})
        return preds

    def row(self, label: str, cases: list[Case], T: int) -> dict:
        """Both scorings in every mode for ``cases``: the retrieving modes scored now, the others once per case."""
        res = {"T": T, "measure": label, "n": len(cases)}
        for mode in MODES:
            preds = self.predictions(cases, mode, label, T, mode not in RETRIEVING) if mode in self.modes and cases else []
            for k, s in enumerate(SCORINGS):
                res[f"{s}: {mode}"] = share([right(c, p)[k] for c, p in zip(cases, preds)]) if preds else None
            if mode == "memory" and preds:
                res["memory read"] = share([p[2] for p in preds])
        return res

    def remember(self, cases: list[Case], desc: str) -> None:
        """Every retrieving mode's answers to ``cases`` before any edit (what locality compares against), each asked
        alone (``LOCALITY_CHUNK``)."""
        for mode in self.modes:
            if mode in RETRIEVING:
                todo = [c for c in cases if _key(f"before {mode}", c) not in self.cache]
                for c, p in zip(todo, predict(self.mem, self.tok, todo, mode, chunk=LOCALITY_CHUNK,
                                              desc=f"{desc} ({mode})")):
                    self.cache[_key(f"before {mode}", c)] = p

    def unchanged(self, label: str, cases: list[Case], T: int) -> dict:
        """Locality: per retrieving mode, the share of answers equal to its answers before any edit (ranked option;
        greedy text, normalised)."""
        res = {"T": T, "measure": label, "n": len(cases)}
        for mode in MODES:
            for s in SCORINGS:
                res[f"{s}: {mode}"] = None
            if mode not in RETRIEVING or mode not in self.modes or not cases:
                continue
            before = [self.cache[_key(f"before {mode}", c)] for c in cases]
            after = self.predictions(cases, mode, label, T, False, chunk=LOCALITY_CHUNK)
            res[f"rank: {mode}"] = share([a[0] == b[0] for a, b in zip(after, before)])
            res[f"gen: {mode}"] = share([normalise(a[1]) == normalise(b[1]) for a, b in zip(after, before)])
            if mode == "memory":
                res["memory read"] = share([a[2] for a in after])
        return res

    def ceilings(self, cases: list[Case], label: str) -> dict:
        """The fact in the prompt at every placement (memory off): where the model reads best, shown once."""
        from memcli.retrieval.placement import PLACEMENTS

        out = {}
        for placement in PLACEMENTS:
            preds = predict(self.mem, self.tok, cases, "in prompt", desc=f"{label} in prompt ({placement})",
                            placement=placement)
            flags = [right(c, p) for c, p in zip(cases, preds)]
            out[placement] = {s: share([f[k] for f in flags]) for k, s in enumerate(SCORINGS)}
        return out


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


def configure(mem, path, placement: str | None = None, abstain_below: float | None = None,
              lexical_weight: float | None = None, dense_weight: float | None = None, anchor_df: int | None = None,
              encoder: str | None = None, anchor: str | None = None) -> None:
    """Measure a run with other read and retrieval settings than it records, nothing retrained: they only change
    where the entry goes, which rows are read and in which order."""
    from memcli.explicit.config import ANCHORS
    from memcli.retrieval.placement import check

    c = mem.cfg
    given = {k: v for k, v in dict(placement=placement, abstain_below=abstain_below, lexical_weight=lexical_weight,
                                   dense_weight=dense_weight, anchor_df=anchor_df, encoder=encoder, anchor=anchor).items()
             if v is not None}
    if given and c.read != "prefix":
        raise MemcliError(f"--{next(iter(given)).replace('_', '-')}: these settings are for a run with read=prefix "
                          f"({path} has read={c.read})")
    if abstain_below is not None and not (c.query == "mean" and c.entry_key == "hidden" and -1 <= abstain_below <= 1):
        raise MemcliError(f"--abstain-below {abstain_below}: expected a cosine in [-1, 1] for a run with query=mean, "
                          f"entry_key=hidden ({path} has query={c.query}, entry_key={c.entry_key})")
    for name in ("lexical_weight", "dense_weight"):
        if given.get(name, 0) < 0:
            raise MemcliError(f"--{name.replace('_', '-')} {given[name]}: expected a weight >= 0")
    if anchor_df is not None and anchor_df < 1:
        raise MemcliError(f"--anchor-df {anchor_df}: expected a count of entries >= 1")
    if placement is not None:
        check(placement, "--placement")
    if anchor is not None and anchor not in ANCHORS:
        raise MemcliError(f"--anchor '{anchor}': expected one of {', '.join(ANCHORS)}")
    for k, v in given.items():
        setattr(c, k, v)


def compare_editing(path: Path, data: Path | None = None, edits: tuple[int, ...] = (1, 10, 100, 1000),
                    num_samples: int | None = 200, trex: str | Path = "builtin", seed: int = 0,
                    modes: tuple[str, ...] = MODES, **settings) -> dict:
    """The editing table of the run at ``path`` (see the module docstring); returns rows, counts and timing.
    ``settings``: ``configure``'s overrides of the run's read and retrieval."""
    from memcli import kinds
    from memcli.rundir import require_kind
    from memcli.runs import load_run

    require_kind(path, kinds.EXPLICIT)
    bad = [m for m in modes if m not in MODES]
    if bad or "memory" not in modes:
        raise MemcliError(f"--setups {','.join(modes)}: expected memory and any of {', '.join(MODES[1:])}")
    t0 = time.perf_counter()
    run = load_run(path)
    mem, tok, bank = run.model, run.tok, run.bank
    mem.eval()
    configure(mem, path, **settings)
    forms = load_forms(trex)
    facts = bank_facts(bank, forms, seed, held_out_uuids(data))
    if not edits or min(edits) < 0 or max(edits) > len(facts):
        raise MemcliError(f"--edits {','.join(map(str, edits))}: expected counts from 0 (no edit) to {len(facts)}, the "
                          f"facts of {path}'s bank that can be edited (a subject, an object and a relation with templates)")
    held = held_out_uuids(data)
    ed = Editing(mem, tok, tuple(m for m in MODES if m in modes))
    away = outside_facts(bank, forms, trex, num_samples or 200, seed)
    outside = [c for f in away if (c := case(tok, bank, forms, f, "own words", 0)) is not None]
    unrelated = [c for i, f in enumerate(away) if (c := case(tok, bank, forms, f, "held-out question", 0, i)) is not None]
    neigh = {T: [case(tok, bank, forms, f, "own words", 0) for f in _neighbours(facts, T, num_samples, seed)]
             for T in edits if T}
    ed.remember(list({_key("", c): c for cs in neigh.values() for c in cs}.values()), "neighbours before any edit")
    ed.remember(unrelated, "unrelated questions before any edit")
    rows, written, ceilings = [], 0, {}
    for T in sorted(set(edits)):
        _edit(mem, bank, tok, facts[written:T])
        written = T
        # T = 0: no edit, the held-out facts (only in the bank, never asked in training) asked for their own objects
        scored = _sample(facts[:T] if T else [f for f in facts if bank.entries[f.row]["uuid"] in held] or facts,
                         num_samples, seed + T)
        for form, label in (("own words", "efficacy"), ("held-out template", "paraphrase"), ("question", "question"),
                            ("held-out question", "other question")):
            cases = [c for i, f in enumerate(scored)
                     if (c := case(tok, bank, forms, f, form, f.new if T else 0, i)) is not None]
            rows.append(ed.row(label, cases, T))
            if form in QUESTION_FORMS and (T, label) not in ceilings and T == min(edits):
                ceilings[(T, label)] = ed.ceilings(cases, label)
        if T:
            rows.append(ed.unchanged("neighbours", neigh[T], T))
        rows.append(ed.row("outside bank", outside, T))
        if T:
            rows.append(ed.unchanged("unrelated", unrelated, T))
    c = mem.cfg
    return {"run": str(path), "data": str(data) if data else None, "edits": sorted(set(edits)), "facts": len(facts),
            "bank": bank.knowledge_num, "num_samples": num_samples, "seed": seed, "modes": list(ed.modes),
            "placement": c.placement, "abstain_below": c.abstain_below, "anchor_df": c.anchor_df,
            "anchor": c.anchor,
            "lexical_weight": c.lexical_weight, "dense_weight": c.dense_weight, "encoder": c.encoder,
            "order": "held-out facts first, then the others, each shuffled with the seed; scored after T writes",
            "rows": rows, "placements": {f"T={T} {label}": v for (T, label), v in ceilings.items()}, "seconds": round(time.perf_counter() - t0, 1),
            "answers": ed.answers}
