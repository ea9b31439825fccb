"""Hybrid vs plain GRPO over seeds: one row per run and the mean +- standard error per arm, from the run
directories of `memcli train hrpo` (checkpoint.json's final evaluation, metrics.jsonl's per-step logs); with
``--evaluate FILE`` each run's greedy accuracy is measured again on FILE by this release's decoding (a hybrid run's
thinking vectors at its rollouts' temperature) beside the one its training recorded.

    python tools/hrpo_seeds_table.py out/hrpo-s1-hybrid out/hrpo-s1-plain ... [--evaluate data/arithmetic/test.jsonl]
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
    out = {"run": run.name, "seed": cfg["training"]["seed"], "hybrid": bool(info.get("hybrid", True)),
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--evaluate", default=None, help="GSM8K-format JSONL to measure each run's greedy accuracy again")
    args = ap.parse_args()
    rows = [row(r, args.evaluate) for r in args.runs]
    for r in rows:
        print(json.dumps(r))
    for key in ["accuracy_recorded", "reward_last_fifth"] + (["accuracy"] if args.evaluate else []):
        arms = {h: [r[key] for r in rows if r["hybrid"] is h] for h in (True, False)}
        print(f"{key}: hybrid {mean_se(arms[True])} (n={len(arms[True])}), plain {mean_se(arms[False])} "
              f"(n={len(arms[False])})")
        by_seed = {(r["seed"], r["hybrid"]): r[key] for r in rows}
        diffs = [by_seed[(s, True)] - by_seed[(s, False)] for s in sorted({r["seed"] for r in rows})
                 if (s, True) in by_seed and (s, False) in by_seed]
        if diffs:
            print(f"  hybrid - plain, paired by seed: {mean_se(diffs)} (n={len(diffs)})")


if __name__ == "__main__":
    main()
