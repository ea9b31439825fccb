"""Write examples/train_<recipe>.yaml: each recipe's default config, resolved (tests/test_recipes.py checks them).

    python tools/write_examples.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memcli.config import RECIPES, load_config, to_yaml  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "examples"
HEAD = {
    "router": "ExplicitLM's first stage: the MemoryGate alone on the router loss (tiny backbone).",
    "fusion": "ExplicitLM's second stage: GatedMemoryFusion + MemoryNorm on the LM loss, the gate loaded from a router run\n"
              "# (set dataset.pretrained_router_path).",
    "memory": "The main job: every memory component on the synthetic knowledge base, tiny backbone trained from scratch.",
    "hippo": "HIPPO dialog memory on the default dialogs, tiny backbone.",
    "hrpo": "HRPO latent reasoning on the built-in arithmetic task, tiny backbone.",
}


MINIMIND = ["dataset.data_dir=data/pretrain", "dataset.text_path=data/pretrain/text_train.jsonl",
            "dataset.text_val_path=data/pretrain/text_val.jsonl", "model.read=additive", "training.ema_update_freq=5",
            "training.ema_decay=0.9", "training.balance_loss_coef=0.1", "training.balance_form=seed",
            "training.router_loss_coef=0.0", "training.counterfactual_prob=0.0", "training.max_steps=1000",
            "training.eval_interval=100"]

HRPO_SMOLLM2 = ["model.backbone=smollm2-135m", "training.gradient_checkpointing=false", "logging.tensorboard=false"]


def write(name: str, recipe: str, overrides: list[str], head: str) -> None:
    text = (f"# memcli train {recipe} --config examples/{name}.yaml [key=value ...]\n# {head}\n"
            "# Every key train " + recipe + " reads (per-backbone defaults resolved; see memcli/config.py).\n"
            + to_yaml(load_config(recipe, overrides=overrides)))
    (OUT / f"{name}.yaml").write_text(text, encoding="utf-8")


for r in RECIPES:
    write(f"train_{r}", r, [], HEAD[r])
write("train_memory_smollm2", "memory", ["model.backbone=smollm2-135m"],
      "The recipe for a pretrained backbone (SmolLM2-135M-Instruct, fetched once by 'memcli download smollm2-135m'):\n"
      "# retrieval from the mean of its layer-8 states, keys from each entry's own layer-8 states, the retrieved entry\n"
      "# read as a prefix, the backbone frozen, T-REx facts in the cloze format.")
write("train_hrpo_smollm2", "hrpo", HRPO_SMOLLM2,
      "HRPO on SmolLM2-135M-Instruct (fetched once by 'memcli download smollm2-135m'), the README's hybrid-vs-plain\n"
      "# runs: LoRA, 60 steps x 4 problems x 4 samples of the built-in arithmetic task, the thinking residual's\n"
      "# released learning rates (the gate barely moves: README). training.hybrid=false gives plain GRPO; the table\n"
      "# used training.seed=1, 2 and 42. Gradient checkpointing off: 10% faster for 4 GB more memory.")
write("train_hrpo_smollm2_projection", "hrpo", HRPO_SMOLLM2 + [
    "model.thinking_source=projection", "training.lambda_lr=1e-2", "training.gate_lr=1e-3", "training.projection_lr=1e-3"],
      "HRPO as its design describes it, on SmolLM2-135M-Instruct: the thinking vector a learnable projection of the last\n"
      "# hidden state (init std 0.001, unit norm, its own optimizer group) and the residual's rates at 10x the released\n"
      "# ones, the setting where the gate's hidden share rose once rewards appeared (docs/results/hrpo.md, 'The thinking\n"
      "# projection'). The seeds table used training.seed=42, 1 and 2; 60 steps, about 26 s each on 2 CPU cores.")
write("pretrain_minimind", "memory", MINIMIND,
      "MiniMind experiment 1.4.x: language-model pretraining on raw text ({\"text\": ...} lines) with the token memory,\n"
      "# EMA updates of the bank every 5 steps (decay 0.9) and the seed's balance loss (0.1, on hard counts).\n"
      "# Data: memcli gen-data default --trex builtin -n 4013 --out data/pretrain (the shipped T-REx slice: its facts are\n"
      "# in the bank, the held-out facts' sentences are the validation texts). memcli compare pretrain runs the comparison.")
print("written")
