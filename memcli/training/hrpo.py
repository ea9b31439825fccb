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

from memcli.backbone import apply_lora, enable_checkpointing, load_backbone, tokenizer_fingerprint
from memcli.config import backbone_spec, model_fields
from memcli.console import err_console
from memcli.errors import MemcliError
from memcli.eval.hrpo import decode, evaluate
from memcli.hrpo.data import encode_prompts, load_problems, prompt_token_ids, write_arithmetic
from memcli.hrpo.grpo import group_advantages, grpo_loss
from memcli.hrpo.io import save_hrpo
from memcli.hrpo.model import HrpoModel
from memcli.hrpo.config import HrpoConfig
from memcli.hrpo.rewards import check_rewards, load_reward
from memcli.hrpo.rollout import completion_logps, hybrid_generate, reference_logps
from memcli.kinds import HRPO
from memcli.training.loop import train
from memcli.training.recipe import Plan, Recipe

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
    hcfg = HrpoConfig(**model_fields(HrpoConfig, m, hidden_size=bb.config.hidden_size, instruction=cfg.dataset.instruction,
                                     backbone=spec, tokenizer_fingerprint=tokenizer_fingerprint(tok),
                                     hybrid=cfg.training.hybrid, thinking_temperature=cfg.training.temperature))
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


class HrpoRecipe(Recipe):
    """``train hrpo``: per micro-batch, sample each problem ``group_size`` times with the hybrid rollout (no grad),
    score, normalise within groups and replay under grad for the GRPO loss with a KL to the reference."""

    kind = HRPO
    command = "train hrpo"
    default_run_name = "hrpo"

    def __init__(self, cfg, reward_fn=None):
        """``reward_fn`` (a callable) overrides ``training.reward_fn`` (the Python API's way in)."""
        super().__init__(cfg)
        self.method = self.cfg.model.finetuning_method.value
        self.reward = reward_fn or load_reward(self.cfg.training.reward_fn)

    def build_data(self) -> None:
        pass  # the problems are read before the model (build_model): a bad file fails before the backbone loads

    def build_model(self) -> None:
        cfg, t, ds = self.cfg, self.cfg.training, self.cfg.dataset
        train_path, eval_path = resolve_paths(cfg)
        self.train_items = load_problems(train_path)
        self.test = load_problems(eval_path) if eval_path is not None and Path(eval_path).exists() else []
        if len(self.train_items) < t.batch_size:
            raise MemcliError(f"{train_path}: {len(self.train_items)} problems, fewer than one batch "
                              f"(training.batch_size={t.batch_size})")
        self.model, self.tok, self.ref = build(cfg, backbone_spec(cfg), self.method)
        qs = [p["question"] for p in self.train_items + self.test]
        cut = sum(len(ids) > ds.max_prompt_length for ids in prompt_token_ids(self.tok, qs, ds.instruction))
        if cut:
            err_console.print(f"[yellow]{cut} prompts are longer than dataset.max_prompt_length={ds.max_prompt_length} "
                              "tokens and keep only their end[/yellow]")
        self.bb_named = [(n, p) for n, p in self.model.backbone.named_parameters() if p.requires_grad]
        rg = self.model.residual_groups()
        self.param_groups = [{"name": "backbone", "params": [p for _, p in self.bb_named], "lr": t.backbone_lr},
                             {"name": "gates", "params": rg["gates"], "lr": t.gate_lr},
                             {"name": "lambda", "params": rg["lambda"], "lr": t.lambda_lr},
                             {"name": "projection", "params": rg["projection"], "lr": t.projection_lr}]
        self.gen = torch.Generator().manual_seed(t.seed)

    def plan(self, plan: Plan) -> None:
        super().plan(plan)
        if plan.world > 1:
            # the rollout and replay call the backbone directly, outside a DDP wrapper's forward: gradients would not sync
            raise MemcliError("train hrpo runs on one process in this release (launch without accelerate launch / "
                              "torchrun)")

    def trainable(self) -> dict[str, torch.Tensor]:
        named = {f"backbone.{n}": p for n, p in self.bb_named}
        named.update({f"residual.{n}": p for n, p in self.model.residual.named_parameters()})
        return named

    def collate(self, items: list, micro: int) -> dict:
        G, ds = self.cfg.training.group_size, self.cfg.dataset
        qs = [it["question"] for it in items for _ in range(G)]
        ids, mask = encode_prompts(self.tok, qs, ds.max_prompt_length, ds.instruction)
        return {"input_ids": ids, "attention_mask": mask, "micro": micro,
                "answers": [it["answer"] for it in items for _ in range(G)], "questions": qs}

    def step(self, m, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        t, model, tok = self.cfg.training, self.model, self.tok
        dev = next(model.backbone.parameters()).device
        if self.gen.device != dev:  # multinomial samples with a generator of the probabilities' device (CUDA too)
            self.gen = torch.Generator(device=dev)
        if self.ref is not None and next(self.ref.parameters()).device != dev:  # the loop places only the policy
            self.ref.to(dev)
        self.gen.manual_seed(t.seed * 100003 + batch["micro"])  # rollouts replay exactly on resume
        model.eval()
        ro = hybrid_generate(model.backbone, model.residual, tok, batch["input_ids"], batch["attention_mask"],
                             t.max_completion_length, temperature=t.temperature, hybrid=t.hybrid, generator=self.gen)
        model.train()
        texts = decode(tok, ro)
        r = check_rewards(self.reward(texts, batch["answers"], batch["questions"]), len(texts), t.reward_fn, step)
        adv, stats = group_advantages(r, t.group_size)
        logps, mix_stats = completion_logps(model.backbone, model.residual, ro, t.temperature, hybrid=t.hybrid)
        ref_lp = ref_logps_fn(model, self.ref, self.method, ro, t.temperature) if t.beta else None
        loss, lstats = grpo_loss(logps, ro.completion_mask, adv.to(logps.device), ref_lp, t.beta)
        stats.update(lstats)
        stats.update(mix_stats)
        if t.log_completions_interval and step % t.log_completions_interval == 0 \
                and batch["micro"] % t.accumulation_steps == 0:
            for j in list(range(0, len(texts), t.group_size))[:4]:  # one sample per group
                err_console.print(f"sample at step {step} (reward {float(r[j]):.2f}): {batch['questions'][j][:50]!r} -> "
                                  f"{texts[j][:80]!r}", markup=False)
        return loss, stats

    @property
    def has_eval(self) -> bool:
        return bool(self.test)

    def evaluate(self, step: int, final: bool = False) -> dict:
        t = self.cfg.training
        n = (self.final_n if final else self.eval_n) or None
        return evaluate(self.model, self.tok, self.test[:n], t.max_completion_length, self.cfg.dataset.max_prompt_length)

    def save(self, out: Path, info: dict) -> None:
        save_hrpo(self.model, self.tok, out, self.method, info)

    def info(self) -> dict:
        return dict(super().info(), thinking_source=self.model.cfg.thinking_source, hybrid=self.cfg.training.hybrid)

    def result(self, res: dict) -> dict:
        hist = res["history"]
        if hist:
            rewards = [h["reward_mean"] for h in hist]
            res["reward_first"], res["reward_last"] = fifth_mean(rewards, last=False), fifth_mean(rewards, last=True)
        return res


def fifth_mean(values: list, last: bool) -> float:
    """The mean over the first (or last) fifth of a run's steps, at least one step."""
    k = max(1, math.ceil(len(values) / 5))
    part = values[-k:] if last else values[:k]
    return sum(part) / len(part)


def train_hrpo(cfg, reward_fn=None) -> dict:
    """``memcli train hrpo`` from Python; ``reward_fn`` (a callable) overrides ``training.reward_fn``."""
    return train(HrpoRecipe(cfg, reward_fn))
