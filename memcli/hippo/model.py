"""``HippoModel``: a causal LM plus a HIPPO encoder whose state is gated into configured decoder layers.

The backbone is not edited: a forward hook on each fusion layer adds ``g * W_o read(state, h)`` to the
layer's output. ``W_o`` (the gate's projection) is zero-initialised, so at step 0 the model is the base
model exactly, and ``g`` is a per-channel gate starting at 1. Measured on the tiny learning check: a
zero ``g`` on a random ``W_o`` left the memory path without a usable gradient (exact match equal to
no history, 2%, after 550 steps) where the zero ``W_o`` reached 59%. Turn features come from the same
backbone with the hooks switched off (a turn never reads the memory it is being written into).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from memcli.backbone import decoder_layers
from memcli.errors import MemcliError
from memcli.hippo.encoder import HippoConfig, build_encoder


class HippoModel(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: HippoConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        n_layers = len(decoder_layers(backbone))
        for i in cfg.fusion_layers:
            if not -n_layers <= i < n_layers:
                raise MemcliError(f"hippo fusion layer {i} is out of range for a backbone with {n_layers} decoder layers")
        if not -(n_layers + 1) <= cfg.feature_layer <= n_layers:
            raise MemcliError(f"hippo feature layer {cfg.feature_layer} is out of range (backbone has {n_layers} layers)")
        self.encoder = build_encoder(cfg)
        self.gates = nn.ParameterDict({str(i): nn.Parameter(torch.ones(cfg.hidden_size)) for i in cfg.fusion_layers})
        self.ctx: dict = {"state": None, "enabled": True}
        layers = decoder_layers(backbone)
        self._hooks = [layers[i].register_forward_hook(self._make_hook(i)) for i in cfg.fusion_layers]

    # ---- fusion
    def _make_hook(self, layer: int):
        def hook(module, args, output):
            S = self.ctx["state"]
            if S is None or not self.ctx["enabled"]:
                return None
            h = output[0] if isinstance(output, tuple) else output
            if S.shape[0] != h.shape[0]:
                raise MemcliError(f"memory state has batch {S.shape[0]}, input has batch {h.shape[0]}")
            new = h + self.gates[str(layer)].to(h.dtype) * self.encoder.read(S, h, layer)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    @contextlib.contextmanager
    def memory(self, state: torch.Tensor | None):
        """Run the backbone with ``state`` read at the fusion layers (``None``: plain backbone)."""
        prev = self.ctx["state"]
        self.ctx["state"] = state
        try:
            yield
        finally:
            self.ctx["state"] = prev

    # ---- turns -> state
    def turn_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [N, L]`` (right-padded turns) -> features from the backbone's hidden states:
        ``[N, D]`` (pool last / mean) or ``[N, L, D]`` (pool tokens: every position writes)."""
        with self.memory(None):
            out = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                                logits_to_keep=1)  # only hidden states are used; skip the vocabulary head
        h = out.hidden_states[self.cfg.feature_layer]
        if self.cfg.pool == "tokens":
            return h
        if self.cfg.pool == "last":
            last = (mask.sum(1) - 1).clamp(min=0)
            return h[torch.arange(h.shape[0], device=h.device), last]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    def init_state(self, batch: int = 1) -> torch.Tensor:
        p = next(self.encoder.parameters())
        return self.encoder.init_state(batch, p.device)

    def write_turns(self, state: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    turn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One turn per dialog: ``ids, mask [B, L]`` -> the updated state ``[B, H, N, V]``."""
        return self.encoder.write(state, self.turn_features(ids, mask), turn_mask, mask)

    def encode_dialogs(self, ids: torch.Tensor, mask: torch.Tensor, turn_mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [B, T, L]``, ``turn_mask [B, T]`` -> state after every dialog's turns (all turns in one pass)."""
        B, T, L = ids.shape
        flat = turn_mask.reshape(-1)
        tokens = self.cfg.pool == "tokens"
        D = self.cfg.hidden_size
        feats = torch.zeros((B * T, L, D) if tokens else (B * T, D), device=ids.device)
        if flat.any():
            f = self.turn_features(ids.reshape(B * T, L)[flat], mask.reshape(B * T, L)[flat])
            feats = feats.to(f.dtype).index_put((flat.nonzero().squeeze(1),), f)
        if tokens:
            return self.encoder.scan(feats.view(B, T, L, D), turn_mask, tok_mask=mask)
        return self.encoder.scan(feats.view(B, T, D), turn_mask)

    # ---- LM
    def forward(self, input_ids, attention_mask=None, state=None, **kw):
        with self.memory(state):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, state=None, **kw):
        with self.memory(state):
            return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def memory_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters()) + list(self.gates.parameters())

    def memory_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"encoder.{k}": v for k, v in self.encoder.state_dict().items()}
        sd.update({f"gates.{k}": v for k, v in self.gates.state_dict().items()})
        return sd

    def load_memory_state_dict(self, sd: dict[str, torch.Tensor], where) -> None:
        enc = {k[8:]: v for k, v in sd.items() if k.startswith("encoder.")}
        gates = {k[6:]: v for k, v in sd.items() if k.startswith("gates.")}
        extra = [k for k in sd if not k.startswith(("encoder.", "gates."))]
        if extra:
            raise MemcliError(f"{where}: unexpected tensor '{extra[0]}'")
        for name, mod, part in (("encoder", self.encoder, enc), ("gates", self.gates, gates)):
            try:
                mod.load_state_dict(part, strict=True)
            except RuntimeError as e:
                msg = " ".join(str(e).split())[:160]
                raise MemcliError(f"{where}: does not fit this HIPPO {name} ({msg})") from None
