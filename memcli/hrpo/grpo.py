"""GRPO objective, on-policy, with the conventions of TRL's ``GRPOTrainer`` (``loss_type="grpo"``).

- advantages ``(r - mean_g) / (std_g + 1e-4)`` per group of ``group_size`` consecutive completions,
  with the unbiased (n-1) standard deviation, as TRL;
- ratio ``exp(logp - logp.detach())`` (1 in value, the policy gradient in grad), no clipping needed
  on-policy;
- KL to the reference by the k3 estimator ``exp(ref - logp) - (ref - logp) - 1``, weighted by ``beta``;
- loss averaged over each sequence's completion tokens, then over sequences (each completion counts
  the same whatever its length; TRL's ``grpo`` type, not ``dapo``/``bnpo`` token averaging).
"""

from __future__ import annotations

import torch

EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, dict]:
    r = rewards.float().view(-1, group_size)
    mean = r.mean(1, keepdim=True)
    std = r.std(1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)
    adv = ((r - mean) / (std + EPS)).reshape(-1)
    stats = {"reward_mean": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0,
             "frac_zero_std": float((std.squeeze(1) == 0).float().mean())}
    return adv, stats


def grpo_loss(logps: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor, ref_logps: torch.Tensor | None = None,
              beta: float = 0.0) -> tuple[torch.Tensor, dict]:
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - logps.detach())
    per_tok = -ratio * advantages.unsqueeze(1)
    kl = None
    if beta and ref_logps is not None:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_tok = per_tok + beta * kl
    n = mask.sum(-1).clamp_min(1.0)
    loss = ((per_tok * mask).sum(-1) / n).mean()
    stats = {"completion_length": float(mask.sum(-1).mean())}
    if kl is not None:
        stats["kl"] = float(((kl.detach() * mask).sum(-1) / n).mean())
    return loss, stats
