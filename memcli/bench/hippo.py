"""HIPPO per-turn cost: a chat turn with the memory state, with the state and the turn memory (``chat -t hippo
--recall 5``), and one that re-reads the full history.

Each turn answers with a fixed number of new tokens (KV cache in every path). HIPPO's prompt is the
current message alone plus one write of the turn into the state, so its cost should not grow with
the turn number; the turn memory adds five retrieved turns to the prompt, two key encodings per turn and a
BM25 pass over the stored turns per question; the full-history path prefills every earlier turn and grows
linearly (``full_up_to`` stops it earlier when later turns would not fit the backbone's window).
"""

from __future__ import annotations

import statistics

import torch

from memcli.bench.timer import measure


def _dialog(turns: int) -> list[str]:
    from memcli.data.dialog import generate_dialogs

    rows = generate_dialogs(1 + turns // 6, seed=0, turns=6)
    return [t["content"] for r in rows for t in r["dialog_history"]][:turns]


def _state_turns(model, tok, texts: list[str], kw: dict, memory=None, recall: int = 0) -> list[float]:
    """Seconds per chat turn as ``memcli chat -t hippo`` runs it: answer from the state (after the ``recall`` best
    turns of ``memory`` when given), then write the message into the state (and into ``memory``)."""
    from memcli.hippo.data import content_ids, prompt_ids, turn_ids
    from memcli.hippo.turns import excerpt_prompt

    state = {"S": model.init_state(1)}
    out = []
    for n, text in enumerate(texts):
        def turn(text=text, n=n):
            read = memory.read(text, recall) if memory is not None and len(memory) else []
            ids = torch.tensor([excerpt_prompt(tok, read, text) if read else prompt_ids(tok, text)])
            model.generate(ids, torch.ones_like(ids), state=state["S"], **kw)
            t = torch.tensor([turn_ids(tok, "user", text, 64)])
            w = torch.tensor([content_ids(tok, text)])
            state["S"] = model.write_turns(state["S"], t, torch.ones_like(t), None, w, torch.ones_like(w))
            if memory is not None:
                memory.add([{"id": f"T{n}", "speaker": "user", "text": text, "session": 0}])

        out.append(measure(turn, repeats=1, warmup=0).median_s)
    return out


def _full_history_turns(bb, tok, texts: list[str], kw: dict) -> list[float]:
    """Seconds per chat turn when every earlier message and answer is prefilled again."""
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


def _rows(runs: dict, names: dict, marks: list[int], window: int) -> list[dict]:
    """One row per path and mark: median and spread over the repeats and the ``window`` turns ending at the mark,
    as a ratio to the state's turn and to the path's first mark."""
    def at(path: str, m: int) -> tuple[float, float] | None:
        if m > len(runs[path][0]):
            return None
        xs = [t for r in runs[path] for t in r[max(0, m - window): m]]
        return statistics.median(xs), max(xs) - min(xs)

    rows = []
    for m in marks:
        h = at("hippo", m)[0]
        for path in runs:
            got = at(path, m)
            if got is None:
                continue
            first = at(path, marks[0])[0]
            rows.append({"bench": f"chat turn {m}", "path": names[path], "median_ms": got[0] * 1e3,
                         "spread_ms": got[1] * 1e3, "ratio": got[0] / h,
                         "note": f"turn {m} / turn {marks[0]}: {got[0] / first:.2f}x"})
    return rows


@torch.no_grad()
def bench_turns(turns: int = 50, new_tokens: int = 16, marks=(1, 10, 50), repeats: int = 3,
                variant: str = "matrix", recall: int = 0, full_up_to: int | None = None, window: int = 1) -> list[dict]:
    """Each path's chat-turn time at ``marks``; ``window`` > 1 pools the turns just before each mark with the
    repeats (a long chat is run once, and its neighbouring turns cost the same as the mark's)."""
    from memcli.backbone import load_backbone
    from memcli.hippo.config import HippoConfig
    from memcli.hippo.model import HippoModel

    torch.manual_seed(0)
    bb, tok = load_backbone("tiny")
    model = HippoModel(bb, HippoConfig(hippo_variant=variant, hidden_size=bb.config.hidden_size)).eval()
    texts = _dialog(turns)
    kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
              pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    marks = [m for m in marks if m <= turns]
    _state_turns(model, tok, texts[:5], kw)  # warm-up
    runs = {"hippo": [_state_turns(model, tok, texts, kw) for _ in range(repeats)]}
    if recall:
        from memcli.hippo.turns import TurnMemory
        from memcli.retrieval.encoders import make_encoder

        encoder = make_encoder("minilm")
        runs["recall"] = [_state_turns(model, tok, texts, kw, TurnMemory(encoder), recall) for _ in range(repeats)]
    runs["full"] = [_full_history_turns(bb, tok, texts[:full_up_to] if full_up_to else texts, kw)
                    for _ in range(repeats)]
    names = {"hippo": f"memcli hippo ({variant} state)", "recall": f"state + turn memory (--recall {recall})",
             "full": "full history in the prompt"}
    return _rows(runs, names, marks, window)


FULL_HISTORY_TURNS = 50  # past this the tiny model's 2,048 positions fill with the history


def run_hippo(quick: bool = False, turns: int = 50) -> list[dict]:
    """Chat turns timed at marks up to ``turns``; the full-history path stops at ``FULL_HISTORY_TURNS``."""
    if quick:
        return bench_turns(turns=4, new_tokens=4, marks=(1, 4), repeats=1, recall=2)
    marks = sorted({m for m in (1, 10, 50, 100, 300, 600) if m <= turns} | {turns})
    if turns <= 50:
        return bench_turns(turns=turns, marks=marks, recall=5)
    # a long chat runs once per path: each mark pools its last 5 turns (about 5 minutes for 600 turns on 2 cores)
    return bench_turns(turns=turns, marks=marks, recall=5, full_up_to=FULL_HISTORY_TURNS, repeats=1, window=5)
