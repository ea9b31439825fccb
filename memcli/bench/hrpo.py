"""HRPO rollout throughput: the hybrid decoding loop vs HF ``generate`` (plain sampling, same model and
batch) and vs a seed-style loop that re-decodes the whole completion each step to look for ``####``."""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def bench_rollout(prompts: int = 2, group: int = 4, new_tokens: int = 512, repeats: int = 3) -> list[dict]:
    from memcli.backbone import load_backbone
    from memcli.hrpo.data import encode_prompts, make_arithmetic
    from memcli.hrpo.model import HrpoModel
    from memcli.hrpo.residual import HrpoConfig
    from memcli.hrpo.rollout import hybrid_generate, text_marker_loop

    torch.manual_seed(0)
    bb, tok = load_backbone("tiny")
    bb.eval()
    tok.padding_side = "left"
    model = HrpoModel(bb, HrpoConfig(hidden_size=bb.config.hidden_size)).eval()
    qs = [p["question"] for p in make_arithmetic(prompts, seed=1) for _ in range(group)]
    ids, mask = encode_prompts(tok, qs, 256)
    B = ids.shape[0]

    def hybrid():
        ro = hybrid_generate(bb, model.residual, tok, ids, mask, new_tokens, temperature=0.5)
        return int(ro.completion_mask.sum())

    def hf():
        out = bb.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.5, top_k=0, top_p=1.0,
                          max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
        return (out.shape[1] - ids.shape[1]) * B

    def redecode():
        return int(text_marker_loop(bb, tok, ids, mask, new_tokens, temperature=0.5).numel())

    rows = []
    res = {}
    for name, fn in (("HF generate (plain sampling)", hf), ("memcli hybrid rollout", hybrid),
                     ("seed-style: re-decode text each step", redecode)):
        fn()  # warm-up
        ts, toks = [], 0
        for _ in range(repeats):
            t = time.perf_counter()
            toks = fn()
            ts.append(time.perf_counter() - t)
        med = statistics.median(ts)
        res[name] = (med, max(ts) - min(ts), toks / med)
    ref = res["HF generate (plain sampling)"]
    for name, (med, sp, tps) in res.items():
        rows.append({"bench": f"HRPO rollout {B} seqs x {new_tokens} tokens", "path": name, "median_ms": med * 1e3,
                     "spread_ms": sp * 1e3, "ratio": med / ref[0],
                     "note": f"{tps:.0f} tok/s = {tps / ref[2]:.2f}x HF generate's"})
    return rows


def run_hrpo(quick: bool = False) -> list[dict]:
    if quick:
        return bench_rollout(prompts=1, group=2, new_tokens=8, repeats=1)
    return bench_rollout()
