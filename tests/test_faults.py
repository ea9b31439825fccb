"""Faults: kill -9 at a random moment of every `train` subcommand and resume, NaN/inf losses and gradients,
an output directory that cannot be written or fills up, a rank that dies in a distributed run.
(`train memory` is killed and resumed in test_resume.py.)"""

from __future__ import annotations

import json
import os
import random
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error, run_cli
from memcli.checkpoint import load_tensors

ROOT = Path(__file__).resolve().parents[1]
GSM = Path(__file__).parent / "fixtures" / "gsm8k"
QUIET = ["training.eval_interval=0", "training.eval_num_samples=4", "training.final_eval_num_samples=4",
         "logging.tensorboard=false"]


def _env():
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACCELERATE_")}
    env.update(MEMCLI_QUIET="1", OMP_NUM_THREADS="1")
    return env


@pytest.fixture(scope="module")
def inputs(default_data, tmp_path_factory):
    from memcli.data.pipeline import gen_dialog

    root = tmp_path_factory.mktemp("faults")
    gen_dialog(root / "dialog", seed=0, num_train=64, num_val=4, turns=3, min_distance=1)
    code, _, err = run_cli(["train", "router", f"dataset.data_dir={default_data}", f"logging.out_dir={root}",
                            "training.max_steps=2", "training.batch_size=8", *QUIET])
    assert code == 0, err
    return {"data": default_data, "dialog": root / "dialog", "router": root / "router"}


def _command(kind: str, inp: dict, out: Path) -> list[str]:
    common = [f"logging.out_dir={out}", "training.save_interval=2", "training.seed=3", *QUIET]
    if kind == "router":
        args = ["router", f"dataset.data_dir={inp['data']}", "training.max_steps=10", "training.batch_size=8"]
    elif kind == "fusion":
        args = ["fusion", f"dataset.data_dir={inp['data']}", f"dataset.pretrained_router_path={inp['router']}",
                "training.max_steps=10", "training.batch_size=8", "training.accumulation_steps=2"]
    elif kind == "hippo":  # the stage switch (step 4) falls between the kill and the end
        args = ["hippo", f"dataset.data_dir={inp['dialog']}", "training.max_steps=12", "training.batch_size=16",
                "training.epochs=3", "training.stage1_epochs=1"]
    else:
        args = ["hrpo", f"dataset.train_path={GSM / 'train.jsonl'}", "training.max_steps=8", "training.batch_size=2",
                "training.group_size=2", "training.max_completion_length=6"]
    return [sys.executable, "-m", "memcli", "train", *args, *common]


def _final_tensors(run: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(run.rglob("*.safetensors")):
        if "states" not in f.relative_to(run).parts:
            out.update({f"{f.relative_to(run)}:{k}": v for k, v in load_tensors(f).items()})
    assert out, f"no weights under {run}"
    return out


@pytest.mark.parametrize("kind", ["router", "fusion", "hippo", "hrpo"])
def test_kill_minus_9_at_a_random_moment_then_resume(kind, inputs, tmp_path):
    rng = random.Random(kind)  # a different, reproducible moment per subcommand
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run(_command(kind, inputs, a), env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    p = subprocess.Popen(_command(kind, inputs, b), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = b / kind / "states" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None and not latest.is_file():
        time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.4))  # anywhere after the first state: mid-step, mid-save, mid-log
    assert p.poll() is None, "run ended before it could be killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    states = b / kind / "states"
    # a kill between creating a temporary sibling and renaming it leaves that sibling: it must be the killed
    # writer's (its pid in the name, so the next run can tell it from a live write) and only a temporary
    left = list(states.parent.rglob(".*"))
    assert all(f".{p.pid}." in f.name or f.name.endswith(f".old-{p.pid}") for f in left), left
    for st in states.glob("step-*"):  # every state on disk is whole
        assert {f.name for f in st.iterdir()} == {"trainable.safetensors", "optimizer.safetensors", "state.json"}
    ptr = json.loads(latest.read_text())
    assert (states / ptr["state"] / "state.json").is_file()  # the pointer names a complete state
    r = subprocess.run(_command(kind, inputs, b) + ["training.resume=auto"], env=_env(), capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not [f for f in states.parent.rglob(".*")], "the resumed run left a temporary behind"
    wa, wb = _final_tensors(a / kind), _final_tensors(b / kind)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k].float(), wb[k].float(), atol=1e-6, rtol=0), k
    la = [json.loads(l) for l in (a / kind / "metrics.jsonl").read_text().splitlines()]
    lb = [json.loads(l) for l in (b / kind / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lb] == [m["step"] for m in la]  # each step logged once across the kill
    key = "reward_mean" if kind == "hrpo" else "loss"
    assert torch.allclose(torch.tensor([m[key] for m in lb]), torch.tensor([m[key] for m in la]), atol=1e-4, rtol=0)


_KILLED_WRITER = """
import os, signal, sys
from memcli import records
os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)  # die after the data is written, before the rename
{call}
"""


def test_a_killed_writers_temporaries_are_swept_by_the_next_run_and_a_live_writers_kept(inputs, tmp_path):
    """kill -9 mid-write, made deterministic: the writer kills itself between writing its temporary and the
    rename. The next `train` over that run directory removes what the dead writer left, and nothing else."""
    run = tmp_path / "hippo"
    for call in (f"records.write_json({str(run / 'states' / 'latest.json')!r}, {{'state': 'step-00000002'}})",
                 f"with records.atomic_dir({str(run / 'states' / 'step-00000002')!r}) as t:\n"
                 "    records.write_json(t / 'state.json', {})"):
        r = subprocess.run([sys.executable, "-c", _KILLED_WRITER.format(call=call)], env=_env(), capture_output=True)
        assert r.returncode == -signal.SIGKILL, r.stderr[-500:]
    dead = sorted(f.name for f in (run / "states").iterdir())
    assert len(dead) == 2 and all(n.endswith(".tmp") for n in dead), dead  # a temp file and a temp directory
    live = run / f".metrics.jsonl.{os.getpid()}.abcd1234.tmp"  # this test process is alive: its write may be going on
    live.write_text("in progress")
    r = subprocess.run([sys.executable, "-m", "memcli", "train", "hippo", f"dataset.data_dir={inputs['dialog']}",
                        f"logging.out_dir={tmp_path}", "training.batch_size=8", "training.max_steps=2", *QUIET],
                       env=_env(), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [f for f in run.rglob(".*")] == [live] and live.read_text() == "in progress"


# ---------------------------------------------------------------- NaN / inf


def _toy_task(bad_micro: set[int], bad_grad_micro: set[int] = frozenset()):
    """A real optimisation problem (least squares) whose loss or gradient is poisoned at chosen micro-batches."""
    from memcli.training.recipe import Recipe

    seen: list[dict] = []

    class Toy(Recipe):
        command = "test"

        def build_model(self):
            torch.manual_seed(0)
            self.model = torch.nn.Linear(4, 1)
            self.param_groups = [{"name": "all", "params": list(self.model.parameters()), "lr": 0.05}]

        def build_data(self):
            X, w_true = torch.randn(64, 4), torch.tensor([[1.0, -2.0, 0.5, 3.0]])
            self.train_items = [(X[i], (X[i:i + 1] @ w_true.T).squeeze()) for i in range(64)]

        def collate(self, batch, micro):
            return {"x": torch.stack([b[0] for b in batch]), "y": torch.stack([b[1] for b in batch]), "micro": micro}

        def step(self, m, batch, step):
            seen.append({n: p.detach().clone() for n, p in m.named_parameters()})
            loss = ((m(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean()
            if batch["micro"] in bad_micro:
                loss = loss * float("nan")
            if batch["micro"] in bad_grad_micro:  # finite loss, infinite gradient (once)
                handle = []

                def hook(g):
                    handle[0].remove()
                    return g * float("inf")
                handle.append(m.weight.register_hook(hook))
            return loss, {}

    return Toy, seen


def run_training(cfg, toy, run_dir, command):
    """The toy recipe on ``cfg``, its run in ``run_dir``."""
    from memcli.training.loop import train

    cfg.logging.out_dir, cfg.logging.run_name = str(run_dir.parent), run_dir.name
    recipe = toy(cfg)
    res = train(recipe)
    res["model"] = recipe.model
    return res


def _cfg(tmp_path, *extra):
    from memcli.config import load_config

    return load_config("memory", overrides=["training.batch_size=4", "training.accumulation_steps=2", "training.max_steps=8",
                                  "training.save_interval=0", "training.eval_interval=0", "training.warmup_ratio=0",
                                  "logging.tensorboard=false", "training.device=cpu", *extra])


def test_nonfinite_skip_drops_whole_optimizer_steps(tmp_path):

    # micro-batches 4..5 form optimizer step 3 (NaN loss in both); 10..11 step 6 (inf gradient in the first)
    task, seen = _toy_task(bad_micro={4, 5}, bad_grad_micro={10})
    res = run_training(_cfg(tmp_path, "training.on_nonfinite=skip"), task, tmp_path / "run", "test")
    assert res["steps"] == 8
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("skipped", 0) for r in rows] == [0, 0, 1, 0, 0, 1, 0, 0]
    # parameters seen at micro-batch 6 (after step 3) equal those at micro-batch 4 (before it): no partial update
    for n in seen[4]:
        assert torch.equal(seen[6][n], seen[4][n]) and torch.equal(seen[12][n], seen[10][n]), n
        assert not torch.equal(seen[4][n], seen[2][n])  # good steps do move
    assert all(torch.isfinite(p).all() for p in res["model"].parameters())
    assert rows[2]["loss"] is None and rows[5]["loss"] is not None  # NaN losses are never logged; finite ones are


def test_nonfinite_loss_stops_and_keeps_the_last_good_state(tmp_path):
    from memcli.errors import MemcliError
    from memcli.training.state import find_state

    task, seen = _toy_task(bad_micro={5})  # optimizer step 3
    with pytest.raises(MemcliError, match=r"test: loss is nan at optimizer step 3 .*last good state .*on_nonfinite=skip"):
        run_training(_cfg(tmp_path, "training.save_interval=1"), task, tmp_path / "run", "test")
    st = find_state(tmp_path / "run", "auto")
    assert st.name == "step-00000002"
    good = load_tensors(st / "trainable.safetensors")
    for n, v in good.items():  # exactly the weights the failing step started from
        assert torch.equal(v, seen[4][n]), n


def test_reward_returning_nan_stops_hrpo_with_the_reward_named(cli, tmp_path, monkeypatch):
    (tmp_path / "bad_reward.py").write_text(
        "calls = [0]\n"
        "def reward(completions, answers, prompts):\n"
        "    calls[0] += 1\n"
        "    return [float('nan') if calls[0] > 1 else 0.5 for _ in completions]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = cli("train", "hrpo", f"dataset.train_path={GSM / 'train.jsonl'}", f"logging.out_dir={tmp_path / 'o'}",
                       "training.reward_fn=bad_reward:reward", "training.max_steps=3", "training.batch_size=2",
                       "training.group_size=2", "training.max_completion_length=4",
                       "training.save_interval=1", "training.log_completions_interval=0", *QUIET)
    assert_one_line_error(code, err, "training.reward_fn=bad_reward:reward returned nan for completion 0",
                          "last good state")
    assert json.loads((tmp_path / "o" / "hrpo" / "states" / "latest.json").read_text())["step"] == 1


def test_nonfinite_skip_gives_up_after_max_skipped_steps(tmp_path):
    from memcli.errors import MemcliError

    task, _ = _toy_task(bad_micro={1, 3, 5})
    with pytest.raises(MemcliError, match=r"3 optimizer steps dropped .*training.max_skipped_steps=2"):
        run_training(_cfg(tmp_path, "training.on_nonfinite=skip", "training.max_skipped_steps=2"), task,
                     tmp_path / "run", "test")


def test_infinite_gradient_stops_by_default(tmp_path):
    from memcli.errors import MemcliError

    task, _ = _toy_task(bad_micro=set(), bad_grad_micro={3})
    with pytest.raises(MemcliError, match=r"gradient norm is inf at optimizer step 2"):
        run_training(_cfg(tmp_path), task, tmp_path / "run", "test")


# ---------------------------------------------------------------- disk


def test_no_room_for_checkpoints_is_refused_before_training(inputs, cli, tmp_path, monkeypatch):
    import shutil

    from memcli.training import loop

    real = shutil.disk_usage
    monkeypatch.setattr(loop.shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))  # a 1 MiB disk
    code, _, err = cli("train", "hippo", f"dataset.data_dir={inputs['dialog']}", f"logging.out_dir={tmp_path / 'o'}",
                       "training.batch_size=8", "training.max_steps=2", *QUIET)
    assert_one_line_error(code, err, "1 MiB free", "needs about", "logging.out_dir")
    assert not (tmp_path / "o").exists()


def test_unwritable_output_directory_is_refused_before_training(inputs, cli, tmp_path):
    if os.geteuid() == 0:
        target = Path("/sys/memcli-out")  # sysfs: no new entries, not even for root (chmod does not stop root)
        if not Path("/sys").is_dir():
            pytest.skip("no directory root cannot write to")
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        target = ro / "out"
    code, _, err = cli("train", "hippo", f"dataset.data_dir={inputs['dialog']}", f"logging.out_dir={target}",
                       "training.batch_size=8", "training.max_steps=2", *QUIET)
    assert_one_line_error(code, err, str(target), "not writable")


def test_disk_filling_up_mid_run_leaves_no_partial_state(inputs, tmp_path):
    """The process may write no file larger than 64 KiB (RLIMIT_FSIZE): the first state write fails for real."""
    limit = 64 * 1024
    cmd = [sys.executable, "-m", "memcli", "train", "hippo", f"dataset.data_dir={inputs['dialog']}",
           f"logging.out_dir={tmp_path}", "training.batch_size=8", "training.max_steps=4", "training.save_interval=2",
           *QUIET]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600,
                       preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert_one_line_error(r.returncode, r.stderr, "could not write the state of step 2", "File too large",
                          "training.resume=auto")
    run = tmp_path / "hippo"
    assert not list(run.rglob("*.tmp")) and not list(run.rglob(".*.tmp"))
    assert not (run / "states" / "latest.json").exists() and not list((run / "states").glob("step-*"))


# ---------------------------------------------------------------- distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dead_rank_ends_the_other_with_a_message(inputs, tmp_path):
    """Two ranks started without an elastic agent (as a cluster scheduler would); rank 1 is killed -9 mid-run.
    Rank 0 must end by itself within the collective timeout with one line, not hang."""
    port = _free_port()
    cmd = [sys.executable, "-m", "memcli", "train", "hippo", f"dataset.data_dir={inputs['dialog']}",
           f"logging.out_dir={tmp_path}", "training.batch_size=4", "training.max_steps=400", "training.save_interval=1",
           "training.stage1_epochs=0", "training.epochs=50", "training.dist_timeout_s=20", *QUIET]
    procs = []
    for rank in (0, 1):
        env = dict(_env(), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    latest = tmp_path / "hippo" / "states" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not latest.is_file() and all(p.poll() is None for p in procs):
        time.sleep(0.05)
    assert all(p.poll() is None for p in procs), procs[0].stderr.read()[-2000:]
    os.kill(procs[1].pid, signal.SIGKILL)
    t0 = time.time()
    try:
        _, err = procs[0].communicate(timeout=120)
    except subprocess.TimeoutExpired:
        procs[0].kill()
        pytest.fail("rank 0 still running 120 s after rank 1 died")
    assert time.time() - t0 < 60
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert procs[0].returncode == 1 and len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "rank 0 lost contact with another rank" in lines[0] and "training.resume=auto" in lines[0]
    procs[1].wait()


def test_compare_runs_reads_a_run_with_dropped_steps(tmp_path):
    from memcli.eval.compare import compare_runs

    task, _ = _toy_task(bad_micro={4, 5})
    run_training(_cfg(tmp_path, "training.on_nonfinite=skip"), task, tmp_path / "run", "test")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    res = compare_runs([tmp_path / "run"])
    losses = [r["loss"] for r in rows if r["loss"] is not None]
    assert len(losses) == 7
    assert res["metrics"]["loss (last)"] == [losses[-1]] and res["metrics"]["loss (min)"] == [min(losses)]
    assert [s for s, _ in res["curves"]["loss"][str(tmp_path / "run")]] == [1, 2, 4, 5, 6, 7, 8]
