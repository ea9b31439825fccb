"""Learning check for explicit memory (fixed seeds, about 6 minutes on 2 CPU cores).

On the tiny default, facts that exist only in memory (held out: never asked in training) must be
answered far better with memory on than off, and answers must follow edited entries.
"""

import pytest


@pytest.mark.slow
def test_memory_on_beats_off_and_edits_are_followed(default_data, tmp_path):
    from memcli.config import load_config
    from memcli.training.explicit import train_explicit

    cfg = load_config("memory", overrides=[f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                                           "training.eval_interval=0", "logging.tensorboard=false"])
    res = train_explicit(cfg, "memory")
    ev = res["eval"]
    print("learning check:", ev)
    assert res["steps"] == 600
    assert ev["heldout_memory_on"] >= ev["heldout_memory_off"] + 0.30, ev
    assert ev["edit_success"] >= 0.70, ev
    assert ev["recall@16_l1"] >= 0.85, ev
