"""How much a thinking vector adds to the token it is mixed with: over the reasoning tokens of hybrid rollouts, the
cosine of each thinking vector with the sampled token's embedding, and the ratio of their norms (README "HRPO
latent reasoning": why the probs source leaves the gate nothing to open for, and what the projection gives before
and after training).

- ``probs`` source: the thinking vector is ``(p @ W) / ||p||``;
- ``projection`` source: ``thinking_projection`` of the last hidden state, normalised (``model.projection_norm``).

    python experiments/hrpo_thinking_vectors.py                                  # probs, untrained, SmolLM2 (2 min)
    python experiments/hrpo_thinking_vectors.py --source projection              # projection at its initialisation
    python experiments/hrpo_thinking_vectors.py --run out/hrpo-proj-s1           # a trained run's residual
"""

import argparse
import json

import torch
import torch.nn.functional as F

from memcli.config import backbone_spec, load_config
from memcli.hrpo.data import encode_prompts, load_problems
from memcli.hrpo.rollout import hybrid_generate
from memcli.training.hrpo import build

ap = argparse.ArgumentParser()
ap.add_argument("--backbone", default="smollm2-135m")
ap.add_argument("--problems", default="data/arithmetic/train.jsonl")
ap.add_argument("--n", type=int, default=16)
ap.add_argument("--source", default="probs", choices=("probs", "projection"))
ap.add_argument("--run", default=None, help="a trained run directory: its residual and backbone (adapter included)")
args = ap.parse_args()
if args.run:
    from memcli.hrpo.io import load_hrpo

    model, tok, _ = load_hrpo(args.run)
    tok.padding_side = "left"
    cfg = load_config("hrpo", args.run + "/config.yaml")
else:
    cfg = load_config("hrpo", overrides=[f"model.backbone={args.backbone}", "model.finetuning_method=frozen",
                                         f"model.thinking_source={args.source}"])
    model, tok, _ = build(cfg, backbone_spec(cfg), "frozen")
t = cfg.training
ids, mask = encode_prompts(tok, [p["question"] for p in load_problems(args.problems)[: args.n]],
                           cfg.dataset.max_prompt_length, cfg.dataset.instruction)
W = model.backbone.get_input_embeddings().weight
res = model.residual
rows = []
for label, greedy, think_t in (("sampled (training)", False, t.temperature),
                               ("greedy, trained temperature", True, t.temperature)):
    with torch.no_grad():
        ro = hybrid_generate(model.backbone, res, tok, ids, mask, t.max_completion_length,
                             temperature=1.0 if greedy else t.temperature, greedy=greedy, thinking_temperature=think_t,
                             generator=torch.Generator().manual_seed(t.seed))
        h = ro.thinking[ro.mix_mask].float()
        if res.thinking_projection is not None:
            h = res.project(h)
    e = W[ro.completion_ids[ro.mix_mask]].float().detach()
    cos = F.cosine_similarity(h, e, -1)
    rows.append({"rollout": label, "mixed_tokens": int(ro.mix_mask.sum()),
                 "cosine_mean": round(float(cos.mean()), 3), "cosine_median": round(float(cos.median()), 3),
                 "share_cosine_above_0.99": round(float((cos > 0.99).float().mean()), 3),
                 "norm_ratio": round(float((h.norm(dim=-1) / e.norm(dim=-1)).mean()), 3),
                 "gate_a_mean": round(float(ro.a_mean), 6) if ro.a_mean == ro.a_mean else None})
print(json.dumps({"backbone": cfg.model.backbone, "run": args.run, "source": res.cfg.thinking_source,
                  "projection_norm": res.cfg.projection_norm, "problems": args.problems, "n": args.n, "rows": rows},
                 indent=1))
