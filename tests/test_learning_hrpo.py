"""HRPO learning check (about 30 s on 2 cores): GRPO with hybrid decoding raises a reward that a random
tiny policy reaches ~15% of the time (the completion starts with a capital letter) to above 0.8, and
with the advantage sign flipped (rewards negated: group normalisation is odd in r) it does not rise.
Fixed seeds, full fine-tuning of the tiny backbone, hybrid mixing on."""

import json

from memcli.config import load_config
from memcli.hrpo.data import write_arithmetic
from memcli.hrpo.rewards import capital_reward
from memcli.training.hrpo import train_hrpo

STEPS = 20


def _run(tmp_path, name, reward_fn):
    train, _ = write_arithmetic(tmp_path / "data", num_train=200, num_test=0)
    cfg = load_config("hrpo", None, [f"dataset.train_path={train}", f"dataset.eval_path={tmp_path / 'none.jsonl'}",
                             f"logging.out_dir={tmp_path}", f"logging.run_name={name}", f"training.max_steps={STEPS}",
                             "training.max_completion_length=2", "training.group_size=8", "training.temperature=1.0",
                             "training.backbone_lr=1e-2", "training.beta=0", "logging.tensorboard=false",
                             "training.log_completions_interval=0"])
    train_hrpo(cfg, reward_fn=reward_fn)
    rows = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    return [r["reward_mean"] for r in rows]


def test_hrpo_reward_rises_and_flipped_sign_does_not(tmp_path):
    up = _run(tmp_path, "up", capital_reward)
    flipped = [-r for r in _run(tmp_path, "flipped", lambda c, a, p: [-x for x in capital_reward(c, a, p)])]
    first, last = sum(up[:4]) / 4, sum(up[-4:]) / 4
    print(f"\nHRPO learning check: reward {first:.3f} (first 4 steps) -> {last:.3f} (last 4 of {STEPS}); "
          f"flipped sign: {sum(flipped[:4]) / 4:.3f} -> {sum(flipped[-4:]) / 4:.3f}")
    assert first < 0.3
    assert last > 0.8
    assert sum(flipped[-4:]) / 4 < 0.3
