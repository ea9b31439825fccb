"""Training items of explicit memory in two answer formats, their batches, and the losses on them.

- ``letter`` (ExplicitLM's): a chat prompt with the question, five options and an instruction,
  answered ``C:text<|im_end|>``;
- ``cloze``: the entry's sentence cut before its object (``Basim plays``), answered with the object
  text (`` voice``), no template. A pretrained model can use a fact in this format; in the letter
  format a 135M model is at chance even with the fact in its prompt (README, measured).

Each item knows its entry (bank row), the router labels of build-keys and counterfactual variants
(the entry with its object replaced by another option, and the answer that follows it). In the
cloze format each fact also gives a router-only item, the chat question, so retrieval learns from
questions as a user asks them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from memcli import records
from memcli.backbone import IGNORE, answer_loss, left_pad
from memcli.data.bank import tokenize_entries
from memcli.data.knowledge import object_pools, parse_options
from memcli.errors import MemcliError
from memcli.explicit import losses



@dataclass
class Item:
    prompt_ids: list[int]
    answer_ids: list[int]  # empty: a router-only item
    row: int | None  # the labelled entry (bank row) or None
    targets: list[int]  # labelled rows
    scores: list[float]
    cf: list[tuple[list[int], list[int]]]  # counterfactual variants: (entry token ids, answer ids)
    router_from: int = 0  # first prompt position whose query can know the subject (router loss from here)
    index: int = 0  # position in its item list (cached prompt features are looked up by it)


def prompt_ids(tok, user: str) -> list[int]:
    from memcli.retrieval.placement import chat_prompt_ids

    return chat_prompt_ids(tok, user)


def answer_ids(tok, text: str) -> list[int]:
    return tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]


def cloze_parts(entry: dict) -> tuple[str, str] | None:
    """``(prompt, object)`` of an entry whose sentence states its object after the subject, else None."""
    sent, obj, subj = entry.get("sentence") or "", entry.get("object") or "", entry.get("subject") or ""
    at = sent.rfind(obj) if obj else -1
    if at <= 0 or (subj and subj not in sent[:at]):
        return None
    return sent[:at].rstrip(), obj


def cloze_ids(tok, prompt: str, obj: str) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids (a space and the object) of a cloze, tokenised as one text would be."""
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    full = tok(prompt + " " + obj, add_special_tokens=False)["input_ids"]
    if full[: len(p)] == p:  # the usual case: the prompt's tokens are a prefix of the whole
        return p, full[len(p):]
    return p, tok(" " + obj, add_special_tokens=False)["input_ids"]


def _router_from(tok, bank, row, user: str, p: list[int], full: list[int]) -> int:
    """First prompt position after the subject (positions before it cannot know which entry is asked about)."""
    e = bank.entries[row] if row is not None else None
    if not e or not e.get("subject") or e["subject"] not in user:
        return len(p) - 1
    end = user.index(e["subject"]) + len(e["subject"])
    n_prefix = len(prompt_ids(tok, user[:end])) - (len(full) - len(p))
    tail = len(prompt_ids(tok, "")) - len(tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    return max(0, min(len(p) - 1, n_prefix - tail - 1))


def load_items(tok, bank, sft_path, labeled_path, max_prompt_length: int, fmt: str = "letter",
               with_questions: bool = True, forms: dict | None = None) -> list[Item]:
    """SFT rows aligned with their labels, in ``fmt``; counterfactual variants pre-tokenised per item.

    ``fmt=cloze`` needs each row's entry (its uuid) and, with ``with_questions``, adds a router-only
    item per row: the chat question alone. With ``forms`` (``memcli.data.forms``) each fact is also asked
    with its relation's training templates (cloze) and its natural question (chat template, answered with
    the object alone); held-out templates are never used.
    """
    rows = records.read_jsonl(sft_path, records.CONVERSATION)
    labels = records.read_jsonl(labeled_path, records.LABELED) if labeled_path else [None] * len(rows)
    if len(labels) != len(rows):
        raise MemcliError(f"{labeled_path}: {len(labels)} labels for {len(rows)} conversations in {sft_path}")
    row_of = bank.row_of_uuid()
    pools = object_pools([{"target": [e]} for e in bank.entries if e.get("uuid")])
    L = bank.knowledge_length
    items: list[Item] = []
    for i, (r, lab) in enumerate(zip(rows, labels)):
        user = next(m["content"] for m in r["conversations"] if m["role"] == "user")
        ans = next(m["content"] for m in r["conversations"] if m["role"] == "assistant")
        if lab is not None:
            if lab["query"] != user:
                raise MemcliError(f"{labeled_path}:{i + 1}: query does not match conversation {i + 1} of {sft_path}")
            bad = [t for t in lab["target_indices"] if t >= bank.knowledge_num]
            if bad:
                raise MemcliError(f"{labeled_path}:{i + 1}: target index {bad[0]} outside the bank [0, {bank.knowledge_num})")
        row = row_of.get(r.get("uuid")) if r.get("uuid") else (lab["target_indices"][0] if lab else None)
        targets, scores = (lab["target_indices"], lab["target_scores"]) if lab else ([], [])
        e = bank.entries[row] if row is not None else None
        opts = parse_options(user.split("\n")[1]) if "\n" in user else []
        alts = [(letter, o) for letter, o in opts
                if e and e.get("object") and o != e["object"] and o in pools.get(e.get("predicate"), [])]

        def variant(obj: str) -> list[int]:
            return tokenize_entries(tok, [e["sentence"].replace(e["object"], obj)], L, bank.pad_id)[0][0].tolist()

        if fmt == "cloze":
            parts = cloze_parts(e) if e else None
            if parts is None:
                continue  # no entry to cut a cloze from: the row cannot be asked in this format
            cp, obj = parts
            p, a = cloze_ids(tok, cp, obj)
            p = p[-max_prompt_length:]
            variants = {o: variant(o) for _, o in alts}
            cf = [(variants[o], cloze_ids(tok, cp, o)[1]) for _, o in alts]
            items.append(Item(p, a, row, targets, scores, cf, 0))
            if forms and e.get("predicate") in forms and e.get("subject"):
                items += _other_forms(tok, forms[e["predicate"]], e["subject"], obj, variants, max_prompt_length,
                                      (row, targets, scores))
            if with_questions:
                q = prompt_ids(tok, user.split("\n")[0])[-max_prompt_length:]
                items.append(Item(q, [], row, targets, scores, [], 0))
            continue
        full = prompt_ids(tok, user)
        p = full[-max_prompt_length:]
        cf = [(variant(o), answer_ids(tok, f"{letter}:{o}")) for letter, o in alts]
        items.append(Item(p, answer_ids(tok, ans), row, targets, scores, cf, _router_from(tok, bank, row, user, p, full)))
    for j, it in enumerate(items):
        it.index = j
    return items


def _other_forms(tok, fm, subject: str, obj: str, variants: dict, max_prompt_length: int, label: tuple) -> list[Item]:
    """A fact asked with its relation's training templates and its natural question (``dataset.paraphrases``)."""
    from memcli.data.forms import cloze_prefix

    out = []
    for t in fm.train:
        text = cloze_prefix(t, subject)
        if text is not None:
            p, a = cloze_ids(tok, text, obj)
            out.append(Item(p[-max_prompt_length:], a, *label, [(v, cloze_ids(tok, text, o)[1]) for o, v in variants.items()]))
    if fm.question:
        q = prompt_ids(tok, fm.question.replace("[X]", subject))[-max_prompt_length:]
        out.append(Item(q, answer_ids(tok, obj), *label, [(v, answer_ids(tok, o)) for o, v in variants.items()]))
    return out


def collate(items: list[Item], pad_id: int, step_seed: int, cf_prob: float) -> dict:
    """Left-aligned batch with labels on answer tokens; counterfactual rows drawn from the step's seed.

    Every router label build-keys wrote is used (``--top-k`` of them per query)."""
    rng = random.Random(step_seed)
    seqs, labs, ov_rows, ov_ids, rfrom = [], [], [], [], []
    used_rows = set()
    for it in items:
        ans = it.answer_ids
        if it.cf and it.row not in used_rows and rng.random() < cf_prob:
            ids, ans = it.cf[rng.randrange(len(it.cf))]
            ov_rows.append(it.row)
            ov_ids.append(ids)
        if it.row is not None:
            used_rows.add(it.row)
        seqs.append(it.prompt_ids + ans)
        labs.append([IGNORE] * len(it.prompt_ids) + ans)
        rfrom.append(it.router_from)
    T = max(len(s) for s in seqs)
    B = len(seqs)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    router_pos = torch.zeros((B, T), dtype=torch.bool)
    prompt_end = torch.zeros(B, dtype=torch.long)
    for b, (s, lab) in enumerate(zip(seqs, labs)):
        o = T - len(s)  # left padding: every answer ends at T-1, so logits are needed for the tail only
        input_ids[b, o:] = torch.tensor(s)
        labels[b, o:] = torch.tensor(lab)
        att[b, o:] = 1
        router_pos[b, o + rfrom[b]: T - 1] = True  # from the subject's end up to the last answer-predicting token
        prompt_end[b] = o + len(items[b].prompt_ids)
    m = max(1, max(len(it.targets) for it in items))
    tgt = torch.full((B, m), -1, dtype=torch.long)
    tw = torch.zeros((B, m))
    for b, it in enumerate(items):
        k = min(m, len(it.targets))
        if k:
            tgt[b, :k] = torch.tensor(it.targets[:k])
            tw[b, :k] = torch.softmax(torch.tensor(it.scores[:k]) * 10.0, 0)  # sharpen cosine scores
    out = {"input_ids": input_ids, "attention_mask": att, "labels": labels, "target_rows": tgt, "target_weights": tw,
           "router_pos": router_pos, "prompt_end": prompt_end,
           "item_index": torch.tensor([it.index for it in items], dtype=torch.long)}
    if ov_rows:
        out["override_rows"] = torch.tensor(ov_rows, dtype=torch.long)
        out["override_ids"] = torch.tensor(ov_ids, dtype=torch.long)
    return out


def tail_lm_loss(model, batch: dict, **kw) -> tuple[torch.Tensor, list[dict]]:
    """LM loss on the answer tail of a left-padded batch (``backbone.answer_loss``) and the forward's memory records."""
    loss, out = answer_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"], with_output=True,
                            collect=True, **kw)
    return loss, (out.memory_records if out is not None else [])


def router_positions(batch: dict, records: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Flattened positions the router loss is taken at, and the batch row of each."""
    rec = records[0]
    if rec.get("per_sequence"):  # one query per sequence (read=prefix)
        pos = torch.arange(rec["cells"].shape[0], device=rec["cells"].device)
        return pos, pos
    labels = batch["labels"]
    T = labels.shape[1]
    pred = batch.get("router_pos")
    if pred is None:  # positions whose query has seen the subject, else those predicting the answer
        pred = torch.zeros_like(labels, dtype=torch.bool)
        pred[:, :-1] = labels[:, 1:] != IGNORE
    flat_pos = torch.nonzero(pred.reshape(-1)).flatten()
    return flat_pos, flat_pos // T


def memory_losses(mem, batch: dict, records: list[dict], coefs: dict) -> tuple[torch.Tensor, dict]:
    """Router / balance / similarity / diversity terms over every memory layer's records.

    ``coefs``: router, balance, similarity, diversity (0 or absent: the term is not computed).
    """
    total = torch.zeros((), device=batch["labels"].device)
    mets = {}
    if not records:
        return total, mets
    flat_pos, seq_of = router_positions(batch, records)
    for rec in records:
        gate = mem.gates[str(rec["layer"])]
        if coefs.get("router"):
            tr = batch["target_rows"][seq_of]
            if (tr >= 0).any():
                rl = losses.router_loss(rec, flat_pos, tr, batch["target_weights"][seq_of], gate.num_keys,
                                        gate.log_scale.exp())
                total = total + coefs["router"] * rl
                mets[f"router_l{rec['layer']}"] = rl.detach()
        if coefs.get("balance"):
            total = total + coefs["balance"] * losses.balance_loss(rec, mem.cfg.knowledge_num,
                                                                   coefs.get("balance_form", "soft"))
        if coefs.get("similarity"):
            total = total + coefs["similarity"] * losses.similarity_loss(rec, gate)
        if coefs.get("diversity"):
            total = total + coefs["diversity"] * losses.diversity_loss(rec, gate)
    return total, mets


# ---------------------------------------------------------------------------- raw text (MiniMind-style pretraining)


@dataclass
class TextItem:
    ids: list[int]
    index: int = 0


def load_texts(tok, path, max_text_length: int) -> list[TextItem]:
    """``{"text": ...}`` rows as token sequences (the start of each, ending with EOS when it fits)."""
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    out = []
    for i, row in enumerate(records.read_rows(path, records.TEXT)):
        ids = (tok(row["text"], add_special_tokens=False)["input_ids"] + eos)[:max_text_length]
        if len(ids) > 1:
            out.append(TextItem(ids, i))
    if not out:
        raise MemcliError(f"{path}: no text with two or more tokens")
    return out


def text_collate(items: list[TextItem], pad_id: int) -> dict:
    """Left-padded texts with every real token a label (next-token loss over the whole text)."""
    ids, att = left_pad([it.ids for it in items], pad_id)
    labels = torch.where(att.bool(), ids, torch.full_like(ids, IGNORE))
    return {"input_ids": ids, "attention_mask": att, "labels": labels}
