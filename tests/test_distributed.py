"""2-process DDP (gloo) and DeepSpeed ZeRO-2 runs of `train memory` on CPU match a 1-process run with the same
global batch: loss curve, EMA-updated bank, usage summed over ranks."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from memcli.checkpoint import load_tensors

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch"]


def _args(data, out, batch):
    return ["-m", "memcli", "train", "memory", f"dataset.data_dir={data}", f"logging.out_dir={out}",
            "training.max_steps=6", f"training.batch_size={batch}", "training.counterfactual_prob=0",
            "training.ema_update_freq=2", "training.eval_interval=0", "training.eval_num_samples=8",
            "training.final_eval_num_samples=8", "training.save_interval=0", "logging.tensorboard=false"]


def _run(cmd, env_extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(MEMCLI_QUIET="1", OMP_NUM_THREADS="1", **(env_extra or {}))
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, (r.stdout[-1500:], r.stderr[-3000:])
    return r


def _losses(run):
    return torch.tensor([json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()])


def _bank(run):
    return load_tensors(run / "bank" / "memory_bank.safetensors")["token_ids"]


@pytest.fixture(scope="module")
def single(default_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    _run([sys.executable, *_args(default_data, out, 8)])
    return out / "memory"


def test_ddp_two_processes_match_one(single, default_data, tmp_path):
    out = tmp_path / "ddp"
    _run([*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", *_args(default_data, out, 4)], {"ACCELERATE_USE_CPU": "true"})
    run = out / "memory"
    info = json.loads((run / "checkpoint.json").read_text())
    assert info["world_size"] == 2 and info["step"] == 6
    one, two = _losses(single), _losses(run)
    assert len(two) == 6
    # ranks average per-rank token means, one process averages over all tokens: close, not bit-equal
    assert torch.allclose(one, two, rtol=1e-2, atol=0), (one, two)
    assert (_bank(single) == _bank(run)).float().mean() > 0.999  # EMA statistics all-reduced over ranks
    u1 = load_tensors(run / "memory" / "usage.safetensors")
    u0 = load_tensors(single / "memory" / "usage.safetensors")
    assert torch.allclose(u1["usage"].sum(), u0["usage"].sum(), rtol=1e-3)  # usage counted on both ranks' shards


def test_zero2_two_processes_match_one(single, default_data, tmp_path):
    out = tmp_path / "zero2"
    # a lock left by a rank killed while DeepSpeed JIT-built its CPU shm op once hung every later run: memcli no
    # longer builds that op, so a stale lock in the extensions dir must not matter
    ext = tmp_path / "torch_extensions"
    op = ext / "deepspeed_shm_comm"  # torch builds an op in TORCH_EXTENSIONS_DIR/<name>, locked by <name>/lock
    op.mkdir(parents=True)
    (op / "lock").touch()
    r = _run([*LAUNCH, "--config_file", "examples/accelerate_zero2.yaml",
              *_args(default_data, out, 4), "training.zero_stage=2"], {"TORCH_EXTENSIONS_DIR": str(ext)})
    assert "deepspeed_shm_comm" not in r.stdout + r.stderr
    run = out / "memory"
    info = json.loads((run / "checkpoint.json").read_text())
    assert info["world_size"] == 2
    one, two = _losses(single), _losses(run)
    assert torch.allclose(one, two, rtol=1e-2, atol=0), (one, two)
    assert (_bank(single) == _bank(run)).float().mean() > 0.999
    assert not (run / "states").exists()  # ZeRO's partitioned optimizer is not written as a resumable state


def test_zero_stage_without_deepspeed_is_refused(default_data, tmp_path):
    r = subprocess.run([sys.executable, *_args(default_data, tmp_path, 8), "training.zero_stage=2"], cwd=ROOT,
                       env=dict(os.environ, MEMCLI_QUIET="1"), capture_output=True,
                       text=True, timeout=300)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "accelerate launch" in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "memory").exists()


RANK_SCRIPT = """
import os, sys
from memcli.checkpoint import save_tensors
from memcli.config import load_config
from memcli.training.hippo import HippoRecipe
from memcli.training.loop import train

recipe = HippoRecipe(load_config("hippo", overrides=sys.argv[2:]))
train(recipe)
save_tensors(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.safetensors"), recipe.state_dict())
"""


def test_hippo_ddp_ranks_keep_identical_weights(tmp_path):
    """The hippo step goes through the prepared (DDP-wrapped) model, so both ranks hold the same weights after
    every step; without the sync each rank would follow its own half of each batch and they would drift apart."""
    from memcli.data.pipeline import gen_dialog

    data = tmp_path / "dialog"
    gen_dialog(data, num_train=64, num_val=4, seed=0)
    script = tmp_path / "ranks.py"
    script.write_text(RANK_SCRIPT)
    _run([*LAUNCH, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
          "--dynamo_backend", "no", str(script), str(tmp_path), f"dataset.data_dir={data}",
          f"logging.out_dir={tmp_path / 'out'}", "training.max_steps=5", "training.batch_size=4",
          "training.eval_interval=0", "training.final_eval_num_samples=4", "training.save_interval=0",
          "logging.tensorboard=false", "training.learning_rate=0.01", "model.finetuning_method=frozen"],
         {"ACCELERATE_USE_CPU": "true"})
    assert json.loads((tmp_path / "out" / "hippo" / "checkpoint.json").read_text())["world_size"] == 2
    r0, r1 = load_tensors(tmp_path / "rank0.safetensors"), load_tensors(tmp_path / "rank1.safetensors")
    assert set(r0) == set(r1) and len(r0) > 5
    for k in r0:
        assert torch.equal(r0[k], r1[k]), k
    w = load_tensors(tmp_path / "out" / "hippo" / "hippo_model" / "hippo_model.safetensors")
    assert w["encoder.readers.1.W_o.weight"].abs().sum() > 0  # the weights moved (W_o starts at zero)
