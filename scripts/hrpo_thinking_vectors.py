"""How much a probs-source thinking vector adds to the token it is mixed with: over the reasoning tokens of hybrid
rollouts of the pretrained recipe (untrained thinking residual), the cosine of each thinking vector
``(p @ W) / ||p||`` with the sampled token's embedding, and the ratio of their norms (README "HRPO latent
reasoning", why the gate stays shut).

    python scripts/hrpo_thinking_vectors.py [BACKBONE] [PROBLEMS_JSONL] [N]
"""

import json
import sys

import torch
import torch.nn.functional as F

from memcli.config import backbone_spec, load_config
from memcli.hrpo.data import encode_prompts, load_problems
from memcli.hrpo.rollout import hybrid_generate
from memcli.training.hrpo import build

backbone = sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m"
problems = sys.argv[2] if len(sys.argv) > 2 else "data/arithmetic/train.jsonl"
n = int(sys.argv[3]) if len(sys.argv) > 3 else 16
cfg = load_config("hrpo", overrides=[f"model.backbone={backbone}", "model.finetuning_method=frozen"])
model, tok, _ = build(cfg, backbone_spec(cfg), "frozen")
t = cfg.training
ids, mask = encode_prompts(tok, [p["question"] for p in load_problems(problems)[:n]], cfg.dataset.max_prompt_length,
                           cfg.dataset.instruction)
W = model.backbone.get_input_embeddings().weight
rows = []
for label, greedy, think_t in (("sampled (training)", False, t.temperature), ("greedy, trained temperature", True,
                                t.temperature), ("greedy, temperature 1", True, 1.0)):
    ro = hybrid_generate(model.backbone, model.residual, tok, ids, mask, t.max_completion_length,
                         temperature=1.0 if greedy else t.temperature, greedy=greedy, thinking_temperature=think_t,
                         generator=torch.Generator().manual_seed(t.seed))
    h, e = ro.thinking[ro.mix_mask], W[ro.completion_ids[ro.mix_mask]].float()
    cos = F.cosine_similarity(h, e, -1)
    rows.append({"rollout": label, "thinking_temperature": think_t, "mixed_tokens": int(ro.mix_mask.sum()),
                 "cosine_mean": round(float(cos.mean()), 3), "cosine_median": round(float(cos.median()), 3),
                 "share_cosine_above_0.99": round(float((cos > 0.99).float().mean()), 3),
                 "norm_ratio": round(float((h.norm(dim=-1) / e.norm(dim=-1)).mean()), 3)})
print(json.dumps({"backbone": backbone, "problems": problems, "n": n, "rows": rows}, indent=1))
