"""HRPO's model config (saved as ``thinking_residual/hrpo_config.json``): the ``model`` keys of ``train hrpo`` by
their own names, plus what the run's data and training decide about decoding (instruction, hybrid)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from memcli.config import ModelConfig, ThinkingSource
from memcli.errors import MemcliError


@dataclass
class HrpoConfig(ModelConfig):
    LEGACY: ClassVar[dict] = {"source": "thinking_source", "r_min": "thinking_r_min", "r_max": "thinking_r_max"}

    hidden_size: int
    thinking_source: str = ThinkingSource.probs.value  # probs | projection
    thinking_r_min: float = 0.99
    thinking_r_max: float = 0.999
    # thinking_source=projection: the normal initialisation's std of thinking_projection's weight, and how its output
    # is normalised: "unit" (the design's: an L2-normalised direction) or "embedding" (that direction times the
    # embedding rows' mean norm: the scale of the token embedding it is mixed with). A run saved before these were
    # recorded used 0.02 / sqrt(hidden) and "embedding".
    projection_init_std: float | None = None
    projection_norm: str = "embedding"
    marker: str = "####"
    instruction: str = "Think step by step, then give the final answer after '####'."  # appended to every problem
    backbone: str = "tiny"
    tokenizer_fingerprint: str = ""
    hybrid: bool = True  # how the run was trained, so how it decodes (False: plain GRPO, token inputs only)
    # the temperature of the distribution whose weighted embedding is the thinking vector (probs source): the
    # rollouts' (training.temperature), also when decoding greedily or at another temperature; None: the decoding one
    thinking_temperature: float | None = None

    def __post_init__(self):
        self.check("hrpo config")

    def check(self, where: str) -> None:
        if self.thinking_source not in {s.value for s in ThinkingSource}:
            raise MemcliError(f"key 'model.thinking_source' got '{self.thinking_source}', expected probs or projection")
        if not 0.0 < self.thinking_r_min <= self.thinking_r_max < 1.0:
            raise MemcliError(f"keys 'model.thinking_r_min/r_max' got {self.thinking_r_min}/{self.thinking_r_max}, "
                              "expected 0 < r_min <= r_max < 1")
        if self.projection_norm not in ("unit", "embedding"):
            raise MemcliError(f"{where}: projection_norm '{self.projection_norm}', expected unit or embedding")
        if self.projection_init_std is not None and not self.projection_init_std > 0:
            raise MemcliError(f"{where}: projection_init_std {self.projection_init_std}, expected a number > 0")
        if self.thinking_temperature is not None and not self.thinking_temperature > 0:
            raise MemcliError(f"{where}: thinking_temperature {self.thinking_temperature}, expected a number > 0")
