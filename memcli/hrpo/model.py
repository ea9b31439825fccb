"""An HF causal LM with a thinking residual: one module for the training loop, hybrid generation for chat/eval."""

from __future__ import annotations

import torch
import torch.nn as nn

from memcli.hrpo.config import HrpoConfig
from memcli.hrpo.residual import ThinkingResidual
from memcli.hrpo.rollout import hybrid_generate


class HrpoModel(nn.Module):
    def __init__(self, backbone, cfg: HrpoConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        W = backbone.get_input_embeddings().weight
        self.residual = ThinkingResidual(cfg, float(W.detach().float().norm(dim=-1).mean()))

    def residual_groups(self) -> dict[str, list[nn.Parameter]]:
        r = self.residual
        return {"gates": list(r.thinking_residual_gate_r.parameters()) + list(r.thinking_residual_gate_i.parameters()),
                "lambda": [r.thinking_residual_Lambda],
                "projection": list(r.thinking_projection.parameters()) if r.thinking_projection is not None else []}

    def residual_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.residual.state_dict().items()}

    def load_residual_state_dict(self, sd: dict, where) -> None:
        from memcli.errors import MemcliError

        want = self.residual.state_dict()
        missing, extra = sorted(set(want) - set(sd)), sorted(set(sd) - set(want))
        if missing or extra:
            raise MemcliError(f"{where}: thinking residual tensors do not match this config "
                              f"(missing {missing[:2]}, unexpected {extra[:2]})")
        for k, v in sd.items():
            if v.shape != want[k].shape:
                raise MemcliError(f"{where}: tensor '{k}' has shape {list(v.shape)}, expected {list(want[k].shape)}")
        self.residual.load_state_dict(sd, strict=True)

    def generate(self, tok, input_ids, attention_mask, max_new_tokens: int, temperature: float = 0.0,
                 hybrid: bool | None = None, streamer=None, generator=None):
        """``hybrid`` None: as the run was trained (``cfg.hybrid``); a plain-GRPO run never saw mixed inputs."""
        hybrid = self.cfg.hybrid if hybrid is None else hybrid
        greedy = temperature <= 0
        return hybrid_generate(self.backbone, self.residual, tok, input_ids, attention_mask, max_new_tokens,
                               temperature=1.0 if greedy else temperature, greedy=greedy, hybrid=hybrid,
                               streamer=streamer, generator=generator, thinking_temperature=self.cfg.thinking_temperature)
