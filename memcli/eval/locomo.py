"""LoCoMo (Maharana et al., 2024) question answering over long conversations, scored as LoCoMo scores it.

Metric (LoCoMo's ``task_eval/evaluation.py``): answers are lower-cased, commas, punctuation and the
words a/an/the/and dropped, tokens Porter-stemmed, and token F1 taken against the gold answer.
Category 1 (multi-hop) splits prediction and gold on commas and averages, over gold parts, the best
F1 of any predicted part; category 3 keeps the gold answer up to the first ';'; category 5
(adversarial) scores 1 when the prediction says "no information available" or "not mentioned".

Three setups answer the same questions after the whole conversation: ``hippo`` (the turns are
written one by one into the memory state; the prompt holds only the question), ``none`` (the
question alone) and ``full`` (the conversation as text before the question, cut from the left to
the context window).
"""

from __future__ import annotations

import random
import re
import string
from collections import Counter
from pathlib import Path

import torch

from memcli.errors import MemcliError

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
SETUPS = ("hippo", "none", "full")
QA_PROMPT = ("Based on the conversation, write an answer in the form of a short phrase for the following question. "
             "Answer with exact words from the conversation whenever possible.\n\nQuestion: {} Short answer:")
NOT_MENTIONED = "Not mentioned in the conversation"

_stemmer = None


def _stem(w: str) -> str:
    global _stemmer
    if _stemmer is None:
        from nltk.stem import PorterStemmer

        _stemmer = PorterStemmer()
    return _stemmer.stem(w)


def normalise_answer(s) -> str:
    s = str(s).replace(",", "").lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the|and)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction, gold) -> float:
    p = [_stem(w) for w in normalise_answer(prediction).split()]
    g = [_stem(w) for w in normalise_answer(gold).split()]
    same = sum((Counter(p) & Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def f1_multi(prediction: str, gold: str) -> float:
    preds = [x.strip() for x in str(prediction).split(",")]
    golds = [x.strip() for x in str(gold).split(",")]
    return sum(max(f1_score(p, g) for p in preds) for g in golds) / len(golds)


def score(prediction: str, item: dict) -> float:
    """One QA item's score, as LoCoMo computes it."""
    cat = item["category"]
    if cat == 5:
        low = prediction.lower()
        return 1.0 if ("no information available" in low or "not mentioned" in low) else 0.0
    gold = str(item["answer"])
    if cat == 3:
        gold = gold.split(";")[0].strip()
    if cat == 1:
        return f1_multi(prediction, gold)
    return f1_score(prediction, gold)


# ---- data
def load_locomo(path: str | Path) -> list[dict]:
    """Validated LoCoMo samples: ``conversation`` (speaker_a/b, session_N, session_N_date_time) and ``qa``."""
    from memcli.records import _load_json, require_file

    p = require_file(path, "LoCoMo file")
    data = _load_json(p, "a JSON list of LoCoMo samples")
    if not isinstance(data, list) or not data:
        raise MemcliError(f"{p}: expected a non-empty JSON list of LoCoMo samples")
    for i, s in enumerate(data):
        where = f"{p}: sample {i}"
        if not isinstance(s, dict) or not isinstance(s.get("conversation"), dict) or not isinstance(s.get("qa"), list):
            raise MemcliError(f"{where}: expected an object with 'conversation' (object) and 'qa' (list)")
        if not sessions(s):
            raise MemcliError(f"{where}: conversation has no session_N lists")
        for n, turn in ((n, t) for n, ts in sessions(s) for t in ts):
            if not isinstance(turn, dict) or not isinstance(turn.get("text"), str) or not isinstance(turn.get("speaker"), str):
                raise MemcliError(f"{where}: session_{n}: a turn without string 'speaker' and 'text'")
        for j, q in enumerate(s["qa"]):
            w = f"{where}: qa[{j}]"
            if not isinstance(q, dict) or not isinstance(q.get("question"), str) or q.get("category") not in CATEGORIES:
                raise MemcliError(f"{w}: expected 'question' (string) and 'category' (1-5)")
            if q["category"] != 5 and "answer" not in q:
                raise MemcliError(f"{w}: category {q['category']} item without 'answer'")
            if q["category"] == 5 and "adversarial_answer" not in q and "answer" not in q:
                raise MemcliError(f"{w}: category 5 item without 'adversarial_answer'")
    return data


def sessions(sample: dict) -> list[tuple[int, list]]:
    conv = sample["conversation"]
    out = []
    for k, v in conv.items():
        m = re.fullmatch(r"session_(\d+)", k)
        if m and isinstance(v, list):
            out.append((int(m.group(1)), v))
    return sorted(out)


def conversation_turns(sample: dict) -> list[str]:
    """The conversation as turn texts in order; each session opens with its date."""
    conv = sample["conversation"]
    out = []
    for n, turns in sessions(sample):
        date = conv.get(f"session_{n}_date_time")
        if date:
            out.append(f"[Session {n}, {date}]")
        out += [f"{t['speaker']}: {t['text']}" for t in turns]
    return out


def question_text(item: dict, rng: random.Random) -> str:
    q = item["question"]
    if item["category"] == 5:  # LoCoMo offers the adversarial answer beside "not mentioned", in random order
        opts = [NOT_MENTIONED, str(item.get("adversarial_answer", item.get("answer", "")))]
        rng.shuffle(opts)
        q = f"{q} Select the correct answer: (a) {opts[0]} (b) {opts[1]}."
    return QA_PROMPT.format(q)


# ---- running a model
@torch.no_grad()
def hippo_state(model, tok, turns: list[str], max_turn_length: int = 64, batch: int = 64) -> torch.Tensor:
    """Write every turn, in order: features in batches (they do not depend on the state), then the recurrence."""
    from memcli.hippo.data import content_ids, pad_turns, turn_ids

    ids = [turn_ids(tok, "user", t, max_turn_length) for t in turns]
    words = [content_ids(tok, t)[-max_turn_length:] for t in turns]
    S = model.init_state(1)
    for s in range(0, len(ids), batch):
        tid, mask, tm = pad_turns([ids[s: s + batch]], tok.pad_token_id)
        cid, cmask, _ = pad_turns([words[s: s + batch]], tok.pad_token_id)
        S = model.encode_dialogs(tid, mask, tm, cid, cmask, S=S)
    return S


def _window(model) -> int:
    cfg = getattr(model.backbone, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 2048) or 2048)


@torch.no_grad()
def answer_questions(model, tok, prompts: list[list[int]], state, max_new_tokens: int, batch: int) -> list[str]:
    from memcli.backbone import left_pad

    out_text = []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s: s + batch]
        ids, att = left_pad(chunk, tok.pad_token_id)
        st = None if state is None else state.expand(len(chunk), *state.shape[1:]).contiguous()
        out = model.generate(ids, att, state=st, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out_text += [tok.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]
    return out_text


def run_locomo(model, tok, data: list[dict], setups=SETUPS, conversations: int | None = None,
               max_questions: int | None = None, max_new_tokens: int = 24, context_window: int | None = None,
               batch: int = 8, seed: int = 0) -> dict:
    """Answer each conversation's QA in every setup; returns per-setup, per-category mean scores and the answers."""
    from memcli.hippo.data import prompt_ids

    bad = [s for s in setups if s not in SETUPS]
    if bad:
        raise MemcliError(f"--setups: '{bad[0]}' is not a setup, expected some of {', '.join(SETUPS)}")
    window = context_window or _window(model)
    rng = random.Random(seed)
    scores = {s: {c: [] for c in CATEGORIES} for s in setups}
    rows = []
    for sample in data[:conversations]:
        turns = conversation_turns(sample)
        qa = sample["qa"][:max_questions]
        questions = [question_text(q, rng) for q in qa]
        q_ids = [prompt_ids(tok, q) for q in questions]
        answers = {}
        for setup in setups:
            if setup == "hippo":
                answers[setup] = answer_questions(model, tok, q_ids, hippo_state(model, tok, turns), max_new_tokens, batch)
            elif setup == "none":
                answers[setup] = answer_questions(model, tok, q_ids, None, max_new_tokens, batch)
            else:
                history = tok("\n".join(turns), add_special_tokens=False)["input_ids"]
                prompts = [full_history_prompt(tok, history, q, window - max_new_tokens) for q in questions]
                answers[setup] = answer_questions(model, tok, prompts, None, max_new_tokens, batch)
        for j, q in enumerate(qa):
            row = {"sample_id": sample.get("sample_id", ""), "category": q["category"], "question": q["question"],
                   "gold": q.get("answer", q.get("adversarial_answer"))}
            for setup in setups:
                sc = score(answers[setup][j], q)
                scores[setup][q["category"]].append(sc)
                row[setup] = answers[setup][j]
                row[f"{setup}_f1"] = sc
            rows.append(row)
    summary = {}
    for setup in setups:
        per = {CATEGORIES[c]: (sum(v) / len(v) if v else None) for c, v in scores[setup].items()}
        allv = [x for v in scores[setup].values() for x in v]
        per["overall"] = sum(allv) / len(allv) if allv else None
        per["count"] = len(allv)
        summary[setup] = per
    return {"summary": summary, "answers": rows, "context_window": window}


def full_history_prompt(tok, history: list[int], question: str, budget: int) -> list[int]:
    """The question after the most recent part of the conversation that fits ``budget`` tokens in all."""
    from memcli.hippo.data import prompt_ids

    room = budget - len(prompt_ids(tok, "Conversation:\n\n\n" + question))
    while True:
        tail = tok.decode(history[-room:]) if room > 0 else ""
        ids = prompt_ids(tok, f"Conversation:\n{tail}\n\n{question}")
        if len(ids) <= budget or room <= 0:
            return ids[-budget:] if len(ids) > budget else ids
        room -= len(ids) - budget  # re-tokenising the cut text can take a few more tokens
