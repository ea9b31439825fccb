"""MiniMind's comparison, reproduced: a small LM pretrained from scratch on sentences with a token memory whose
bank holds their facts, against the same LM with its memory switched off, a dense model of the same parameter
count, and the memory with EMA updates on.

Every variant trains with the shared loop on the same texts (``text_train.jsonl``) and is measured on the
held-out sentences (``text_val.jsonl``: facts never seen as text, present in the bank): validation loss,
perplexity, training tokens/s and peak memory.
"""

from __future__ import annotations

from pathlib import Path

import torch

from memcli.config import load_config
from memcli.console import err_console
from memcli.errors import MemcliError
from memcli.training.loop import train
from memcli.training.recipe import Recipe

VARIANTS = ("memory", "memory + EMA", "dense")


class DenseBaseline(Recipe):
    """The tiny backbone with a wider MLP (``extra_params`` more weights), trained on the same texts, no memory."""

    command = "compare pretrain (dense)"
    default_run_name = "dense"

    def __init__(self, cfg, data_dir: Path, extra_params: int, seed: int):
        super().__init__(cfg)
        self.data_dir, self.extra_params, self.seed = data_dir, extra_params, seed

    def build_model(self) -> None:
        from memcli.backbone import TINY_CONFIG, load_backbone

        per_unit = 3 * TINY_CONFIG["hidden_size"] * TINY_CONFIG["num_hidden_layers"]
        width = TINY_CONFIG["intermediate_size"] + round(self.extra_params / per_unit)
        self.model, self.tok = load_backbone("tiny", seed=self.seed, intermediate_size=width)
        for p in self.model.parameters():
            p.requires_grad_(True)
        self.param_groups = [{"name": "backbone", "params": list(self.model.parameters()),
                              "lr": self.cfg.training.backbone_lr}]

    def build_data(self) -> None:
        from memcli.explicit import items as X

        self.train_items = X.load_texts(self.tok, self.data_dir / "text_train.jsonl", 64)
        self.val = X.load_texts(self.tok, self.data_dir / "text_val.jsonl", 64)

    def collate(self, items: list, micro: int) -> dict:
        from memcli.explicit import items as X

        return X.text_collate(items, self.tok.pad_token_id)

    def step(self, model, batch: dict, step: int):
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        return loss, {"lm": loss.detach()}

    @property
    def has_eval(self) -> bool:
        return True

    def evaluate(self, step: int, final: bool = False) -> dict:
        return _plain_perplexity(self.model, self.val, self.tok.pad_token_id)


def _dense_baseline(data_dir: Path, out_dir: Path, steps: int, batch_size: int, extra_params: int, seed: int) -> dict:
    cfg = load_config("memory", overrides=[f"training.max_steps={steps}", f"training.batch_size={batch_size}",
                                           "training.epochs=1000", f"training.eval_interval={_every(steps)}",
                                           f"logging.out_dir={out_dir}", "logging.run_name=dense",
                                           "logging.tensorboard=false", f"training.seed={seed}"])
    recipe = DenseBaseline(cfg, data_dir, extra_params, seed)
    res = train(recipe)
    return dict(res["eval"], params=sum(p.numel() for p in recipe.model.parameters()), tokens_per_s=_tps(res),
                peak_rss_mb=res["peak_rss_mb"], steps=res["steps"])


@torch.no_grad()
def _plain_perplexity(model, items, pad_id: int, batch: int = 32) -> dict:
    import math

    from memcli.explicit.items import text_collate

    model.eval()
    nll = n = 0.0
    for s in range(0, len(items), batch):
        b = text_collate(items[s: s + batch], pad_id)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        tgt = b["labels"][:, 1:]
        lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, tgt.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        real = tgt != -100
        nll -= float(lp[real].sum())
        n += int(real.sum())
    return {"val_loss": nll / max(1, n), "val_ppl": math.exp(min(nll / max(1, n), 50.0))}


def _every(steps: int) -> int:
    """Validation every tenth of the run, so ``compare runs`` can draw the curves side by side."""
    return max(1, steps // 10)


def _tps(res: dict) -> float:
    hist = res["history"]
    return round(hist[-1]["tokens_per_s"], 1) if hist else 0.0


def pretrain_comparison(data_dir: str | Path, out_dir: str | Path, steps: int = 1000, batch_size: int = 32,
                        seed: int = 42) -> dict:
    """Train every variant for ``steps`` optimizer steps and return their validation figures side by side."""
    from memcli.training.explicit import TextRecipe

    d, out = Path(data_dir), Path(out_dir)
    if not (d / "text_train.jsonl").is_file() or not (d / "cache").is_dir():
        if d.exists() and any(d.iterdir()):
            raise MemcliError(f"{d}: no text_train.jsonl or cache/ (expected the output of 'memcli gen-data default')")
        from memcli.data.pipeline import default_data

        err_console.print(f"no data in {d}: writing every fact of the T-REx slice shipped with memcli (tiny tokenizer)")
        default_data(d, seed=0, num_facts=4013, source="builtin")
    common = [f"dataset.data_dir={d}", f"dataset.text_path={d / 'text_train.jsonl'}",
              f"dataset.text_val_path={d / 'text_val.jsonl'}", f"training.max_steps={steps}",
              f"training.batch_size={batch_size}", "training.epochs=1000", f"training.eval_interval={_every(steps)}",
              f"logging.out_dir={out}", "logging.tensorboard=false", f"training.seed={seed}"]
    rows: dict[str, dict] = {}
    for name, extra in (("memory", []),
                        ("memory + EMA", ["training.ema_update_freq=5", "training.ema_decay=0.9",
                                          "training.balance_loss_coef=0.1", "training.balance_form=seed"])):
        err_console.print(f"compare pretrain: training '{name}' ({steps} steps)")
        res = train(TextRecipe(load_config("memory", overrides=common + extra +
                                           [f"logging.run_name={name.replace(' + ', '-')}"])))
        from memcli.runs import load_run

        run = load_run(res["run_dir"])
        mem_params = sum(p.numel() for p in run.model.memory_parameters())
        rows[name] = dict(res["eval"], params=sum(p.numel() for p in run.model.parameters()), memory_params=mem_params,
                          tokens_per_s=_tps(res), peak_rss_mb=res["peak_rss_mb"], steps=res["steps"])
    err_console.print(f"compare pretrain: training the dense baseline ({steps} steps)")
    rows["dense"] = _dense_baseline(d, out, steps, batch_size, rows["memory"]["memory_params"], seed)
    return {"data": str(d), "steps": steps, "rows": rows}
