"""``memcli train hrpo``: GRPO with hybrid latent reasoning, on the shared training loop.

One micro-batch = ``training.batch_size`` problems, each sampled ``training.group_size`` times with
the hybrid rollout (no grad), scored by the reward function, turned into group-normalised advantages
and replayed under grad (same masks and positions) for the GRPO loss with a k3 KL to the reference
(LoRA: the adapter disabled; full: a frozen copy of the starting backbone; token inputs only).
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch

from memcli.errors import MemcliError
from memcli.hrpo.data import encode_prompts, load_problems, write_arithmetic
from memcli.hrpo.grpo import group_advantages, grpo_loss
from memcli.hrpo.io import save_hrpo
from memcli.hrpo.model import HrpoModel
from memcli.hrpo.residual import HrpoConfig
from memcli.hrpo.rewards import check_rewards, extract_answer, gsm8k_reward, load_reward
from memcli.hrpo.rollout import completion_logps, hybrid_generate, reference_logps
from memcli.training.loop import TrainTask, run_training
from memcli.training.state import trainable_io

# the seed's learning rate for a pretrained backbone (LoRA or full); the tiny one starts from scratch
REAL_BACKBONE_LR = 5e-6
TINY_BACKBONE_LR = 1e-4
DEFAULT_DIR = "data/arithmetic"


def resolve_paths(cfg) -> tuple[Path, Path | None]:
    ds = cfg.dataset
    if ds.train_path:
        return Path(ds.train_path), Path(ds.eval_path) if ds.eval_path else None
    d = Path(DEFAULT_DIR)
    if not (d / "train.jsonl").exists():
        from memcli.views import err_console

        err_console.print(f"no dataset.train_path: writing the built-in arithmetic task to {d}")
        write_arithmetic(d)
    return d / "train.jsonl", Path(ds.eval_path) if ds.eval_path else d / "test.jsonl"


def build(cfg, spec: str, method: str):
    from memcli.backbone import load_backbone
    from memcli.data.bank import tokenizer_fingerprint

    bb, tok = load_backbone(spec, seed=0, trust_remote_code=cfg.model.trust_remote_code)
    tok.padding_side = "left"
    m = cfg.model
    hcfg = HrpoConfig(hidden_size=bb.config.hidden_size, source=m.thinking_source, r_min=m.thinking_r_min,
                      r_max=m.thinking_r_max, backbone=spec, tokenizer_fingerprint=tokenizer_fingerprint(tok))
    torch.manual_seed(cfg.training.seed)
    ref = None
    for p in bb.parameters():
        p.requires_grad_(method == "full")
    if method == "full" and cfg.training.beta:
        ref = copy.deepcopy(bb).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lcfg = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        bb = get_peft_model(bb, lcfg)
    return HrpoModel(bb, hcfg), tok, ref


def ref_logps_fn(model: HrpoModel, ref, method: str, ro, temperature: float) -> torch.Tensor:
    with torch.no_grad():
        if method == "lora":
            with model.backbone.disable_adapter():
                return reference_logps(model.backbone, ro, temperature)
        return reference_logps(ref if ref is not None else model.backbone, ro, temperature)


def evaluate(model: HrpoModel, tok, problems: list[dict], max_new_tokens: int, max_length: int, hybrid: bool = True,
             batch: int = 16) -> dict:
    """Greedy accuracy (hybrid mixing on unless ``hybrid`` is False)."""
    model.eval()
    correct = formed = 0
    for i in range(0, len(problems), batch):
        part = problems[i:i + batch]
        ids, mask = encode_prompts(tok, [p["question"] for p in part], max_length)
        ro = model.generate(tok, ids, mask, max_new_tokens, temperature=0.0, hybrid=hybrid)
        texts = decode(tok, ro)
        rew = gsm8k_reward(texts, [p["answer"] for p in part])
        correct += int(sum(rew))
        formed += sum(extract_answer(t) is not None for t in texts)
    n = max(1, len(problems))
    return {"accuracy": correct / n, "well_formed": formed / n, "eval_n": len(problems)}


def decode(tok, ro) -> list[str]:
    return [tok.decode(ids[m.bool()], skip_special_tokens=True) for ids, m in zip(ro.completion_ids, ro.completion_mask)]


def train_hrpo(cfg, reward_fn=None) -> dict:
    """``reward_fn`` (a callable) overrides ``training.reward_fn`` (the Python API's way in)."""
    from memcli.explicit.run import backbone_spec
    from memcli.views import err_console, table

    t, ds = cfg.training, cfg.dataset
    spec, method = backbone_spec(cfg)
    for key, val, ok in (("training.group_size", t.group_size, t.group_size >= 2),
                         ("training.temperature", t.temperature, t.temperature > 0),
                         ("training.max_completion_length", t.max_completion_length, t.max_completion_length >= 1),
                         ("training.beta", t.beta, t.beta >= 0)):
        if not ok:
            raise MemcliError(f"key '{key}' got {val}, expected {'>= 2' if key.endswith('size') else 'a positive value'}")
    if int(__import__("os").environ.get("WORLD_SIZE", "1")) > 1:
        # the rollout and replay call the backbone directly, outside a DDP wrapper's forward: gradients would not sync
        raise MemcliError("train hrpo runs on one process in this release (launch without accelerate launch / torchrun)")
    reward = reward_fn or load_reward(t.reward_fn)
    train_path, eval_path = resolve_paths(cfg)
    problems = load_problems(train_path)
    test = load_problems(eval_path) if eval_path is not None and eval_path.is_file() else []
    if len(problems) < t.batch_size:
        raise MemcliError(f"{train_path}: {len(problems)} problems, fewer than one batch (training.batch_size={t.batch_size})")
    model, tok, ref = build(cfg, spec, method)

    bb_named = [(n, p) for n, p in model.backbone.named_parameters() if p.requires_grad]
    rg = model.residual_groups()
    groups = [{"name": "backbone", "params": [p for _, p in bb_named],
               "lr": t.backbone_lr or (TINY_BACKBONE_LR if spec == "tiny" else REAL_BACKBONE_LR)},
              {"name": "gates", "params": rg["gates"], "lr": t.gate_lr},
              {"name": "lambda", "params": rg["lambda"], "lr": t.lambda_lr},
              {"name": "projection", "params": rg["projection"], "lr": t.projection_lr}]
    G, temp = t.group_size, t.temperature
    gen = torch.Generator().manual_seed(t.seed)

    def collate(items, micro):
        qs = [it["question"] for it in items for _ in range(G)]
        ids, mask = encode_prompts(tok, qs, ds.max_length)
        return {"input_ids": ids, "attention_mask": mask, "micro": micro,
                "answers": [it["answer"] for it in items for _ in range(G)], "questions": qs}

    def step_fn(m, batch, step):
        gen.manual_seed(t.seed * 100003 + batch["micro"])  # rollouts replay exactly on resume
        model.eval()
        ro = hybrid_generate(model.backbone, model.residual, tok, batch["input_ids"], batch["attention_mask"],
                             t.max_completion_length, temperature=temp, hybrid=t.hybrid, generator=gen)
        model.train()
        texts = decode(tok, ro)
        r = check_rewards(reward(texts, batch["answers"], batch["questions"]), len(texts), t.reward_fn, step)
        adv, stats = group_advantages(r, G)
        logps, mix_stats = completion_logps(model.backbone, model.residual, ro, temp, hybrid=t.hybrid)
        ref_lp = ref_logps_fn(model, ref, method, ro, temp) if t.beta else None
        loss, lstats = grpo_loss(logps, ro.completion_mask, adv.to(logps.device), ref_lp, t.beta)
        stats.update(lstats)
        stats.update(mix_stats)
        if t.log_completions_interval and step % t.log_completions_interval == 0 and batch["micro"] % t.accumulation_steps == 0:
            rows = [(batch["questions"][j][:40], texts[j][:60].replace("\n", " "), f"{float(r[j]):.2f}")
                    for j in range(0, len(texts), G)][:4]
            err_console.print(table(f"train hrpo: samples at step {step}", ["question", "completion", "reward"], rows))
        return loss, stats

    eval_n, final_n = t.eval_num_samples, t.final_eval_num_samples

    def eval_fn(step):
        return evaluate(model, tok, test[:eval_n] if eval_n else test, t.max_completion_length, ds.max_length)

    named = {f"backbone.{n}": p for n, p in bb_named}
    named.update({f"residual.{n}": p for n, p in model.residual.named_parameters()})
    trainable_state, load_trainable = trainable_io(named)
    run_dir = Path(cfg.logging.out_dir) / (cfg.logging.run_name or "hrpo")

    def save_fn(out, info):
        save_hrpo(model, tok, out, method, dict(info, backbone=spec))

    task = TrainTask(
        model=model, param_groups=groups, train_items=problems, collate=collate, step_fn=step_fn,
        trainable_state=trainable_state, load_trainable=load_trainable, save_fn=save_fn,
        eval_fn=eval_fn if test else None,
        final_eval_fn=(lambda step: evaluate(model, tok, test[:final_n] if final_n else test, t.max_completion_length,
                                             ds.max_length)) if test else None,
        tokens_in=lambda b: int(b["attention_mask"].sum()),
        info={"kind": "hrpo", "finetuning_method": method, "thinking_source": model.cfg.source, "hybrid": t.hybrid},
    )
    res = run_training(cfg, task, run_dir, "train hrpo")
    hist = res["history"]
    if hist:
        k = max(1, math.ceil(len(hist) / 5))
        res["reward_first"] = sum(h["reward_mean"] for h in hist[:k]) / k
        res["reward_last"] = sum(h["reward_mean"] for h in hist[-k:]) / k
    return res
