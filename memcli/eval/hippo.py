"""HIPPO dialog evaluation: exact match of the greedy answer, with the memory state vs without history."""

from __future__ import annotations

import re
import string

import torch

from pathlib import Path

from memcli.backbone import left_pad
from memcli.errors import MemcliError
from memcli.hippo.data import DialogItem, pad_turns

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalise(s: str) -> str:
    return " ".join(_PUNCT.sub(" ", s.lower()).split())


def full_history_prompt(tok, it: DialogItem) -> list[int]:
    """The baseline that re-reads everything: every history turn and the query in one chat prompt."""
    msgs = [{"role": r, "content": t} for r, t in it.history] + [{"role": "user", "content": it.query}]
    out = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@torch.no_grad()
def answer_batch(model, tok, items: list[DialogItem], use_memory: bool, max_new_tokens: int,
                 full_history: bool = False) -> list[str]:
    dev = next(model.parameters()).device
    # no history: nothing read (additive), or an empty state read (prefix: the learned prompt stays, the memory is empty)
    state = model.init_state(len(items)) if getattr(model.cfg, "read", "additive") == "prefix" else None
    if use_memory:
        ids, mask, tm = pad_turns([it.turns for it in items], tok.pad_token_id)
        cid, cmask, _ = pad_turns([it.contents for it in items], tok.pad_token_id)
        state = model.encode_dialogs(ids.to(dev), mask.to(dev), tm.to(dev), cid.to(dev), cmask.to(dev))
    prompts = [full_history_prompt(tok, it) for it in items] if full_history else [it.prompt for it in items]
    q, att = left_pad(prompts, tok.pad_token_id)
    out = model.generate(q.to(dev), att.to(dev), state=state, max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return [tok.decode(o[q.shape[1]:], skip_special_tokens=True).strip() for o in out]


@torch.no_grad()
def exact_match(model, tok, items: list[DialogItem], use_memory: bool = True, batch: int = 32,
                return_answers: bool = False, full_history: bool = False):
    """Fraction of items whose greedy answer equals ``memory_answer`` (lower-cased, punctuation dropped)."""
    was = model.training
    model.eval()
    hits, answers = 0, []
    max_new = max((len(it.answer) for it in items), default=1) + 2
    for s in range(0, len(items), batch):
        chunk = items[s: s + batch]
        got = answer_batch(model, tok, chunk, use_memory, max_new, full_history)
        hits += sum(normalise(g) == normalise(it.answer_text) for g, it in zip(got, chunk))
        answers += got
    model.train(was)
    em = hits / max(1, len(items))
    return (em, answers) if return_answers else em


@torch.no_grad()
def validation_loss(model, tok, items: list[DialogItem], batch: int = 32) -> float:
    """Mean answer loss over ``items`` (the seed's validation loss; lower is better)."""
    from memcli.hippo.data import collate

    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    total = n = 0
    for s in range(0, len(items), batch):
        chunk = items[s: s + batch]
        b = {k: v.to(dev) for k, v in collate(chunk, tok.pad_token_id).items()}
        total += float(model.answer_loss(b)) * len(chunk)
        n += len(chunk)
    model.train(was)
    return total / max(1, n)


def evaluate(model, tok, items: list[DialogItem], batch: int = 32) -> dict:
    return {"exact_match_memory": exact_match(model, tok, items, True, batch),
            "exact_match_no_history": exact_match(model, tok, items, False, batch),
            "val_loss": validation_loss(model, tok, items, batch)}


def compare_rows(run, data: Path, num: int | None, max_new_tokens: int) -> dict:
    """``memcli compare checkpoints`` rows of a HIPPO run: its validation figures on a dialog file, cut to the lengths
    the run was trained with."""
    from memcli.hippo.data import load_dialogs

    if not data.is_file():
        raise MemcliError(f"--data {data}: expected a dialog JSONL file (data_val.jsonl) for HIPPO runs")
    ds = run.config.get("dataset", {})
    items = load_dialogs(run.tok, data, ds.get("max_turn_length", 64), ds.get("max_prompt_length", 64))[:num]
    return dict(evaluate(run.model, run.tok, items), dialogs=len(items))
