"""``MemoryAugmentedLM``: explicit token memory as an adapter over any Qwen3-family causal LM.

Nothing in transformers is patched: a forward pre-hook on the decoder stack captures the 2D
attention mask, and a forward hook on each configured decoder layer adds the memory read to that
layer's output. ``model.backbone(...)`` and ``model.backbone.generate(...)`` (KV cache, batched,
left padding) therefore use memory transparently; with a cache only the new positions retrieve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from memcli.backbone import decoder_layers
from memcli.errors import MemcliError
from memcli.explicit.fusion import GatedMemoryFusion, MemoryNorm
from memcli.explicit.gate import MemoryGate


@dataclass
class MemoryConfig:
    knowledge_num: int
    knowledge_length: int
    knowledge_dim: int
    hidden_size: int
    vocab_size: int
    pad_id: int
    memory_layers: list[int] = field(default_factory=lambda: [1, 3])
    num_candidates: int = 16
    topk_per_half: int | None = None
    gate_rank: int = 0
    fusion_rank: int = 0
    freeze_keys: bool = False
    rerank: bool = True
    retrieval: str = "product"  # product | exact (resolved from config's "auto" when the model is built)
    backbone: str = "tiny"
    mode: str = "full"  # frozen | lora | full
    tokenizer_fingerprint: str | None = None
    index_id: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict, where: str = "memory_config.json") -> "MemoryConfig":
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise MemcliError(f"{where}: unknown field(s) {sorted(unknown)}")
        try:
            return cls(**d)
        except TypeError as e:
            raise MemcliError(f"{where}: {e}") from None


class MemoryAugmentedLM(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: MemoryConfig, bank_ids: torch.Tensor,
                 valid: torch.Tensor | None = None, keys: dict[int, torch.Tensor] | torch.Tensor | None = None):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        N, L = cfg.knowledge_num, cfg.knowledge_length
        if tuple(bank_ids.shape) != (N, L):
            raise MemcliError(f"bank has shape {list(bank_ids.shape)}, expected [{N}, {L}] from the memory config")
        self.register_buffer("bank", bank_ids.to(torch.int32).clone(), persistent=False)
        v = valid if valid is not None else torch.ones(N, dtype=torch.bool)
        self.register_buffer("valid", v.clone(), persistent=False)
        self.register_buffer("usage", torch.zeros(N), persistent=False)
        self.register_buffer("last_updated", torch.full((N,), -1, dtype=torch.long), persistent=False)
        layers = decoder_layers(backbone)
        for i in cfg.memory_layers:
            if not 0 <= i < len(layers):
                raise MemcliError(f"model.memory_layers holds {i}, expected layer indices in [0, {len(layers)})")
        D = cfg.hidden_size
        self.gates = nn.ModuleDict()
        self.mem_norms = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        for i in cfg.memory_layers:
            k = keys.get(i) if isinstance(keys, dict) else keys
            self.gates[str(i)] = MemoryGate(D, N, cfg.knowledge_dim, cfg.num_candidates, cfg.topk_per_half,
                                            cfg.gate_rank, k, cfg.freeze_keys,
                                            rerank=cfg.rerank, retrieval=cfg.retrieval)
            self.mem_norms[str(i)] = MemoryNorm(D)
            self.fusions[str(i)] = GatedMemoryFusion(D, cfg.fusion_rank)
        self.memory_enabled = True
        self.ctx: dict = {"collect": False, "records": [], "attention_mask": None, "bank_override": None}
        self._hooks = [self._stack(backbone).register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        for i in cfg.memory_layers:
            self._hooks.append(layers[i].register_forward_hook(self._make_hook(i), with_kwargs=True))

    # ------------------------------------------------------------------ plumbing
    @staticmethod
    def _stack(backbone):
        layers = decoder_layers(backbone)
        m = backbone
        for _ in range(6):
            if getattr(m, "layers", None) is layers:
                return m
            m = getattr(m, "model", None) or getattr(m, "base_model", None)
        raise MemcliError("could not find the decoder stack of the backbone")

    def _capture_mask(self, module, args, kwargs):
        am = kwargs.get("attention_mask")
        self.ctx["attention_mask"] = am if (am is not None and am.dim() == 2) else None

    def embed_weight(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight

    def memory_parameters(self):
        for mod in (self.gates, self.mem_norms, self.fusions):
            yield from mod.parameters()

    def _bank_for_read(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Bank and valid mask, with the batch-local counterfactual rows swapped in when set."""
        ov = self.ctx.get("bank_override")
        if ov is None:
            return self.bank, self.valid
        rows, ids = ov
        bank = self.bank.clone()
        bank[rows] = ids.to(bank.dtype)
        return bank, self.valid

    def read(self, layer: int, h: torch.Tensor):
        """Memory read for hidden states ``h [T, D]`` at ``layer``: (fused h, record)."""
        gate = self.gates[str(layer)]
        bank, valid = self._bank_for_read()
        rec = gate(h, bank, self.embed_weight(), self.cfg.pad_id, valid)
        m = self.mem_norms[str(layer)](rec.pop("m").to(h.dtype))
        fused = self.fusions[str(layer)](h, m)
        rec["h"] = h
        return fused, rec

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            if not self.memory_enabled:
                return output
            h = output[0] if isinstance(output, tuple) else output
            B, T, D = h.shape
            am = self.ctx.get("attention_mask")
            mask = am[:, -T:].bool() if am is not None else torch.ones(B, T, dtype=torch.bool, device=h.device)
            fused, rec = self.read(layer, h.reshape(B * T, D))
            new = torch.where(mask.reshape(B * T, 1), fused, h.reshape(B * T, D)).reshape(B, T, D)
            if self.ctx["collect"]:
                rec["mask"] = mask.reshape(-1)
                rec["layer"] = layer
                rec["shape"] = (B, T)
                self.ctx["records"].append(rec)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    # ------------------------------------------------------------------ use
    def forward(self, input_ids=None, attention_mask=None, labels=None, collect: bool = False, **kw):
        self.ctx["records"] = []
        self.ctx["collect"] = collect
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)

    @torch.no_grad()
    def generate(self, **kw):
        self.ctx["collect"] = kw.pop("collect", False)
        self.ctx["records"] = []
        return self.backbone.generate(**kw)

    def update_usage(self, records: list[dict], step: int | None = None) -> None:
        """Accumulate selection weights per entry on device (no host sync)."""
        for r in records:
            m = r["mask"].unsqueeze(1).to(r["weights"].dtype)
            self.usage.index_add_(0, r["cells"].reshape(-1), (r["weights"].detach() * m).reshape(-1).to(self.usage.dtype))

    # ------------------------------------------------------------------ editing
    def set_entry(self, row: int, token_ids: list[int], step: int = 0) -> None:
        if not 0 <= row < self.cfg.knowledge_num:
            raise MemcliError(f"row {row} is outside the bank [0, {self.cfg.knowledge_num})")
        L = self.cfg.knowledge_length
        ids = list(token_ids)[:L] + [self.cfg.pad_id] * max(0, L - len(token_ids))
        self.bank[row] = torch.tensor(ids, dtype=self.bank.dtype, device=self.bank.device)
        self.valid[row] = any(t != self.cfg.pad_id for t in ids)
        self.last_updated[row] = step

    def remove_hooks(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def num_params(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
