"""``MemoryAugmentedLM``: explicit token memory as an adapter over any Qwen3-family causal LM.

Nothing in transformers is patched. Two ways for a retrieved entry to reach the model (``read``):

- ``additive``: a forward pre-hook on the decoder stack captures the attention mask, and a forward
  hook on each memory layer adds the gated, pooled read of the retrieved entries to that layer's
  output (``GatedMemoryFusion``, zero-initialised: a fresh wrapper gives the base logits exactly).
  ``backbone(...)`` and ``backbone.generate(...)`` (KV cache, batched, left padding) use memory
  transparently; with a cache only the new positions retrieve.
- ``prefix``: the query is the mean of the base model's states at the memory layer over the input
  (layers above it are skipped), and the top entries are written into the input where a pretrained model
  reads them (``cfg.placement``, ``memcli.retrieval.placement``: inside the chat template's conversation, or
  before a cloze). Logits keep the input's positions from where the entries go on (positions before it are
  the template's header; every answer position is after it), and ``generate`` returns the input followed by
  the new tokens, so callers see no difference.
"""

from __future__ import annotations

import contextlib
import torch
import torch.nn as nn

from memcli.backbone import decoder_layers, decoder_stack, layer_output, left_pad
from memcli.errors import MemcliError
from memcli.explicit.config import MemoryConfig
from memcli.explicit.fusion import GatedMemoryFusion, MemoryNorm
from memcli.explicit.gate import MemoryGate
from memcli.retrieval.lexical import names
from memcli.retrieval.placement import question_text


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
        if cfg.read == "prefix" and len(cfg.memory_layers) != 1:
            raise MemcliError(f"read=prefix retrieves at one layer, memory_layers is {cfg.memory_layers}")
        D = cfg.hidden_size
        self.gates = nn.ModuleDict()
        self.mem_norms = nn.ModuleDict()
        self.fusions = nn.ModuleDict()
        for i in cfg.memory_layers:
            k = keys.get(i) if isinstance(keys, dict) else keys
            self.gates[str(i)] = MemoryGate(D, N, cfg.knowledge_dim, cfg.num_candidates, cfg.topk_per_half,
                                            cfg.gate_rank, k, cfg.freeze_keys, rerank=cfg.rerank,
                                            retrieval=cfg.retrieval, query=cfg.query, entry_key=cfg.entry_key,
                                            index_pool=cfg.index_pool)
            if cfg.read == "additive":
                self.mem_norms[str(i)] = MemoryNorm(D)
                self.fusions[str(i)] = GatedMemoryFusion(D, cfg.fusion_rank)
            if cfg.entry_key == "hidden":
                self.register_buffer(f"entry_feats_{i}", torch.zeros(N, D), persistent=False)
        self.memory_enabled = True
        self.tok = None  # the run's tokenizer: placements other than prefix write entries as text (set by the loaders)
        self.entry_records: list[dict] | None = None  # the bank's row records (what each entry is about; set by loaders)
        self.text_cache = text_key_cache()  # where the text scorers keep entry keys by content (never in a run)
        self._text_index = None  # the bank as text (lexical / dense scorers), built on first use
        self._text_index_spec = None  # the sentence encoder it was built with (None: none)
        self.router_weight = 1.0  # the trained router's part in the fusion; 0: a plain RAG over the text scorers
        # per-call plumbing between forward and the layer hooks (never read by callers): forwards return their records
        self._mask: torch.Tensor | None = None  # the decoder's 2-D attention mask, captured by a pre-hook
        self._running: dict = {}  # query=mean: running sums across KV-cached calls of one generate
        self._records: list | None = None  # gate records of the current call, when collected
        self._override = None  # (rows, ids): batch-local counterfactual rows
        self._override_feats: dict = {}
        self._feature_cache: dict = {}  # entry features per token sequence (the base model does not change)
        self._hooks = []
        if cfg.read == "additive":
            self._hooks.append(decoder_stack(backbone).register_forward_pre_hook(self._capture_mask, with_kwargs=True))
            for i in cfg.memory_layers:
                self._hooks.append(layers[i].register_forward_hook(self._make_hook(i), with_kwargs=True))

    # ------------------------------------------------------------------ plumbing
    def _capture_mask(self, module, args, kwargs):
        am = kwargs.get("attention_mask")
        self._mask = am if (am is not None and am.dim() == 2) else None

    def embed_weight(self) -> torch.Tensor:
        return self.backbone.get_input_embeddings().weight

    def memory_parameters(self):
        for mod in (self.gates, self.mem_norms, self.fusions):
            yield from mod.parameters()

    def entry_feats(self, layer: int) -> torch.Tensor | None:
        return getattr(self, f"entry_feats_{layer}", None)

    @contextlib.contextmanager
    def base_model(self):
        """The backbone as it was before training: memory hooks and LoRA adapters off (features for retrieval)."""
        was = self.memory_enabled
        self.memory_enabled = False
        dis = self.backbone.disable_adapter() if hasattr(self.backbone, "disable_adapter") else contextlib.nullcontext()
        try:
            with dis:
                yield self.backbone
        finally:
            self.memory_enabled = was

    @torch.no_grad()
    def layer_means(self, ids: torch.Tensor, mask: torch.Tensor, layer: int, batch: int = 64) -> torch.Tensor:
        """Mean of the base model's states after decoder layer ``layer`` over each row's real tokens ``[R, D]``.

        Rows are run in order of length, each chunk padded only to its own longest row (RoPE makes the
        states independent of where a row's padding was).
        """
        out = torch.zeros(ids.shape[0], self.cfg.hidden_size)
        lengths = mask.sum(1)
        order = torch.argsort(lengths, stable=True)
        dev = self.bank.device
        with self.base_model() as bb:
            for s in range(0, len(order), batch):
                idx = order[s: s + batch]
                seqs = [ids[i][mask[i].bool()].tolist() for i in idx.tolist()]
                x, m = left_pad(seqs, self.cfg.pad_id)
                h = layer_output(bb, x.to(dev), m.to(dev), layer).float()
                w = m.to(dev).unsqueeze(-1).float()
                out[idx] = ((h * w).sum(1) / w.sum(1).clamp_min(1)).cpu()
        return out

    @torch.no_grad()
    def entry_features(self, ids: torch.Tensor, layer: int) -> torch.Tensor:
        """Hidden-state features ``[R, D]`` of bank rows given as token ids ``[R, L]`` (padding excluded).

        The base model does not change (entry_key=hidden needs a frozen or LoRA backbone), so the features of
        a token sequence are computed once: counterfactual and edited rows come back every step.
        """
        cache = self._feature_cache
        keys = [(layer, tuple(r)) for r in ids.tolist()]
        todo = [i for i, k in enumerate(keys) if k not in cache]
        if todo:
            sub = ids[todo].long()
            mask = (sub != self.cfg.pad_id).long()
            mask[:, 0] = 1  # an all-padding row still has one position to read
            for i, f in zip(todo, self.layer_means(sub, mask, layer).cpu()):
                cache[keys[i]] = f
        return torch.stack([cache[k] for k in keys]).to(self.bank.device)

    @torch.no_grad()
    def refresh_entry_features(self, rows: torch.Tensor | None = None, fit: bool = False) -> None:
        """Recompute the hidden-state features of ``rows`` (all when None); ``fit`` re-fits the key statistics."""
        if self.cfg.entry_key != "hidden":
            return
        idx = torch.arange(self.cfg.knowledge_num, device=self.bank.device) if rows is None else rows.to(self.bank.device)
        for i in self.cfg.memory_layers:
            buf = self.entry_feats(i)
            ids = self.bank[idx].long()
            mask = (ids != self.cfg.pad_id).long()
            mask[:, 0] = 1
            buf[idx] = self.layer_means(ids, mask, i).to(buf.dtype)  # the whole bank: no need to cache
            if fit:
                self.gates[str(i)].content_norm.fit(buf[self.valid])

    def _bank_for_read(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Bank and entry features, with the batch-local counterfactual rows swapped in when set."""
        ov = self._override
        feats = self.entry_feats(layer)
        if ov is None:
            return self.bank, feats
        rows, ids = ov
        rows = rows.to(self.bank.device)
        bank = self.bank.clone()
        bank[rows] = ids.to(device=bank.device, dtype=bank.dtype)
        if feats is not None:
            cache = self._override_feats
            if layer not in cache:  # features of the rewritten rows, once per override
                cache[layer] = self.entry_features(bank[rows], layer).to(feats.dtype)
            feats = feats.clone()
            feats[rows] = cache[layer]
        return bank, feats

    def _fresh_rows(self) -> torch.Tensor | None:
        """Rows a counterfactual override rewrites in this call (a fitted index searches them exactly)."""
        return None if self._override is None else self._override[0]

    def set_override(self, rows: torch.Tensor | None, ids: torch.Tensor | None = None) -> None:
        """Rewrite ``rows`` to token ids ``ids`` for the following forwards only (None: back to the bank)."""
        self._override = None if rows is None else (rows, ids)
        self._override_feats = {}

    # ------------------------------------------------------------------ additive read (hooks)
    def read(self, layer: int, h: torch.Tensor, q_in: torch.Tensor | None = None):
        """Memory read for hidden states ``h [T, D]`` at ``layer``: (fused h, record)."""
        gate = self.gates[str(layer)]
        bank, feats = self._bank_for_read(layer)
        rec = gate(h if q_in is None else q_in, bank, self.embed_weight(), self.cfg.pad_id, self.valid, feats,
                   fresh=self._fresh_rows())
        m = self.mem_norms[str(layer)](rec.pop("m").to(h.dtype))
        fused = self.fusions[str(layer)](h, m)
        rec["h"] = h
        return fused, rec

    def _running_mean(self, layer: int, h: torch.Tensor, mask: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """Causal running mean of the layer's states per position, continued across KV-cached calls."""
        cp = kwargs.get("cache_position")
        fresh = cp is None or int(cp.reshape(-1)[0]) == 0
        w = mask.unsqueeze(-1).to(h.dtype)
        s = (h * w).cumsum(1)
        c = w.cumsum(1)
        prev = None if fresh else self._running.get(layer)
        if prev is not None:
            s = s + prev[0].unsqueeze(1)
            c = c + prev[1].unsqueeze(1)
        self._running[layer] = (s[:, -1].detach(), c[:, -1].detach())
        return s / c.clamp_min(1)

    def _make_hook(self, layer: int):
        def hook(module, args, kwargs, output):
            if not self.memory_enabled:
                return output
            h = output[0] if isinstance(output, tuple) else output
            B, T, D = h.shape
            am = self._mask
            mask = am[:, -T:].bool() if am is not None else torch.ones(B, T, dtype=torch.bool, device=h.device)
            q_in = None
            if self.cfg.query == "mean":
                q_in = self._running_mean(layer, h, mask, kwargs).reshape(B * T, D)
            fused, rec = self.read(layer, h.reshape(B * T, D), q_in)
            new = torch.where(mask.reshape(B * T, 1), fused, h.reshape(B * T, D)).reshape(B, T, D)
            if self._records is not None:
                rec["mask"] = mask.reshape(-1)
                rec["layer"] = layer
                rec["shape"] = (B, T)
                self._records.append(rec)
            return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

        return hook

    # ------------------------------------------------------------------ prefix read
    def prompt_features(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The query input of ``read=prefix``: mean of the base model's memory-layer states over each input ``[B, D]``."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        return self.layer_means(input_ids, mask, self.cfg.memory_layers[0])

    def retrieve(self, feats: torch.Tensor, prompt_ids: torch.Tensor | None = None,
                 prompt_mask: torch.Tensor | None = None) -> dict:
        """Gate record for prompt features ``[B, D]`` (``read=prefix``): cells, weights, scores (and full scores).
        With ``model.lexical_weight`` / ``model.dense_weight`` and the prompts' token ids, the router's scores are
        fused with BM25's and a sentence encoder's over the question's text (``memcli.retrieval``)."""
        layer = self.cfg.memory_layers[0]
        bank, ef = self._bank_for_read(layer)
        rec = self.gates[str(layer)](feats.to(self.embed_weight().dtype), bank, self.embed_weight(), self.cfg.pad_id,
                                     self.valid, ef, read=False, fresh=self._fresh_rows())
        rec.update(layer=layer, per_sequence=True, mask=torch.ones(feats.shape[0], dtype=torch.bool, device=feats.device))
        if prompt_ids is not None and self.reads_text():
            mask = prompt_mask if prompt_mask is not None else torch.ones_like(prompt_ids)
            rec["query_texts"] = [question_text(self.tok, prompt_ids[b][mask[b].bool()].tolist())
                                  for b in range(prompt_ids.shape[0])]
            if self.cfg.lexical_weight or self.cfg.dense_weight:
                rec = self._fused(rec, bank, ef)
        return rec

    @contextlib.contextmanager
    def retrieval_setting(self, router: float = 1.0, dense: float | None = None, lexical: float | None = None,
                          anchor_df="keep", abstain_below="keep", encoder: str | None = None, anchor: str | None = None):
        """Retrieve differently for a while (``compare editing``'s RAG setups and overrides): the router's weight, the
        text scorers' weights, the abstention; what is not given stays as the run has it."""
        c = self.cfg
        saved = (self.router_weight, c.dense_weight, c.lexical_weight, c.anchor_df, c.abstain_below, c.encoder, c.anchor)
        self.router_weight = router
        c.dense_weight = c.dense_weight if dense is None else dense
        c.lexical_weight = c.lexical_weight if lexical is None else lexical
        c.anchor_df = c.anchor_df if anchor_df == "keep" else anchor_df
        c.abstain_below = c.abstain_below if abstain_below == "keep" else abstain_below
        c.encoder = encoder or c.encoder
        c.anchor = anchor or c.anchor
        try:
            yield self
        finally:
            self.router_weight, c.dense_weight, c.lexical_weight, c.anchor_df, c.abstain_below, c.encoder, c.anchor = saved

    def reads_text(self) -> bool:
        """Whether retrieval reads the question as text: fusion with a text scorer, or anchored abstention."""
        return bool(self.cfg.lexical_weight or self.cfg.dense_weight or self.cfg.anchor_df is not None)

    def _fused(self, rec: dict, bank: torch.Tensor, ef) -> dict:
        """The router's scores over every entry, z-fused with the text scorers' (weight 1 for the router): the top
        ``num_candidates`` by the fused score become the candidates, in that order. ``scores`` stay the router's
        (cosines, what ``abstain_below`` compares); ``fused`` and each scorer's own score ride along."""
        from memcli.retrieval.fusion import fuse

        gate = self.gates[str(rec["layer"])]
        full = rec.get("full_scores")
        if full is None:  # product keys / a fitted index: the router's exact score of every entry (kept keys)
            _, keys = gate._all_keys(bank, self.embed_weight(), self.cfg.pad_id,
                                     torch.arange(bank.shape[0], device=bank.device), ef, rec["q"].dtype)
            full = (rec["q"] @ keys.T).masked_fill(~self.valid.unsqueeze(0), float("-inf"))
        idx = self.text_index(bank)
        k = min(self.cfg.num_candidates, full.shape[1])
        if not self.router_weight and not self.cfg.lexical_weight:  # a plain dense RAG: nearest neighbours (FAISS)
            top, cells = idx.dense_top(rec["query_texts"], k)
            cells = cells.to(full.device)
            return dict(rec, cells=cells, scores=full.gather(1, cells), fused=top, dense=top,
                        weights=torch.softmax(top, -1))
        parts = idx.scores(rec["query_texts"], dense=bool(self.cfg.dense_weight), lexical=bool(self.cfg.lexical_weight))
        parts = {name: v.to(full.device) for name, v in parts.items()}
        fused = fuse([(full, self.router_weight)] + [(parts[n], w) for n, w in (("dense", self.cfg.dense_weight),
                                                                               ("lexical", self.cfg.lexical_weight))
                                                    if n in parts])
        fused = fused.masked_fill(~torch.isfinite(full), float("-inf"))
        top, cells = fused.topk(k, dim=-1)
        out = dict(rec, cells=cells, scores=full.gather(1, cells), fused=top,
                   weights=torch.softmax(top.masked_fill(~torch.isfinite(top), -1e4), -1))
        for k, v in parts.items():
            out[k] = v.gather(1, cells)
        return out

    def text_index(self, bank: torch.Tensor | None = None):
        """The bank's entries as text for the lexical and sentence scorers (``memcli.retrieval.text``), built on first
        use and kept in step with ``write_rows``; a batch-local override (``bank`` differing in some rows) is scored
        on a copy with those rows rewritten."""
        from memcli.retrieval.text import TextIndex

        want = self.cfg.encoder if self.cfg.dense_weight else None
        if self._text_index is None or (want is not None and self._text_index_spec != want):
            # built once; again only when a sentence encoder is needed that it was not built with (BM25 is lazy)
            idx = TextIndex(encoder_of(want) if want else None, lexical=True, cache=self.text_cache)
            idx.set(self.entry_texts(self.bank), self.valid.tolist())
            self._text_index, self._text_index_spec = idx, want
        idx = self._text_index
        if self._override is not None and bank is not None:
            rows = self._override[0].tolist()
            idx = idx.copy()
            idx.replace(rows, self.entry_texts(bank[self._override[0].to(bank.device)]), [True] * len(rows))
        return idx

    def entry_texts(self, ids: torch.Tensor) -> list[str]:
        if self.tok is None:
            raise MemcliError("model.lexical_weight / dense_weight score entries as text: this model has no tokenizer")
        pad = self.cfg.pad_id
        return [self.tok.decode([t for t in row if t != pad], skip_special_tokens=True, clean_up_tokenization_spaces=False)
                for row in ids.tolist()]

    def texts_changed(self, rows: torch.Tensor) -> None:
        """Rows whose entries were rewritten (``memcli.explicit.store.write_rows``): their text keys follow."""
        if self._text_index is not None:
            rows = rows.tolist()
            self._text_index.replace(rows, self.entry_texts(self.bank[torch.tensor(rows, device=self.bank.device)]),
                                     [bool(self.valid[r]) for r in rows])

    def prefixed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor,
                 placement: str | None = None):
        """Each input with the entries of ``rows[b]`` written in at the run's placement (``memcli.retrieval.placement``:
        before the whole input for ``prefix`` and for a cloze; into the chat template's conversation otherwise),
        left-padded -> (ids, mask). -1 in ``rows``: retrieval abstained, nothing placed."""
        from memcli.retrieval.placement import place

        bank, _ = self._bank_for_read(self.cfg.memory_layers[0])
        pad = self.cfg.pad_id
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        how = placement or self.cfg.placement
        seqs = []
        for b in range(input_ids.shape[0]):
            entries = [[t for t in bank[r].tolist() if t != pad] for r in rows[b].tolist() if r >= 0]
            seqs.append(place(self.tok, input_ids[b][mask[b].bool()].tolist(), entries, how,
                              list(self.cfg.prefix_separator)))
        ids, att = left_pad(seqs, pad)
        return ids.to(input_ids.device), att.to(input_ids.device)

    def _prefix_inputs(self, input_ids, attention_mask, rows=None, feats=None):
        if not self.memory_enabled:
            return input_ids, attention_mask
        if rows is None:
            if feats is None:
                feats = self.prompt_features(input_ids, attention_mask)
            rec = self.retrieve(feats, input_ids, attention_mask)
            rows = rec["read_rows"] = self.chosen_rows(rec)
            if self._records is not None:
                self._records.append(rec)
        return self.prefixed(input_ids, attention_mask, rows)

    def chosen_rows(self, rec: dict) -> torch.Tensor:
        """The entries ``read=prefix`` places ``[B, prefix_entries]``; -1 where retrieval abstains: the entry's cosine is
        below ``abstain_below``, or (``anchor_df``) the question is not tied to it. ``anchor=word``: the top candidates,
        each read only when it shares with the question a word that at most ``anchor_df`` entries hold (a question no
        entry is about shares only common words with its nearest entry). ``anchor=subject``: the best candidates whose
        recorded subject the question names (an entry without one: the word rule), so a question-shaped entry that
        outscores a question's own entry does not hide it, and a name shared in passing ties nothing."""
        k = self.cfg.prefix_entries
        cells = rec["cells"] if self.cfg.anchor == "subject" and self.cfg.anchor_df is not None else rec["cells"][:, :k]
        ok = cells >= 0
        if self.cfg.abstain_below is not None:
            ok &= rec["scores"][:, : cells.shape[1]] >= self.cfg.abstain_below
        if self.cfg.anchor_df is not None and "query_texts" in rec:
            idx = self.text_index(self._bank_for_read(self.cfg.memory_layers[0])[0])
            tied = [[bool(keep) and self._tied(idx, q, r) for r, keep in zip(row, oks)]
                    for q, row, oks in zip(rec["query_texts"], cells.tolist(), ok.tolist())]
            ok = torch.tensor(tied, dtype=torch.bool, device=cells.device).reshape(cells.shape)
        if cells.shape[1] == k:
            return cells.masked_fill(~ok, -1)
        # the first k candidates that pass, in the fused order; -1 after them
        order = torch.argsort((~ok).to(torch.int8), dim=1, stable=True)[:, :k]
        return torch.where(ok.gather(1, order), cells.gather(1, order), torch.full_like(order, -1))

    def _tied(self, idx, question: str, row: int) -> bool:
        """Whether ``question`` may read entry ``row`` (``chosen_rows``' anchor rules)."""
        subject = None
        if self.cfg.anchor == "subject" and self.entry_records is not None and row < len(self.entry_records):
            subject = self.entry_records[row].get("subject")
        if subject:
            return names(question, subject)
        return (idx.rarest_shared(question, row) or 1 << 62) <= self.cfg.anchor_df

    # ------------------------------------------------------------------ use
    def forward(self, input_ids=None, attention_mask=None, labels=None, collect: bool = False, rows=None,
                prompt_feats=None, **kw):
        """The backbone's forward with memory; with ``collect`` the output's ``memory_records`` holds the gate record of
        every retrieval (layer, cells, weights, scores, mask): what the router and usage terms are computed from.

        ``read=prefix`` retrieves from the whole input, which is right for a prompt; when the input holds
        an answer, pass ``rows [B, k]`` (entries to place) or ``prompt_feats [B, D]`` (features of the
        prompt alone, e.g. cached) so the answer never reaches the query. Logits keep the input's positions.
        """
        records: list = []
        self._records = records if collect else None
        try:
            out = self._forward(input_ids, attention_mask, labels, rows, prompt_feats, **kw)
        finally:
            self._records = None
        out.memory_records = records
        return out

    def _forward(self, input_ids, attention_mask, labels, rows, prompt_feats, **kw):
        if self.cfg.read == "additive":
            return self.backbone(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kw)
        if labels is not None:
            raise MemcliError("read=prefix: compute the loss from the returned logits (labels are not shifted here)")
        T = input_ids.shape[1]
        ids, att = self._prefix_inputs(input_ids, attention_mask, rows, prompt_feats)
        out = self.backbone(input_ids=ids, attention_mask=att, **kw)
        keep = kw.get("logits_to_keep", 0)
        if not keep or keep > T:  # cut the prefix positions off: logits align with the input
            out.logits = out.logits[:, -T:]
        return out

    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, rows=None, records: list | None = None, **kw):
        """HF ``generate`` with memory; returns the input followed by the new tokens (prefixes stay hidden). Gate
        records of the prompt and of every generated token are appended to ``records`` when a list is given."""
        self._records = records
        self._running = {}
        try:
            if self.cfg.read == "additive":
                return self.backbone.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
            ids, att = self._prefix_inputs(input_ids, attention_mask, rows)
            out = self.backbone.generate(input_ids=ids, attention_mask=att, **kw)
            return torch.cat([input_ids, out[:, ids.shape[1]:].to(input_ids.device)], dim=1)
        finally:
            self._records = None

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
        self.refresh_entry_features(torch.tensor([row]))  # the key follows the new content


_ENCODERS: dict = {}


def text_key_cache():
    """``$MEMCLI_HOME/cache/text-keys``: sentence-encoder keys of entry texts by content, shared by every run (an entry's
    key depends on its text and the encoder alone); safe to delete."""
    from memcli.download import home

    return home() / "cache" / "text-keys"


def encoder_of(spec: str):
    """One loaded sentence encoder per spec for the whole process (loading one takes seconds)."""
    from memcli.retrieval.encoders import make_encoder

    if spec not in _ENCODERS:
        _ENCODERS[spec] = make_encoder(spec)
    return _ENCODERS[spec]
