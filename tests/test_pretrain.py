"""MiniMind-style pretraining on raw text with the token memory (issue 16): the objective, its validation figures,
the EMA path it turns on, and the comparison command."""

import json
import math
from pathlib import Path

import torch

EXAMPLE = Path(__file__).parent.parent / "examples" / "pretrain_minimind.yaml"


def _metrics(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def _pretrain(cli, data: Path, out: Path, name: str, *extra: str) -> Path:
    code, _, err = cli("train", "memory", "--config", EXAMPLE, f"dataset.data_dir={data}",
                       f"dataset.text_path={data / 'text_train.jsonl'}", f"dataset.text_val_path={data / 'text_val.jsonl'}",
                       "training.max_steps=4", "training.batch_size=8", "training.eval_interval=2",
                       "training.eval_num_samples=16", "training.final_eval_num_samples=32", "training.ema_update_freq=2",
                       f"logging.out_dir={out}", f"logging.run_name={name}", "logging.tensorboard=false", *extra)
    assert code == 0, err
    return out / name


def test_text_pretraining_logs_validation_loss_perplexity_and_throughput(cli, default_data, tmp_path):
    run = _pretrain(cli, default_data, tmp_path / "out", "mm")
    ev = json.loads((run / "checkpoint.json").read_text())["eval"]
    for suffix in ("", "_memory_off"):
        assert math.isfinite(ev[f"val_loss{suffix}"]) and ev[f"val_loss{suffix}"] > 0
        assert ev[f"val_ppl{suffix}"] == math.exp(ev[f"val_loss{suffix}"])
    rows = _metrics(run)
    steps = [r for r in rows if "loss" in r]
    assert len(steps) == 4 and all(r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0 for r in steps)
    assert [r["step"] for r in rows if "eval/val_loss" in r] == [2]  # the last step's evaluation is the summary's


def test_ema_rewrites_the_bank_only_when_on(cli, default_data, tmp_path):
    """The seed's EMA (every ema_update_freq steps) moves bank rows toward the states that read them; off, the
    bank stays the one built."""
    from memcli.data.bank import load_bank
    from memcli.runs import load_run

    built = load_bank(default_data / "cache").token_ids
    # decay 0: a touched row becomes the nearest tokens of the mean state that read it (0.9 needs many updates)
    on = load_run(_pretrain(cli, default_data, tmp_path / "out", "ema-on", "training.ema_decay=0.0")).bank.token_ids
    off = load_run(_pretrain(cli, default_data, tmp_path / "out", "ema-off", "training.ema_update_freq=0")).bank.token_ids
    assert torch.equal(off, built)
    changed = (on != built).any(1).sum().item()
    assert 0 < changed < built.shape[0]  # only rows read in 2 x 2 steps of 8 texts move


def test_compare_pretrain_reports_every_variant_and_curves(cli, default_data, tmp_path):
    out = tmp_path / "cmp"
    code, stdout, err = cli("compare", "pretrain", "--data", default_data, "--steps", "4", "--batch-size", "8",
                            "--out-dir", out, "--json")
    assert code == 0, err
    rows = json.loads(stdout)["rows"]
    assert set(rows) == {"memory", "memory + EMA", "dense"}
    mem, dense = rows["memory"], rows["dense"]
    assert abs(dense["params"] - mem["params"]) / mem["params"] < 0.02  # the dense model matches the parameter count
    for r in rows.values():
        assert math.isfinite(r["val_loss"]) and r["tokens_per_s"] > 0 and r["peak_rss_mb"] > 0
    code, stdout, err = cli("compare", "runs", out / "memory", out / "memory-EMA", out / "dense",
                            "--metric", "eval/val_loss", "--metric", "eval/val_ppl", "--json")
    assert code == 0, err
    res = json.loads(stdout)
    assert "eval/val_ppl (min)" in res["metrics"]  # perplexity: lower is better
    curves = res["curves"]
    # every tenth of the run (here every step), the last one in checkpoint.json
    assert {len(c) for c in curves["eval/val_loss"].values()} == {3}
