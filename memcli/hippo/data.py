"""Dialog rows -> token tensors: history turns for the memory, the query prompt and the answer for the LM."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from memcli import records
from memcli.backbone import IGNORE, left_pad



def turn_text(t, index: int = 0) -> tuple[str, str]:
    """A history turn -> (role, text). Plain strings alternate user / assistant (the seed's dialog_history: the
    user speaks first); objects ``{"role"?, "speaker"?, "content"|"text"}`` say who speaks."""
    if isinstance(t, str):
        return ("user" if index % 2 == 0 else "assistant"), t
    text = t.get("content", t.get("text"))
    speaker = t.get("speaker")
    role = t.get("role", "user")
    if role not in ("user", "assistant", "system"):
        role = "user"
    return role, f"{speaker}: {text}" if speaker else text


def _ids(out) -> list[int]:
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def message_block(tok, role: str, text: str) -> list[int]:
    """One message as the chat template renders it inside a conversation (no default system prompt, which some
    templates add to a conversation's first message)."""
    key = (id(tok), role, text)
    if key not in _BLOCKS:
        sys_msg = {"role": "system", "content": "."}
        head = _ids(tok.apply_chat_template([sys_msg], tokenize=True))
        both = _ids(tok.apply_chat_template([sys_msg, {"role": role, "content": text}], tokenize=True))
        _BLOCKS[key] = (both[len(head):] if both[: len(head)] == head else
                        _ids(tok.apply_chat_template([{"role": role, "content": text}], tokenize=True)))
    return _BLOCKS[key]


_BLOCKS: dict = {}  # dialogs repeat many turns (small talk, templates): each block is rendered once


def turn_ids(tok, role: str, text: str, max_len: int) -> list[int]:
    """A turn as its chat-template block; the end is kept when it is too long (the last position is read)."""
    return message_block(tok, role, text)[-max_len:]


def prompt_ids(tok, text: str) -> list[int]:
    """The query as a user message followed by the assistant header (no default system prompt: the memory state,
    not the prompt, carries the conversation; the chat session renders its prompts the same way)."""
    key = (id(tok), "<generation>")
    if key not in _BLOCKS:
        sys_msg, msg = {"role": "system", "content": "."}, {"role": "user", "content": "x"}
        plain = _ids(tok.apply_chat_template([sys_msg, msg], tokenize=True))
        gen = _ids(tok.apply_chat_template([sys_msg, msg], tokenize=True, add_generation_prompt=True))
        _BLOCKS[key] = gen[len(plain):] if gen[: len(plain)] == plain else []
    return message_block(tok, "user", text) + _BLOCKS[key]


def answer_ids(tok, text: str) -> list[int]:
    return tok(text + tok.eos_token, add_special_tokens=False)["input_ids"]


def content_ids(tok, text: str) -> list[int]:
    """A turn's words alone (no template): what a prefix read stores and reads back."""
    return tok(text, add_special_tokens=False)["input_ids"]


@dataclass
class DialogItem:
    turns: list[list[int]]
    prompt: list[int]
    answer: list[int]
    query: str
    answer_text: str
    history: list = field(default_factory=list)  # (role, text) per turn: the full-history baseline's prompt
    contents: list = field(default_factory=list)  # each turn's words alone (content_ids)


def load_dialogs(tok, path, max_turn_length: int, max_prompt_length: int) -> list[DialogItem]:
    """Dialog rows (a JSONL file or a Hugging Face dataset, see ``records.read_rows``) as token items."""
    items = []
    for row in records.read_rows(path, records.DIALOG):
        turns = [turn_ids(tok, *turn_text(t, i), max_turn_length) for i, t in enumerate(row["dialog_history"])]
        prompt = prompt_ids(tok, row["memory_query"])[-max_prompt_length:]
        ans = answer_ids(tok, row["memory_answer"])
        history = [turn_text(t, i) for i, t in enumerate(row["dialog_history"])]
        items.append(DialogItem(turns, prompt, ans, row["memory_query"], row["memory_answer"], history,
                                [content_ids(tok, text)[-max_turn_length:] for _, text in history]))
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
    """Turns for the encoder; prompt + answer left-padded (answers end together) with labels on the answer only."""
    ids, mask, tmask = pad_turns([it.turns for it in items], pad_id)
    cids, cmask, _ = pad_turns([it.contents for it in items], pad_id)
    q, qm = left_pad([it.prompt + it.answer for it in items], pad_id)
    lab = torch.full(q.shape, IGNORE, dtype=torch.long)
    for b, it in enumerate(items):
        lab[b, q.shape[1] - len(it.answer):] = torch.tensor(it.answer)
    p, pm = left_pad([it.prompt for it in items], pad_id)  # the prompts alone: what a prefix read is chosen by
    return {"turn_ids": ids, "turn_mask": mask, "turns": tmask, "input_ids": q, "attention_mask": qm, "labels": lab,
            "query_ids": p, "query_mask": pm, "content_ids": cids, "content_mask": cmask}
