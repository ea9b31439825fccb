"""Side-by-side comparisons: checkpoints on one evaluation, training runs' curves, HIPPO variants.

Every number in a comparison comes from the same evaluation functions the training commands use
(``memcli.eval.explicit``, ``memcli.eval.hippo``, ``memcli.eval.hrpo``), never recomputed.
"""

from __future__ import annotations

from pathlib import Path

from memcli import kinds
from memcli.errors import MemcliError

LOWER_IS_BETTER = ("loss", "ppl", "perplexity", "kl", "ms", "bytes", "params", "MB", "_s", "rss")


def lower_is_better(metric: str) -> bool:
    return any(k in metric for k in LOWER_IS_BETTER) and "recall" not in metric


def compare_checkpoints(paths: list[Path], data: Path, num: int | None = None, max_new_tokens: int = 64) -> dict:
    from memcli.backbone import tokenizer_fingerprint
    from memcli.rundir import kind_of
    from memcli.runs import load_run

    if len(paths) < 2:
        raise MemcliError("compare checkpoints: give at least two checkpoints")
    found = [kind_of(p) for p in paths]
    if len(set(found)) > 1:
        pairs = ", ".join(f"{p} is {k}" for p, k in zip(paths, found))
        raise MemcliError(f"compare checkpoints: checkpoints of different kinds ({pairs}); compare like with like")
    kind = found[0]
    results, fp0 = [], None
    for p in paths:
        run = load_run(p)
        fp = tokenizer_fingerprint(run.tok)
        if fp0 is None:
            fp0 = fp
        elif fp != fp0:
            raise MemcliError(f"compare checkpoints: {p} uses a different tokenizer than {paths[0]}; their scores "
                              "are not comparable")
        results.append(kinds.resolve_ref(kinds.get(run.kind).evaluate)(run, data, num, max_new_tokens))
        del run
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


# --------------------------------------------------------------------------- HIPPO variants

def compare_hippo(checkpoints: list[Path] | None, data: Path | None, num: int | None, turns: int = 50,
                  repeats: int = 3, new_tokens: int = 16) -> dict:
    """matrix vs selective (+ no memory, full history): parameters, bytes, latency per turn, exact match."""
    from memcli.backbone import load_backbone
    from memcli.bench.hippo import bench_turns
    from memcli.hippo.config import HippoConfig
    from memcli.hippo.model import HippoModel

    if checkpoints and data is None:  # before minutes of timing
        raise MemcliError("compare hippo: --checkpoint needs --data (a dialog JSONL file)")
    from memcli.rundir import kind_of

    for ck in checkpoints or []:
        if kind_of(ck) != kinds.HIPPO:
            raise MemcliError(f"compare hippo: {ck} is not a HIPPO run")
    bb, _ = load_backbone("tiny")
    # turns 1, 10, 50 as the table asks, more points for the latency plot, and always the last turn
    marks = tuple(sorted({m for m in (1, 5, 10, 20, 30, 40, 50) if m <= turns} | {turns}))
    rows: dict[str, dict] = {}
    for variant in ("matrix", "selective"):
        mdl = HippoModel(bb, HippoConfig(hippo_variant=variant, hidden_size=bb.config.hidden_size))
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
        from memcli.runs import load_run

        for i, ck in enumerate(checkpoints):
            run = load_run(ck)
            model, tok = run.model, run.tok
            ds = run.config.get("dataset", {})  # the lengths the run was trained with
            items = load_dialogs(tok, data, ds.get("max_turn_length", 64), ds.get("max_prompt_length", 64))[:num]
            v = model.cfg.hippo_variant
            label = v if v not in rows or "exact match" not in rows[v] else f"{v} ({Path(ck).name})"
            rows.setdefault(label, dict(rows.get(v, {})))["exact match"] = exact_match(model, tok, items, True)
            if i == 0:  # baselines on the first checkpoint's backbone
                rows["no memory"]["exact match"] = exact_match(model, tok, items, False)
                rows["full history"]["exact match"] = exact_match(model, tok, items, False, full_history=True)
    order = [k for k in rows if k not in ("no memory", "full history")] + ["no memory", "full history"]
    return {"setups": order, "rows": {k: rows[k] for k in order}, "backbone": "tiny"}


# --------------------------------------------------------------------------- answer formats

FORMAT_COLUMNS = (("off", "no fact"), ("context", "fact in prompt"), ("context_edit", "edit in prompt followed"),
                  ("on", "memory on"), ("edit", "edit in memory followed"))


def compare_formats(path: Path, data: Path, num: int | None = None) -> dict:
    """One explicit-memory run's held-out questions in every answer format: the backbone alone (no fact), with the
    fact or an edited fact written in the prompt (the ceilings of reading), and through its memory."""
    from memcli.eval.explicit import FORMATS, accuracy, questions
    from memcli.records import OMCQ, read_json_list
    from memcli.rundir import require_kind
    from memcli.runs import load_run

    require_kind(path, kinds.EXPLICIT)
    omcq_path = Path(data) / "omcq_val.json"
    if not omcq_path.is_file():
        raise MemcliError(f"{omcq_path}: not found (expected the held-out questions written by 'memcli gen-data')")
    omcq = read_json_list(omcq_path, OMCQ)[:num]
    run = load_run(path)
    rows = {}
    for fmt in FORMATS:
        qs = questions(run.tok, run.bank, omcq, fmt)
        rows[fmt] = {label: accuracy(run.model, run.tok, qs, mode, desc=f"{fmt}: {label}") for mode, label in FORMAT_COLUMNS}
        rows[fmt]["questions"] = len(qs)
    return {"run": str(path), "data": str(data), "recipe_format": run.info.get("answer_format"), "formats": rows}
