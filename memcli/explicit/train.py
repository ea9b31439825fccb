"""Training stages of explicit memory: ``router``, ``fusion`` and ``memory`` (ExplicitLM's, bugs fixed).

- router: only the MemoryGate trains, on the router loss toward labelled entries;
- fusion: the gate is loaded strictly from the router stage and frozen; fusion + MemoryNorm train on LM loss;
- memory: all memory components (and the backbone if full / LoRA) on LM loss (assistant tokens only)
  + ``router_loss_coef`` * router loss + balance / similarity / diversity losses, with counterfactual
  memory augmentation (``counterfactual_prob``): an entry's object is rewritten in a batch-local copy
  of the bank and the target follows it, so answers cannot come from the weights.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from memcli import records
from memcli.checkpoint import load_tensors, save_tensors
from memcli.data.bank import tokenize_entries
from memcli.data.knowledge import object_pools, parse_options
from memcli.errors import MemcliError
from memcli.explicit import losses
from memcli.explicit.ema import EmaAccumulator, ema_update, frozen_rows
from memcli.explicit.io import build_model, load_memory_state_dict, memory_state_dict, save_checkpoint

IGNORE = -100


@dataclass
class Item:
    prompt_ids: list[int]
    answer_ids: list[int]
    row: int | None  # the labelled entry (bank row) or None
    targets: list[int]  # labelled rows
    scores: list[float]
    cf: list[tuple[list[int], list[int]]]  # counterfactual variants: (entry token ids, answer ids)
    router_from: int = 0  # first prompt position whose query can know the subject (router loss from here)


def prompt_ids(tok, user: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": user}], tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def answer_ids(tok, text: str) -> list[int]:
    return tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]


def load_items(tok, bank, sft_path, labeled_path, L: int, max_length: int) -> list[Item]:
    """SFT rows aligned with their labels; counterfactual variants pre-tokenised per item."""
    rows = records.read_jsonl(sft_path, records.CONVERSATION)
    labels = records.read_jsonl(labeled_path, records.LABELED) if labeled_path else [None] * len(rows)
    if len(labels) != len(rows):
        raise MemcliError(f"{labeled_path}: {len(labels)} labels for {len(rows)} conversations in {sft_path}")
    row_of = bank.row_of_uuid()
    pools = object_pools([{"target": [e]} for e in bank.entries if e.get("uuid")])
    items = []
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
        full = prompt_ids(tok, user)
        p = full[-max_length:]
        router_from = len(p) - 1  # by default: the last prompt token only
        if row is not None and bank.entries[row].get("subject") and bank.entries[row]["subject"] in user:
            end = user.index(bank.entries[row]["subject"]) + len(bank.entries[row]["subject"])
            # prefix of the rendered prompt up to the subject's end: positions after it have seen the subject
            n_prefix = len(prompt_ids(tok, user[:end])) - (len(full) - len(p))
            tail = len(prompt_ids(tok, "")) - len(tok("<|im_start|>user\n", add_special_tokens=False)["input_ids"])
            router_from = max(0, min(len(p) - 1, n_prefix - tail - 1))
        cf = []
        if row is not None and bank.entries[row].get("object"):
            e = bank.entries[row]
            opts = parse_options(user.split("\n")[1]) if "\n" in user else []
            for letter, obj in opts:
                if obj != e["object"] and obj in pools.get(e["predicate"], []):
                    sent = e["sentence"].replace(e["object"], obj)
                    ids, _ = tokenize_entries(tok, [sent], L, bank.pad_id)
                    cf.append((ids[0].tolist(), answer_ids(tok, f"{letter}:{obj}")))
        items.append(Item(p, answer_ids(tok, ans), row, lab["target_indices"] if lab else [],
                          lab["target_scores"] if lab else [], cf, router_from))
    return items


def collate(items: list[Item], pad_id: int, step_seed: int, cf_prob: float, m: int = 8) -> dict:
    """Left-aligned batch with labels on answer tokens; counterfactual rows drawn from the step's seed."""
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
    for b, (s, l) in enumerate(zip(seqs, labs)):
        o = T - len(s)  # left padding: every answer ends at T-1, so logits are needed for the tail only
        input_ids[b, o:] = torch.tensor(s)
        labels[b, o:] = torch.tensor(l)
        att[b, o:] = 1
        router_pos[b, o + rfrom[b]: T - 1] = True  # from the subject's end up to the last answer-predicting token
    tgt = torch.full((B, m), -1, dtype=torch.long)
    tw = torch.zeros((B, m))
    for b, it in enumerate(items):
        k = min(m, len(it.targets))
        if k:
            tgt[b, :k] = torch.tensor(it.targets[:k])
            tw[b, :k] = torch.softmax(torch.tensor(it.scores[:k]) * 10.0, 0)  # sharpen cosine scores
    answer_span = int((labels != IGNORE).sum(1).max()) + 1
    out = {"input_ids": input_ids, "attention_mask": att, "labels": labels, "target_rows": tgt, "target_weights": tw,
           "router_pos": router_pos, "answer_span": answer_span}
    if ov_rows:
        out["override_rows"] = torch.tensor(ov_rows, dtype=torch.long)
        out["override_ids"] = torch.tensor(ov_ids, dtype=torch.long)
    return out


def tail_lm_loss(model, batch: dict) -> torch.Tensor:
    """LM loss on the answer tail only: logits for the last ``answer_span`` positions (left-padded batch).

    Mean over supervised tokens, like HF's loss; the full-vocabulary head runs on a few positions
    instead of all of them.
    """
    K = batch["answer_span"]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=K, collect=True)
    logits = out.logits[:, :-1].float()  # positions T-K .. T-2 predict tokens T-K+1 .. T-1
    tgt = batch["labels"][:, -K + 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE)


def memory_losses(mem, batch: dict, cfg, stage: str) -> tuple[torch.Tensor, dict]:
    """Router / balance / similarity / diversity terms over every memory layer's records."""
    t = cfg.training
    labels = batch["labels"]
    B, T = labels.shape
    # positions whose query has seen the subject (collate marks them), else those predicting the answer
    pred = batch.get("router_pos")
    if pred is None:
        pred = torch.zeros_like(labels, dtype=torch.bool)
        pred[:, :-1] = labels[:, 1:] != IGNORE
    flat_pos = torch.nonzero(pred.reshape(-1)).flatten()
    seq_of = flat_pos // T
    total = torch.zeros((), device=labels.device)
    mets = {}
    for rec in mem.ctx["records"]:
        gate = mem.gates[str(rec["layer"])]
        if t.router_loss_coef or stage == "router":
            tr = batch["target_rows"][seq_of]
            if (tr >= 0).any():
                rl = losses.router_loss(rec, flat_pos, tr, batch["target_weights"][seq_of], gate.num_keys,
                                        gate.log_scale.exp())
                total = total + (1.0 if stage == "router" else t.router_loss_coef) * rl
                mets[f"router_l{rec['layer']}"] = rl.detach()
        if stage != "router":
            if t.balance_loss_coef:
                total = total + t.balance_loss_coef * losses.balance_loss(rec, mem.cfg.knowledge_num)
            if t.similarity_loss_coef:
                total = total + t.similarity_loss_coef * losses.similarity_loss(rec, gate)
            if t.diversity_loss_coef:
                total = total + t.diversity_loss_coef * losses.diversity_loss(rec, gate)
    return total, mets


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def mcq_accuracy(mem, tok, omcq: list[dict], bank, mode: str = "on", batch_items: int = 16) -> float:
    """Multiple-choice accuracy by log-likelihood of each option's answer string ("X:text").

    ``mode``: ``on`` (memory), ``off`` (memory disabled), ``edit`` (each item's entry rewritten to a
    distractor's object in a batch-local bank; success = the model picks that distractor).
    """
    from memcli.data.convert import INSTRUCTION

    row_of = bank.row_of_uuid()
    correct = 0
    total = 0
    was = mem.memory_enabled
    mem.memory_enabled = mode != "off"
    rng = random.Random(1234)
    try:
        for s in range(0, len(omcq), batch_items):
            chunk = omcq[s: s + batch_items]
            seqs, labs, golds, ov_rows, ov_ids = [], [], [], [], []
            for item in chunk:
                t = item["target"][0]
                opts = parse_options(t["options"])
                gold = [i for i, (l, o) in enumerate(opts) if f"{l}:{o}" == t["correct_answer"]][0]
                if mode == "edit":
                    row = row_of.get(t.get("uuid"))
                    e = bank.entries[row] if row is not None else None
                    choices = [i for i in range(len(opts)) if i != gold]
                    if e is None or not e.get("object") or not choices:
                        continue
                    gold = rng.choice(choices)
                    ids, _ = tokenize_entries(tok, [e["sentence"].replace(e["object"], opts[gold][1])],
                                              bank.knowledge_length, bank.pad_id)
                    ov_rows.append(row)
                    ov_ids.append(ids[0].tolist())
                p = prompt_ids(tok, f"{t['question']}\n{t['options']}\n{INSTRUCTION}")
                for l, o in opts:
                    a = answer_ids(tok, f"{l}:{o}")
                    seqs.append(p + a)
                    labs.append([IGNORE] * len(p) + a)
                golds.append((gold, len(opts)))
            if not golds:
                continue
            T = max(len(x) for x in seqs)
            ids = torch.full((len(seqs), T), tok.pad_token_id)
            lab = torch.full((len(seqs), T), IGNORE)
            att = torch.zeros((len(seqs), T), dtype=torch.long)
            for i, (x, y) in enumerate(zip(seqs, labs)):
                ids[i, : len(x)] = torch.tensor(x)
                lab[i, : len(y)] = torch.tensor(y)
                att[i, : len(x)] = 1
            if ov_rows:
                mem.ctx["bank_override"] = (torch.tensor(ov_rows), torch.tensor(ov_ids))
            logits = mem(input_ids=ids, attention_mask=att).logits.float()
            mem.ctx["bank_override"] = None
            lp = torch.log_softmax(logits[:, :-1], -1)
            tgt = lab[:, 1:]
            tok_lp = lp.gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1) * (tgt != IGNORE)
            seq_lp = tok_lp.sum(-1)
            k = 0
            for gold, n in golds:
                pick = int(seq_lp[k: k + n].argmax())
                correct += int(pick == gold)
                total += 1
                k += n
    finally:
        mem.memory_enabled = was
        mem.ctx["bank_override"] = None
    return correct / max(1, total)


@torch.no_grad()
def router_recall(mem, items: list[Item], k: int | None = None, batch: int = 32) -> dict:
    """Share of items whose labelled entry is among the candidates retrieved at the last prompt token."""
    hits: dict[int, int] = {}
    n = 0
    for s in range(0, len(items), batch):
        chunk = [it for it in items[s: s + batch] if it.row is not None]
        if not chunk:
            continue
        T = max(len(it.prompt_ids) for it in chunk)
        ids = torch.full((len(chunk), T), mem.cfg.pad_id)
        att = torch.zeros((len(chunk), T), dtype=torch.long)
        for b, it in enumerate(chunk):
            ids[b, T - len(it.prompt_ids):] = torch.tensor(it.prompt_ids)  # left padding: last token at T-1
            att[b, T - len(it.prompt_ids):] = 1
        mem(input_ids=ids, attention_mask=att, collect=True)
        rows = torch.tensor([it.row for it in chunk])
        for rec in mem.ctx["records"]:
            cells = rec["cells"].reshape(len(chunk), T, -1)[:, -1, : (k or rec["cells"].shape[-1])]
            hits[rec["layer"]] = hits.get(rec["layer"], 0) + int((cells == rows.unsqueeze(1)).any(1).sum())
        n += len(chunk)
    return {f"recall@{k or mem.cfg.num_candidates}_l{layer}": h / max(1, n) for layer, h in hits.items()}


def _eval_subset(items, num):
    return items[: num] if num else items
