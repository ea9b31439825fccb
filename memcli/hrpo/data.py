"""GSM8K-format problems (``question``, ``answer`` ending in ``#### n``) and the built-in arithmetic task."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from memcli.errors import MemcliError
from memcli.hrpo.rewards import MARKER, extract_answer
from memcli.records import GSM8K, iter_jsonl, write_jsonl

INSTRUCTION = "Think step by step, then give the final answer after '####'."


def load_problems(path: str | Path) -> list[dict]:
    rows = []
    for lineno, row in iter_jsonl(path, GSM8K):
        if MARKER not in row["answer"] or extract_answer(row["answer"]) is None:
            raise MemcliError(f"{path}:{lineno}: field 'answer' has no '#### <number>' final answer")
        rows.append({"question": row["question"], "answer": row["answer"]})
    if not rows:
        raise MemcliError(f"{path}: empty file, expected GSM8K-format rows (question, answer)")
    return rows


def make_arithmetic(n: int, seed: int = 0) -> list[dict]:
    """Small addition / subtraction word problems with worked answers in GSM8K format."""
    rng = random.Random(seed)
    things = ["apples", "pens", "coins", "books", "marbles", "stamps"]
    rows = []
    for _ in range(n):
        a, b = rng.randint(1, 20), rng.randint(1, 20)
        t = rng.choice(things)
        if rng.random() < 0.5:
            q = f"Sam has {a} {t} and buys {b} more. How many {t} does Sam have now?"
            ans = f"{a} + {b} = {a + b}\n{MARKER} {a + b}"
        else:
            a, b = max(a, b), min(a, b)
            q = f"Sam has {a} {t} and gives away {b}. How many {t} are left?"
            ans = f"{a} - {b} = {a - b}\n{MARKER} {a - b}"
        rows.append({"question": q, "answer": ans})
    return rows


def write_arithmetic(d: str | Path, num_train: int = 400, num_test: int = 100, seed: int = 0) -> tuple[Path, Path]:
    d = Path(d)
    d.mkdir(parents=True, exist_ok=True)
    rows = make_arithmetic(num_train + num_test, seed)
    write_jsonl(d / "train.jsonl", rows[:num_train])
    write_jsonl(d / "test.jsonl", rows[num_train:])
    return d / "train.jsonl", d / "test.jsonl"


def prompt_text(tok, question: str) -> str:
    msgs = [{"role": "user", "content": f"{question}\n{INSTRUCTION}"}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def encode_prompts(tok, questions: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (prompts longer than ``max_length`` keep their end)."""
    from memcli.eval.hippo import left_pad

    ids = [tok(prompt_text(tok, q), add_special_tokens=False)["input_ids"][-max_length:] for q in questions]
    return left_pad(ids, tok.pad_token_id)
