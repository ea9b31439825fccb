"""HIPPO memory encoders: a state written once per dialog turn and read by every position of the LLM.

Both variants keep a *matrix-valued* state per head, ``S in R^{dk x dv}``, written by key-value outer
products (DESIGN.md, "A second measured lesson": a summed vector state cannot keep attribute -> value
bindings apart). In state-space form, per turn ``t`` with turn feature ``x_t``::

    S_t = Abar S_{t-1} + Bbar k(x_t) v(x_t)^T        (h = A h + B x, zero-order hold)
    y   = C S + D x  with C = q(position)^T          (read by the current position)

``Abar = exp(dt A)``, ``Bbar = A^-1 (exp(dt A) - I)`` (exact ZOH), with ``A`` initialised from
HiPPO-LegS (dense, lower triangular) or S4D-Real (diagonal, ``A_n = -(n+1)``) and ``dt`` learnable,
log-uniform in ``[dt_min, dt_max]`` at init. Nothing depends on a sequence length, and the initial
state is exactly zero.

- ``MatrixMemory``: time-invariant ``dt`` per head; few parameters (the seed's light version).
- ``SelectiveMemory``: Mamba-style input-dependent ``dt``, keys and values from an expanded,
  gated projection of the turn (the seed's original, larger version).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memcli.errors import MemcliError
from memcli.hippo.config import HippoConfig

def legs_matrix(n: int) -> torch.Tensor:
    """HiPPO-LegS transition: -sqrt(2i+1)sqrt(2j+1) below the diagonal, -(i+1) on it, 0 above."""
    r = torch.sqrt(2 * torch.arange(n, dtype=torch.float64) + 1)
    A = -(r[:, None] * r[None, :])
    A = torch.tril(A, -1) - torch.diag(torch.arange(n, dtype=torch.float64) + 1)
    return A.float()


def s4d_real(n: int) -> torch.Tensor:
    return -(torch.arange(n, dtype=torch.float32) + 1)


def zoh(A: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact zero-order hold of ``x' = A x + u`` over ``dt``: ``(exp(dt A), A^-1 (exp(dt A) - I))``.

    ``A`` is ``[H, N]`` (diagonal) or ``[H, N, N]`` (dense); ``dt`` broadcasts against ``[..., H]``.
    """
    if A.dim() == 2:
        dA = dt[..., None] * A
        Abar = torch.exp(dA)
        # (e^x - 1)/x * dt, stable for small x
        Bbar = torch.special.expm1(dA) / A
        return Abar, Bbar
    dA = dt[..., None, None] * A
    Abar = torch.linalg.matrix_exp(dA)
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    Bbar = torch.linalg.solve(A.expand_as(Abar), Abar - eye)
    return Abar, Bbar


def _init_dt(h: int, dt_min: float, dt_max: float, gen: torch.Generator | None = None) -> torch.Tensor:
    u = torch.rand(h, generator=gen)
    return torch.exp(u * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))


def _heads(x: torch.Tensor, h: int) -> torch.Tensor:
    return x.view(*x.shape[:-1], h, x.shape[-1] // h)


class _Transition(nn.Module):
    """Continuous ``A`` (learnable), diagonal (S4D-Real, kept negative via -exp) or dense (LegS)."""

    def __init__(self, cfg: HippoConfig):
        super().__init__()
        H, N = cfg.hippo_heads, cfg.hippo_state_dim
        self.dense = cfg.hippo_init == "legs"
        if self.dense:
            self.A = nn.Parameter(legs_matrix(N).expand(H, N, N).clone())
        else:
            self.A_log = nn.Parameter(torch.log(-s4d_real(N)).expand(H, N).clone())

    def matrix(self) -> torch.Tensor:
        return self.A if self.dense else -torch.exp(self.A_log)

    def step(self, S: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dt: torch.Tensor,
             mask: torch.Tensor | None = None) -> torch.Tensor:
        """S [B,H,N,V]; k [B,L,H,N], v [B,L,H,V] (L writers, ``mask [B,L]``); dt [H] or [B,H] -> next S.

        The turn's input is the sum of its writers' outer products ``sum_l k_l v_l^T`` (one writer for
        pooled features); ZOH's ``Bbar`` is linear, so it applies to the sum.
        """
        Abar, Bbar = zoh(self.matrix(), dt)
        if mask is not None:
            k = k * mask[..., None, None].to(k.dtype)
        kv = torch.einsum("blhn,blhv->bhnv", k, v)
        if self.dense:  # per-head [H, N, N] (time-invariant) or per-dialog [B, H, N, N] (selective)
            shape = (S.shape[0], *Abar.shape[-3:])
            return torch.einsum("bhij,bhjv->bhiv", Abar.expand(shape), S) + \
                torch.einsum("bhij,bhjv->bhiv", Bbar.expand(shape), kv)
        return Abar[..., None] * S + Bbar[..., None] * kv


class HippoEncoder(nn.Module):
    """Interface: ``init_state(B)``, ``write(S, x, mask)`` once per turn, ``read(S, h, layer)`` per position."""

    cfg: HippoConfig

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        c = self.cfg
        return torch.zeros(batch, c.hippo_heads, c.hippo_state_dim, c.hippo_value_dim, device=device, dtype=dtype)

    def write(self, S: torch.Tensor, x: torch.Tensor, mask: torch.Tensor | None = None,
              tok_mask: torch.Tensor | None = None) -> torch.Tensor:
        """One turn: ``x [B, D]`` (pooled) or ``[B, L, D]`` (every position writes, ``tok_mask [B, L]``)."""
        if x.dim() == 2:
            x, tok_mask = x[:, None], None
        new = self._write(S, x, tok_mask)
        if mask is None:
            return new
        return torch.where(mask.view(-1, 1, 1, 1), new, S)  # padded turns leave the state as it was

    def scan(self, x: torch.Tensor, mask: torch.Tensor | None = None, S: torch.Tensor | None = None,
             tok_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Turn features ``x [B, T, D]`` or ``[B, T, L, D]`` (``mask [B, T]``) -> state after the last turn."""
        if S is None:
            S = self.init_state(x.shape[0], x.device, torch.float32)
        for t in range(x.shape[1]):
            S = self.write(S, x[:, t], None if mask is None else mask[:, t],
                           None if tok_mask is None else tok_mask[:, t])
        return S

    def _read_out(self, S: torch.Tensor, q: torch.Tensor, v_skip: torch.Tensor, norm: nn.Module, D: torch.Tensor):
        # y = C S + D x: the position's query reads the state; D is a diagonal skip in value space.
        # The read is normalised per head (written magnitudes scale with dt); an empty state reads 0.
        y = torch.einsum("bthn,bhnv->bthv", q, S)  # q [B, T, H, N]
        y = norm(y.float()).to(v_skip.dtype)
        return y + D * v_skip


class _HeadNorm(nn.Module):
    """RMS norm per head with a learnable scale; exactly zero for a zero input."""

    def __init__(self, h: int, v: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(h, v))
        self.eps = eps

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MatrixMemory(HippoEncoder):
    def __init__(self, cfg: HippoConfig):
        super().__init__()
        self.cfg = cfg
        D, H, N, V = cfg.hidden_size, cfg.hippo_heads, cfg.hippo_state_dim, cfg.hippo_value_dim
        self.trans = _Transition(cfg)
        self.log_dt = nn.Parameter(torch.log(_init_dt(H, cfg.dt_min, cfg.dt_max)))
        self.W_k = nn.Linear(D, H * N, bias=False)
        self.W_v = nn.Linear(D, H * V, bias=False)
        self.readers = nn.ModuleDict({str(i): _MatrixReader(cfg) for i in _fused(cfg)})

    def _write(self, S, x, tok_mask):
        H = self.cfg.hippo_heads
        k = F.normalize(_heads(self.W_k(x), H).float(), dim=-1)
        v = _heads(self.W_v(x), H).float()
        return self.trans.step(S, k, v, torch.exp(self.log_dt), tok_mask)

    def read(self, S: torch.Tensor, h: torch.Tensor, layer: int) -> torch.Tensor:
        r = self.readers[str(layer)]
        H = self.cfg.hippo_heads
        q = F.normalize(_heads(r.W_q(h), H).float(), dim=-1)
        v_skip = _heads(self.W_v(h), H).float()
        y = self._read_out(S, q, v_skip, r.norm, r.D)
        return r.W_o(y.flatten(-2).to(h.dtype))


class _MatrixReader(nn.Module):
    def __init__(self, cfg: HippoConfig):
        super().__init__()
        D, H, N, V = cfg.hidden_size, cfg.hippo_heads, cfg.hippo_state_dim, cfg.hippo_value_dim
        self.W_q = nn.Linear(D, H * N, bias=False)
        self.norm = _HeadNorm(H, V)
        self.D = nn.Parameter(torch.zeros(H, V))  # skip starts off: at init only the state is read
        self.W_o = nn.Linear(H * V, D, bias=False)
        nn.init.zeros_(self.W_o.weight)  # the fusion starts at exactly zero (see HippoModel)


class SelectiveMemory(HippoEncoder):
    """Input-dependent ``dt`` (softplus of a projection), keys/values from ``silu(in_proj(x))``, output gated by ``silu(z)``."""

    def __init__(self, cfg: HippoConfig):
        super().__init__()
        self.cfg = cfg
        D, H, N = cfg.hidden_size, cfg.hippo_heads, cfg.hippo_state_dim
        E = cfg.hippo_expand * D
        if E % H:
            raise MemcliError(f"hippo config: expand*hidden_size ({E}) must be divisible by num_heads ({H})")
        cfg.hippo_value_dim = E // H
        self.trans = _Transition(cfg)
        self.in_proj = nn.Linear(D, E, bias=False)
        self.W_k = nn.Linear(E, H * N, bias=False)  # B(x)
        self.W_v = nn.Linear(E, E, bias=False)
        self.dt_proj = nn.Linear(E, H, bias=True)
        with torch.no_grad():  # softplus(bias) = dt drawn log-uniform, as in Mamba
            dt = _init_dt(H, cfg.dt_min, cfg.dt_max)
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
            self.dt_proj.weight.mul_(0.1)
        self.readers = nn.ModuleDict({str(i): _SelectiveReader(cfg) for i in _fused(cfg)})

    def _write(self, S, x, tok_mask):
        H = self.cfg.hippo_heads
        u = F.silu(self.in_proj(x))  # [B, L, E]
        k = F.normalize(_heads(self.W_k(u), H).float(), dim=-1)
        v = _heads(self.W_v(u), H).float()
        w = torch.ones(u.shape[:2], device=u.device) if tok_mask is None else tok_mask.float()
        u_turn = (u.float() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp(min=1)
        dt = F.softplus(self.dt_proj(u_turn.to(u.dtype)).float())  # [B, H]: one step size per turn
        return self.trans.step(S, k, v, dt, tok_mask)

    def read(self, S: torch.Tensor, h: torch.Tensor, layer: int) -> torch.Tensor:
        r = self.readers[str(layer)]
        H = self.cfg.hippo_heads
        u, z = r.in_proj(h).chunk(2, dim=-1)
        u = F.silu(u)
        q = F.normalize(_heads(r.W_q(u), H).float(), dim=-1)  # C(x)
        v_skip = _heads(self.W_v(u), H).float()
        y = self._read_out(S, q, v_skip, r.norm, r.D).flatten(-2)
        return r.out_proj((y * F.silu(z.float())).to(h.dtype))


class _SelectiveReader(nn.Module):
    def __init__(self, cfg: HippoConfig):
        super().__init__()
        D, H, N = cfg.hidden_size, cfg.hippo_heads, cfg.hippo_state_dim
        E = cfg.hippo_expand * D
        self.in_proj = nn.Linear(D, 2 * E, bias=False)
        self.W_q = nn.Linear(E, H * N, bias=False)
        self.norm = _HeadNorm(H, E // H)
        self.D = nn.Parameter(torch.zeros(H, E // H))
        self.out_proj = nn.Linear(E, D, bias=False)
        nn.init.zeros_(self.out_proj.weight)  # the fusion starts at exactly zero (see HippoModel)


def _fused(cfg: HippoConfig) -> list[int]:
    """Layers with an additive reader (a prefix read reads the state once, into memory tokens)."""
    return list(cfg.memory_layers) if cfg.hippo_read == "additive" else []


class TokenMemory(nn.Module):
    """``read=prefix``: a matrix state whose values are the turns' own token embeddings, read back as memory tokens.

    Per turn, ``k = W_k(x)`` (from the turn's pooled, standardised states: what the turn is about) and ``v`` the
    embeddings of the turn's last ``memory_tokens`` content tokens (split across heads), written as
    ``S = exp(dt A) S + A^-1 (exp(dt A) - I) k v^T`` like the other encoders (``dt`` per head, or input-dependent
    for the selective variant). The question's state gives ``q = W_q(x_q)``; ``q^T S`` is then a sequence of
    ``memory_tokens`` embeddings, mostly the matching turn's, placed before the prompt: a pretrained model reads
    words in its context (measured: projected values reached 2% exact match after 500 steps, the model answered
    with the right *kind* of value but not the value).
    """

    def __init__(self, cfg: HippoConfig, embed_rms: float, prompt_init: torch.Tensor):
        super().__init__()
        D, H, N = cfg.hidden_size, cfg.hippo_heads, cfg.hippo_state_dim
        if D % H:
            raise MemcliError(f"hippo config: hidden_size ({D}) must be divisible by num_heads ({H}) for read=prefix")
        self.cfg = cfg
        self.trans = _Transition(cfg)
        if cfg.hippo_variant == "matrix":
            self.log_dt = nn.Parameter(torch.log(_init_dt(H, cfg.dt_min, cfg.dt_max)))
        else:
            self.dt_proj = nn.Linear(D, H, bias=True)
            with torch.no_grad():
                dt = _init_dt(H, cfg.dt_min, cfg.dt_max)
                self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
                self.dt_proj.weight.mul_(0.1)
        self.W_k = nn.Linear(D, H * N, bias=False)
        self.W_q = nn.Linear(D, H * N, bias=False)
        with torch.no_grad():  # a question starts out reading the turns whose features look like it
            self.W_q.weight.copy_(self.W_k.weight)
        self.scale = nn.Parameter(torch.tensor(float(embed_rms)))  # memory tokens at the embedding table's scale
        # learned soft prompt before the memory tokens (prefix tuning): how to use them, e.g. to answer with the
        # value alone (SmolLM2-135M answers 0-2.5% of the dialog questions exactly even with the history in its prompt)
        self.prompt = nn.Parameter(prompt_init.detach().float().clone())

    def init_state(self, batch: int, device=None, dtype=torch.float32) -> torch.Tensor:
        c = self.cfg
        return torch.zeros(batch, c.hippo_heads, c.hippo_state_dim, c.hippo_memory_tokens * c.hidden_size // c.hippo_heads,
                           device=device, dtype=dtype)

    def write(self, S: torch.Tensor, x: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """One turn: features ``x [B, D]``, token embeddings ``tokens [B, m, D]`` (zeros where there is none)."""
        B, m, D = tokens.shape
        H = self.cfg.hippo_heads
        k = F.normalize(_heads(self.W_k(x), H).float(), dim=-1)  # [B, H, N]
        v = tokens.float().reshape(B, m, H, D // H).permute(0, 2, 1, 3).reshape(B, H, m * D // H)
        dt = torch.exp(self.log_dt) if self.cfg.hippo_variant == "matrix" else F.softplus(self.dt_proj(x).float())
        new = self.trans.step(S, k[:, None], v[:, None], dt)
        return new if mask is None else torch.where(mask.view(-1, 1, 1, 1), new, S)

    def read(self, S: torch.Tensor, question: torch.Tensor) -> torch.Tensor:
        """``question [B, D]`` -> the soft prompt and the memory tokens ``[B, p + m, D]`` (memory tokens per head
        normalised, then at the embedding scale; an empty state reads zeros)."""
        H, m, D = self.cfg.hippo_heads, self.cfg.hippo_memory_tokens, self.cfg.hidden_size
        q = F.normalize(_heads(self.W_q(question), H).float(), dim=-1)
        y = torch.einsum("bhn,bhnv->bhv", q, S.float())  # [B, H, m*D/H]
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-12)
        mem = y.reshape(-1, H, m, D // H).permute(0, 2, 1, 3).reshape(-1, m, D) * self.scale
        return torch.cat([self.prompt.unsqueeze(0).expand(mem.shape[0], -1, -1).to(mem.dtype), mem], dim=1)


def build_encoder(cfg: HippoConfig) -> HippoEncoder:
    cfg.check()
    return MatrixMemory(cfg) if cfg.hippo_variant == "matrix" else SelectiveMemory(cfg)
