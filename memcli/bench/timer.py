"""The one timer every benchmark suite uses: torch.utils.benchmark's, which synchronises CUDA around each run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any, Callable

from torch.utils.benchmark import Timer


@dataclass
class Timing:
    median_s: float
    spread_s: float  # max - min over the repeats
    result: Any = None  # what the last call returned


def measure(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> Timing:
    """Median and spread of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed ones."""
    box: dict = {}

    def call():
        box["r"] = fn()

    timer = Timer(stmt="call()", globals={"call": call})
    for _ in range(warmup):
        call()
    ts = [timer.timeit(1).median for _ in range(max(1, repeats))]
    return Timing(statistics.median(ts), max(ts) - min(ts), box.get("r"))
