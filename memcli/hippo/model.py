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

from memcli.backbone import Standardise, answer_loss, decoder_layers, layer_output
from memcli.errors import MemcliError
from memcli.hippo.config import HippoConfig
from memcli.hippo.encoder import TokenMemory, build_encoder

PARTS = ("encoder", "gates", "norms")


class HippoModel(nn.Module):
    def __init__(self, backbone: nn.Module, cfg: HippoConfig):
        super().__init__()
        self.backbone = backbone
        self.cfg = cfg
        n_layers = len(decoder_layers(backbone))
        for i in cfg.memory_layers:
            if not -n_layers <= i < n_layers:
                raise MemcliError(f"hippo fusion layer {i} is out of range for a backbone with {n_layers} decoder layers")
        if not -(n_layers + 1) <= cfg.hippo_feature_layer <= n_layers:
            raise MemcliError(f"hippo feature layer {cfg.hippo_feature_layer} is out of range (backbone has {n_layers} layers)")
        additive = cfg.hippo_read == "additive"
        if additive:
            self.encoder = build_encoder(cfg)
        else:  # prefix read: the turns' tokens are the values; the question's state at fusion_layers[0] reads them
            cfg.check()
            W = backbone.get_input_embeddings().weight.detach().float()
            rows = torch.randperm(W.shape[0], generator=torch.Generator().manual_seed(0))[: cfg.hippo_prompt_tokens]
            self.encoder = TokenMemory(cfg, float(W.pow(2).mean().sqrt()), W[rows])  # prompt starts as real tokens
        fused = list(cfg.memory_layers) if additive else []
        self.gates = nn.ParameterDict({str(i): nn.Parameter(torch.ones(cfg.hidden_size)) for i in fused})
        # a pretrained model's states are dominated by a few large dimensions: without standardising them every turn
        # writes (and every position reads) nearly the same direction (DESIGN.md, last lessons)
        self.norms = nn.ModuleDict()
        if cfg.hippo_standardise:
            self.norms["features"] = Standardise(cfg.hidden_size)
            for i in fused:
                self.norms[f"read{i}"] = Standardise(cfg.hidden_size)
            if not additive:
                self.norms["question"] = Standardise(cfg.hidden_size)
        self._state: torch.Tensor | None = None  # what the fusion hooks read, set only inside ``memory(state)``
        layers = decoder_layers(backbone)
        self._hooks = [layers[i].register_forward_hook(self._make_hook(i)) for i in fused]

    # ---- fusion
    def _make_hook(self, layer: int):
        def hook(module, args, output):
            S = self._state
            if S is None:
                return None
            h = output[0] if isinstance(output, tuple) else output
            if S.shape[0] != h.shape[0]:
                raise MemcliError(f"memory state has batch {S.shape[0]}, input has batch {h.shape[0]}")
            hr = self.norms[f"read{layer}"](h) if self.cfg.hippo_standardise else h
            new = h + self.gates[str(layer)].to(h.dtype) * self.encoder.read(S, hr, layer)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    @contextlib.contextmanager
    def memory(self, state: torch.Tensor | None):
        """Run the backbone with ``state`` read at the fusion layers (``None``: plain backbone)."""
        prev, self._state = self._state, state
        try:
            yield
        finally:
            self._state = prev

    # ---- turns -> state
    def _layer_states(self, ids: torch.Tensor, mask: torch.Tensor, index: int) -> torch.Tensor:
        """``hidden_states[index]`` of the backbone (0: input embeddings, i >= 1: after decoder layer i - 1, -1: the
        final normed states); only the layers below it run."""
        n = len(decoder_layers(self.backbone))
        i = index if index >= 0 else n + 1 + index
        if i == 0:
            return self.backbone.get_input_embeddings()(ids)
        if i < n:
            return layer_output(self.backbone, ids, mask, i - 1)
        out = self.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True, use_cache=False,
                            logits_to_keep=1)  # the final norm is part of the last hidden state
        return out.hidden_states[-1]

    def turn_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``ids, mask [N, L]`` (right-padded turns) -> features from the backbone's hidden states:
        ``[N, D]`` (pool last / mean) or ``[N, L, D]`` (pool tokens: every position writes)."""
        train_bb = any(p.requires_grad for p in self.backbone.parameters())
        with self.memory(None), torch.set_grad_enabled(torch.is_grad_enabled() and train_bb):
            h = self._layer_states(ids, mask, self.cfg.hippo_feature_layer)
        if self.cfg.hippo_standardise:
            h = self.norms["features"](h)
        if self.cfg.hippo_pool == "tokens":
            return h
        if self.cfg.hippo_pool == "last":
            last = (mask.sum(1) - 1).clamp(min=0)
            return h[torch.arange(h.shape[0], device=h.device), last]
        m = mask.unsqueeze(-1).to(h.dtype)
        return (h * m).sum(1) / m.sum(1).clamp(min=1)

    @torch.no_grad()
    def fit_norms(self, turn_ids: torch.Tensor, turn_mask: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> None:
        """Fit the standardisation on sample turns ``[N, L]`` (their pooled features) and prompts ``[B, T]`` (the states
        at each fusion layer, real positions only)."""
        if not self.cfg.hippo_standardise:
            return
        with self.memory(None):
            h = self._layer_states(turn_ids, turn_mask, self.cfg.hippo_feature_layer).float()
            real = turn_mask.bool()
            if self.cfg.hippo_pool == "last":
                feats = h[torch.arange(h.shape[0]), (turn_mask.sum(1) - 1).clamp(min=0)]
            elif self.cfg.hippo_pool == "mean":
                feats = (h * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
            else:
                feats = h[real]
            self.norms["features"].fit(feats)
            if self.cfg.hippo_read == "prefix":
                self.norms["question"].fit(self.question_features(ids, mask, standardised=False))
                return
            for i in self.cfg.memory_layers:
                self.norms[f"read{i}"].fit(layer_output(self.backbone, ids, mask, i).float()[mask.bool()])

    def init_state(self, batch: int = 1) -> torch.Tensor:
        p = next(self.encoder.parameters())
        return self.encoder.init_state(batch, p.device)

    def token_values(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The last ``memory_tokens`` real tokens of each row ``[N, L]`` as embeddings ``[N, m, D]`` (zeros after)."""
        m = self.cfg.hippo_memory_tokens
        emb = self.backbone.get_input_embeddings()
        out = torch.zeros(ids.shape[0], m, self.cfg.hidden_size, device=ids.device)
        with torch.no_grad():
            for r in range(ids.shape[0]):
                real = ids[r][mask[r].bool()][-m:]
                if real.numel():
                    out[r, : real.numel()] = emb(real).float()
        return out

    def write_turns(self, state: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor,
                    turn_mask: torch.Tensor | None = None, content_ids: torch.Tensor | None = None,
                    content_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One turn per dialog: ``ids, mask [B, L]`` (chat blocks) -> the updated state. ``read=prefix`` also stores
        the turn's words: ``content_ids, content_mask [B, Lc]`` (its text without the template)."""
        if self.cfg.hippo_read == "prefix":
            return self.encoder.write(state, self.turn_features(ids, mask), self.token_values(content_ids, content_mask),
                                      turn_mask)
        return self.encoder.write(state, self.turn_features(ids, mask), turn_mask, mask)

    def encode_dialogs(self, ids: torch.Tensor, mask: torch.Tensor, turn_mask: torch.Tensor,
                       content_ids: torch.Tensor | None = None, content_mask: torch.Tensor | None = None,
                       S: torch.Tensor | None = None) -> torch.Tensor:
        """``ids, mask [B, T, L]``, ``turn_mask [B, T]`` -> the state after every dialog's turns, from ``S`` (zero
        when None); features of all turns in one pass. ``read=prefix`` also takes the turns' words."""
        B, T, L = ids.shape
        flat = turn_mask.reshape(-1)
        if self.cfg.hippo_read == "prefix":
            feats = self.turn_features(ids.reshape(B * T, L), mask.reshape(B * T, L)).view(B, T, -1)
            Lc = content_ids.shape[-1]
            vals = self.token_values(content_ids.reshape(B * T, Lc), content_mask.reshape(B * T, Lc))
            vals = vals.view(B, T, *vals.shape[1:])
            S = self.encoder.init_state(B, ids.device) if S is None else S
            for t in range(T):
                S = self.encoder.write(S, feats[:, t], vals[:, t], turn_mask[:, t])
            return S
        tokens = self.cfg.hippo_pool == "tokens"
        D = self.cfg.hidden_size
        feats = torch.zeros((B * T, L, D) if tokens else (B * T, D), device=ids.device)
        if flat.any():
            f = self.turn_features(ids.reshape(B * T, L)[flat], mask.reshape(B * T, L)[flat])
            feats = feats.to(f.dtype).index_put((flat.nonzero().squeeze(1),), f)
        if tokens:
            return self.encoder.scan(feats.view(B, T, L, D), turn_mask, S=S, tok_mask=mask)
        return self.encoder.scan(feats.view(B, T, D), turn_mask, S=S)

    # ---- prefix read
    def question_features(self, ids: torch.Tensor, mask: torch.Tensor, standardised: bool = True) -> torch.Tensor:
        """Mean of the prompt's states after decoder layer ``fusion_layers[0]`` over its real tokens ``[B, D]``."""
        train_bb = any(p.requires_grad for p in self.backbone.parameters())
        with self.memory(None), torch.set_grad_enabled(torch.is_grad_enabled() and train_bb):
            h = layer_output(self.backbone, ids, mask, self.cfg.memory_layers[0]).float()
        w = mask.unsqueeze(-1).to(h.dtype)
        q = (h * w).sum(1) / w.sum(1).clamp(min=1)
        return self.norms["question"](q) if (standardised and self.cfg.hippo_standardise) else q

    def prefix_inputs(self, input_ids, attention_mask, state, query_ids=None, query_mask=None):
        """``[memory tokens of the state] + input`` as left-padded input embeddings and mask."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        qi, qm = (input_ids, mask) if query_ids is None else (query_ids, query_mask)
        soft = self.encoder.read(state, self.question_features(qi, qm))  # [B, m, D]
        emb = self.backbone.get_input_embeddings()
        E = emb(input_ids)
        rows = [torch.cat([soft[b].to(E.dtype), E[b][mask[b].bool()]]) for b in range(E.shape[0])]
        T = max(r.shape[0] for r in rows)
        out = E.new_zeros((len(rows), T, E.shape[-1]))  # padding positions are masked out
        att = torch.zeros((len(rows), T), dtype=mask.dtype, device=mask.device)
        for b, r in enumerate(rows):
            out[b, T - r.shape[0]:] = r
            att[b, T - r.shape[0]:] = 1
        return out, att

    # ---- LM
    def forward(self, input_ids=None, attention_mask=None, state=None, query_ids=None, query_mask=None, batch=None,
                **kw):
        """The backbone with the memory read. ``read=prefix``: ``query_ids`` (the prompt alone) choose what the memory
        tokens read when ``input_ids`` also hold an answer; logits keep the input's positions. ``batch`` (a training
        batch of ``hippo.data.collate``): its answer loss instead, so a DDP-wrapped model syncs the training step."""
        if batch is not None:
            return self.answer_loss(batch)
        if self.cfg.hippo_read == "prefix" and state is not None:
            E, att = self.prefix_inputs(input_ids, attention_mask, state, query_ids, query_mask)
            out = self.backbone(inputs_embeds=E, attention_mask=att, **kw)
            T = input_ids.shape[1]
            if not kw.get("logits_to_keep") or kw["logits_to_keep"] > T:
                out.logits = out.logits[:, -T:]
            return out
        with self.memory(state):
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, **kw)

    @torch.no_grad()
    def generate(self, input_ids, attention_mask=None, state=None, **kw):
        """HF ``generate`` with the memory; returns the input followed by the new tokens."""
        if self.cfg.hippo_read == "prefix" and state is not None:
            E, att = self.prefix_inputs(input_ids, attention_mask, state)
            new = self.backbone.generate(inputs_embeds=E, attention_mask=att, **kw)
            return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
        with self.memory(state):
            return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)

    def answer_loss(self, batch: dict) -> torch.Tensor:
        """LM loss of a batch's answers (``hippo.data.collate``) given the state of their dialogs; the prompt never
        holds the history."""
        state = self.encode_dialogs(batch["turn_ids"], batch["turn_mask"], batch["turns"], batch["content_ids"],
                                    batch["content_mask"])
        return answer_loss(self, batch["input_ids"], batch["attention_mask"], batch["labels"], state=state,
                           query_ids=batch["query_ids"], query_mask=batch["query_mask"], use_cache=False)

    def memory_parameters(self) -> list[nn.Parameter]:
        return [p for name in PARTS for p in getattr(self, name).parameters()]

    def memory_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for name in PARTS:
            sd.update({f"{name}.{k}": v for k, v in getattr(self, name).state_dict().items()})
        return sd

    def load_memory_state_dict(self, sd: dict[str, torch.Tensor], where) -> None:
        parts = {name: {k[len(name) + 1:]: v for k, v in sd.items() if k.startswith(name + ".")} for name in PARTS}
        extra = [k for k in sd if not k.startswith(tuple(f"{n}." for n in PARTS))]
        if extra:
            raise MemcliError(f"{where}: unexpected tensor '{extra[0]}'")
        for name, part in parts.items():
            mod = getattr(self, name)
            try:
                mod.load_state_dict(part, strict=True)
            except RuntimeError as e:
                msg = " ".join(str(e).split())[:160]
                raise MemcliError(f"{where}: does not fit this HIPPO {name} ({msg})") from None
