"""HRPO rollout throughput: the hybrid decoding loop vs HF ``generate`` (plain sampling, same model and
batch) and vs a seed-style loop that re-decodes the whole completion each step to look for ``####``."""

from __future__ import annotations

import torch

from memcli.bench.timer import measure


@torch.no_grad()
def bench_rollout(prompts: int = 2, group: int = 4, new_tokens: int = 512, repeats: int = 3) -> list[dict]:
    from memcli.backbone import load_backbone
    from memcli.hrpo.data import encode_prompts, make_arithmetic
    from memcli.hrpo.model import HrpoModel
    from memcli.hrpo.config import HrpoConfig
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
        t = measure(fn, repeats, warmup=1)
        res[name] = (t.median_s, t.spread_s, t.result / t.median_s)
    ref = res["HF generate (plain sampling)"]
    for name, (med, sp, tps) in res.items():
        rows.append({"bench": f"HRPO rollout {B} seqs x {new_tokens} tokens", "path": name, "median_ms": med * 1e3,
                     "spread_ms": sp * 1e3, "ratio": med / ref[0],
                     "note": f"{tps:.0f} tok/s = {tps / ref[2]:.2f}x HF generate's"})
    return rows


def bench_marker_check(lengths=(128, 512, 2048), rows: int = 8) -> list[dict]:
    """The marker check alone over a whole completion: token-id state machine vs re-decoding the text
    each step (the seed's way: O(T^2) characters decoded per sequence)."""
    from memcli.backbone import load_backbone
    from memcli.hrpo.rollout import marker_table

    _, tok = load_backbone("tiny")
    table = marker_table(tok)
    g = torch.Generator().manual_seed(0)
    out = []
    for L in lengths:
        ids = torch.randint(10, len(tok), (rows, L), generator=g)

        def by_ids():
            st = torch.zeros(rows, dtype=torch.long)
            for t in range(L):
                st = table[ids[:, t], st]
            return st

        def by_text():
            lst = ids.tolist()
            for t in range(1, L + 1):
                _ = ["####" in tok.decode(r[:t]) for r in lst]

        a = measure(by_ids, repeats=1, warmup=0).median_s
        b = measure(by_text, repeats=1, warmup=0).median_s
        out.append({"bench": f"marker check, {rows} seqs x {L} tokens", "path": "memcli token-id state machine",
                    "median_ms": a * 1e3, "spread_ms": 0.0, "ratio": 1.0, "note": "O(T) per sequence"})
        out.append({"bench": f"marker check, {rows} seqs x {L} tokens", "path": "seed-style re-decode each step",
                    "median_ms": b * 1e3, "spread_ms": 0.0, "ratio": b / a, "note": "O(T^2) characters decoded"})
    return out


def run_hrpo(quick: bool = False) -> list[dict]:
    if quick:
        return bench_rollout(prompts=1, group=2, new_tokens=8, repeats=1) + bench_marker_check((16,), 2)
    return bench_rollout() + bench_marker_check()
