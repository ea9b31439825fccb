"""Hybrid decoding over any HF causal LM, and the replay forward that scores what it sampled.

Rollout: the prompt goes in as token embeddings; each sampled token goes back in as
``a * e + sqrt(1 - a^2) * (i * h)`` while the model is still reasoning, i.e. until the generated text
contains the answer marker (``####``), found by a per-token state machine over token ids (no
re-decoding of text). The marker's own tokens and everything after are fed as plain embeddings. KV
cache, batched groups, left padding with position ids from the attention mask; a row that emitted
EOS keeps feeding masked pad positions.

Replay: the same sequence, the same masks and positions, the stored thinking vectors (``probs``) or
hidden states (``projection``, whose projection is recomputed under grad so it learns).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from memcli.backbone import cache_kw

_TABLES: dict = {}


def marker_table(tok, marker: str = "####") -> torch.Tensor:
    """``[V, m+1]`` next state of a KMP matcher for ``marker`` after each token's text (m = found, absorbing)."""
    key = (id(tok), len(tok), marker)
    if key in _TABLES:
        return _TABLES[key]
    m = len(marker)
    fail = [0] * m
    k = 0
    for q in range(1, m):
        while k and marker[q] != marker[k]:
            k = fail[k - 1]
        if marker[q] == marker[k]:
            k += 1
        fail[q] = k
    V = len(tok)
    table = torch.zeros(V, m + 1, dtype=torch.long)
    table[:, m] = m
    chars = set(marker)
    pieces = tok.convert_ids_to_tokens(list(range(V)))
    for tid, piece in enumerate(pieces):
        if piece is None or not chars & set(piece):
            continue  # text without any marker character resets the matcher: state 0
        text = tok.decode([tid])
        for s in range(m):
            q = s
            for ch in text:
                while q and ch != marker[q]:
                    q = fail[q - 1]
                if ch == marker[q]:
                    q += 1
                if q == m:
                    break
            table[tid, s] = q
    _TABLES[key] = table
    return table


@dataclass
class Rollout:
    prompt_ids: torch.Tensor  # [B, P] left-padded
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor  # [B, T] (pad after EOS)
    completion_mask: torch.Tensor  # 1 up to and including EOS
    thinking: torch.Tensor | None  # [B, T, D] thinking vectors (probs) or last hidden states (projection)
    mix_mask: torch.Tensor  # [B, T] True where the token's input was the hybrid mix
    a_mean: float  # mean embedding share a over mixed positions (nan when none)


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


@torch.no_grad()
def hybrid_generate(model, residual, tok, input_ids, attention_mask, max_new_tokens: int, temperature: float = 1.0,
                    greedy: bool = False, hybrid: bool = True, use_cache: bool = True, generator=None,
                    streamer=None, thinking_temperature: float | None = None) -> Rollout:
    """Sample ``max_new_tokens`` (or until EOS in every row) with the hybrid input rule. The thinking vector is
    weighted by the distribution at ``thinking_temperature`` (None: ``temperature``): a run decodes greedily
    with the thinking vectors it was trained on, not those of a temperature-1 distribution."""
    from transformers import DynamicCache

    emb = model.get_input_embeddings()
    W = emb.weight
    dev = W.device  # callers may pass CPU batches (evaluation, chat) to a model on the GPU
    input_ids, attention_mask = input_ids.to(dev), attention_mask.to(dev)
    B = input_ids.shape[0]
    mix_on = hybrid and residual is not None
    want_hidden = mix_on and residual.thinking_projection is not None
    table = marker_table(tok, residual.cfg.marker if residual is not None else "####").to(dev)
    m = table.shape[1] - 1
    eos = torch.tensor(sorted(_eos_ids(tok)), device=dev)
    pad = tok.pad_token_id if tok.pad_token_id is not None else int(eos[0])

    if streamer is not None:
        streamer.put(input_ids[:1].cpu())  # as HF generate does: a skip_prompt streamer drops this
    am = attention_mask.long().clone()
    seq_embeds = emb(input_ids)
    pos = _positions(am)
    cache = DynamicCache() if use_cache else None
    out = model(inputs_embeds=seq_embeds, attention_mask=am, position_ids=pos, use_cache=use_cache,
                **cache_kw(model, cache), output_hidden_states=want_hidden, logits_to_keep=1)
    next_pos = am.sum(-1)  # position of the next real token
    state = torch.zeros(B, dtype=torch.long, device=dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    toks, live_m, thinks, mixes, a_sum, a_n = [], [], [], [], 0.0, 0
    for step in range(max_new_tokens):
        logits = out.logits[:, -1].float()
        hidden = out.hidden_states[-1][:, -1] if want_hidden else None
        p = F.softmax(logits / max(temperature, 1e-6), dim=-1)
        tokn = p.argmax(-1) if greedy else torch.multinomial(p, 1, generator=generator).squeeze(1)
        live = ~done
        tokn = torch.where(live, tokn, torch.full_like(tokn, pad))
        e = emb(tokn)
        state = torch.where(live, table[tokn, state], state)
        reasoning = live & (state < m)
        x = e
        if mix_on:
            h = hidden if want_hidden else _thinking_probs(residual, logits, p, temperature, thinking_temperature, W)
            x, a = _mixed_input(residual, e, h, reasoning, want_hidden)
            if reasoning.any():
                a_sum += float(a[reasoning].mean(-1).sum())
                a_n += int(reasoning.sum())
            thinks.append(h.float())
        toks.append(tokn)
        live_m.append(live)
        mixes.append(reasoning if mix_on else torch.zeros_like(reasoning))
        if streamer is not None:
            streamer.put(tokn[:1].cpu())
        done = done | (live & torch.isin(tokn, eos))
        if step == max_new_tokens - 1 or bool(done.all()):
            break
        am = torch.cat([am, live.long()[:, None]], 1)
        step_pos = next_pos[:, None]
        next_pos = next_pos + live.long()
        if use_cache:
            out = model(inputs_embeds=x[:, None], attention_mask=am, position_ids=step_pos, use_cache=True,
                        **cache_kw(model, cache), output_hidden_states=want_hidden)
        else:  # the slow check path: the whole sequence again, same inputs and positions
            seq_embeds, pos = torch.cat([seq_embeds, x[:, None]], 1), torch.cat([pos, step_pos], 1)
            out = model(inputs_embeds=seq_embeds, attention_mask=am, position_ids=pos, use_cache=False,
                        output_hidden_states=want_hidden, logits_to_keep=1)
    if streamer is not None:
        streamer.end()
    return Rollout(prompt_ids=input_ids, prompt_mask=attention_mask.long(), completion_ids=torch.stack(toks, 1),
                   completion_mask=torch.stack(live_m, 1).long(),
                   thinking=torch.stack(thinks, 1) if thinks else None, mix_mask=torch.stack(mixes, 1),
                   a_mean=a_sum / a_n if a_n else float("nan"))


def _thinking_probs(residual, logits, p, temperature: float, thinking_temperature: float | None, W) -> torch.Tensor:
    """The ``probs`` thinking vector, weighted by the rollouts' distribution whatever this decoding samples at."""
    same = thinking_temperature in (None, temperature)
    return residual.probs_vector(p if same else F.softmax(logits / thinking_temperature, -1), W)


def _mixed_input(residual, e: torch.Tensor, h: torch.Tensor, reasoning: torch.Tensor, projected: bool):
    """The next inputs: the gated mix of token embedding and thinking vector where a row is still reasoning, the
    plain embedding elsewhere; and the gate ``a``."""
    mixed, a = residual.mix(e, residual.project(h) if projected else h)
    return torch.where(reasoning[:, None], mixed, e), a


def _eos_ids(tok) -> set[int]:
    ids = set()
    for t in (tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")):
        if isinstance(t, int) and t >= 0 and t != tok.unk_token_id:
            ids.add(t)
    return ids


def completion_logps(model, residual, ro: Rollout, temperature: float, hybrid: bool = True) -> tuple[torch.Tensor, dict]:
    """Per-token log-probabilities ``[B, T]`` of the sampled completion (temperature-scaled, as sampled).

    With ``hybrid`` the completion inputs are re-mixed from the stored thinking vectors under grad
    (gates, Lambda and the projection learn); positions and masks are the rollout's.
    """
    emb = model.get_input_embeddings()
    e_p = emb(ro.prompt_ids)
    e_c = emb(ro.completion_ids)
    stats = {}
    if hybrid and residual is not None and ro.thinking is not None and bool(ro.mix_mask.any()):
        h = residual.project(ro.thinking) if residual.thinking_projection is not None else ro.thinking
        mixed, a = residual.mix(e_c, h)
        e_c = torch.where(ro.mix_mask[..., None], mixed, e_c)
        am_ = a[ro.mix_mask]
        am_ = am_.detach()
        stats = {"gate_a": float(am_.mean()), "hidden_share": float(torch.sqrt((1 - am_ * am_).clamp_min(0)).mean())}
    embeds = torch.cat([e_p, e_c], 1)
    am = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    T = ro.completion_ids.shape[1]
    logits = model(inputs_embeds=embeds, attention_mask=am, position_ids=_positions(am), use_cache=False,
                   logits_to_keep=T + 1).logits[:, :-1].float()
    logp = F.log_softmax(logits / max(temperature, 1e-6), dim=-1)
    return logp.gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1), stats


def reference_logps(model, ro: Rollout, temperature: float) -> torch.Tensor:
    """Reference log-probabilities from token ids only (no mixing); call with the adapter disabled."""
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    am = torch.cat([ro.prompt_mask, ro.completion_mask], 1)
    T = ro.completion_ids.shape[1]
    logits = model(input_ids=ids, attention_mask=am, position_ids=_positions(am), use_cache=False,
                   logits_to_keep=T + 1).logits[:, :-1].float()
    logp = F.log_softmax(logits / max(temperature, 1e-6), dim=-1)
    return logp.gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)


def text_marker_loop(model, tok, input_ids, attention_mask, max_new_tokens: int, temperature: float = 1.0,
                     generator=None, marker: str = "####") -> torch.Tensor:
    """The seed-style loop (benchmark only): KV cache, but the whole completion is re-decoded every step
    to look for the marker, so the cost of the check grows with the square of the length."""
    from transformers import DynamicCache

    cache = DynamicCache()
    am = attention_mask.long().clone()
    out = model(input_ids=input_ids, attention_mask=am, position_ids=_positions(am), use_cache=True,
                **cache_kw(model, cache), logits_to_keep=1)
    next_pos = am.sum(-1)
    toks = []
    for _ in range(max_new_tokens):
        p = F.softmax(out.logits[:, -1].float() / max(temperature, 1e-6), -1)
        t = torch.multinomial(p, 1, generator=generator).squeeze(1)
        toks.append(t)
        seen = [marker in tok.decode(row) for row in torch.stack(toks, 1).tolist()]  # quadratic re-decode
        del seen
        am = torch.cat([am, torch.ones_like(am[:, :1])], 1)
        out = model(input_ids=t[:, None], attention_mask=am, position_ids=next_pos[:, None], use_cache=True,
                    **cache_kw(model, cache))
        next_pos = next_pos + 1
    return torch.stack(toks, 1)
