"""kill -9 during `train memory`, then training.resume=auto: the final weights equal an uninterrupted run's."""

import json
import os
import signal
import subprocess
import sys
import time

import torch

from memcli.checkpoint import load_tensors


def _cmd(data, out, *extra):
    return [sys.executable, "-m", "memcli", "train", "memory", f"dataset.data_dir={data}", f"logging.out_dir={out}",
            "training.max_steps=12", "training.batch_size=8", "training.accumulation_steps=2",
            "training.save_interval=4", "training.eval_interval=0", "training.eval_num_samples=8",
            "training.final_eval_num_samples=8", "training.ema_update_freq=3", "logging.tensorboard=false", *extra]


def _weights(run):
    sd = load_tensors(run / "memory" / "memory.safetensors")
    sd.update({f"bb.{k}": v for k, v in load_tensors(run / "backbone" / "model.safetensors").items()})
    sd["bank"] = load_tensors(run / "bank" / "memory_bank.safetensors")["token_ids"]
    return sd


def test_kill_minus_9_then_resume_matches_uninterrupted(default_data, tmp_path):
    env = dict(os.environ, MEMCLI_QUIET="1")
    a = tmp_path / "a"
    subprocess.run(_cmd(default_data, a), check=True, env=env, capture_output=True)
    b = tmp_path / "b"
    p = subprocess.Popen(_cmd(default_data, b), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = b / "memory" / "states" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if latest.is_file() and json.loads(latest.read_text())["step"] >= 4:
            break
        time.sleep(0.02)
    assert p.poll() is None, "run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    assert not (b / "memory" / "checkpoint.json").exists()  # killed before the end: no final model
    # every state on disk is complete (written whole or not at all)
    for st in (b / "memory" / "states").glob("step-*"):
        assert {f.name for f in st.iterdir()} == {"trainable.safetensors", "optimizer.safetensors", "state.json"}
    r = subprocess.run(_cmd(default_data, b, "training.resume=auto"), env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    wa, wb = _weights(a / "memory"), _weights(b / "memory")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6, rtol=0), k
    ma = [json.loads(l) for l in (a / "memory" / "metrics.jsonl").read_text().splitlines()]
    mb = [json.loads(l) for l in (b / "memory" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in mb] == list(range(1, 13))  # max_steps counts optimizer steps, each logged once
    assert torch.allclose(torch.tensor([m["loss"] for m in mb]), torch.tensor([m["loss"] for m in ma]),
                          atol=1e-4, rtol=0)  # same curve across the kill


def test_resume_refuses_a_changed_config_naming_the_key(default_data, tmp_path, cli):
    """The resolved config is saved as config.yaml; a resume whose config differs (in a key that changes what is
    computed) is refused in one line that names the key, while watch-only keys may change."""
    import yaml

    from conftest import assert_one_line_error

    common = [f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}", "training.max_steps=4",
              "training.batch_size=8", "training.save_interval=2", "training.eval_interval=0",
              "training.final_eval_num_samples=4", "logging.tensorboard=false"]
    assert cli("train", "memory", *common)[0] == 0
    saved = yaml.safe_load((tmp_path / "memory" / "config.yaml").read_text())
    assert saved["training"]["batch_size"] == 8 and saved["model"]["read"] == "additive"  # resolved values
    code, _, err = cli("train", "memory", *common, "training.resume=auto", "training.learning_rate=0.5")
    assert_one_line_error(code, err, "training.learning_rate", "0.003", "0.5", "may change on resume")
    code, _, err = cli("train", "memory", *common, "training.resume=auto", "training.eval_num_samples=7",
                       "logging.log_interval=3")
    assert code == 0, err
