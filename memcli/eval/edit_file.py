"""``memcli compare editing --edits-file FILE``: a user's own edits, scored as the field reports them.

The file holds edits in the field's standard records (``records.validate_edit``): ZsRE (EasyEdit's fields:
``src`` a question, ``alt`` the new answer, ``rephrase`` the question in other words, ``loc`` an unrelated
question and ``loc_ans`` its answer) or CounterFact (``requested_rewrite`` with a cloze ``prompt``, ``subject`` and
``target_new``; ``paraphrase_prompts``; ``neighborhood_prompts``, other subjects' facts). Every edit becomes one
entry, written with the code of ``memcli memory add`` into the loaded run's bank (the run directory is not
changed): ``"<question> <new answer> ."`` for ZsRE, the filled prompt and the new object for CounterFact. Then,
as WISE reports them:

- **Rel** (reliability): the edit asked as written (``src``; the rewrite prompt);
- **Gen** (generalisation): asked in other words (``rephrase``; each paraphrase prompt);
- **Loc** (locality): a question no edit is about (``loc``; each neighbourhood prompt): the answer after the edits
  against the answer of the same setup before them. A locality prompt that names the subject of any edit in the file
  is left out (``locality_about_edited`` counts them): a batch can rewrite the very fact another edit's
  neighbourhood asks, and that answer should follow.

Every edit of the file is written; ``num_samples`` of them (a seeded sample) are scored. Two scorings: ``token``, EasyEdit's teacher-forced token accuracy (the share of the new answer's tokens the model
predicts, each after the right ones before it; for Loc the share of the unrelated answer's positions whose
prediction is unchanged), and ``gen``, the greedy answer (a question's first line states the new answer; a cloze
continues with it; for Loc the normalised answer is unchanged). Beside memory: the plain RAG setups over the same
bank, the edit written in the prompt where memory writes it (the ceiling), and memory off.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli import records
from memcli.backbone import left_pad
from memcli.console import progress
from memcli.errors import MemcliError
from memcli.eval.editing import (LOCALITY_CHUNK, MODES, RETRIEVING, answer_match, configure, exact_match, normalise,
                                 setup)
from memcli.eval.explicit import _retrieved_rows
from memcli.explicit.io import separator_ids
from memcli.explicit.items import answer_ids, cloze_ids, prompt_ids
from memcli.retrieval.placement import place

SCORINGS = ("token", "gen")
QUESTION_ROOM = 16  # tokens beyond the answer a chat answer may take to state it


@dataclass
class Ask:
    """One prompt and the answer it is scored against."""

    prompt: list[int]
    answer: list[int]  # token ids scored teacher-forced (no end-of-turn token)
    text: str  # the answer as text (what the greedy answer must state)
    question: bool  # a chat-template question (else a cloze)
    asked: str = ""  # the prompt as written (the question, or the cloze)


@dataclass
class Edit:
    where: str
    entry: str  # what is written into memory
    subject: str | None  # what it is about (the record's subject), kept with the entry
    rel: Ask
    gen: list[Ask] = field(default_factory=list)
    loc: list[Ask] = field(default_factory=list)


def read_edits(path: str | Path) -> list[tuple[str, dict]]:
    """``(where, record)`` of every edit in a JSONL file or a JSON list, each validated (one line names a bad one)."""
    p = Path(path)
    if p.suffix == ".json":
        return [(f"{p}: item {i}", r) for i, r in enumerate(records.read_json_list(p, records.EDITS))]
    rows = [(f"{p}:{n}", r) for n, r in records.iter_jsonl(p, records.EDITS)]
    if not rows:
        raise MemcliError(f"{p}: empty file, expected at least one edit record (ZsRE or CounterFact)")
    return rows


def _question(tok, q: str, answer: str) -> Ask:
    return Ask(prompt_ids(tok, q), answer_ids(tok, answer)[: len(tok(answer, add_special_tokens=False)["input_ids"])],
               answer, True, q)


def _cloze(tok, prompt: str, answer: str) -> Ask:
    p, a = cloze_ids(tok, prompt, answer)
    return Ask(p, a, answer, False, prompt)


def build(tok, where: str, r: dict) -> Edit:
    if records.edit_format(r) == "zsre":
        alt = r["alt"].strip()
        e = Edit(where, f"{r['src'].strip()} {alt} .", (r.get("subject") or "").strip() or None, _question(tok, r["src"], alt))
        if r.get("rephrase"):
            e.gen.append(_question(tok, r["rephrase"], alt))
        if r.get("loc"):
            e.loc.append(_question(tok, r["loc"].removeprefix("nq question: "), r["loc_ans"]))
        return e
    rw = r["requested_rewrite"]
    new = rw["target_new"]["str"].strip()
    prompt = rw["prompt"].format(rw["subject"])
    e = Edit(where, f"{prompt} {new} .", rw["subject"].strip(), _cloze(tok, prompt, new))
    e.gen = [_cloze(tok, p, new) for p in r.get("paraphrase_prompts", [])]
    true = rw.get("target_true", {}).get("str", "")
    e.loc = [_cloze(tok, p, true) for p in r.get("neighborhood_prompts", [])] if true else []
    return e


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def predict(mem, tok, asks: list[Ask], mode: str, contexts: list[list[int]] | None = None, chunk: int = 16,
            desc: str = "") -> list[tuple[list[int], str, bool]]:
    """Per ask: the teacher-forced argmax token at each answer position, the greedy answer, whether an entry was read.
    ``contexts``: the entry each ask's edit wrote (written into the prompt for ``in prompt``)."""
    sep = separator_ids(tok)
    pad, dev = mem.cfg.pad_id, mem.bank.device
    out = []
    with setup(mem, mode), progress() as bar:
        task = bar.add_task(desc or mode, total=len(asks))
        for s in range(0, len(asks), chunk):
            part = asks[s: s + chunk]
            prompts = [place(tok, a.prompt, [contexts[s + i]], mem.cfg.placement, sep) if mode == "in prompt"
                       else a.prompt for i, a in enumerate(part)]
            rows = _retrieved_rows(mem, prompts) if mode in RETRIEVING and mem.cfg.read == "prefix" else None
            # teacher forcing: prompt + answer in one pass; the answer's positions sit at the right end (left padding,
            # and every placement writes before them), so the last len(answer) + 1 logits predict it
            ids, att = left_pad([p + a.answer for p, a in zip(prompts, part)], pad)
            ids, att = ids.to(dev), att.to(dev)
            if rows is not None:
                ids, att = mem.prefixed(ids, att, rows.to(dev))
            logits = mem.backbone(input_ids=ids, attention_mask=att).logits  # an additive read's hooks act as in any forward
            width = max(len(a.answer) for a in part)
            pred = logits[:, -width - 1: -1].argmax(-1).cpu()
            forced = [pred[i, width - len(a.answer):].tolist() for i, a in enumerate(part)]
            pids, patt = left_pad(prompts, pad)
            budget = max(len(a.answer) for a in part) + QUESTION_ROOM
            gen = mem.generate(input_ids=pids.to(dev), attention_mask=patt.to(dev), rows=rows, max_new_tokens=budget,
                               do_sample=False, pad_token_id=pad)[:, pids.shape[1]:]
            texts = tok.batch_decode([g[: len(a.answer) + (QUESTION_ROOM if a.question else 1)] for g, a in zip(gen, part)],
                                     skip_special_tokens=True)
            read = [bool((r >= 0).any()) for r in rows] if rows is not None else [mode == "in prompt"] * len(part)
            out += list(zip(forced, texts, read))
            bar.advance(task, len(part))
    return out


def token_accuracy(a: Ask, forced: list[int]) -> float:
    return sum(x == y for x, y in zip(forced, a.answer)) / len(a.answer)


def stated(a: Ask, text: str) -> bool:
    return (answer_match if a.question else exact_match)(text, a.text)


def _mean(xs: list) -> float | None:
    return sum(xs) / len(xs) if xs else None


# --------------------------------------------------------------------------- the table


def compare_edit_file(path: Path, edits_file: Path, num_samples: int | None = 200, seed: int = 0,
                      modes: tuple[str, ...] = MODES, **settings) -> dict:
    """Rel / Gen / Loc of the edits in ``edits_file`` added to the run at ``path`` (module docstring)."""
    from memcli import kinds
    from memcli.rundir import require_kind
    from memcli.runs import load_run

    require_kind(path, kinds.EXPLICIT)
    bad = [m for m in modes if m not in MODES]
    if bad or "memory" not in modes:
        raise MemcliError(f"--setups {','.join(modes)}: expected memory and any of {', '.join(MODES[1:])}")
    raw = read_edits(edits_file)  # the whole file checked before the run is opened
    t0 = time.perf_counter()
    run = load_run(path)
    run.model.eval()
    configure(run.model, path, **settings)
    res = score_edits(run.model, run.tok, run.bank, raw, num_samples, seed, modes)
    return {"run": str(path), "edits_file": str(edits_file), **res, "seconds": round(time.perf_counter() - t0, 1)}


def score_edits(mem, tok, bank, raw: list[tuple[str, dict]], num_samples: int | None = 200, seed: int = 0,
                modes: tuple[str, ...] = MODES) -> dict:
    """``compare_edit_file`` on a loaded run (its bank is changed in memory): the edits ``raw`` (``read_edits``)."""
    from memcli.data.facts import fact_uuid
    from memcli.explicit import store
    from memcli.retrieval.lexical import namer

    every = [build(tok, w, r) for w, r in raw]  # every edit is written; a seeded sample of them is scored
    edits = random.Random(seed).sample(every, num_samples) if num_samples and len(every) > num_samples else every
    modes = tuple(m for m in MODES if m in modes)
    # a locality prompt about a subject some edit of the file rewrites is no longer unrelated: its answer may follow
    touched = namer(sorted({e.subject for e in every if e.subject}))
    loc_all = [(e, a) for e in edits for a in e.loc]
    loc = [(e, a) for e, a in loc_all if not touched(a.asked)]
    before = {m: predict(mem, tok, [a for _, a in loc], m, chunk=LOCALITY_CHUNK, desc=f"locality before the edits ({m})")
              for m in modes if m in RETRIEVING} if loc else {}
    entries, where, seen = [], [], set()
    for e in every:  # the memory add path; the same entry twice is one fact
        if e.entry not in seen:
            seen.add(e.entry)
            entries.append({"uuid": fact_uuid(e.entry), "sentence": e.entry, "subject": e.subject, "predicate": None,
                            "object": None})
            where.append(e.where)
    mem, bank, change = store.add(mem, bank, tok, entries, where=where)
    mem.eval()
    answers, rows = [], []
    for label, pairs in (("reliability", [(e, e.rel) for e in edits]), ("generalisation", [(e, a) for e in edits for a in e.gen])):
        res = {"T": len(entries), "measure": label, "n": len(pairs)}
        for m in modes:
            preds = predict(mem, tok, [a for _, a in pairs], m, [tok(e.entry, add_special_tokens=False)["input_ids"]
                                                                for e, _ in pairs], desc=f"{label} ({m})") if pairs else []
            res[f"token: {m}"] = _mean([token_accuracy(a, p[0]) for (_, a), p in zip(pairs, preds)])
            res[f"gen: {m}"] = _mean([stated(a, p[1]) for (_, a), p in zip(pairs, preds)])
            if m == "memory" and preds:
                res["memory read"] = _mean([p[2] for p in preds])
            answers += [{"measure": label, "mode": m, "edit": e.where, "prompt": tok.decode(a.prompt, skip_special_tokens=True),
                         "answer": a.text, "generated": p[1], "read": p[2]} for (e, a), p in zip(pairs, preds)]
        rows.append(res)
    res = {"T": len(entries), "measure": "locality", "n": len(loc)}
    for m in modes:
        res[f"token: {m}"] = res[f"gen: {m}"] = None
        if m not in before:
            continue
        after = predict(mem, tok, [a for _, a in loc], m, chunk=LOCALITY_CHUNK, desc=f"locality after the edits ({m})")
        res[f"token: {m}"] = _mean([_mean([x == y for x, y in zip(p[0], b[0])]) for p, b in zip(after, before[m])])
        res[f"gen: {m}"] = _mean([normalise(p[1]) == normalise(b[1]) for p, b in zip(after, before[m])])
        if m == "memory":
            res["memory read"] = _mean([p[2] for p in after])
        answers += [{"measure": "locality", "mode": m, "edit": e.where, "prompt": tok.decode(a.prompt, skip_special_tokens=True),
                     "before": b[1], "after": p[1], "read_before": b[2], "read": p[2]}
                    for (e, a), p, b in zip(loc, after, before[m])]
    rows.append(res)
    c = mem.cfg
    return {"edits": len(every), "scored": len(edits), "entries_added": len(entries), "bank": bank.knowledge_num,
            "locality_about_edited": len(loc_all) - len(loc),
            "num_samples": num_samples, "seed": seed, "modes": list(modes), "scorings": list(SCORINGS),
            "placement": c.placement, "anchor_df": c.anchor_df, "anchor": c.anchor, "abstain_below": c.abstain_below,
            "lexical_weight": c.lexical_weight, "dense_weight": c.dense_weight, "encoder": c.encoder, "rows": rows,
            "answers": answers}
