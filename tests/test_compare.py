"""memcli compare checkpoints | runs | hippo: the numbers come from the evaluations, mismatches are refused."""

import json
from pathlib import Path

import pytest

from conftest import assert_one_line_error, run_cli

GSM = Path(__file__).parent / "fixtures" / "gsm8k"


@pytest.fixture(scope="module")
def hippo_pair(tmp_path_factory):
    from memcli.data.pipeline import gen_dialog

    root = tmp_path_factory.mktemp("cmp")
    gen_dialog(root / "data", seed=0, num_train=48, num_val=12, turns=3, min_distance=1)
    runs = {}
    for variant in ("matrix", "selective"):
        code, _, err = run_cli(["train", "hippo", f"dataset.data_dir={root / 'data'}", f"logging.out_dir={root}",
                                f"logging.run_name={variant}", f"model.hippo_variant={variant}", "training.batch_size=8",
                                "training.max_steps=3", "training.stage1_epochs=0", "training.eval_interval=0",
                                "logging.tensorboard=false"])
        assert code == 0, err
        runs[variant] = root / variant
    return root, runs


def test_checkpoints_table_equals_training_evaluation(hippo_pair, cli, tmp_path):
    from memcli.eval.hippo import evaluate
    from memcli.hippo.data import load_dialogs
    from memcli.hippo.io import load_hippo

    root, runs = hippo_pair
    val = root / "data" / "data_val.jsonl"
    md = tmp_path / "t.md"
    png = tmp_path / "t.png"
    code, out, err = cli("compare", "checkpoints", str(runs["matrix"]), str(runs["selective"]), "--data", str(val),
                         "--json", "--markdown", str(md), "--plot", str(png))
    assert code == 0, err
    res = json.loads(out)
    assert res["kind"] == "hippo"
    for i, name in enumerate(("matrix", "selective")):
        # the same numbers the training run recorded for its final evaluation on the same file
        info = json.loads((runs[name] / "checkpoint.json").read_text())
        for k in ("exact_match_memory", "exact_match_no_history"):
            assert res["metrics"][k][i] == info["eval"][k], (name, k)
        model, tok, _ = load_hippo(runs[name])
        direct = evaluate(model, tok, load_dialogs(tok, val, 64, 128))
        assert res["metrics"]["exact_match_memory"][i] == direct["exact_match_memory"]
    text = md.read_text()
    assert "exact_match_memory" in text and "Δ selective vs matrix" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_checkpoints_of_different_kinds_are_refused(hippo_pair, cli, tmp_path):
    _, runs = hippo_pair
    code, _, err = run_cli(["train", "hrpo", f"dataset.train_path={GSM / 'train.jsonl'}", f"logging.out_dir={tmp_path}",
                            "training.max_steps=1", "training.group_size=2", "training.batch_size=2",
                            "training.max_completion_length=3", "logging.tensorboard=false",
                            "training.log_completions_interval=0",
                            f"dataset.eval_path={tmp_path / 'none.jsonl'}"])
    assert code == 0, err
    code, _, err = cli("compare", "checkpoints", str(runs["matrix"]), str(tmp_path / "hrpo"), "--data", str(GSM / "test.jsonl"))
    assert_one_line_error(code, err, "different kinds", "is hippo", "is hrpo")


def test_checkpoints_with_different_tokenizers_are_refused(cli, tmp_path):
    from memcli.backbone import tokenizer_fingerprint
    from memcli.hrpo.io import load_hrpo

    for name in ("a", "b"):
        code, _, err = run_cli(["train", "hrpo", f"dataset.train_path={GSM / 'train.jsonl'}", f"logging.out_dir={tmp_path}",
                                f"logging.run_name={name}", "training.max_steps=1", "training.group_size=2",
                                "training.batch_size=2", "training.max_completion_length=3",
                                "logging.tensorboard=false", f"dataset.eval_path={tmp_path / 'none.jsonl'}",
                                "training.log_completions_interval=0"])
        assert code == 0, err
    # give run b another vocabulary (a full-mode run carries its tokenizer), consistently with its config
    _, tok, _ = load_hrpo(tmp_path / "b")
    tok.add_tokens(["<extra_token_for_test>"])
    tok.save_pretrained(str(tmp_path / "b" / "backbone"))
    cfgp = tmp_path / "b" / "checkpoint.json"  # where every run records its tokenizer
    cfg = json.loads(cfgp.read_text())
    assert "tokenizer_fingerprint" in cfg
    cfg["tokenizer_fingerprint"] = tokenizer_fingerprint(tok)
    cfgp.write_text(json.dumps(cfg))
    code, _, err = cli("compare", "checkpoints", str(tmp_path / "a"), str(tmp_path / "b"), "--data",
                       str(GSM / "test.jsonl"), "--num-samples", "2", "--max-new-tokens", "4")
    assert_one_line_error(code, err, "different tokenizer")


def test_runs_table_and_plot(hippo_pair, cli, tmp_path):
    _, runs = hippo_pair
    png = tmp_path / "curves.png"
    code, out, err = cli("compare", "runs", str(runs["matrix"]), str(runs["selective"]), "--json", "--plot", str(png))
    assert code == 0, err
    res = json.loads(out)
    for i, name in enumerate(("matrix", "selective")):
        rows = [json.loads(x) for x in (runs[name] / "metrics.jsonl").read_text().splitlines()]
        assert res["metrics"]["loss (last)"][i] == rows[-1]["loss"]
        assert res["metrics"]["loss (min)"][i] == min(r["loss"] for r in rows)
        assert res["metrics"]["steps"][i] == rows[-1]["step"] == 3
        assert [p[1] for p in res["curves"]["loss"][str(runs[name])]] == [r["loss"] for r in rows]
    assert png.stat().st_size > 1000
    code, _, err = cli("compare", "runs", str(runs["matrix"]), "--metric", "eval/nothing")
    assert_one_line_error(code, err, "--metric 'eval/nothing'")
    code, _, err = cli("compare", "runs", str(tmp_path))
    assert_one_line_error(code, err, "no metrics.jsonl")
    bad = tmp_path / "badrun"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"loss": 1.0}\n')
    code, _, err = cli("compare", "runs", str(bad))
    assert_one_line_error(code, err, "metrics.jsonl:2", "'step'")


def test_compare_hippo_variants(hippo_pair, cli, tmp_path):
    from memcli.eval.hippo import evaluate, exact_match
    from memcli.hippo.data import load_dialogs
    from memcli.hippo.io import load_hippo

    root, runs = hippo_pair
    val = root / "data" / "data_val.jsonl"
    code, out, err = cli("compare", "hippo", "-m", str(runs["matrix"]), "-m", str(runs["selective"]), "--data", str(val),
                         "--turns", "2", "--repeats", "1", "--json", "--plot", str(tmp_path / "h.png"))
    assert code == 0, err
    res = json.loads(out)
    assert res["setups"] == ["matrix", "selective", "no memory", "full history"]
    rows = res["rows"]
    for name in ("matrix", "selective"):
        model, tok, _ = load_hippo(runs[name])
        assert rows[name]["params"] == sum(p.numel() for p in model.memory_parameters())
        assert rows[name]["fp16 MB"] == pytest.approx(rows[name]["params"] * 2 / 2**20)
        items = load_dialogs(tok, val, 64, 128)
        assert rows[name]["exact match"] == evaluate(model, tok, items)["exact_match_memory"]
        if name == "matrix":
            assert rows["no memory"]["exact match"] == exact_match(model, tok, items, False)
            assert rows["full history"]["exact match"] == exact_match(model, tok, items, False, full_history=True)
        assert rows[name]["turn 1 ms"] > 0 and rows[name]["turn 2 ms"] > 0
    assert rows["selective"]["params"] > rows["matrix"]["params"]
    assert rows["full history"]["turn 2 ms"] > 0
    assert (tmp_path / "h.png").stat().st_size > 1000
    code, _, err = cli("compare", "hippo", "-m", str(runs["matrix"]))
    assert_one_line_error(code, err, "--data")


def test_checkpoints_explicit_memory_numbers_from_inspect_eval(default_data, cli, tmp_path, capsys):
    from memcli.eval.explicit import evaluate_run
    from memcli.explicit.io import load_memory

    for name, extra in (("full", []), ("lora", ["model.finetuning_method=lora"])):
        code, _, err = run_cli(["train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                                f"logging.run_name={name}", "training.max_steps=3", "training.batch_size=8",
                                "training.eval_num_samples=10", "training.final_eval_num_samples=10",
                                "logging.tensorboard=false", *extra])
        assert code == 0, err
    capsys.readouterr()  # the training summaries
    code, out, err = cli("compare", "checkpoints", str(tmp_path / "full"), str(tmp_path / "lora"), "--data",
                         str(default_data), "--num-samples", "20", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["kind"] == "explicit-memory"
    for i, name in enumerate(("full", "lora")):
        model, tok, bank, _ = load_memory(tmp_path / name)
        direct = evaluate_run(model, tok, bank, default_data, "letter", 20)
        for k, vals in res["metrics"].items():
            assert vals[i] == direct[k], (name, k)
    assert res["metrics"]["questions"] == [20, 20]
