"""``memcli train hippo``: dialogs -> memory state -> answer loss, in two stages over the shared loop.

Stage 1 (the first ``training.stage1_epochs`` epochs) trains the encoder and the fusion gates only
(``training.learning_rate``); stage 2 unfreezes the backbone (LoRA or full, ``model.finetuning_method``)
with its own learning rate (``training.backbone_lr``). The stage is a function of the optimizer step,
so a resumed run re-enters the right stage. The query never sees the history: only the state built
from the history's turns.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from memcli.backbone import apply_lora, load_backbone, tokenizer_fingerprint
from memcli.checkpoint import load_tensors, save_tensors
from memcli.config import backbone_spec, resolve
from memcli.console import err_console
from memcli.errors import MemcliError
from memcli.eval.hippo import evaluate
from memcli.hippo.data import collate, load_dialogs
from memcli.hippo.encoder import HippoConfig
from memcli.hippo.io import save_hippo
from memcli.hippo.model import HippoModel
from memcli.training.loop import TrainTask, run_training
from memcli.training.state import trainable_io

# the data the tiny model learns from in minutes: names from a pool of 200 (chance 0.5%) and dialog
# lengths 1..6 (short dialogs teach reading the state, long ones choosing among turns)
DEFAULT_DATA = {"num_train": 18000, "num_val": 200, "turns": 6, "min_distance": 2, "name_pool": 200, "min_turns": 1}
DEFAULT_DATA_ARGS = "--num-train 18000 --name-pool 200 --min-turns 1"


def resolve_paths(cfg) -> tuple[str, str | None]:
    ds = cfg.dataset
    d = Path(ds.data_dir)
    train = ds.train_path or str(d / "data_train.jsonl")
    val = ds.eval_path or (str(d / "data_val.jsonl") if not ds.train_path else None)
    if not ds.train_path and not Path(train).exists():
        from memcli.data.pipeline import gen_dialog

        err_console.print(f"no dialogs in {d}: generating the default recipe (memcli gen-data dialog {DEFAULT_DATA_ARGS})")
        gen_dialog(d, seed=0, **DEFAULT_DATA)
    return train, val


def hippo_config(cfg, backbone, tok, spec: str) -> HippoConfig:
    m = cfg.model
    return HippoConfig(variant=m.hippo_variant.value, hidden_size=backbone.config.hidden_size, num_heads=m.hippo_heads,
                       state_dim=m.hippo_state_dim, value_dim=m.hippo_value_dim or 64, init=m.hippo_init.value,
                       expand=m.hippo_expand or 2, fusion_layers=list(m.memory_layers),
                       feature_layer=m.hippo_feature_layer, pool=m.hippo_pool.value,
                       standardise=m.hippo_standardise, read=m.hippo_read.value,
                       memory_tokens=m.hippo_memory_tokens, prompt_tokens=m.hippo_prompt_tokens, backbone=spec,
                       tokenizer_fingerprint=tokenizer_fingerprint(tok))


def build(cfg, spec: str, method: str):
    m = cfg.model
    bb, tok = load_backbone(spec, seed=0, trust_remote_code=m.trust_remote_code)
    torch.manual_seed(cfg.training.seed)
    model = HippoModel(bb, hippo_config(cfg, bb, tok, spec))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    if method == "lora":
        model.backbone = apply_lora(model.backbone, m.lora_rank, m.lora_alpha, m.lora_dropout)
    return model, tok


def backbone_trainables(model: HippoModel, method: str) -> list[tuple[str, torch.nn.Parameter]]:
    if method == "frozen":
        return []
    named = list(model.backbone.named_parameters())
    return [(n, p) for n, p in named if "lora_" in n] if method == "lora" else named


def answer_loss(model: HippoModel, batch: dict) -> torch.Tensor:
    return model.answer_loss(batch)


def train_hippo(cfg) -> dict:
    resolve(cfg)
    t, ds = cfg.training, cfg.dataset
    spec = backbone_spec(cfg)
    method = cfg.model.finetuning_method.value
    if t.stage1_epochs < 0:
        raise MemcliError(f"key 'training.stage1_epochs' got {t.stage1_epochs}, expected >= 0")
    train_path, val_path = resolve_paths(cfg)
    torch.manual_seed(t.seed)
    model, tok = build(cfg, spec, method)
    items = load_dialogs(tok, train_path, ds.max_turn_length, ds.max_prompt_length)
    val = load_dialogs(tok, val_path, ds.max_turn_length, ds.max_prompt_length) if val_path and Path(val_path).exists() else []
    if len(items) < t.batch_size:
        raise MemcliError(f"{train_path}: {len(items)} dialogs, fewer than one batch (training.batch_size={t.batch_size})")

    if model.cfg.standardise:  # statistics of the backbone's states on the first training dialogs
        sample = collate(items[:64], tok.pad_token_id)
        real = sample["turns"].reshape(-1)
        model.fit_norms(sample["turn_ids"].flatten(0, 1)[real], sample["turn_mask"].flatten(0, 1)[real],
                        sample["query_ids"], sample["query_mask"])
    bb_named = backbone_trainables(model, method)
    mem_params = model.memory_parameters()
    groups = [{"name": "hippo", "params": mem_params, "lr": t.learning_rate},
              {"name": "backbone", "params": [p for _, p in bb_named], "lr": t.backbone_lr}]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, len(items) // (t.batch_size * world))
    boundary = int(t.stage1_epochs * per_epoch) // t.accumulation_steps  # first optimizer step of stage 2
    if bb_named and boundary and world > 1:
        raise MemcliError("train hippo: unfreezing the backbone mid-run is not supported under DDP; run stage 1 and "
                          "stage 2 as two runs (training.stage1_epochs=0 for the second), or train on one process")
    stage = {"now": None}

    def set_stage(step: int) -> None:
        s = 1 if (step < boundary or not bb_named) else 2
        if s != stage["now"]:
            for _, p in bb_named:
                p.requires_grad_(s == 2)
            stage["now"] = s

    def step_fn(m, batch, step):
        set_stage(step)
        loss = answer_loss(model, batch)
        return loss, {"stage": float(stage["now"])}

    eval_n, final_n = t.eval_num_samples, t.final_eval_num_samples
    trainable = {f"memory.{i}": p for i, p in enumerate(mem_params)}
    trainable.update({f"backbone.{n}": p for n, p in bb_named})
    trainable_state, load_trainable = trainable_io(trainable)
    run_dir = Path(cfg.logging.out_dir) / (cfg.logging.run_name or "hippo")
    best_path = run_dir / "states" / "best.safetensors"  # the seed's --load_best_model: weights of the lowest val loss
    keep_best = t.load_best_model
    best = {"loss": float("inf"), "step": -1}
    if keep_best and t.resume and best_path.is_file():
        saved = load_tensors(best_path)
        best.update(loss=float(saved["val_loss"]), step=int(saved["step"]))

    def eval_fn(step):
        res = evaluate(model, tok, val[:eval_n] if eval_n else val)
        if keep_best and res["val_loss"] < best["loss"]:
            best.update(loss=res["val_loss"], step=step)
            save_tensors(best_path, dict(trainable_state(), val_loss=torch.tensor(res["val_loss"]), step=torch.tensor(step)))
        return res

    def final_eval(step):
        if keep_best and best["loss"] < float("inf"):  # an evaluation of this run (or the run it resumes) saved one
            last = evaluate(model, tok, val[:eval_n] if eval_n else val)["val_loss"]
            if last > best["loss"]:  # the end is worse than the best evaluation: the best weights are the run's
                sd = load_tensors(best_path)
                sd.pop("val_loss")
                sd.pop("step")
                load_trainable(sd)
                err_console.print(f"train hippo: keeping the weights of step {best['step']}, the lowest validation "
                                  f"loss ({best['loss']:.4f}; the last was {last:.4f})")
            else:
                best.update(loss=last, step=step)
            return dict(evaluate(model, tok, val[:final_n]), best_step=best["step"])
        return evaluate(model, tok, val[:final_n])

    def save_fn(out, info):
        save_hippo(model, tok, out, method, dict(info, stage1_steps=boundary))

    set_stage(0)
    task = TrainTask(
        model=model, param_groups=groups, train_items=items,
        collate=lambda its, micro: collate(its, tok.pad_token_id),
        step_fn=step_fn, trainable_state=trainable_state, load_trainable=load_trainable, save_fn=save_fn,
        eval_fn=eval_fn if val else None,
        final_eval_fn=final_eval if val else None,
        info={"kind": "hippo", "variant": model.cfg.variant},
    )
    return run_training(cfg, task, run_dir, "train hippo")



