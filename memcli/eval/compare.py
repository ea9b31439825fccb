"""Side-by-side comparisons: checkpoints on one evaluation, training runs' curves, HIPPO variants.

Every number in a comparison comes from the same evaluation functions the training commands use
(``memcli.eval.explicit``, ``memcli.eval.hippo``, ``memcli.hrpo.train.evaluate``), never recomputed.
"""

from __future__ import annotations

import json
from pathlib import Path

from memcli.errors import MemcliError

KINDS = {"explicit-memory": "explicit memory", "hippo": "HIPPO", "hrpo": "HRPO"}
LOWER_IS_BETTER = ("loss", "kl", "ms", "bytes", "params", "MB")


def lower_is_better(metric: str) -> bool:
    return any(k in metric for k in LOWER_IS_BETTER)


def checkpoint_kind(path: str | Path) -> str:
    p = Path(path)
    for c in (p / "checkpoint.json", p / "model" / "checkpoint.json"):
        if c.is_file():
            try:
                kind = json.loads(c.read_text()).get("kind")
            except (OSError, ValueError) as e:
                raise MemcliError(f"{c}: unreadable checkpoint.json ({e})") from None
            if kind not in KINDS:
                raise MemcliError(f"{c}: unknown checkpoint kind '{kind}', expected one of {', '.join(KINDS)}")
            return kind
    if not p.exists():
        raise MemcliError(f"{p}: not found")
    raise MemcliError(f"{p}: no checkpoint.json (expected a run directory written by 'memcli train')")


def _load(kind: str, path: Path):
    if kind == "explicit-memory":
        from memcli.explicit.io import load_checkpoint

        model, tok, bank, _ = load_checkpoint(path)
        return model, tok, bank
    if kind == "hippo":
        from memcli.hippo.io import load_hippo

        model, tok, _ = load_hippo(path)
        return model, tok, None
    from memcli.hrpo.io import load_hrpo

    model, tok, _ = load_hrpo(path)
    tok.padding_side = "left"
    return model, tok, None


def _evaluate(kind: str, model, tok, bank, data: Path, num: int | None, max_new_tokens: int) -> dict:
    if kind == "explicit-memory":
        from memcli.eval.explicit import evaluate_checkpoint

        if not data.is_dir():
            raise MemcliError(f"--data {data}: expected a data directory (omcq_val.json, ...) for explicit-memory checkpoints")
        res = evaluate_checkpoint(model, tok, bank, data, num)
        return {k: v for k, v in res.items() if isinstance(v, (int, float))}
    if kind == "hippo":
        from memcli.eval.hippo import evaluate
        from memcli.hippo.data import load_dialogs

        if not data.is_file():
            raise MemcliError(f"--data {data}: expected a dialog JSONL file (data_val.jsonl) for HIPPO checkpoints")
        items = load_dialogs(tok, data, 64, 128)[:num]
        return dict(evaluate(model, tok, items), dialogs=len(items))
    from memcli.hrpo.data import load_problems
    from memcli.hrpo.train import evaluate

    if not data.is_file():
        raise MemcliError(f"--data {data}: expected a GSM8K-format JSONL file for HRPO checkpoints")
    probs = load_problems(data)[:num]
    return evaluate(model, tok, probs, max_new_tokens, 256)


def compare_checkpoints(paths: list[Path], data: Path, num: int | None = None, max_new_tokens: int = 64) -> dict:
    from memcli.data.bank import tokenizer_fingerprint

    if len(paths) < 2:
        raise MemcliError("compare checkpoints: give at least two checkpoints")
    kinds = [checkpoint_kind(p) for p in paths]
    if len(set(kinds)) > 1:
        pairs = ", ".join(f"{p} is {k}" for p, k in zip(paths, kinds))
        raise MemcliError(f"compare checkpoints: checkpoints of different kinds ({pairs}); compare like with like")
    kind = kinds[0]
    results, fp0 = [], None
    for p in paths:
        model, tok, bank = _load(kind, p)
        fp = tokenizer_fingerprint(tok)
        if fp0 is None:
            fp0 = fp
        elif fp != fp0:
            raise MemcliError(f"compare checkpoints: {p} uses a different tokenizer than {paths[0]}; their scores "
                              "are not comparable")
        results.append(_evaluate(kind, model, tok, bank, data, num, max_new_tokens))
        del model
    metrics = [m for m in results[0] if all(m in r for r in results)]
    return {"kind": kind, "data": str(data), "checkpoints": [str(p) for p in paths],
            "metrics": {m: [r[m] for r in results] for m in metrics}}


# --------------------------------------------------------------------------- runs

def read_run(d: str | Path) -> list[dict]:
    from memcli.records import iter_jsonl

    d = Path(d)
    if d.is_file() and d.name == "metrics.jsonl":
        f = d
    else:
        f = d / "metrics.jsonl"
    if not f.is_file():
        raise MemcliError(f"{d}: no metrics.jsonl (expected a run directory written by 'memcli train')")
    rows = []
    for lineno, row in iter_jsonl(f):
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise MemcliError(f"{f}:{lineno}: expected an object with an integer 'step'")
        rows.append(row)
    if not rows:
        raise MemcliError(f"{f}: empty file, expected one JSON object per optimizer step")
    return rows


def _num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def compare_runs(dirs: list[Path], metrics: list[str] | None = None) -> dict:
    if len(dirs) < 1:
        raise MemcliError("compare runs: give at least one run directory")
    runs = {str(d): read_run(d) for d in dirs}
    numeric = lambda rows: {k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and k != "step"}  # noqa: E731
    common = set.intersection(*(numeric(r) for r in runs.values()))
    if metrics:
        bad = [m for m in metrics if m not in common]
        if bad:
            raise MemcliError(f"--metric '{bad[0]}': not logged by every run; available: {', '.join(sorted(common))}")
        chosen = metrics
    else:
        chosen = [m for m in ("loss", "reward_mean") if m in common] + sorted(m for m in common if m.startswith("eval/"))
    summary = {}
    for m in chosen:
        finals, bests = [], []
        for rows in runs.values():
            vals = [r[m] for r in rows if _num(r.get(m))]  # steps dropped for NaN log a null loss
            finals.append(vals[-1])
            bests.append(min(vals) if lower_is_better(m) else max(vals))
        summary[f"{m} (last)"] = finals
        summary[f"{m} ({'min' if lower_is_better(m) else 'max'})"] = bests
    summary["steps"] = [rows[-1]["step"] for rows in runs.values()]
    curves = {m: {name: [(r["step"], r[m]) for r in rows if _num(r.get(m))] for name, rows in runs.items()} for m in chosen}
    return {"runs": list(runs), "metrics": summary, "curves": curves}


def plot_curves(curves: dict, out: Path, title: str, xlabel: str = "optimizer step") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, (m, by_run) in zip(axes[0], curves.items()):
        for name, pts in by_run.items():
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=Path(name).name or name, linewidth=1.4)
        ax.set_title(m)
        ax.set_xlabel(xlabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    _save_fig(fig, out)


COUNTS = ("questions", "labelled_items", "eval_n", "dialogs", "count")


def plot_bars(metrics: dict, labels: list[str], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m for m, vs in metrics.items() if m not in COUNTS and all(isinstance(v, (int, float)) for v in vs)]
    n = max(1, len(names))
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, m in zip(axes.flat, names):
        vals = metrics[m]
        bars = ax.bar(range(len(vals)), vals, color=[f"C{i}" for i in range(len(vals))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(vals)), [Path(x).name or x for x in labels], rotation=20, fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save_fig(fig, out)


def _save_fig(fig, out: Path) -> None:
    import io

    import matplotlib.pyplot as plt

    from memcli.records import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, dpi=120, format=Path(out).suffix.lstrip(".") or "png")
    plt.close(fig)
    atomic_write_bytes(out, buf.getvalue())


# --------------------------------------------------------------------------- HIPPO variants

def compare_hippo(checkpoints: list[Path] | None, data: Path | None, num: int | None, turns: int = 50,
                  repeats: int = 3, new_tokens: int = 16) -> dict:
    """matrix vs selective (+ no memory, full history): parameters, bytes, latency per turn, exact match."""
    from memcli.backbone import load_backbone
    from memcli.bench.hippo import bench_turns
    from memcli.hippo.encoder import HippoConfig
    from memcli.hippo.model import HippoModel

    if checkpoints and data is None:  # before minutes of timing
        raise MemcliError("compare hippo: --checkpoint needs --data (a dialog JSONL file)")
    for ck in checkpoints or []:
        if checkpoint_kind(ck) != "hippo":
            raise MemcliError(f"compare hippo: {ck} is not a HIPPO checkpoint")
    bb, _ = load_backbone("tiny")
    # turns 1, 10, 50 as the table asks, more points for the latency plot, and always the last turn
    marks = tuple(sorted({m for m in (1, 5, 10, 20, 30, 40, 50) if m <= turns} | {turns}))
    rows: dict[str, dict] = {}
    for variant in ("matrix", "selective"):
        mdl = HippoModel(bb, HippoConfig(variant=variant, hidden_size=bb.config.hidden_size))
        params = sum(p.numel() for p in mdl.memory_parameters())
        lat = bench_turns(turns=turns, new_tokens=new_tokens, marks=marks, repeats=repeats, variant=variant)
        r = {"params": params, "fp32 MB": params * 4 / 2**20, "fp16 MB": params * 2 / 2**20}
        for row in lat:
            key = f"{row['bench'].replace('chat ', '')} ms"
            if row["path"].startswith("memcli hippo"):
                r[key] = row["median_ms"]
            elif variant == "matrix":  # the full-history path does not depend on the variant
                rows.setdefault("full history", {"params": 0, "fp32 MB": 0.0, "fp16 MB": 0.0})[key] = row["median_ms"]
        rows[variant] = r
    rows["no memory"] = {"params": 0, "fp32 MB": 0.0, "fp16 MB": 0.0}
    if checkpoints:
        from memcli.eval.hippo import exact_match
        from memcli.hippo.data import load_dialogs
        from memcli.hippo.io import load_hippo

        for i, ck in enumerate(checkpoints):
            model, tok, _ = load_hippo(ck)
            items = load_dialogs(tok, data, 64, 128)[:num]
            v = model.cfg.variant
            label = v if v not in rows or "exact match" not in rows[v] else f"{v} ({Path(ck).name})"
            rows.setdefault(label, dict(rows.get(v, {})))["exact match"] = exact_match(model, tok, items, True)
            if i == 0:  # baselines on the first checkpoint's backbone
                rows["no memory"]["exact match"] = exact_match(model, tok, items, False)
                rows["full history"]["exact match"] = exact_match(model, tok, items, False, full_history=True)
    order = [k for k in rows if k not in ("no memory", "full history")] + ["no memory", "full history"]
    return {"setups": order, "rows": {k: rows[k] for k in order}, "backbone": "tiny"}
