"""HIPPO per-turn cost: a chat turn with the memory state vs one that re-reads the full history.

Each turn answers with a fixed number of new tokens (KV cache in both paths). HIPPO's prompt is the
current message alone plus one write of the turn into the state, so its cost should not grow with
the turn number; the full-history path prefills every earlier turn and grows linearly.
"""

from __future__ import annotations

import statistics
import time

import torch


def _dialog(turns: int) -> list[str]:
    from memcli.data.dialog import generate_dialogs

    rows = generate_dialogs(1 + turns // 6, seed=0, turns=6)
    return [t for r in rows for t in r["dialog_history"]][:turns]


@torch.no_grad()
def bench_turns(turns: int = 50, new_tokens: int = 16, marks=(1, 10, 50), repeats: int = 3,
                variant: str = "matrix") -> list[dict]:
    from memcli.backbone import load_backbone
    from memcli.chat import GenOptions, HippoChatSession
    from memcli.hippo.encoder import HippoConfig
    from memcli.hippo.model import HippoModel

    torch.manual_seed(0)
    bb, tok = load_backbone("tiny")
    model = HippoModel(bb, HippoConfig(variant=variant, hidden_size=bb.config.hidden_size)).eval()
    texts = _dialog(turns)
    opts = GenOptions(max_new_tokens=new_tokens)
    kw = dict(opts.generate_kwargs(tok), min_new_tokens=new_tokens)
    marks = [m for m in marks if m <= turns]

    def hippo_run() -> list[float]:
        s = HippoChatSession(model, tok, opts)
        out = []
        for text in texts:
            t = time.perf_counter()
            from memcli.hippo.data import prompt_ids

            ids = torch.tensor([prompt_ids(tok, text)])
            model.generate(ids, torch.ones_like(ids), state=s.state, **kw)
            s.remember(text)
            out.append(time.perf_counter() - t)
        return out

    def full_run() -> list[float]:
        history: list[dict] = []
        out = []
        for text in texts:
            t = time.perf_counter()
            history.append({"role": "user", "content": text})
            enc = tok.apply_chat_template(history, tokenize=True, add_generation_prompt=True, return_tensors="pt",
                                          return_dict=True)
            g = bb.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], **kw)
            history.append({"role": "assistant", "content": tok.decode(g[0, enc["input_ids"].shape[1]:],
                                                                       skip_special_tokens=True)})
            out.append(time.perf_counter() - t)
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
