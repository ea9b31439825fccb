"""Greedy accuracy of a backbone before HRPO training: the prompts, instruction and completion length of the
pretrained recipe, token inputs only (README "HRPO latent reasoning", the before-training figure).

    python experiments/hrpo_base_accuracy.py [BACKBONE] [PROBLEMS_JSONL]
"""

import json
import sys

from memcli.config import backbone_spec, load_config
from memcli.eval.hrpo import evaluate
from memcli.hrpo.data import load_problems
from memcli.training.hrpo import build

backbone = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
problems = sys.argv[2] if len(sys.argv) > 2 else "data/arithmetic/test.jsonl"
cfg = load_config("hrpo", overrides=[f"model.backbone={backbone}", "model.finetuning_method=frozen",
                                    "training.hybrid=false"])
model, tok, _ = build(cfg, backbone_spec(cfg), "frozen")  # the recipe's own model, untrained
res = evaluate(model, tok, load_problems(problems), cfg.training.max_completion_length, cfg.dataset.max_prompt_length)
print(json.dumps(dict(res, backbone=backbone, problems=problems)))
