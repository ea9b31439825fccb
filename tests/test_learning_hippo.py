"""Learning check (slow, ~5 min on 2 cores): the tiny model recalls facts stated turns earlier only through
the HIPPO state. Validation dialogs have 6 turns, the asked fact 2-6 turns before the question, a
distractor fact of another attribute, and names from a pool of 200 (chance 0.5%); the query's
prompt never holds the history. Fixed seeds; `memcli train hippo` on the default recipe.
"""

import json

from conftest import run_cli


def test_hippo_memory_beats_no_history(tmp_path, capsys):
    from memcli.data.pipeline import gen_dialog
    from memcli.training.hippo import DEFAULT_DATA

    gen_dialog(tmp_path / "data", seed=0, **DEFAULT_DATA)
    code, out, err = run_cli(["train", "hippo", f"dataset.data_dir={tmp_path / 'data'}", f"logging.out_dir={tmp_path}",
                              "training.max_steps=1000", "training.stage1_epochs=0", "training.eval_interval=0",
                              "logging.tensorboard=false", "--json"], capsys)
    assert code == 0, err
    res = json.loads(out)  # progress lines go to stderr: stdout is the JSON summary alone
    print(f"\nHIPPO learning check: exact match {res['exact_match_memory']:.3f} with the memory state, "
          f"{res['exact_match_no_history']:.3f} without history ({res['elapsed s']} s)")
    # measured 0.805 vs 0.030 at 1000 steps (0.785 at 1300: a plateau); margins leave room for BLAS drift
    assert res["exact_match_memory"] >= 0.60
    assert res["exact_match_no_history"] <= 0.10
