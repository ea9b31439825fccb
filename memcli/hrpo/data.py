"""GSM8K-format problems (``question``, ``answer`` ending in ``#### n``) and the built-in arithmetic task."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from memcli.backbone import left_pad
from memcli.errors import MemcliError
from memcli.hrpo.rewards import MARKER, extract_answer
from memcli.records import GSM8K, iter_jsonl, read_rows, write_jsonl

INSTRUCTION = "Think step by step, then give the final answer after '####'."  # the default for the tiny model


def load_problems(path: str | Path) -> list[dict]:
    """GSM8K-format rows from a JSONL file or a Hugging Face dataset (``records.read_rows``)."""
    if Path(path).is_file():
        where = [(f"{path}:{lineno}", row) for lineno, row in iter_jsonl(path, GSM8K)]
    else:
        where = [(f"{path}: row {i}", row) for i, row in enumerate(read_rows(path, GSM8K))]
    rows = []
    for at, row in where:
        if MARKER not in row["answer"] or extract_answer(row["answer"]) is None:
            raise MemcliError(f"{at}: field 'answer' has no '#### <number>' final answer")
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


def prompt_text(tok, question: str, instruction: str = INSTRUCTION) -> str:
    msgs = [{"role": "user", "content": f"{question}\n{instruction}" if instruction else question}]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def prompt_token_ids(tok, questions: list[str], instruction: str = INSTRUCTION) -> list[list[int]]:
    return [tok(prompt_text(tok, q, instruction), add_special_tokens=False)["input_ids"] for q in questions]


def encode_prompts(tok, questions: list[str], max_prompt_length: int,
                   instruction: str = INSTRUCTION) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded prompt ids and mask (prompts longer than ``max_prompt_length`` keep their end)."""
    ids = prompt_token_ids(tok, questions, instruction)
    return left_pad([x[-max_prompt_length:] for x in ids], tok.pad_token_id)
