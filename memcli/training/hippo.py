"""``memcli train hippo``: dialogs -> memory state -> answer loss, in two stages over the shared loop.

Stage 1 (the first ``training.stage1_epochs`` epochs) trains the encoder and the fusion gates only
(``training.learning_rate``); stage 2 unfreezes the backbone (LoRA or full, ``model.finetuning_method``)
with its own learning rate (``training.backbone_lr``). The stage is a function of the optimizer step,
so a resumed run re-enters the right stage. The query never sees the history: only the state built
from the history's turns.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memcli.backbone import apply_lora, load_backbone, tokenizer_fingerprint
from memcli.checkpoint import load_tensors, save_tensors
from memcli.config import backbone_spec, model_fields
from memcli.console import err_console
from memcli.errors import MemcliError
from memcli.eval.hippo import evaluate
from memcli.hippo.data import collate, load_dialogs
from memcli.hippo.config import HippoConfig
from memcli.hippo.io import save_hippo
from memcli.hippo.model import HippoModel
from memcli.kinds import HIPPO
from memcli.training.loop import train
from memcli.training.recipe import Plan, Recipe

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
    """The recipe's ``model`` section by its own names, plus what the backbone decides."""
    fields = model_fields(HippoConfig, cfg.model, hidden_size=backbone.config.hidden_size, backbone=spec,
                          tokenizer_fingerprint=tokenizer_fingerprint(tok))
    return HippoConfig.from_dict(fields, "model config")


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


class HippoRecipe(Recipe):
    """``train hippo``: stage 1 trains the encoder and gates, stage 2 (from ``training.stage1_epochs``) the backbone too."""

    kind = HIPPO
    command = "train hippo"
    default_run_name = "hippo"

    def __init__(self, cfg):
        super().__init__(cfg)
        self.method = self.cfg.model.finetuning_method.value

    def build_model(self) -> None:
        cfg, t = self.cfg, self.cfg.training
        self.train_path, self.val_path = resolve_paths(cfg)
        torch.manual_seed(t.seed)
        self.model, self.tok = build(cfg, backbone_spec(cfg), self.method)
        self.bb_named = backbone_trainables(self.model, self.method)
        self.mem_params = self.model.memory_parameters()
        self.param_groups = [{"name": "hippo", "params": self.mem_params, "lr": t.learning_rate},
                             {"name": "backbone", "params": [p for _, p in self.bb_named], "lr": t.backbone_lr}]

    def build_data(self) -> None:
        ds, t, tok, model = self.cfg.dataset, self.cfg.training, self.tok, self.model
        self.train_items = load_dialogs(tok, self.train_path, ds.max_turn_length, ds.max_prompt_length)
        vp = self.val_path
        self.val = load_dialogs(tok, vp, ds.max_turn_length, ds.max_prompt_length) if vp and Path(vp).exists() else []
        if len(self.train_items) < t.batch_size:
            raise MemcliError(f"{self.train_path}: {len(self.train_items)} dialogs, fewer than one batch "
                              f"(training.batch_size={t.batch_size})")
        if model.cfg.hippo_standardise:  # statistics of the backbone's states on the first training dialogs
            sample = collate(self.train_items[:64], tok.pad_token_id)
            real = sample["turns"].reshape(-1)
            model.fit_norms(sample["turn_ids"].flatten(0, 1)[real], sample["turn_mask"].flatten(0, 1)[real],
                            sample["query_ids"], sample["query_mask"])
        self.best = Best(self)

    def plan(self, plan: Plan) -> None:
        super().plan(plan)
        self.boundary = plan.step_of_epochs(self.cfg.training.stage1_epochs)  # first optimizer step of stage 2
        if self.bb_named and self.boundary and plan.world > 1:
            raise MemcliError("train hippo: unfreezing the backbone mid-run is not supported under DDP; run stage 1 "
                              "and stage 2 as two runs (training.stage1_epochs=0 for the second), or train on one "
                              "process")
        self.stage = None
        self.set_stage(0)

    def set_stage(self, step: int) -> None:
        s = 1 if (step < self.boundary or not self.bb_named) else 2
        if s != self.stage:
            for _, p in self.bb_named:
                p.requires_grad_(s == 2)
            self.stage = s

    def trainable(self) -> dict[str, torch.Tensor]:
        named = {f"memory.{i}": p for i, p in enumerate(self.mem_params)}
        named.update({f"backbone.{n}": p for n, p in self.bb_named})
        return named

    def collate(self, items: list, micro: int) -> dict:
        return collate(items, self.tok.pad_token_id)

    def step(self, model, batch: dict, step: int) -> tuple[torch.Tensor, dict]:
        self.set_stage(step)
        return model(batch=batch), {"stage": float(self.stage)}  # through the (DDP-wrapped) model's forward

    @property
    def has_eval(self) -> bool:
        return bool(self.val)

    def evaluate(self, step: int, final: bool = False) -> dict:
        if final:
            return self.best.final(step, self.val[:self.final_n])
        res = evaluate(self.model, self.tok, self.val[:self.eval_n])
        self.best.seen(step, res["val_loss"])
        return res

    def save(self, out: Path, info: dict) -> None:
        save_hippo(self.model, self.tok, out, self.method, dict(info, stage1_steps=self.boundary))

    def info(self) -> dict:
        return dict(super().info(), variant=self.model.cfg.hippo_variant)


class Best:
    """The seed's ``--load_best_model``: keep the weights of the lowest validation loss (states/best.safetensors, which
    survives a resume) and end with them when the last evaluation is worse."""

    def __init__(self, recipe: HippoRecipe):
        self.recipe = recipe
        self.path = recipe.run_dir() / "states" / "best.safetensors"
        self.on = recipe.cfg.training.load_best_model
        self.loss, self.step = float("inf"), -1
        if self.on and recipe.cfg.training.resume and self.path.is_file():
            saved = load_tensors(self.path)
            self.loss, self.step = float(saved["val_loss"]), int(saved["step"])

    def seen(self, step: int, loss: float) -> None:
        if self.on and loss < self.loss:
            self.loss, self.step = loss, step
            save_tensors(self.path, dict(self.recipe.state_dict(), val_loss=torch.tensor(loss), step=torch.tensor(step)))

    def final(self, step: int, val: list) -> dict:
        r = self.recipe
        if not (self.on and self.loss < float("inf")):  # no evaluation of this run (or the run it resumes) saved one
            return evaluate(r.model, r.tok, val)
        last = evaluate(r.model, r.tok, r.val[:r.eval_n])["val_loss"]
        if last > self.loss:  # the end is worse than the best evaluation: the best weights are the run's
            sd = load_tensors(self.path)
            sd.pop("val_loss")
            sd.pop("step")
            r.load_state_dict(sd)
            err_console.print(f"train hippo: keeping the weights of step {self.step}, the lowest validation loss "
                              f"({self.loss:.4f}; the last was {last:.4f})")
        else:
            self.loss, self.step = last, step
        return dict(evaluate(r.model, r.tok, val), best_step=self.step)


def train_hippo(cfg) -> dict:
    return train(HippoRecipe(cfg))
