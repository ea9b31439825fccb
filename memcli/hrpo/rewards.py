"""Rewards. A reward function takes ``(completions, answers, prompts)`` (lists of str) and returns floats;
``training.reward_fn`` names one as ``module:function``."""

from __future__ import annotations

import importlib
import re
from typing import Callable

from memcli.errors import MemcliError

MARKER = "####"
_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def normalise_number(s: str) -> str | None:
    """``"1,234.50"`` -> ``"1234.5"``, ``"7.0"`` -> ``"7"``; None when ``s`` is not a number."""
    s = s.replace(",", "").strip()
    try:
        float(s)
    except ValueError:
        return None
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    if s in ("-0", ""):
        s = "0"
    return s


def extract_answer(text: str) -> str | None:
    """The last number after the last ``####``, normalised; None when there is no marker or no number."""
    if MARKER not in text:
        return None
    tail = text.rsplit(MARKER, 1)[1]
    nums = _NUM.findall(tail)
    return normalise_number(nums[-1]) if nums else None


def gsm8k_reward(completions: list[str], answers: list[str], prompts: list[str] | None = None) -> list[float]:
    """1 for a well-formed (``#### number``) and correct answer, else 0."""
    out = []
    for c, a in zip(completions, answers):
        got = extract_answer(c)
        want = extract_answer(a) if MARKER in a else normalise_number(a)
        out.append(1.0 if got is not None and got == want else 0.0)
    return out


def capital_reward(completions: list[str], answers: list[str], prompts: list[str] | None = None) -> list[float]:
    """Toy task: 1 when the completion starts with a capital letter (a random tiny policy: ~16%)."""
    return [1.0 if c.lstrip()[:1].isupper() else 0.0 for c in completions]


def load_reward(spec: str) -> Callable:
    if ":" not in spec:
        raise MemcliError(f"key 'training.reward_fn' got '{spec}', expected module:function")
    mod, name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise MemcliError(f"key 'training.reward_fn' got '{spec}': {e}") from None
    if not callable(fn):
        raise MemcliError(f"key 'training.reward_fn' got '{spec}': not callable")
    return fn


def check_rewards(values, n: int, spec: str, step: int):
    """The reward function's output as a float tensor; a wrong length or a NaN/inf is the reward's bug, said so."""
    import math

    import torch

    try:
        vals = [float(v) for v in values]
    except (TypeError, ValueError):
        raise MemcliError(f"training.reward_fn={spec} returned {type(values).__name__} at step {step}, expected "
                          f"{n} numbers") from None
    if len(vals) != n:
        raise MemcliError(f"training.reward_fn={spec} returned {len(vals)} rewards at step {step}, expected {n} "
                          "(one per completion)")
    bad = [i for i, v in enumerate(vals) if not math.isfinite(v)]
    if bad:
        raise MemcliError(f"training.reward_fn={spec} returned {vals[bad[0]]} for completion {bad[0]} at step {step}, "
                          "expected finite numbers; stopping, the last good state is kept")
    return torch.tensor(vals, dtype=torch.float32)
