"""Dialog rows -> token tensors: history turns for the memory, the query prompt and the answer for the LM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memcli import records

IGNORE = -100


def turn_text(t) -> tuple[str, str]:
    """A history turn: a string (a user turn) or ``{"role"?, "speaker"?, "content"|"text"}``."""
    if isinstance(t, str):
        return "user", t
    text = t.get("content", t.get("text"))
    speaker = t.get("speaker")
    role = t.get("role", "user")
    if role not in ("user", "assistant", "system"):
        role = "user"
    return role, f"{speaker}: {text}" if speaker else text


def turn_ids(tok, role: str, text: str, max_len: int) -> list[int]:
    """A turn as its chat-template block; the end is kept when it is too long (the last position is read)."""
    out = tok.apply_chat_template([{"role": role, "content": text}], tokenize=True, add_generation_prompt=False)
    ids = list(out["input_ids"] if hasattr(out, "keys") else out)
    return ids[-max_len:]


def prompt_ids(tok, text: str) -> list[int]:
    out = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def answer_ids(tok, text: str) -> list[int]:
    return tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]


@dataclass
class DialogItem:
    turns: list[list[int]]
    prompt: list[int]
    answer: list[int]
    query: str
    answer_text: str
    history: list = field(default_factory=list)  # (role, text) per turn: the full-history baseline's prompt


def load_dialogs(tok, path, max_turn_length: int, max_length: int) -> list[DialogItem]:
    items = []
    for _, row in records.iter_jsonl(path, records.DIALOG):
        turns = [turn_ids(tok, *turn_text(t), max_turn_length) for t in row["dialog_history"]]
        prompt = prompt_ids(tok, row["memory_query"])[-max_length // 2:]
        ans = answer_ids(tok, row["memory_answer"])[: max_length - len(prompt)]
        items.append(DialogItem(turns, prompt, ans, row["memory_query"], row["memory_answer"],
                                [turn_text(t) for t in row["dialog_history"]]))
    return items


def pad_turns(turn_lists: list[list[list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Dialogs of turns -> ``ids, mask [B, T, L]`` (right-padded) and ``turn_mask [B, T]``."""
    B = len(turn_lists)
    T = max(1, max(len(ts) for ts in turn_lists))
    L = max(1, max((len(t) for ts in turn_lists for t in ts), default=1))
    ids = torch.full((B, T, L), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T, L), dtype=torch.long)
    tmask = torch.zeros((B, T), dtype=torch.bool)
    for b, ts in enumerate(turn_lists):
        for t, seq in enumerate(ts):
            ids[b, t, : len(seq)] = torch.tensor(seq)
            mask[b, t, : len(seq)] = 1
            tmask[b, t] = True
    return ids, mask, tmask


def collate(items: list[DialogItem], pad_id: int) -> dict:
    """Turns for the encoder; prompt + answer right-padded with labels on the answer tokens only."""
    ids, mask, tmask = pad_turns([it.turns for it in items], pad_id)
    T = max(len(it.prompt) + len(it.answer) for it in items)
    q = torch.full((len(items), T), pad_id, dtype=torch.long)
    qm = torch.zeros((len(items), T), dtype=torch.long)
    lab = torch.full((len(items), T), IGNORE, dtype=torch.long)
    for b, it in enumerate(items):
        seq = it.prompt + it.answer
        q[b, : len(seq)] = torch.tensor(seq)
        qm[b, : len(seq)] = 1
        lab[b, len(it.prompt): len(seq)] = torch.tensor(it.answer)
    return {"turn_ids": ids, "turn_mask": mask, "turns": tmask, "input_ids": q, "attention_mask": qm, "labels": lab}
