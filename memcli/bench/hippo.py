"""HIPPO per-turn cost: a chat turn with the memory state vs one that re-reads the full history.

Each turn answers with a fixed number of new tokens (KV cache in both paths). HIPPO's prompt is the
current message alone plus one write of the turn into the state, so its cost should not grow with
the turn number; the full-history path prefills every earlier turn and grows linearly.
"""

from __future__ import annotations

import statistics

import torch

from memcli.bench.timer import measure


def _dialog(turns: int) -> list[str]:
    from memcli.data.dialog import generate_dialogs

    rows = generate_dialogs(1 + turns // 6, seed=0, turns=6)
    return [t["content"] for r in rows for t in r["dialog_history"]][:turns]


@torch.no_grad()
def bench_turns(turns: int = 50, new_tokens: int = 16, marks=(1, 10, 50), repeats: int = 3,
                variant: str = "matrix") -> list[dict]:
    from memcli.backbone import load_backbone
    from memcli.hippo.data import content_ids, prompt_ids, turn_ids
    from memcli.hippo.config import HippoConfig
    from memcli.hippo.model import HippoModel

    torch.manual_seed(0)
    bb, tok = load_backbone("tiny")
    model = HippoModel(bb, HippoConfig(hippo_variant=variant, hidden_size=bb.config.hidden_size)).eval()
    texts = _dialog(turns)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    marks = [m for m in marks if m <= turns]

    def hippo_run() -> list[float]:
        state = {"S": model.init_state(1)}
        out = []
        for text in texts:
            def turn(text=text):  # answer from the state, then write the message into it (as memcli chat -t hippo)
                ids = torch.tensor([prompt_ids(tok, text)])
                model.generate(ids, torch.ones_like(ids), state=state["S"], **kw)
                t = torch.tensor([turn_ids(tok, "user", text, 64)])
                w = torch.tensor([content_ids(tok, text)])
                state["S"] = model.write_turns(state["S"], t, torch.ones_like(t), None, w, torch.ones_like(w))

            out.append(measure(turn, repeats=1, warmup=0).median_s)
        return out

    def full_run() -> list[float]:
        history: list[dict] = []
        out = []
        for text in texts:
            def turn(text=text):
                history.append({"role": "user", "content": text})
                enc = tok.apply_chat_template(history, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)
                g = bb.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
                history.append({"role": "assistant", "content": tok.decode(g[0, enc["input_ids"].shape[1]:],
                                                                           skip_special_tokens=True)})

            out.append(measure(turn, repeats=1, warmup=0).median_s)
        return out

    hippo_run()  # warm-up
    runs = {"hippo": [hippo_run() for _ in range(repeats)], "full": [full_run() for _ in range(repeats)]}

    def at(path: str, m: int) -> tuple[float, float]:
        xs = [r[m - 1] for r in runs[path]]
        return statistics.median(xs), max(xs) - min(xs)

    rows = []
    h1 = at("hippo", marks[0])[0]
    for m in marks:
        h, hs = at("hippo", m)
        f, fs = at("full", m)
        rows.append({"bench": f"chat turn {m}", "path": f"memcli hippo ({variant} state)", "median_ms": h * 1e3,
                     "spread_ms": hs * 1e3, "ratio": 1.0, "note": f"turn {m} / turn {marks[0]}: {h / h1:.2f}x"})
        rows.append({"bench": f"chat turn {m}", "path": "full history in the prompt", "median_ms": f * 1e3,
                     "spread_ms": fs * 1e3, "ratio": f / h,
                     "note": f"turn {m} / turn {marks[0]}: {f / at('full', marks[0])[0]:.2f}x"})
    return rows


def run_hippo(quick: bool = False) -> list[dict]:
    if quick:
        return bench_turns(turns=4, new_tokens=4, marks=(1, 4), repeats=1)
    return bench_turns()
