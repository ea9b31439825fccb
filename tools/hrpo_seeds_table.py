"""Hybrid vs plain GRPO over seeds: one row per run and the mean +- standard error per arm (plain, or the hybrid
run's thinking source: probs | projection), from the run directories of `memcli train hrpo` (checkpoint.json's final
evaluation, metrics.jsonl's per-step logs), and every pair of arms' difference paired by seed; with ``--evaluate
FILE`` each run's greedy accuracy is measured again on FILE by this release's decoding (a hybrid run's thinking
vectors at its rollouts' temperature) beside the one its training recorded. ``--recorded ARM:SEED=ACC,...`` adds an
arm whose runs are no longer on disk by the accuracies a results page recorded for them (paired on accuracy only).

    python tools/hrpo_seeds_table.py out/hrpo-s1-hybrid out/hrpo-s1-plain ... [--evaluate data/arithmetic/test.jsonl]
    python tools/hrpo_seeds_table.py out/hrpo-proj-s42 out/hrpo-proj-s1 out/hrpo-proj-s2 \
        --recorded plain:42=0.61,1=0.48,2=0.59 --recorded probs:42=0.66,1=0.44,2=0.64
"""

import argparse
import json
import math
import statistics
from pathlib import Path

from memcli.rundir import read_config
from memcli.training.hrpo import fifth_mean


def row(run: Path, data: str | None) -> dict:
    info = json.loads((run / "checkpoint.json").read_text())
    hist = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if x.strip()]
    cfg = read_config(run)
    rewards = [h["reward_mean"] for h in hist]
    hybrid = bool(info.get("hybrid", True))
    arm = cfg["model"].get("thinking_source", "probs") if hybrid else "plain"
    out = {"run": run.name, "seed": cfg["training"]["seed"], "arm": arm, "hybrid": hybrid,
           "steps": len(hist), "accuracy_recorded": info["eval"]["accuracy"],
           "reward_first_fifth": fifth_mean(rewards, last=False), "reward_last_fifth": fifth_mean(rewards, last=True)}
    if "hidden_share" in hist[0]:
        out.update(hidden_share_first=hist[0]["hidden_share"], hidden_share_last=hist[-1]["hidden_share"],
                   gate_a_first=hist[0]["gate_a"], gate_a_last=hist[-1]["gate_a"])
    if data:
        from memcli.eval.hrpo import evaluate
        from memcli.hrpo.data import load_problems
        from memcli.hrpo.io import load_hrpo

        model, tok, _ = load_hrpo(run)
        out["accuracy"] = evaluate(model, tok, load_problems(data), cfg["training"]["max_completion_length"],
                                   cfg["dataset"]["max_prompt_length"])["accuracy"]
    return out


def mean_se(xs: list) -> str:
    if not xs:
        return "-"
    se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return f"{statistics.mean(xs):.3f} ± {se:.3f}"


def recorded(spec: str) -> list[dict]:
    """``ARM:SEED=ACC,...`` as rows of that arm with only an accuracy."""
    arm, _, pairs = spec.partition(":")
    try:
        return [{"run": f"{arm} (recorded)", "seed": int(k), "arm": arm, "accuracy_recorded": float(v)}
                for k, v in (p.split("=") for p in pairs.split(","))]
    except ValueError:
        raise SystemExit(f"--recorded '{spec}': expected ARM:SEED=ACCURACY,..., e.g. plain:42=0.61,1=0.48") from None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--evaluate", default=None, help="GSM8K-format JSONL to measure each run's greedy accuracy again")
    ap.add_argument("--recorded", action="append", default=[], help="ARM:SEED=ACC,... an arm by recorded accuracies")
    args = ap.parse_args()
    rows = [row(r, args.evaluate) for r in args.runs] + [x for spec in args.recorded for x in recorded(spec)]
    for r in rows:
        print(json.dumps(r))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for key in ["accuracy_recorded", "reward_last_fifth"] + (["accuracy"] if args.evaluate else []):
        by_arm = {a: [r[key] for r in rows if r["arm"] == a and key in r] for a in arms}
        print(f"{key}: " + ", ".join(f"{a} {mean_se(v)} (n={len(v)})" for a, v in by_arm.items() if v))
        by_seed = {(r["seed"], r["arm"]): r[key] for r in rows if key in r}
        for i, a in enumerate(arms):
            for b in arms[i + 1:]:
                diffs = [by_seed[(s, a)] - by_seed[(s, b)] for s in sorted({r["seed"] for r in rows})
                         if (s, a) in by_seed and (s, b) in by_seed]
                if diffs:
                    print(f"  {a} - {b}, paired by seed: {mean_se(diffs)} (n={len(diffs)})")


if __name__ == "__main__":
    main()
