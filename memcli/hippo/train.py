"""``memcli train hippo``: dialogs -> memory state -> answer loss, in two stages over the shared loop.

Stage 1 (the first ``training.stage1_epochs`` epochs) trains the encoder and the fusion gates only;
stage 2 unfreezes the backbone (LoRA or full, ``model.finetuning_method``) with its own learning rate
(``training.backbone_lr``) beside the memory's (``training.hippo_lr``). The stage is a function of the
optimizer step, so a resumed run re-enters the right stage. The query never sees the history: only
the state built from the history's turns.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from memcli.errors import MemcliError
from memcli.eval.hippo import evaluate
from memcli.hippo.data import IGNORE, collate, load_dialogs
from memcli.hippo.encoder import HippoConfig
from memcli.hippo.io import save_hippo
from memcli.hippo.model import HippoModel
from memcli.training.loop import TrainTask, run_training
from memcli.training.state import trainable_io

# learning rates when not configured: the seed's for a pretrained backbone; the tiny model learns from scratch
REAL_LR = {"hippo": 5e-5, "backbone": 1e-5}
TINY_LR = {"hippo": 3e-3, "backbone": 1e-3}


# the data the tiny model learns from in minutes: names from a pool of 200 (chance 0.5%) and dialog
# lengths 1..6 (short dialogs teach reading the state, long ones choosing among turns)
DEFAULT_DATA = {"num_train": 18000, "num_val": 200, "turns": 6, "min_distance": 2, "name_pool": 200, "min_turns": 1}
DEFAULT_DATA_ARGS = "--num-train 18000 --name-pool 200 --min-turns 1"


def resolve_paths(cfg) -> tuple[Path, Path]:
    ds = cfg.dataset
    d = Path(ds.data_dir)
    train = Path(ds.sft_dataset_path) if ds.sft_dataset_path else d / "data_train.jsonl"
    val = Path(ds.sft_val_dataset_path) if ds.sft_val_dataset_path else d / "data_val.jsonl"
    if not ds.sft_dataset_path and not train.exists():
        from memcli.data.pipeline import gen_dialog
        from memcli.views import err_console

        err_console.print(f"no dialogs in {d}: generating the default recipe (memcli gen-data dialog {DEFAULT_DATA_ARGS})")
        gen_dialog(d, seed=0, **DEFAULT_DATA)
    return train, val


def hippo_config(cfg, backbone, tok, spec: str) -> HippoConfig:
    from memcli.data.bank import tokenizer_fingerprint

    m = cfg.model
    tiny = spec == "tiny"
    layer = m.hippo_feature_layer if m.hippo_feature_layer is not None else (0 if tiny else -1)
    pool = m.hippo_pool if m.hippo_pool != "auto" else ("mean" if tiny else "last")
    return HippoConfig(variant=m.hippo_variant, hidden_size=backbone.config.hidden_size, num_heads=m.hippo_heads,
                       state_dim=m.hippo_state_dim, value_dim=m.hippo_value_dim, init=m.hippo_init,
                       expand=m.hippo_expand, fusion_layers=list(m.memory_layers), feature_layer=layer,
                       pool=pool, backbone=spec, tokenizer_fingerprint=tokenizer_fingerprint(tok))


def build(cfg, spec: str, method: str):
    from memcli.backbone import load_backbone

    bb, tok = load_backbone(spec, seed=0, trust_remote_code=cfg.model.trust_remote_code)
    torch.manual_seed(cfg.training.seed)
    model = HippoModel(bb, hippo_config(cfg, bb, tok, spec))
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        m = cfg.model
        lcfg = LoraConfig(r=m.lora_rank, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        model.backbone = get_peft_model(model.backbone, lcfg)
    return model, tok


def backbone_trainables(model: HippoModel, method: str) -> list[tuple[str, torch.nn.Parameter]]:
    if method == "frozen":
        return []
    named = list(model.backbone.named_parameters())
    return [(n, p) for n, p in named if "lora_" in n] if method == "lora" else named


def answer_loss(model: HippoModel, batch: dict) -> torch.Tensor:
    state = model.encode_dialogs(batch["turn_ids"], batch["turn_mask"], batch["turns"])
    out = model(batch["input_ids"], batch["attention_mask"], state=state, use_cache=False)
    logits = out.logits[:, :-1].float()
    tgt = batch["labels"][:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=IGNORE)


def train_hippo(cfg) -> dict:
    from memcli.explicit.run import backbone_spec

    t, ds = cfg.training, cfg.dataset
    spec, method = backbone_spec(cfg)
    if t.stage1_epochs < 0:
        raise MemcliError(f"key 'training.stage1_epochs' got {t.stage1_epochs}, expected >= 0")
    train_path, val_path = resolve_paths(cfg)
    torch.manual_seed(t.seed)
    model, tok = build(cfg, spec, method)
    items = load_dialogs(tok, train_path, ds.max_turn_length, ds.max_length)
    val = load_dialogs(tok, val_path, ds.max_turn_length, ds.max_length) if val_path.is_file() else []
    if len(items) < t.batch_size:
        raise MemcliError(f"{train_path}: {len(items)} dialogs, fewer than one batch (training.batch_size={t.batch_size})")

    lrs = TINY_LR if spec == "tiny" else REAL_LR
    bb_named = backbone_trainables(model, method)
    mem_params = model.memory_parameters()
    groups = [
        {"name": "hippo", "params": mem_params, "lr": t.hippo_lr or lrs["hippo"]},
        {"name": "backbone", "params": [p for _, p in bb_named], "lr": t.backbone_lr or lrs["backbone"]},
    ]
    world = int(__import__("os").environ.get("WORLD_SIZE", "1"))
    per_epoch = max(1, len(items) // (t.batch_size * world))
    boundary = (t.stage1_epochs * per_epoch) // t.accumulation_steps  # first optimizer step of stage 2
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

    def eval_fn(step):
        return evaluate(model, tok, val[:eval_n] if eval_n else val)

    trainable = {f"memory.{i}": p for i, p in enumerate(mem_params)}
    trainable.update({f"backbone.{n}": p for n, p in bb_named})

    trainable_state, load_trainable = trainable_io(trainable)

    run_dir = Path(cfg.logging.out_dir) / (cfg.logging.run_name or "hippo")

    def save_fn(out, info):
        save_hippo(model, tok, out, method, dict(info, backbone=spec, stage1_steps=boundary))

    set_stage(0)
    task = TrainTask(
        model=model, param_groups=groups, train_items=items,
        collate=lambda its, micro: collate(its, tok.pad_token_id),
        step_fn=step_fn, trainable_state=trainable_state, load_trainable=load_trainable, save_fn=save_fn,
        eval_fn=eval_fn if val else None,
        final_eval_fn=(lambda step: evaluate(model, tok, val[:final_n])) if val else None,
        info={"kind": "hippo", "variant": model.cfg.variant, "finetuning_method": method},
    )
    return run_training(cfg, task, run_dir, "train hippo")
