"""Greedy accuracy of a backbone before HRPO training: the prompts, instruction and completion length of the
pretrained recipe, token inputs only (README "HRPO latent reasoning", the before-training figure).

    python scripts/hrpo_base_accuracy.py [BACKBONE] [PROBLEMS_JSONL]
"""

import json
import sys

from memcli.backbone import load_backbone
from memcli.config import load_config
from memcli.eval.hrpo import evaluate
from memcli.hrpo.data import load_problems
from memcli.hrpo.model import HrpoModel
from memcli.hrpo.residual import HrpoConfig

backbone = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
problems = sys.argv[2] if len(sys.argv) > 2 else "data/arithmetic/test.jsonl"
cfg = load_config("hrpo", overrides=[f"model.backbone={backbone}"])
bb, tok = load_backbone(backbone)
tok.padding_side = "left"
model = HrpoModel(bb, HrpoConfig(hidden_size=bb.config.hidden_size, instruction=cfg.dataset.instruction,
                                 backbone=backbone, hybrid=False))
res = evaluate(model, tok, load_problems(problems), cfg.training.max_completion_length, cfg.dataset.max_prompt_length)
print(json.dumps(dict(res, backbone=backbone, problems=problems)))
