"""``memcli train hrpo``: GRPO with hybrid latent reasoning, on the shared training loop.

One micro-batch = ``training.batch_size`` problems, each sampled ``training.group_size`` times with
the hybrid rollout (no grad), scored by the reward function, turned into group-normalised advantages
and replayed under grad (same masks and positions) for the GRPO loss with a k3 KL to the reference
(LoRA: the adapter disabled; full: a frozen copy of the starting backbone; token inputs only).
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch

from memcli.backbone import apply_lora, enable_checkpointing, load_backbone, tokenizer_fingerprint
from memcli.config import backbone_spec, resolve
from memcli.console import err_console
from memcli.errors import MemcliError
from memcli.eval.hrpo import decode, evaluate
from memcli.hrpo.data import encode_prompts, load_problems, prompt_token_ids, write_arithmetic
from memcli.hrpo.grpo import group_advantages, grpo_loss
from memcli.hrpo.io import save_hrpo
from memcli.hrpo.model import HrpoModel
from memcli.hrpo.residual import HrpoConfig
from memcli.hrpo.rewards import check_rewards, load_reward
from memcli.hrpo.rollout import completion_logps, hybrid_generate, reference_logps
from memcli.training.loop import TrainTask, run_training
from memcli.training.state import trainable_io

DEFAULT_DIR = "data/arithmetic"


def resolve_paths(cfg) -> tuple[str, str | None]:
    ds = cfg.dataset
    if ds.train_path:
        return ds.train_path, ds.eval_path
    d = Path(DEFAULT_DIR)
    if not (d / "train.jsonl").exists():
        err_console.print(f"no dataset.train_path: writing the built-in arithmetic task to {d}")
        write_arithmetic(d)
    return str(d / "train.jsonl"), ds.eval_path or str(d / "test.jsonl")


def build(cfg, spec: str, method: str):
    m = cfg.model
    bb, tok = load_backbone(spec, seed=0, trust_remote_code=m.trust_remote_code)
    tok.padding_side = "left"
    hcfg = HrpoConfig(hidden_size=bb.config.hidden_size, source=m.thinking_source.value, r_min=m.thinking_r_min,
                      r_max=m.thinking_r_max, instruction=cfg.dataset.instruction, backbone=spec,
                      tokenizer_fingerprint=tokenizer_fingerprint(tok), hybrid=cfg.training.hybrid)
    torch.manual_seed(cfg.training.seed)
    ref = None
    for p in bb.parameters():
        p.requires_grad_(method == "full")
    if method == "full" and cfg.training.beta:
        ref = copy.deepcopy(bb).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    if method == "lora":
        bb = apply_lora(bb, m.lora_rank, m.lora_alpha, m.lora_dropout)
    if cfg.training.gradient_checkpointing:
        enable_checkpointing(bb)  # the replay's activations dominate peak memory
    return HrpoModel(bb, hcfg), tok, ref


def ref_logps_fn(model: HrpoModel, ref, method: str, ro, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        if method == "lora":
            with model.backbone.disable_adapter():
                return reference_logps(model.backbone, ro, temperature)
        return reference_logps(ref if ref is not None else model.backbone, ro, temperature)


def train_hrpo(cfg, reward_fn=None) -> dict:
    """``reward_fn`` (a callable) overrides ``training.reward_fn`` (the Python API's way in)."""
    resolve(cfg)
    t, ds = cfg.training, cfg.dataset
    spec = backbone_spec(cfg)
    method = cfg.model.finetuning_method.value
    for key, val, ok in (("training.group_size", t.group_size, t.group_size >= 2),
                         ("training.temperature", t.temperature, t.temperature > 0),
                         ("training.max_completion_length", t.max_completion_length, t.max_completion_length >= 1),
                         ("training.beta", t.beta, t.beta >= 0)):
        if not ok:
            raise MemcliError(f"key '{key}' got {val}, expected {'>= 2' if key.endswith('size') else 'a positive value'}")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # the rollout and replay call the backbone directly, outside a DDP wrapper's forward: gradients would not sync
        raise MemcliError("train hrpo runs on one process in this release (launch without accelerate launch / torchrun)")
    reward = reward_fn or load_reward(t.reward_fn)
    train_path, eval_path = resolve_paths(cfg)
    problems = load_problems(train_path)
    test = load_problems(eval_path) if eval_path is not None and Path(eval_path).exists() else []
    if len(problems) < t.batch_size:
        raise MemcliError(f"{train_path}: {len(problems)} problems, fewer than one batch (training.batch_size={t.batch_size})")
    model, tok, ref = build(cfg, spec, method)
    P = ds.max_prompt_length
    inst = ds.instruction
    cut = sum(len(ids) > P for ids in prompt_token_ids(tok, [p["question"] for p in problems + test], inst))
    if cut:
        err_console.print(f"[yellow]{cut} prompts are longer than dataset.max_prompt_length={P} tokens and keep only "
                          "their end[/yellow]")

    bb_named = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    rg = model.residual_groups()
    groups = [{"name": "backbone", "params": [p for _, p in bb_named], "lr": t.backbone_lr},
              {"name": "gates", "params": rg["gates"], "lr": t.gate_lr},
              {"name": "lambda", "params": rg["lambda"], "lr": t.lambda_lr},
              {"name": "projection", "params": rg["projection"], "lr": t.projection_lr}]
    G, temp, hybrid, beta, log_every = t.group_size, t.temperature, t.hybrid, t.beta, t.log_completions_interval
    gen = torch.Generator().manual_seed(t.seed)

    def collate(items, micro):
        qs = [it["question"] for it in items for _ in range(G)]
        ids, mask = encode_prompts(tok, qs, P, inst)
        return {"input_ids": ids, "attention_mask": mask, "micro": micro,
                "answers": [it["answer"] for it in items for _ in range(G)], "questions": qs}

    def step_fn(m, batch, step):
        gen.manual_seed(t.seed * 100003 + batch["micro"])  # rollouts replay exactly on resume
        model.eval()
        ro = hybrid_generate(model.backbone, model.residual, tok, batch["input_ids"], batch["attention_mask"],
                             t.max_completion_length, temperature=temp, hybrid=hybrid, generator=gen)
        model.train()
        texts = decode(tok, ro)
        r = check_rewards(reward(texts, batch["answers"], batch["questions"]), len(texts), t.reward_fn, step)
        adv, stats = group_advantages(r, G)
        logps, mix_stats = completion_logps(model.backbone, model.residual, ro, temp, hybrid=hybrid)
        ref_lp = ref_logps_fn(model, ref, method, ro, temp) if beta else None
        loss, lstats = grpo_loss(logps, ro.completion_mask, adv.to(logps.device), ref_lp, beta)
        stats.update(lstats)
        stats.update(mix_stats)
        if log_every and step % log_every == 0 and batch["micro"] % t.accumulation_steps == 0:
            for j in list(range(0, len(texts), G))[:4]:  # one sample per group
                err_console.print(f"sample at step {step} (reward {float(r[j]):.2f}): {batch['questions'][j][:50]!r} -> "
                                  f"{texts[j][:80]!r}", markup=False)
        return loss, stats

    eval_n, final_n = t.eval_num_samples, t.final_eval_num_samples

    def eval_fn(step):
        return evaluate(model, tok, test[:eval_n] if eval_n else test, t.max_completion_length, P)

    named = {f"backbone.{n}": p for n, p in bb_named}
    named.update({f"residual.{n}": p for n, p in model.residual.named_parameters()})
    trainable_state, load_trainable = trainable_io(named)
    run_dir = Path(cfg.logging.out_dir) / (cfg.logging.run_name or "hrpo")

    def save_fn(out, info):
        save_hrpo(model, tok, out, method, info)

    task = TrainTask(
        model=model, param_groups=groups, train_items=problems, collate=collate, step_fn=step_fn,
        trainable_state=trainable_state, load_trainable=load_trainable, save_fn=save_fn,
        eval_fn=eval_fn if test else None,
        final_eval_fn=(lambda step: evaluate(model, tok, test[:final_n] if final_n else test, t.max_completion_length,
                                             P)) if test else None,
        tokens_in=lambda b: int(b["attention_mask"].sum()),
        info={"kind": "hrpo", "thinking_source": model.cfg.source, "hybrid": hybrid},
    )
    res = run_training(cfg, task, run_dir, "train hrpo")
    hist = res["history"]
    if hist:
        k = max(1, math.ceil(len(hist) / 5))
        res["reward_first"] = sum(h["reward_mean"] for h in hist[:k]) / k
        res["reward_last"] = sum(h["reward_mean"] for h in hist[-k:]) / k
    return res
