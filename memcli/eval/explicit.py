"""Explicit memory evaluation on held-out facts (entries that exist only in memory).

Each question is scored by the log-likelihood of its five options (only the option tokens are
scored: ``logits_to_keep`` and a gather, batched by a memory budget), four ways:

- ``heldout_memory_on``: memory as trained;
- ``heldout_memory_off``: memory disabled (no fusion / no prefix);
- ``edit_success``: the question's entry rewritten to a distractor's object (its key recomputed from the
  new text), counted when the answer follows the edit;
- ``heldout_in_context``: memory off, the entry's sentence written into the prompt where memory writes an entry
  (the run's placement; the ceiling of reading the fact; README "the evaluation format decides what a small
  model can show");
- ``edit_in_context``: memory off, the edited sentence written there (the ceiling of edit success).

Formats (``memcli.explicit.items``): ``letter`` (ExplicitLM's ``X:text`` after the chat prompt with the
options), ``cloze`` (the sentence cut before its object, answered with the object text) and, for
comparison, ``chat`` (the object text answered to "Complete: <sentence with ___>" in a chat prompt).
The recipe's own format has the plain names above; another format's numbers carry its name as prefix.
Router recall@k is measured on the labelled held-out items.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli import records
from memcli.backbone import cache_kw, left_pad, output_cache
from memcli.console import progress
from memcli.data.bank import tokenize_entries
from memcli.data.convert import INSTRUCTION
from memcli.data.knowledge import parse_options
from memcli.errors import MemcliError
from memcli.explicit.io import separator_ids
from memcli.explicit.items import Item, answer_ids, cloze_ids, cloze_parts, load_items, prompt_ids
from memcli.retrieval.placement import place

MODES = ("on", "off", "edit", "context", "context_edit")
NAMES = {"on": "heldout_memory_on", "off": "heldout_memory_off", "edit": "edit_success", "context": "heldout_in_context",
         "context_edit": "edit_in_context"}
FORMATS = ("letter", "chat", "cloze")


@dataclass
class Question:
    row: int | None
    prompt: list[int]
    answers: list[list[int]]  # one per option
    gold: int
    edit_to: int  # the option an edit rewrites the entry to (-1: no edit possible)
    edit_ids: list[int] = field(default_factory=list)  # the entry rewritten to that option, as bank token ids


def questions(tok, bank, omcq: list[dict], fmt: str, seed: int = 1234) -> list[Question]:
    """Held-out questions in ``fmt``; the option each edit rewrites to is drawn from ``seed`` (the same every time)."""
    if fmt not in FORMATS:
        raise MemcliError(f"answer format '{fmt}': expected one of {', '.join(FORMATS)}")
    rng = random.Random(seed)
    row_of = bank.row_of_uuid()
    out = []
    for item in omcq:
        t = item["target"][0]
        opts = parse_options(t["options"])
        gold = next((i for i, (letter, o) in enumerate(opts) if f"{letter}:{o}" == t["correct_answer"]), None)
        if gold is None:
            continue
        row = row_of.get(t.get("uuid"))
        e = bank.entries[row] if row is not None else None
        others = [i for i in range(len(opts)) if i != gold]
        edit_to = rng.choice(others) if (e and e.get("object") and others) else -1
        if fmt == "cloze":
            parts = cloze_parts(e) if e else None
            if parts is None:
                continue
            cp, _ = parts
            prompt = cloze_ids(tok, cp, opts[gold][1])[0]
            answers = [cloze_ids(tok, cp, o)[1] for _, o in opts]
        elif fmt == "chat":
            if not (e and e.get("object") and e["object"] in e.get("sentence", "")):
                continue
            prompt = prompt_ids(tok, "Complete: " + e["sentence"].replace(e["object"], "___"))
            answers = [answer_ids(tok, o) for _, o in opts]
        else:
            prompt = prompt_ids(tok, f"{t['question']}\n{t['options']}\n{INSTRUCTION}")
            answers = [answer_ids(tok, f"{letter}:{o}") for letter, o in opts]
        edit_ids = []
        if edit_to >= 0:
            edit_ids = tokenize_entries(tok, [e["sentence"].replace(e["object"], opts[edit_to][1])],
                                        bank.knowledge_length, bank.pad_id)[0][0].tolist()
        out.append(Question(row, prompt, answers, gold, edit_to, edit_ids))
    return out


@torch.no_grad()
def _retrieved_rows(mem, prompts: list[list[int]]) -> torch.Tensor:
    ids, att = left_pad(prompts, mem.cfg.pad_id)
    dev = mem.bank.device
    rec = mem.retrieve(mem.prompt_features(ids.to(dev), att.to(dev)), ids.to(dev), att.to(dev))
    return mem.chosen_rows(rec)


@torch.no_grad()
def option_logprobs(mem, prompts: list[list[int]], answers: list[list[list[int]]], rows: torch.Tensor | None = None,
                    budget_bytes: int = 64 << 20) -> list[torch.Tensor]:
    """Log-probability of each answer after its prompt: ``[len(answers[q])]`` per question ``q``.

    The prompt runs once per question (KV cache), then the cache is repeated for its options and only
    the option tokens run and are scored, with a vocabulary-sized log-softmax at those positions only.
    ``rows``: entries placed before each prompt (``read=prefix``); memory hooks act as in any forward.
    """
    dev = mem.bank.device
    V = mem.embed_weight().shape[0]
    n_max = max(len(a) for a in answers)
    A = max(len(x) for a in answers for x in a)
    per = max(1, budget_bytes // (n_max * A * V * 4))  # questions per chunk: their answers' logits fit the budget
    out: list[torch.Tensor] = []
    bb = mem.backbone
    for s in range(0, len(prompts), per):
        ps, ans = prompts[s: s + per], answers[s: s + per]
        ids, att = left_pad(ps, mem.cfg.pad_id)
        ids, att = ids.to(dev), att.to(dev)
        if rows is not None:
            ids, att = mem.prefixed(ids, att, rows[s: s + per].to(dev))
        first = bb(input_ids=ids, attention_mask=att, use_cache=True, logits_to_keep=1)
        lp0 = torch.log_softmax(first.logits[:, -1].float(), -1)  # predicts each option's first token
        counts = [len(a) for a in ans]
        cache = output_cache(first)
        cache.batch_repeat_interleave(n_max)
        # every question gets n_max option slots (missing ones repeat its last option and are ignored)
        slots = [a[min(j, len(a) - 1)] for a in ans for j in range(n_max)]
        L = max(len(x) for x in slots)
        a_ids = torch.full((len(slots), L), mem.cfg.pad_id, dtype=torch.long, device=dev)
        a_att = torch.zeros((len(slots), L), dtype=att.dtype, device=dev)
        for i, x in enumerate(slots):
            a_ids[i, : len(x)] = torch.tensor(x, device=dev)
            a_att[i, : len(x)] = 1
        full_att = torch.cat([att.repeat_interleave(n_max, 0), a_att], dim=1)
        logits = bb(input_ids=a_ids, attention_mask=full_att, use_cache=True, **cache_kw(bb, cache)).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, a_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        lp = (lp * a_att[:, 1:]).sum(1) + lp0.repeat_interleave(n_max, 0).gather(1, a_ids[:, :1]).squeeze(1)
        lp = lp.view(len(ans), n_max).cpu()
        out += [lp[q, : counts[q]] for q in range(len(ans))]
    return out


@torch.no_grad()
def accuracy(mem, tok, qs: list[Question], mode: str, chunk: int = 32, desc: str | None = None) -> float:
    """Share of questions answered as ``mode`` expects (gold, or the edited option for ``edit``)."""
    if mode not in MODES:
        raise MemcliError(f"evaluation mode '{mode}': expected one of {', '.join(MODES)}")
    qs = [q for q in qs if mode not in ("edit", "context_edit") or q.edit_to >= 0]
    if not qs:
        return 0.0
    was = mem.memory_enabled
    mem.memory_enabled = mode in ("on", "edit")
    sep = separator_ids(tok)
    prefix = mem.cfg.read == "prefix"
    correct = 0
    try:
        with progress() as bar:
            task = bar.add_task(desc or f"evaluating ({mode})", total=len(qs))
            for s in range(0, len(qs), chunk):
                part = qs[s: s + chunk]
                if mode == "edit":
                    mem.set_override(torch.tensor([q.row for q in part]), torch.tensor([q.edit_ids for q in part]))
                prompts = [q.prompt for q in part]
                if mode in ("context", "context_edit"):  # the (edited) fact written before the prompt, memory off
                    facts = [q.edit_ids if mode == "context_edit" else mem.bank[q.row].tolist() for q in part]
                    prompts = [place(tok, q.prompt, [[t for t in f if t != mem.cfg.pad_id]], mem.cfg.placement, sep)
                               if q.row is not None else q.prompt for f, q in zip(facts, part)]
                rows = _retrieved_rows(mem, prompts) if (prefix and mem.memory_enabled) else None
                for q, lp in zip(part, option_logprobs(mem, prompts, [q.answers for q in part], rows)):
                    correct += int(int(lp.argmax()) == (q.edit_to if mode in ("edit", "context_edit") else q.gold))
                mem.set_override(None)
                bar.advance(task, len(part))
    finally:
        mem.memory_enabled = was
        mem.set_override(None)
    return correct / len(qs)


@torch.no_grad()
def router_recall(mem, items: list[Item], ks: tuple[int, ...] = (1,), batch: int = 32) -> dict:
    """Share of items whose labelled entry is among the top-k retrieved for the prompt (its last token)."""
    ks = tuple(sorted(set(ks) | {mem.cfg.num_candidates}))
    hits: dict[tuple[int, int], int] = {}
    n = 0
    dev = mem.bank.device
    for s in range(0, len(items), batch):
        chunk = [it for it in items[s: s + batch] if it.row is not None]
        if not chunk:
            continue
        ids, att = left_pad([it.prompt_ids for it in chunk], mem.cfg.pad_id)
        ids, att = ids.to(dev), att.to(dev)
        rows = torch.tensor([it.row for it in chunk], device=dev)
        if mem.cfg.read == "prefix":
            recs = [mem.retrieve(mem.prompt_features(ids, att), ids, att)]
            last = [r["cells"] for r in recs]
        else:
            recs = mem(input_ids=ids, attention_mask=att, collect=True).memory_records
            last = [r["cells"].reshape(len(chunk), ids.shape[1], -1)[:, -1] for r in recs]
        for rec, cells in zip(recs, last):
            for k in ks:
                key = (rec["layer"], k)
                hits[key] = hits.get(key, 0) + int((cells[:, :k] == rows.unsqueeze(1)).any(1).sum())
        n += len(chunk)
    return {f"recall@{k}_l{layer}": h / max(1, n) for (layer, k), h in sorted(hits.items())}


@torch.no_grad()
def text_perplexity(mem, items: list, pad_id: int, batch: int = 32) -> dict:
    """Validation next-token loss and perplexity of held-out texts, with memory on and off."""
    from memcli.explicit.items import text_collate

    was_training, was_on = mem.training, mem.memory_enabled
    mem.eval()
    out = {}
    dev = mem.bank.device
    try:
        for on, suffix in ((True, ""), (False, "_memory_off")):
            mem.memory_enabled = on
            nll = n = 0.0
            for s in range(0, len(items), batch):
                b = text_collate(items[s: s + batch], pad_id)
                logits = mem(input_ids=b["input_ids"].to(dev), attention_mask=b["attention_mask"].to(dev)).logits
                tgt = b["labels"][:, 1:].to(dev)
                lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
                real = tgt != -100
                nll -= float(lp[real].sum())
                n += int(real.sum())
            out[f"val_loss{suffix}"] = nll / max(1, n)
            out[f"val_ppl{suffix}"] = math.exp(min(out[f"val_loss{suffix}"], 50.0))
    finally:
        mem.memory_enabled = was_on
        mem.train(was_training)
    return out


def evaluate(mem, tok, bank, omcq: list[dict], val_items: list[Item], fmt: str,
             formats: tuple[str, ...] | None = None, modes: tuple[str, ...] = MODES) -> dict:
    """Accuracies in ``formats`` (default: ``fmt`` only) x ``modes``, and router recall on ``val_items``.

    Numbers in the recipe's format ``fmt`` have the plain names; another format's are prefixed with it.
    """
    was = mem.training
    mem.eval()
    out: dict = {}
    for f in (formats or (fmt,)) if omcq else ():
        qs = questions(tok, bank, omcq, f)
        for mode in modes:
            name = NAMES[mode] if f == fmt else f"{f}_{NAMES[mode]}"
            out[name] = accuracy(mem, tok, qs, mode, desc=f"{name} ({len(qs)} questions)")
        if f == fmt:
            out["questions"] = len(qs)
    if val_items:
        out.update(router_recall(mem, val_items))
    mem.train(was)
    return out


def load_eval_data(tok, bank, omcq_path: Path, sft_val: Path, labels: Path, max_prompt_length: int, fmt: str):
    """Held-out questions and, when both files exist, the labelled items router recall is measured on."""
    omcq = records.read_json_list(omcq_path, records.OMCQ) if omcq_path.is_file() else []
    items = (load_items(tok, bank, sft_val, labels, max_prompt_length, fmt, with_questions=False)
             if sft_val.is_file() and labels.is_file() else [])
    return omcq, items


def evaluate_run(mem, tok, bank, data_dir: str | Path, fmt: str, num_samples: int | None = None,
                 max_prompt_length: int = 128, both_formats: bool = True) -> dict:
    """Evaluate a loaded run on ``data_dir``'s held-out questions (omcq_val.json) and labels."""
    d = Path(data_dir)
    omcq_path = d / "omcq_val.json"
    if not omcq_path.is_file():
        raise MemcliError(f"{omcq_path}: not found (expected the held-out questions written by 'memcli gen-data')")
    omcq, items = load_eval_data(tok, bank, omcq_path, d / "sft_val.jsonl", d / "keys" / "val_labeled.jsonl",
                                 max_prompt_length, fmt)
    omcq, items = omcq[:num_samples], items[:num_samples]
    row_of = bank.row_of_uuid()
    absent = sum(q["target"][0].get("uuid") not in row_of for q in omcq)
    if absent:  # scoring them would measure the memory on facts it does not hold: a silent wrong figure
        raise MemcliError(f"{omcq_path}: {absent} of {len(omcq)} questions ask about facts that are not in this run's "
                          f"bank (no entry has their uuid); add them first with 'memcli memory add -m RUN --from "
                          f"{d / 'sentence_trex_data.json'}', or evaluate on the run's own data directory")
    formats = (fmt, "letter" if fmt == "cloze" else "cloze") if both_formats else (fmt,)
    res = evaluate(mem, tok, bank, omcq, items, fmt, formats)
    return dict(res, labelled_items=len(items))


def compare_rows(run, data: Path, num: int | None, max_new_tokens: int) -> dict:
    """``memcli compare checkpoints`` rows of an explicit-memory run: the held-out evaluation on a data directory."""
    if not data.is_dir():
        raise MemcliError(f"--data {data}: expected a data directory (omcq_val.json, ...) for explicit-memory runs")
    prompt_len = run.config.get("dataset", {}).get("max_prompt_length", 128)
    res = evaluate_run(run.model, run.tok, run.bank, data, run.info.get("answer_format", "letter"), num, prompt_len)
    return {k: v for k, v in res.items() if isinstance(v, (int, float))}
