"""LoCoMo (Maharana et al., 2024) question answering over long conversations, scored as LoCoMo scores it.

Metric (LoCoMo's ``task_eval/evaluation.py``): answers are lower-cased, commas, punctuation and the
words a/an/the/and dropped, tokens Porter-stemmed, and token F1 taken against the gold answer.
Category 1 (multi-hop) splits prediction and gold on commas and averages, over gold parts, the best
F1 of any predicted part; category 3 keeps the gold answer up to the first ';'; category 5
(adversarial) scores 1 when the prediction says "no information available" or "not mentioned".

Setups answer the same questions after the whole conversation:

- ``none``: the question alone; ``full``: the conversation as text before the question, cut from the
  left to the context window;
- ``oracle``: the question's evidence turns (LoCoMo's ``evidence``), with their dates, before it: the
  ceiling of any memory that reads turns into this model's prompt;
- ``turns``: the conversation's turns as memory entries (``memcli.hippo.turns``); the question brings back
  its top-k turns, read as a prefix like the oracle's;
- ``hippo``: the turns written one by one into the HIPPO memory state, the prompt holds only the
  question; ``hippo+turns``: the state and the retrieved turns together; ``hippo+oracle``: the state and the
  evidence turns, in the form the HIPPO run was trained with (the ceiling of ``hippo+turns``).

Beside F1 and BLEU-1 per category: the share of each question's evidence turns that its prompt holds,
the retriever's recall@k, latency per question (its share of the batch's wall time, plus retrieval),
prompt tokens per question, and the time to write a conversation into the memory.
"""

from __future__ import annotations

import math
import random
import re
import time
import string
from collections import Counter
from pathlib import Path

import torch

from memcli.errors import MemcliError

CATEGORIES = {1: "multi-hop", 2: "temporal", 3: "open-domain", 4: "single-hop", 5: "adversarial"}
SCORED = (1, 2, 3, 4)  # what the field reports as "overall"; adversarial (5) is scored on abstention, apart
SETUPS = ("hippo", "none", "full", "oracle", "turns", "hippo+turns", "hippo+oracle")
RETRIEVAL_SETUPS = ("turns", "hippo+turns")
ORACLE_SETUPS = ("oracle", "hippo+oracle")  # read exactly the evidence turns
RECALL_KS = (1, 5, 10)
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


def bleu1(prediction, gold) -> float:
    """BLEU-1 of one answer: clipped unigram precision times the brevity penalty, on the tokens F1 uses (normalised,
    not stemmed); 0 for an empty answer."""
    p = normalise_answer(prediction).split()
    g = normalise_answer(gold).split()
    if not p or not g:
        return 0.0
    clipped = sum((Counter(p) & Counter(g)).values())
    bp = 1.0 if len(p) > len(g) else math.exp(1 - len(g) / len(p))
    return bp * clipped / len(p)


def bleu_score(prediction: str, item: dict) -> float | None:
    """BLEU-1 against the gold answer under LoCoMo's category rules (3: cut at ';'); None for category 5, whose
    right answer is an abstention rather than a text to match."""
    if item["category"] == 5:
        return None
    gold = str(item["answer"])
    if item["category"] == 3:
        gold = gold.split(";")[0].strip()
    return bleu1(prediction, gold)


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


def conversation_entries(sample: dict) -> list[dict]:
    """Every turn in order as ``{id, session, date, speaker, text, caption?}`` (``id`` is LoCoMo's ``dia_id``)."""
    conv = sample["conversation"]
    out = []
    for n, turns in sessions(sample):
        date = str(conv.get(f"session_{n}_date_time") or "")
        for j, t in enumerate(turns):
            e = {"id": str(t.get("dia_id") or f"D{n}:{j + 1}"), "session": n, "date": date, "speaker": t["speaker"],
                 "text": t["text"]}
            if isinstance(t.get("blip_caption"), str):
                e["caption"] = t["blip_caption"]
            out.append(e)
    return out


def conversation_turns(sample: dict) -> list[str]:
    """The conversation as turn texts in order; each session opens with its date."""
    from memcli.hippo.turns import key_text

    conv = sample["conversation"]
    out = []
    for n, turns in sessions(sample):
        date = conv.get(f"session_{n}_date_time")
        if date:
            out.append(f"[Session {n}, {date}]")
        out += [key_text({"speaker": t["speaker"], "text": t["text"], "caption": t.get("blip_caption")}) for t in turns]
    return out


_EVIDENCE = re.compile(r"D\s*:?\s*(\d+)\s*:\s*(\d+)")


def evidence_ids(item: dict) -> list[str]:
    """The turns a question's answer rests on, as ``D<session>:<turn>``; LoCoMo's few malformed references
    ("D8:6; D9:17", "D:11:26", "D30:05") are read by pattern, a bare "D" is dropped."""
    out = []
    for e in item.get("evidence") or []:
        for a, b in _EVIDENCE.findall(str(e)):
            x = f"D{int(a)}:{int(b)}"
            if x not in out:
                out.append(x)
    return out


def question_text(item: dict, rng: random.Random) -> str:
    """The question as a setup asks it: an adversarial one with its two options (the HIPPO setups then put it
    in ``QA_PROMPT``, the others ask for a short answer after it: ``_setup_prompts``)."""
    q = item["question"]
    if item["category"] == 5:  # LoCoMo offers the adversarial answer beside "not mentioned", in random order
        opts = [NOT_MENTIONED, str(item.get("adversarial_answer", item.get("answer", "")))]
        rng.shuffle(opts)
        q = f"{q} Select the correct answer: (a) {opts[0]} (b) {opts[1]}."
    return q


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
def answer_questions(model, tok, prompts: list[list[int]], state, max_new_tokens: int, batch: int, timed: bool = False):
    """Greedy answers; with ``timed`` also each question's share of its batch's wall time (seconds)."""
    from memcli.backbone import left_pad

    out_text, times = [], []
    for s in range(0, len(prompts), batch):
        chunk = prompts[s: s + batch]
        t0 = time.perf_counter()
        ids, att = left_pad(chunk, tok.pad_token_id)
        st = None if state is None else state.expand(len(chunk), *state.shape[1:]).contiguous()
        out = model.generate(ids, att, state=st, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        out_text += [tok.decode(o[ids.shape[1]:], skip_special_tokens=True).strip() for o in out]
        times += [(time.perf_counter() - t0) / len(chunk)] * len(chunk)
    return (out_text, times) if timed else out_text


def _count_recall(ranked: list[list[int]], evidence: list[list[int]], ks, recall: dict, every: dict) -> None:
    """Add each question's evidence recall@k (share of its evidence turns in the top k) and all@k (every one
    there) for questions that have evidence turns."""
    for r, ev in zip(ranked, evidence):
        if not ev:
            continue
        for k in ks:
            got = set(r[:k])
            recall[k].append(sum(i in got for i in ev) / len(ev))
            every[k].append(float(all(i in got for i in ev)))


def _recall_summary(name: str, recall: dict, every: dict, ks) -> dict:
    return {"retriever": name, "questions_with_evidence": len(recall[ks[0]]),
            **{f"recall@{k}": _mean(recall[k]) for k in ks}, **{f"all@{k}": _mean(every[k]) for k in ks}}


def recall_only(data: list[dict], encoder, conversations: int | None = None, max_questions: int | None = None,
                ks=RECALL_KS, retriever: str = "hybrid", first: int = 0, reranker=None, sample: int | None = None,
                seed: int = 0, progress_cb=None, priors: dict | None = None) -> dict:
    """The turn retriever's evidence recall@k over the conversations, without answering anything. ``priors``:
    ``TurnMemory``'s ``neighbor_weight`` / ``speaker_weight`` / ``date_weight`` / ``dense_share`` (its defaults
    where absent)."""
    recall = {k: [] for k in ks}
    every = {k: [] for k in ks}
    t0 = time.perf_counter()
    for conv in data[first:][:conversations]:
        entries = conversation_entries(conv)
        position = {e["id"]: i for i, e in enumerate(entries)}
        qa = pick_questions(conv["qa"], max_questions, sample, seed)
        mem = _turn_memory(encoder, retriever, reranker, priors)
        mem.add(entries)
        ranked = mem.search([q["question"] for q in qa], max(ks))[0].tolist()
        _count_recall(ranked, [[position[x] for x in evidence_ids(q) if x in position] for q in qa], ks, recall, every)
        if progress_cb:
            progress_cb("recall", len(qa))
    return {**_recall_summary(_retriever_name(encoder, retriever, reranker, priors), recall, every, ks),
            "seconds": round(time.perf_counter() - t0, 2)}


def _turn_memory(encoder, retriever: str, reranker=None, priors: dict | None = None):
    from memcli.hippo.turns import TurnMemory

    return TurnMemory(encoder, retriever, reranker=reranker, **(priors or {}))


def _retriever_name(encoder, retriever: str, reranker=None, priors: dict | None = None) -> str:
    mem = _turn_memory(encoder, retriever, None, priors)
    extra = [f"{label} x{w:g}" for label, w in (("neighbours", mem.neighbor_weight), ("named speaker", mem.speaker_weight),
                                                ("named date", mem.date_weight)) if w]
    share = f" at dense share {mem.dense_share:g}" if mem.retriever == "hybrid" and mem.dense_share != 0.5 else ""
    name = mem.name + share + (f" + {', '.join(extra)}" if extra else "")
    return name if reranker is None else f"{name} + {reranker.name} re-ranking of the top {reranker.candidates}"


def pick_questions(qa: list, first: int | None, sample: int | None, seed: int) -> list:
    """The first ``first`` questions, or ``sample`` of them drawn with ``seed`` and kept in file order."""
    if sample is None or sample >= len(qa):
        return qa[:first]
    keep = sorted(random.Random(seed).sample(range(len(qa)), sample))
    return [qa[i] for i in keep]


class PlainModel:
    """A bare backbone behind HippoModel's ``generate`` signature: the setups that need no memory state run on it."""

    def __init__(self, backbone):
        self.backbone = backbone

    def generate(self, input_ids, attention_mask=None, state=None, **kw):
        return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)


def _p95(xs: list[float]) -> float | None:
    if not xs:
        return None
    ys = sorted(xs)
    return ys[min(len(ys) - 1, math.ceil(0.95 * len(ys)) - 1)]


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def run_locomo(model, tok, data: list[dict], setups=SETUPS, conversations: int | None = None,
               max_questions: int | None = None, max_new_tokens: int = 24, context_window: int | None = None,
               batch: int = 8, seed: int = 0, top_k: int = 5, encoder=None, recall_ks=RECALL_KS,
               progress_cb=None, retriever: str = "hybrid", first: int = 0, sample: int | None = None,
               reranker=None, priors: dict | None = None) -> dict:
    """Answer each conversation's QA in every setup.

    Returns ``summary`` (per setup: F1 and BLEU-1 per category, ``overall`` = categories 1-4, adversarial apart;
    evidence share in the prompt; retrieval recall@k; latency; prompt tokens), ``answers`` (one row per question)
    and ``context_window``. ``retriever`` and ``encoder`` (``memcli.hippo.turns``) rank the turns for ``turns`` /
    ``hippo+turns``. ``first``: skip that many conversations; ``sample``: that many questions per conversation, drawn
    with ``seed`` (kept in file order), instead of the first ``max_questions``. ``reranker``
    (``memcli.hippo.turns.LikelihoodReranker``) re-orders the retriever's best candidates; ``priors`` as in
    ``recall_only``."""
    bad = [s for s in setups if s not in SETUPS]
    if bad:
        raise MemcliError(f"--setups: '{bad[0]}' is not a setup, expected some of {', '.join(SETUPS)}")
    retrieving = any(s in RETRIEVAL_SETUPS for s in setups)
    if top_k < 1:
        raise MemcliError(f"--top-k {top_k}: expected at least 1")
    window = context_window or _window(model)
    rng = random.Random(seed)
    rows = []
    per = {s: {"latency": [], "tokens": [], "in_prompt": [], "write_s": []} for s in setups}
    recall = {k: [] for k in recall_ks}
    recall_all = {k: [] for k in recall_ks}
    ret_name = _retriever_name(encoder, retriever, reranker, priors) if retrieving else None
    for conv in data[first:][:conversations]:
        entries = conversation_entries(conv)
        position = {e["id"]: i for i, e in enumerate(entries)}
        turns = conversation_turns(conv)
        qa = pick_questions(conv["qa"], max_questions, sample, seed)
        questions = [question_text(q, rng) for q in qa]
        evidence = [[position[x] for x in evidence_ids(q) if x in position] for q in qa]
        prompts, reads, states, write_s, extra_s = {}, {}, {}, {}, {}
        hippo = None
        ranked = None
        if retrieving:
            t0 = time.perf_counter()
            mem = _turn_memory(encoder, retriever, reranker, priors)
            mem.add(entries)
            t1 = time.perf_counter()
            idx, _ = mem.search([q["question"] for q in qa], max(top_k, *recall_ks))
            search_s = (time.perf_counter() - t1) / max(1, len(qa))
            ranked = idx.tolist()
            _count_recall(ranked, evidence, recall_ks, recall, recall_all)
        for setup in setups:
            states[setup], write_s[setup], extra_s[setup] = None, 0.0, 0.0
            if setup.startswith("hippo"):
                if hippo is None:  # one state per conversation, shared by the hippo setups
                    t0h = time.perf_counter()
                    hippo = (hippo_state(model, tok, turns), time.perf_counter() - t0h)
                states[setup], write_s[setup] = hippo
            if setup in RETRIEVAL_SETUPS:
                write_s[setup] += t1 - t0
                extra_s[setup] = search_s
            prompts[setup], reads[setup] = _setup_prompts(setup, tok, questions, entries, turns, evidence, ranked,
                                                          top_k, window - max_new_tokens)
        answers, times = {}, {}
        for setup in setups:
            answers[setup], times[setup] = answer_questions(model, tok, prompts[setup], states[setup], max_new_tokens,
                                                            batch, timed=True)
            per[setup]["write_s"].append(write_s[setup])
            if progress_cb:
                progress_cb(setup, len(qa))
        rows += _score_rows(conv, qa, entries, evidence, setups, answers, reads, prompts,
                            {s: [t + extra_s[s] for t in times[s]] for s in setups}, per)
    summary = {setup: _setup_summary(setup, rows, per[setup]) for setup in setups}
    res = {"summary": summary, "answers": rows, "context_window": window, "top_k": top_k}
    if retrieving:
        res["retrieval"] = _recall_summary(ret_name, recall, recall_all, recall_ks)
    return res


def _score_rows(conv: dict, qa: list[dict], entries: list[dict], evidence: list[list[int]], setups, answers: dict,
                reads: dict, prompts: dict, latency: dict, per: dict) -> list[dict]:
    """One row per question (every setup's answer, F1, BLEU-1, turns read, evidence share); ``per`` collects
    each setup's evidence shares, prompt lengths and latencies."""
    rows = []
    for j, q in enumerate(qa):
        row = {"sample_id": conv.get("sample_id", ""), "category": q["category"], "question": q["question"],
               "gold": q.get("answer", q.get("adversarial_answer")), "evidence": [entries[i]["id"] for i in evidence[j]]}
        ev = set(evidence[j])
        for setup in setups:
            a = answers[setup][j]
            share = (sum(i in set(reads[setup][j]) for i in ev) / len(ev)) if ev else None
            row.update({setup: a, f"{setup}_f1": score(a, q), f"{setup}_bleu1": bleu_score(a, q),
                        f"{setup}_read": [entries[i]["id"] for i in reads[setup][j]] if setup != "full" else None,
                        f"{setup}_evidence_in_prompt": share})
            per[setup]["in_prompt"].append(share)
            per[setup]["tokens"].append(len(prompts[setup][j]))
            per[setup]["latency"].append(latency[setup][j])
        rows.append(row)
    return rows


def _setup_prompts(setup: str, tok, questions: list[str], entries: list[dict], turns: list[str],
                   evidence: list[list[int]], ranked: list[list[int]] | None, top_k: int,
                   budget: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, turns read) of each question in one setup; ``budget``: the full history's prompt tokens."""
    from memcli.hippo.data import prompt_ids
    from memcli.hippo.turns import context_prompt, excerpt_prompt, key_text

    # the setups without a state use the backbone's own chat form (context_prompt: the question, then
    # SHORT_ANSWER); the HIPPO setups keep the format their run was trained with, LoCoMo's QA prompt around it
    native = not setup.startswith("hippo")
    if not native:
        questions = [QA_PROMPT.format(q) for q in questions]
    if setup in ("none", "hippo"):  # hippo: the state carries the conversation, the prompt is the question
        return [context_prompt(tok, None, q) if native else prompt_ids(tok, q) for q in questions], [[] for _ in questions]
    if setup == "full":
        history = tok("\n".join(turns), add_special_tokens=False)["input_ids"]
        prompts = [full_history_prompt(tok, history, q, budget) for q in questions]
        texts = [tok.decode(p) for p in prompts]
        return prompts, [[i for i, e in enumerate(entries) if key_text(e) in t] for t in texts]
    reads = [sorted(ev) for ev in evidence] if setup in ORACLE_SETUPS else [sorted(r[:top_k]) for r in ranked]
    return [excerpt_prompt(tok, [entries[i] for i in r], q, native) for r, q in zip(reads, questions)], reads


def _setup_summary(setup: str, rows: list[dict], per: dict) -> dict:
    """F1 and BLEU-1 per category and overall (categories 1-4), counts, evidence share, latency, tokens."""
    out = {}
    for metric in ("f1", "bleu1"):
        col = f"{setup}_{metric}"
        m = {name: _mean([r[col] for r in rows if r["category"] == c and r[col] is not None])
             for c, name in CATEGORIES.items()}
        m["overall"] = _mean([r[col] for r in rows if r["category"] in SCORED])
        out[metric] = m
    out["count"] = {CATEGORIES[c]: sum(r["category"] == c for r in rows) for c in CATEGORIES}
    out["count"]["overall"] = sum(r["category"] in SCORED for r in rows)
    out["evidence_in_prompt"] = _mean(per["in_prompt"])
    out["latency_s_mean"] = _mean(per["latency"])
    out["latency_s_p95"] = _p95(per["latency"])
    out["prompt_tokens_mean"] = _mean(per["tokens"])
    out["write_s_per_conversation"] = _mean(per["write_s"])
    return out


def full_history_prompt(tok, history: list[int], question: str, budget: int) -> list[int]:
    """The question after the most recent part of the conversation that fits ``budget`` tokens in all."""
    from memcli.hippo.turns import context_prompt

    room = budget - len(context_prompt(tok, "Conversation:\n", question))
    while True:
        tail = tok.decode(history[-room:]) if room > 0 else ""
        ids = context_prompt(tok, f"Conversation:\n{tail}", question)
        if len(ids) <= budget or room <= 0:
            return ids[-budget:] if len(ids) > budget else ids
        room -= len(ids) - budget  # re-tokenising the cut text can take a few more tokens
