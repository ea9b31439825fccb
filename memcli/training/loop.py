"""The one training loop every ``memcli train`` subcommand uses (accelerate-based).

- real gradient accumulation: the optimizer steps once per ``accumulation_steps`` micro-batches;
- warmup + cosine / linear / constant schedule (``training.lr_scheduler``) sized in optimizer steps; parameter groups with their own learning rates;
- gradient clipping, fp32 / bf16, DDP (``accelerate launch``) and DeepSpeed ZeRO (``training.zero_stage``);
- deterministic data order from the seed, so ``training.resume=auto`` continues a killed run exactly;
- eval every ``eval_interval`` optimizer steps, checkpoints every ``save_interval`` and at the end;
- TensorBoard (offline) by default, W&B / SwanLab when installed and enabled; metrics.jsonl always.
"""

from __future__ import annotations

import json
import errno
import os as _os
import re
import shutil
import signal
import tempfile
import time
import warnings
from datetime import timedelta
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli.errors import MemcliError, RunAborted
from memcli.records import atomic_write_text, sweep_stale_temps

# memcli keeps rank-local buffers (bank, usage) out of DDP's sync on purpose: broadcast_buffers=False is the
# setting that does that in accelerate 1.15, whose deprecation notice points to a replacement that still syncs at init
warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
if not torch.cuda.is_available():
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns on every import here
from memcli.console import err_console, progress
from memcli.training import state as S
from memcli.training.recipe import Plan, Recipe


def make_scheduler(optimizer, kind: str, total: int, warmup: int):
    """Linear warmup, then cosine / linear decay to 0 or constant (transformers' schedules)."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[kind]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (MiB)."""
    import resource
    import sys

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def make_accelerator(tcfg, run_dir: Path, trackers: list[str]):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

    if tcfg.deterministic:
        # some CPU ops (2+ threads) accumulate in a run-dependent order: without this the same seed drifts by
        # ulps from step 3 and learning checks land a few points apart run to run
        _os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what cuBLAS needs to be deterministic
        torch.use_deterministic_algorithms(True, warn_only=True)
    kwargs = {}
    # buffers (the token bank, usage counts) are kept in step by the task itself, not overwritten from rank 0
    handlers = [DistributedDataParallelKwargs(broadcast_buffers=False)]
    multi = int(_os.environ.get("WORLD_SIZE", "1")) > 1
    # a rank that dies or hangs makes the others' next collective fail after this long instead of waiting forever
    timeout = getattr(tcfg, "dist_timeout_s", 600)
    if multi:
        pg = {"timeout": timedelta(seconds=timeout)}
        if not torch.cuda.is_available():
            pg["backend"] = "gloo"  # CPU runs (CI) use gloo
        handlers.append(InitProcessGroupKwargs(**pg))
    zero_stage = getattr(tcfg, "zero_stage", 0)  # recipes that run on one process only have no such key
    launched_ds = _os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    use_ds = launched_ds or bool(zero_stage)
    if zero_stage and "WORLD_SIZE" not in _os.environ:
        raise MemcliError(f"training.zero_stage={zero_stage} needs a distributed launcher, e.g. 'accelerate launch "
                          "--config_file examples/accelerate_zero2.yaml -m memcli train memory ...'")
    if zero_stage and not launched_ds:  # a launcher's DeepSpeed config (file or flags) takes precedence
        from accelerate.utils import DeepSpeedPlugin

        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(zero_stage=zero_stage,
                                                     gradient_accumulation_steps=tcfg.accumulation_steps,
                                                     gradient_clipping=tcfg.max_grad_norm)
    if use_ds and not torch.cuda.is_available():
        _no_deepspeed_shm_op()
    # without a GPU, a multi-process launch must say cpu=True: else accelerate (1.15) joins the process group but
    # reports DistributedType.NO, and every rank trains alone with no gradient sync (seen under torchrun-style env)
    # (a DeepSpeed launch is left alone: cpu=True would turn DeepSpeed off)
    cpu = tcfg.device == "cpu" or (multi and not torch.cuda.is_available() and not use_ds)
    acc = Accelerator(gradient_accumulation_steps=tcfg.accumulation_steps, mixed_precision=tcfg.mixed_precision.value,
                      kwargs_handlers=handlers, log_with=trackers or None, project_dir=str(run_dir), cpu=cpu, **kwargs)
    from accelerate.utils import DistributedType

    if acc.num_processes > 1 and acc.distributed_type == DistributedType.NO:
        raise MemcliError(f"WORLD_SIZE={acc.num_processes} but accelerate set up no distributed training; launch with "
                          "'accelerate launch' or torchrun")
    ds = acc.state.deepspeed_plugin
    if zero_stage and ds is None:
        raise MemcliError(f"training.zero_stage={zero_stage} but this process runs without DeepSpeed (for example "
                          "ACCELERATE_USE_CPU=true turns it off); launch with 'accelerate launch --use_deepspeed' "
                          "or examples/accelerate_zero2.yaml")
    if ds is not None:
        # batches come from our own sampler, not a prepared DataLoader, so DeepSpeed is told the size here
        ds.deepspeed_config["train_micro_batch_size_per_gpu"] = tcfg.batch_size
        if acc.gradient_accumulation_steps != tcfg.accumulation_steps:
            raise MemcliError(f"training.accumulation_steps={tcfg.accumulation_steps} but the DeepSpeed launch config "
                              f"says gradient_accumulation_steps={acc.gradient_accumulation_steps}; make them agree")
    return acc


def _no_deepspeed_shm_op() -> None:
    """Keep DeepSpeed on CPU from JIT-compiling its shared-memory all-reduce op at process-group start.

    Training never calls it (it serves inference_all_reduce), yet every rank builds it under a lock file in
    ~/.cache/torch_extensions: a rank killed mid-build leaves that lock behind and every later DeepSpeed run waits
    on it forever (seen as a 600 s hang in CI), and a machine without a C++ compiler cannot build it at all.
    deepspeed.ops keeps one cached dict of compatible ops, so marking the op incompatible there sticks."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _trackers(lcfg) -> list[str]:
    out = []
    if lcfg.tensorboard:
        out.append("tensorboard")
    for name, mod in (("wandb", "wandb"), ("swanlab", "swanlab")):
        if getattr(lcfg, name):
            try:
                __import__(mod)
                out.append(name)
            except ImportError:
                err_console.print(f"[yellow]logging.{name}=true but {mod} is not installed; skipping it[/yellow]")
    return out


def _nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def preflight_output(run_dir: Path, need_bytes: int) -> None:
    """Refuse an output directory that cannot be written or a disk without room for the checkpoints, before training."""
    a = run_dir
    while not a.exists() and a != a.parent:
        a = a.parent
    if not a.is_dir():
        raise MemcliError(f"{run_dir}: cannot be an output directory, {a} is a file")
    try:
        with tempfile.TemporaryFile(dir=a):
            pass
    except OSError as e:
        raise MemcliError(f"{run_dir}: output directory is not writable ({e.strerror or e})") from None
    free = shutil.disk_usage(a).free
    if free < need_bytes:
        raise MemcliError(f"{run_dir}: {free / 2**20:.0f} MiB free on this disk, training needs about "
                          f"{need_bytes / 2**20:.0f} MiB for its states and final checkpoint; free space or set "
                          "logging.out_dir elsewhere")


def _dist_failure(e: BaseException) -> bool:
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(e, dist_error):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and any(w in msg for w in ("gloo", "nccl", "connection closed", "connection reset",
                                                                   "timed out", "timeout", "broken pipe"))


def train(recipe: Recipe) -> dict:
    """Drive ``recipe`` through its phases (recipe.py): setup, plan, resume, steps, finish."""
    recipe.setup()
    cfg, run_dir = recipe.cfg, recipe.run_dir()
    acc = make_accelerator(cfg.training, run_dir, _trackers(cfg.logging))  # refuses a bad launch before anything is written
    params = list(recipe.model.parameters())
    trainable = [p for g in recipe.param_groups for p in g["params"]]
    # final checkpoint (every weight, to be safe) + `keep` resumable states of weights and two AdamW moments each
    if acc.is_main_process:
        preflight_output(run_dir, _nbytes(params) + 2 * 3 * _nbytes(trainable))
    run_dir.mkdir(parents=True, exist_ok=True)
    if acc.is_main_process:
        sweep_stale_temps(run_dir)  # a kill -9 mid-write leaves its temporary sibling; readers never saw it
    if acc.num_processes == 1:
        return recipe.result(_run(recipe, acc, run_dir))
    prev = signal.signal(signal.SIGTERM, _on_sigterm)  # a launcher ends the survivors of a dead rank with SIGTERM
    try:
        return recipe.result(_run(recipe, acc, run_dir))
    except Exception as e:
        if isinstance(e, MemcliError) or not _dist_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # gloo prefixes its source location
        raise RunAborted(f"{recipe.command}: rank {acc.process_index} lost contact with another rank ({first}); "
                         f"stopping. The last complete state in {run_dir / 'states'} is kept: rerun with "
                         "training.resume=auto") from None
    finally:
        signal.signal(signal.SIGTERM, prev)


def _on_sigterm(signum, frame):
    raise RunAborted("training stopped by SIGTERM (the launcher ends every rank when one fails); the last complete "
                     "state is kept: rerun with training.resume=auto")


def _save_config(cfg, run_dir: Path, resuming: bool, write: bool = True) -> dict:
    """Write the resolved config as config.yaml; a resume must match the run's saved one (but for watch-only keys).
    ``write=False`` only checks (a resume rewrites it once its state has loaded, so a failed resume changes nothing)."""
    import yaml

    from memcli.config import RESUME_MAY_CHANGE, resume_conflict, to_dict, to_yaml
    from memcli.rundir import CONFIG

    now = to_dict(cfg)
    saved_path = run_dir / CONFIG
    if resuming and saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
        diff = resume_conflict(saved, now)
        if diff:
            raise MemcliError(f"training.resume: {run_dir} was trained with another config ({diff}); only "
                              f"{', '.join(k for k in RESUME_MAY_CHANGE)} may change on resume (or start a new "
                              "logging.run_name)")
    if write:
        atomic_write_text(saved_path, to_yaml(cfg))
    return now


def _tracker_config(d: dict) -> dict:
    """Flat scalars for trackers (TensorBoard's hparams take no lists or None)."""
    from memcli.config import flat

    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in flat(d).items()}


# the terms that tell whether a run learns, in the order the console shows them
_SHOWN = ("loss", "lm", "router", "recall", "reward_mean", "reward_std", "kl", "completion_len", "eval/heldout_memory_on",
          "eval/heldout_memory_off", "eval/edit_success", "eval/recall", "eval/exact_match", "eval/accuracy")


def step_line(logged: dict, groups: list[str], lrs: list[float]) -> str:
    parts = []
    for key in _SHOWN:
        for k, v in logged.items():
            if (k == key or k.startswith(key + "_") or k.startswith(key + "@")) and v is not None:
                parts.append(f"{k} {v:.3f}" if abs(v) >= 1e-3 or v == 0 else f"{k} {v:.2e}")
    if logged.get("loss") is None:
        parts.insert(0, "loss nan")
    shown = [f"{g} {lr:.1e}" for g, lr in zip(groups, lrs)]
    return " ".join(parts) + (" lr " + " ".join(shown) if shown else "")


def make_plan(t, n_items: int, acc) -> Plan:
    world = acc.num_processes
    per_epoch = max(1, n_items // (t.batch_size * world))  # drop the ragged tail: every rank sees equal batches
    total_micro = per_epoch * t.epochs
    if t.max_steps is not None:
        total_micro = min(total_micro, t.max_steps * t.accumulation_steps) if t.max_steps > 0 else 0
    total_micro -= total_micro % t.accumulation_steps  # a ragged last window would never step
    return Plan(world=world, rank=acc.process_index, per_epoch=per_epoch, total_micro=total_micro,
                total_steps=max(1, total_micro // t.accumulation_steps), accumulation=t.accumulation_steps)


def _resume(recipe: Recipe, acc, optimizer, scheduler, run_dir: Path) -> tuple[int, dict]:
    """Load the state to resume from, if any, and write config.yaml -> (first micro-batch, resolved config)."""
    cfg, t = recipe.cfg, recipe.cfg.training
    if t.resume and acc.state.deepspeed_plugin is not None:
        raise MemcliError("training.resume is not supported with DeepSpeed ZeRO (its optimizer state is partitioned "
                          "across ranks and memcli does not write it); resume a DDP run instead")
    st = S.find_state(run_dir, t.resume) if t.resume else None
    resolved = _save_config(cfg, run_dir, st is not None, write=st is None) if acc.is_main_process else {}
    if st is None:
        return 0, resolved
    meta, trainable, other, opt_sd = S.load_state(st)
    recipe.load_state_dict(trainable)
    optimizer.load_state_dict(opt_sd)
    scheduler.load_state_dict(meta["scheduler"])
    S.set_rng_state(other, meta["rng"])
    if acc.is_main_process:
        _save_config(cfg, run_dir, False)
    recipe.load_extra_state({k[6:]: v for k, v in other.items() if k.startswith("extra.")})
    start = int(meta["micro_step"])
    if acc.is_main_process:
        err_console.print(f"resumed from {st} (optimizer step {meta['step']}, micro-batch {start})")
    return start, resolved


def _open_metrics(acc, run_dir: Path, start_micro: int, accumulation: int) -> Path:
    """metrics.jsonl: a fresh run starts a new log; a resumed one keeps the lines up to the state it resumed from."""
    path = run_dir / "metrics.jsonl"
    if acc.is_main_process and path.exists():
        keep_upto = start_micro // accumulation
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if start_micro and json.loads(ln).get("step", 0) <= keep_upto]
        atomic_write_text(path, "".join(ln + "\n" for ln in kept))
    return path


def _batch(recipe: Recipe, plan: Plan, seed: int, micro: int, device) -> dict:
    """Micro-batch ``micro`` of this rank: a deterministic permutation per epoch, so a resume continues exactly."""
    epoch, j = divmod(micro, plan.per_epoch)
    perm = torch.randperm(len(recipe.train_items), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    bs = recipe.cfg.training.batch_size
    ids = perm[j * bs * plan.world: (j + 1) * bs * plan.world][plan.rank * bs: (plan.rank + 1) * bs]
    batch = recipe.collate([recipe.train_items[i] for i in ids], micro)
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}


@dataclass
class _Window:
    """What the loop carries across the micro-batches of one optimizer step."""

    limit: int  # training.max_skipped_steps
    running: dict = field(default_factory=dict)
    bad: bool = False
    skipped: int = 0  # optimizer steps dropped so far


def _micro_step(recipe: Recipe, acc, model, optimizer, batch: dict, step: int, micro: int, win: _Window,
                run_dir: Path) -> None:
    """Forward, backward and (at the window's end) the optimizer step; a non-finite loss or gradient drops the
    whole window (no partial update) or stops the run, by training.on_nonfinite."""
    t, cmd = recipe.cfg.training, recipe.command
    stop = t.on_nonfinite.value == "stop"
    kept = f"the last good state in {run_dir / 'states'} is kept (training.on_nonfinite=skip drops such steps instead)"
    with acc.accumulate(model):
        loss, mets = recipe.step(model, batch, step)
        bad = _any_rank(acc, not bool(torch.isfinite(loss.detach())))  # every rank takes the same branch
        if bad and stop:
            raise MemcliError(f"{cmd}: loss is {loss.item()} at optimizer step {step + 1} (micro-batch {micro}); "
                              f"stopping, {kept}")
        win.bad = win.bad or bad
        if not bad and loss.requires_grad:
            acc.backward(loss)
        if acc.sync_gradients and not win.bad and not getattr(t, "zero_stage", 0):
            if t.max_grad_norm:
                gnorm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
            else:
                gnorm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
            if gnorm is not None and not torch.isfinite(torch.as_tensor(gnorm)):
                if stop:
                    raise MemcliError(f"{cmd}: gradient norm is {float(gnorm)} at optimizer step {step + 1}; "
                                      f"stopping, {kept}")
                win.bad = True
        if not (acc.sync_gradients and win.bad):  # a bad window is dropped whole: no partial update
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if not bad:
        for k, v in dict(mets, loss=loss.detach()).items():
            win.running[k] = win.running.get(k, 0.0) + float(v) / t.accumulation_steps


def _close_window(recipe: Recipe, acc, scheduler, win: _Window, step: int, names: list[str], run_dir: Path) -> dict:
    """After an optimizer step: advance the schedule, reduce the window's metrics over ranks, count a dropped step."""
    with warnings.catch_warnings():
        # a dropped step still consumes its data and its place in the schedule; torch warns when the first
        # optimizer step is the one dropped, which is intended here
        warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning)
        scheduler.step()
    logged = {k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean")) for k, v in win.running.items()}
    win.running = {}
    if win.bad:
        win.skipped += 1
        win.bad = False
        logged["skipped"] = 1.0
        logged.setdefault("loss", None)
        err_console.print(f"[yellow]{recipe.command}: non-finite loss or gradient, optimizer step {step} dropped "
                          f"({win.skipped} so far)[/yellow]")
        if win.skipped > win.limit:
            raise MemcliError(f"{recipe.command}: {win.skipped} optimizer steps dropped for non-finite loss or "
                              f"gradients (training.max_skipped_steps={win.limit}); stopping, the last "
                              f"good state in {run_dir / 'states'} is kept")
    lrs = scheduler.get_last_lr()
    logged["lr"] = lrs[0]
    logged.update({f"lr_{nm}": lr for nm, lr in zip(names, lrs)} if len(names) > 1 else {})
    return logged


def _log(acc, metrics_path: Path, rec: dict) -> None:
    if acc.is_main_process:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if acc.trackers:
            acc.log({k: v for k, v in rec.items() if k != "step"}, step=rec["step"])


def _run(recipe: Recipe, acc, run_dir: Path) -> dict:
    cfg, t, cmd = recipe.cfg, recipe.cfg.training, recipe.command
    plan = make_plan(t, len(recipe.train_items), acc)
    recipe.plan(plan)
    live = [g for g in recipe.param_groups if g["params"]]
    names = [g["name"] for g in live]
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in live],
                                  weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, t.lr_scheduler.value, plan.total_steps, int(t.warmup_ratio * plan.total_steps))
    start_micro, resolved = _resume(recipe, acc, optimizer, scheduler, run_dir)
    model, optimizer = acc.prepare(recipe.model, optimizer)
    if acc.is_main_process and acc.trackers:
        acc.init_trackers(cmd.replace(" ", "_"), config=_tracker_config(dict(resolved, command=cmd)))
    metrics_path = _open_metrics(acc, run_dir, start_micro, t.accumulation_steps)
    history: list[dict] = []
    win = _Window(limit=t.max_skipped_steps)
    step = start_micro // t.accumulation_steps
    t0, tokens, eval_s = time.time(), 0, 0.0  # evaluations during training are not counted in s/step
    model.train()
    with progress(transient=False, info=True) as bar:
        bar_id = bar.add_task(cmd, total=plan.total_steps, completed=step, info="")
        for micro in range(start_micro, plan.total_micro):
            batch = _batch(recipe, plan, t.seed, micro, acc.device)
            _micro_step(recipe, acc, model, optimizer, batch, step, micro, win, run_dir)
            tokens += recipe.tokens_in(batch) * plan.world
            if not acc.sync_gradients:
                continue
            step += 1
            logged = _close_window(recipe, acc, scheduler, win, step, names, run_dir)
            logged["tokens_per_s"] = tokens / max(time.time() - t0, 1e-9)
            logged["peak_rss_mb"] = round(peak_rss_mb(), 1)
            recipe.after_step(step)
            if t.eval_interval and step % t.eval_interval == 0 and step < plan.total_steps and recipe.has_eval:
                e0 = time.time()
                model.eval()
                res = recipe.evaluate(step) if acc.is_main_process else {}
                model.train()
                eval_s += time.time() - e0
                logged.update({f"eval/{k}": v for k, v in res.items() if isinstance(v, (int, float))})
            history.append({"step": step, **logged})
            _log(acc, metrics_path, history[-1])
            line = step_line(logged, names, scheduler.get_last_lr())
            bar.update(bar_id, completed=step, info=f"{line} {logged['tokens_per_s']:.0f} tok/s")
            if t.save_interval and step % t.save_interval == 0 and step < plan.total_steps:
                recipe.sync_state()
                _save(acc, recipe, optimizer, scheduler, run_dir, step, micro + 1)
            if cfg.logging.log_interval and step % cfg.logging.log_interval == 0 and acc.is_main_process \
                    and not bar.live.is_started:
                err_console.print(f"step {step}/{plan.total_steps} {line}")
    done = max(1, step - start_micro // t.accumulation_steps)
    return _finish(recipe, acc, optimizer, scheduler, run_dir, plan, step, history,
                   dict(t0=t0, train_s=time.time() - t0 - eval_s, eval_s=eval_s, done=done))


def _finish(recipe: Recipe, acc, optimizer, scheduler, run_dir: Path, plan: Plan, step: int, history: list,
            clock: dict) -> dict:
    """The final evaluation and checkpoint (main process), the last resumable state, the trackers closed."""
    acc.wait_for_everyone()
    recipe.sync_state()
    final_eval = {}
    s_per_step = round(clock["train_s"] / clock["done"], 3)
    if acc.is_main_process:
        recipe.model.eval()
        e0 = time.time()
        final_eval = recipe.evaluate(step, final=True) if recipe.has_eval else {}
        info = dict(recipe.info(), step=step, command=recipe.command,
                    final_loss=history[-1]["loss"] if history else None, eval=final_eval, world_size=plan.world,
                    elapsed_s=round(time.time() - clock["t0"], 1), train_s=round(clock["train_s"], 1),
                    eval_s=round(clock["eval_s"] + time.time() - e0, 1), s_per_step=s_per_step,
                    peak_rss_mb=round(peak_rss_mb(), 1))
        recipe.save(run_dir, info)
    _save(acc, recipe, optimizer, scheduler, run_dir, step, plan.total_micro)
    if acc.trackers:
        acc.end_training()
    return {"steps": step, "history": history, "eval": final_eval, "run_dir": str(run_dir),
            "elapsed_s": time.time() - clock["t0"], "world_size": plan.world, "is_main": acc.is_main_process,
            "s_per_step": s_per_step, "peak_rss_mb": round(peak_rss_mb(), 1)}


def _any_rank(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum") > 0)


def _save(acc, recipe: Recipe, optimizer, scheduler, run_dir: Path, step: int, micro: int) -> None:
    try:
        _save_state(acc, recipe, optimizer, scheduler, run_dir, step, micro)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
            raise
        raise MemcliError(f"{run_dir}: could not write the state of step {step} ({e.strerror}); nothing half-written "
                          "was left, the previous state is kept: free space and rerun with training.resume=auto") from None


def _save_state(acc, recipe: Recipe, optimizer, scheduler, run_dir: Path, step: int, micro: int) -> None:
    acc.wait_for_everyone()
    if not acc.is_main_process or acc.state.deepspeed_plugin is not None:
        return  # ZeRO partitions the optimizer across ranks; resumable states are written for DDP / 1 process only
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    extra = {f"extra.{k}": v for k, v in recipe.extra_state().items()}
    S.save_state(run_dir, step, recipe.state_dict(), opt, scheduler, {"micro_step": micro}, extra)
