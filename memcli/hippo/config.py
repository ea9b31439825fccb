"""HIPPO's model config (saved as ``hippo_model/hippo_config.json``): the ``model`` keys of ``train hippo`` by their
own names, plus what the backbone decides (hidden size, spec, tokenizer fingerprint)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from memcli.config import HippoInit, ModelConfig, Pool, Read, Variant
from memcli.errors import MemcliError


def _choices(enum) -> tuple[str, ...]:
    return tuple(e.value for e in enum)


@dataclass
class HippoConfig(ModelConfig):
    # names in hippo_config.json written before release 3
    LEGACY: ClassVar[dict] = {"variant": "hippo_variant", "num_heads": "hippo_heads", "state_dim": "hippo_state_dim",
                              "value_dim": "hippo_value_dim", "init": "hippo_init", "expand": "hippo_expand",
                              "fusion_layers": "memory_layers", "feature_layer": "hippo_feature_layer",
                              "pool": "hippo_pool", "standardise": "hippo_standardise", "read": "hippo_read",
                              "memory_tokens": "hippo_memory_tokens", "prompt_tokens": "hippo_prompt_tokens"}

    hippo_variant: str = Variant.matrix.value
    hidden_size: int = 256  # the backbone's
    hippo_heads: int = 4
    hippo_state_dim: int = 32  # dk per head
    hippo_value_dim: int = 64  # dv per head
    hippo_init: str = HippoInit.s4d_real.value  # A from S4D-Real (diagonal) or HiPPO-LegS (dense)
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    hippo_expand: int = 2  # selective: inner width = expand * hidden_size
    memory_layers: list[int] = field(default_factory=lambda: [1])  # layers the state is read into
    hippo_feature_layer: int = -1  # backbone hidden state the turn features come from (-1: last)
    hippo_pool: str = Pool.last.value  # last (causal position that has seen the whole turn) | mean | tokens
    hippo_standardise: bool = False  # standardise turn features and read states per dimension (pretrained backbones)
    hippo_read: str = Read.additive.value  # additive (fused into the layers' outputs) | prefix (memory tokens)
    hippo_memory_tokens: int = 16  # read=prefix: content tokens kept per turn, read back as memory tokens
    hippo_prompt_tokens: int = 8  # read=prefix: learned soft-prompt vectors before the memory tokens
    backbone: str = "tiny"
    tokenizer_fingerprint: str = ""

    def check(self, where: str = "hippo config") -> None:
        for k, enum in (("hippo_variant", Variant), ("hippo_init", HippoInit), ("hippo_pool", Pool), ("hippo_read", Read)):
            if getattr(self, k) not in _choices(enum):
                raise MemcliError(f"{where}: {k} '{getattr(self, k)}', expected one of {', '.join(_choices(enum))}")
        for k in ("hidden_size", "hippo_heads", "hippo_state_dim", "hippo_value_dim", "hippo_expand"):
            if not isinstance(getattr(self, k), int) or getattr(self, k) < 1:
                raise MemcliError(f"{where}: {k} got {getattr(self, k)!r}, expected a positive integer")
        if not 0 < self.dt_min <= self.dt_max:
            raise MemcliError(f"{where}: dt_min/dt_max got {self.dt_min}/{self.dt_max}, expected 0 < dt_min <= dt_max")
        if not self.memory_layers:
            raise MemcliError(f"{where}: memory_layers is empty, expected at least one decoder layer")
        if self.hippo_read == "prefix" and self.hippo_pool == "tokens":
            raise MemcliError(f"{where}: read=prefix writes one key per turn, expected pool last or mean")
        for k in ("hippo_memory_tokens", "hippo_prompt_tokens"):
            if getattr(self, k) < (1 if k == "hippo_memory_tokens" else 0):
                raise MemcliError(f"{where}: {k} got {getattr(self, k)}, expected a positive integer")
