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
from typing import Callable

import torch

from memcli.errors import MemcliError, RunAborted
from memcli.records import atomic_write_text

# memcli keeps rank-local buffers (bank, usage) out of DDP's sync on purpose: broadcast_buffers=False is the
# setting that does that in accelerate 1.15, whose deprecation notice points to a replacement that still syncs at init
warnings.filterwarnings("ignore", message=".*broadcast_buffers.* is deprecated", category=FutureWarning)
if not torch.cuda.is_available():
    _os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed otherwise warns on every import here
from memcli.console import err_console, progress
from memcli.training import state as S


@dataclass
class TrainTask:
    model: torch.nn.Module
    param_groups: list[dict]  # {"name", "params", "lr"}
    train_items: list
    collate: Callable[[list, int], dict]  # (items, optimizer step) -> batch
    step_fn: Callable[[torch.nn.Module, dict, int], tuple[torch.Tensor, dict]]
    trainable_state: Callable[[], dict[str, torch.Tensor]]
    load_trainable: Callable[[dict[str, torch.Tensor]], None]
    save_fn: Callable[[Path, dict], None]
    eval_fn: Callable[[int], dict] | None = None
    final_eval_fn: Callable[[int], dict] | None = None  # at the end (default: eval_fn)
    after_step: Callable[[int], None] | None = None
    extra_state: Callable[[], dict[str, torch.Tensor]] | None = None
    load_extra_state: Callable[[dict[str, torch.Tensor]], None] | None = None
    # collective: bring per-rank statistics (buffers DDP does not sync) together before saves; all ranks call it
    sync_state: Callable[[], None] | None = None
    tokens_in: Callable[[dict], int] = lambda b: int(b["attention_mask"].sum()) if "attention_mask" in b else 0
    info: dict = field(default_factory=dict)


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


def run_training(cfg, task: TrainTask, run_dir: Path, command: str) -> dict:
    t = cfg.training
    acc = make_accelerator(t, run_dir, _trackers(cfg.logging))  # refuses a bad launch before anything is written
    params = list(task.model.parameters())
    trainable = [p for g in task.param_groups for p in g["params"]]
    # final checkpoint (every weight, to be safe) + `keep` resumable states of weights and two AdamW moments each
    if acc.is_main_process:
        preflight_output(run_dir, _nbytes(params) + 2 * 3 * _nbytes(trainable))
    run_dir.mkdir(parents=True, exist_ok=True)
    if acc.num_processes == 1:
        return _run(cfg, task, run_dir, command, acc)
    prev = signal.signal(signal.SIGTERM, _on_sigterm)  # a launcher ends the survivors of a dead rank with SIGTERM
    try:
        return _run(cfg, task, run_dir, command, acc)
    except Exception as e:
        if isinstance(e, MemcliError) or not _dist_failure(e):
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        first = re.sub(r"^\[[^\]]*\]\s*", "", first).split(". ")[0][:160]  # gloo prefixes its source location
        raise RunAborted(f"{command}: rank {acc.process_index} lost contact with another rank ({first}); stopping. "
                         f"The last complete state in {run_dir / 'states'} is kept: rerun with training.resume=auto") from None
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


def _run(cfg, task: TrainTask, run_dir: Path, command: str, acc) -> dict:
    t = cfg.training
    world, rank = acc.num_processes, acc.process_index
    n = len(task.train_items)
    global_batch = t.batch_size * world
    per_epoch = max(1, n // global_batch)  # drop the ragged tail: every rank sees equal batches
    total_micro = per_epoch * t.epochs
    if t.max_steps is not None:
        total_micro = min(total_micro, t.max_steps * t.accumulation_steps) if t.max_steps > 0 else 0
    total_micro -= total_micro % t.accumulation_steps  # a ragged last window would never step
    total_opt = max(1, total_micro // t.accumulation_steps)
    warmup = int(t.warmup_ratio * total_opt)
    max_skipped, on_nonfinite = t.max_skipped_steps, t.on_nonfinite.value
    zero_stage = getattr(t, "zero_stage", 0)

    live = [g for g in task.param_groups if g["params"]]
    optimizer = torch.optim.AdamW([{"params": g["params"], "lr": g["lr"], "name": g["name"]} for g in live],
                                  weight_decay=t.weight_decay)
    scheduler = make_scheduler(optimizer, t.lr_scheduler.value, total_opt, warmup)
    start_micro = 0
    if t.resume and acc.state.deepspeed_plugin is not None:
        raise MemcliError("training.resume is not supported with DeepSpeed ZeRO (its optimizer state is partitioned "
                          "across ranks and memcli does not write it); resume a DDP run instead")
    st = S.find_state(run_dir, t.resume) if t.resume else None
    resolved = _save_config(cfg, run_dir, st is not None, write=st is None) if acc.is_main_process else {}
    if st is not None:
        meta, trainable, other, opt_sd = S.load_state(st)
        task.load_trainable(trainable)
        optimizer.load_state_dict(opt_sd)
        scheduler.load_state_dict(meta["scheduler"])
        S.set_rng_state(other, meta["rng"])
        if acc.is_main_process:
            _save_config(cfg, run_dir, False)
        if task.load_extra_state:
            task.load_extra_state({k[6:]: v for k, v in other.items() if k.startswith("extra.")})
        start_micro = int(meta["micro_step"])
        if acc.is_main_process:
            err_console.print(f"resumed from {st} (optimizer step {meta['step']}, micro-batch {start_micro})")
    model, optimizer = acc.prepare(task.model, optimizer)
    if acc.is_main_process and acc.trackers:
        acc.init_trackers(command.replace(" ", "_"), config=_tracker_config(dict(resolved, command=command)))
    metrics_path = run_dir / "metrics.jsonl"
    if acc.is_main_process and metrics_path.exists():
        # a fresh run starts a new log; a resumed one keeps the lines up to the state it resumed from
        keep_upto = start_micro // t.accumulation_steps
        lines = [ln for ln in metrics_path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if start_micro and json.loads(ln).get("step", 0) <= keep_upto]
        atomic_write_text(metrics_path, "".join(ln + "\n" for ln in kept))

    def order(epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(t.seed * 1000 + epoch)
        return torch.randperm(n, generator=g).tolist()

    history: list[dict] = []
    skipped, window_bad = 0, False
    opt_step = start_micro // t.accumulation_steps
    t0 = time.time()
    tokens = 0
    last_eval: dict = {}
    eval_s = 0.0  # time spent in evaluations during training (not counted in s/step)
    names = [g["name"] for g in live]
    model.train()
    with progress(transient=False, info=True) as bar:
        task_id = bar.add_task(command, total=total_opt, completed=opt_step, info="")
        running: dict[str, float] = {}
        for micro in range(start_micro, total_micro):
            epoch, j = divmod(micro, per_epoch)
            perm = order(epoch)
            ids = perm[j * global_batch: (j + 1) * global_batch][rank * t.batch_size: (rank + 1) * t.batch_size]
            batch = task.collate([task.train_items[i] for i in ids], micro)
            batch = {k: (v.to(acc.device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            with acc.accumulate(model):
                loss, mets = task.step_fn(model, batch, opt_step)
                bad = _any_rank(acc, not bool(torch.isfinite(loss.detach())))  # every rank takes the same branch
                if bad and on_nonfinite == "stop":
                    raise MemcliError(f"{command}: loss is {loss.item()} at optimizer step {opt_step + 1} (micro-batch "
                                      f"{micro}); stopping, the last good state in {run_dir / 'states'} is kept "
                                      "(training.on_nonfinite=skip drops such steps instead)")
                window_bad = window_bad or bad
                if not bad and loss.requires_grad:
                    acc.backward(loss)
                if acc.sync_gradients and not window_bad and not zero_stage:
                    if t.max_grad_norm:
                        gnorm = acc.clip_grad_norm_(model.parameters(), t.max_grad_norm)
                    else:
                        gnorm = torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
                    if gnorm is not None and not torch.isfinite(torch.as_tensor(gnorm)):
                        if on_nonfinite == "stop":
                            raise MemcliError(f"{command}: gradient norm is {float(gnorm)} at optimizer step "
                                              f"{opt_step + 1}; stopping, the last good state in {run_dir / 'states'} "
                                              "is kept (training.on_nonfinite=skip drops such steps instead)")
                        window_bad = True
                if not (acc.sync_gradients and window_bad):  # a bad window is dropped whole: no partial update
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            tokens += task.tokens_in(batch) * world
            if not bad:
                for k, v in dict(mets, loss=loss.detach()).items():
                    running[k] = running.get(k, 0.0) + float(v) / t.accumulation_steps
            if not acc.sync_gradients:
                continue
            with warnings.catch_warnings():
                # a dropped step still consumes its data and its place in the schedule; torch warns when the
                # first optimizer step is the one dropped, which is intended here
                warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*before.*optimizer.step", category=UserWarning)
                scheduler.step()
            opt_step += 1
            logged = {k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean")) for k, v in running.items()}
            running = {}
            if window_bad:
                skipped += 1
                window_bad = False
                logged["skipped"] = 1.0
                logged.setdefault("loss", None)
                err_console.print(f"[yellow]{command}: non-finite loss or gradient, optimizer step {opt_step} dropped "
                                  f"({skipped} so far)[/yellow]")
                if skipped > max_skipped:
                    raise MemcliError(f"{command}: {skipped} optimizer steps dropped for non-finite loss or gradients "
                                      f"(training.max_skipped_steps={max_skipped}); stopping, the last good "
                                      f"state in {run_dir / 'states'} is kept")
            lrs = scheduler.get_last_lr()
            logged["lr"] = lrs[0]
            logged.update({f"lr_{nm}": lr for nm, lr in zip(names, lrs)} if len(names) > 1 else {})
            el = time.time() - t0
            logged["tokens_per_s"] = tokens / max(el, 1e-9)
            logged["peak_rss_mb"] = round(peak_rss_mb(), 1)
            if task.after_step:
                task.after_step(opt_step)
            if t.eval_interval and opt_step % t.eval_interval == 0 and opt_step < total_opt and task.eval_fn:
                e0 = time.time()
                model.eval()
                last_eval = task.eval_fn(opt_step) if acc.is_main_process else {}
                model.train()
                eval_s += time.time() - e0
                logged.update({f"eval/{k}": v for k, v in last_eval.items() if isinstance(v, (int, float))})
            rec = {"step": opt_step, **logged}
            history.append(rec)
            if acc.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if acc.trackers:
                    acc.log({k: v for k, v in logged.items()}, step=opt_step)
            line = step_line(logged, names, lrs)
            bar.update(task_id, completed=opt_step, info=f"{line} {logged['tokens_per_s']:.0f} tok/s")
            if t.save_interval and opt_step % t.save_interval == 0 and opt_step < total_opt:
                if task.sync_state:
                    task.sync_state()
                _save(acc, task, optimizer, scheduler, run_dir, opt_step, micro + 1)
            if cfg.logging.log_interval and opt_step % cfg.logging.log_interval == 0 and acc.is_main_process \
                    and not bar.live.is_started:
                err_console.print(f"step {opt_step}/{total_opt} {line}")
    acc.wait_for_everyone()
    if task.sync_state:
        task.sync_state()
    train_s = time.time() - t0 - eval_s
    done = max(1, opt_step - start_micro // t.accumulation_steps)
    final_eval = {}
    if acc.is_main_process:
        model.eval()
        fe = task.final_eval_fn or task.eval_fn
        e0 = time.time()
        final_eval = fe(opt_step) if fe else {}
        info = dict(task.info, step=opt_step, command=command, final_loss=history[-1]["loss"] if history else None,
                    eval=final_eval, world_size=world, elapsed_s=round(time.time() - t0, 1),
                    train_s=round(train_s, 1), eval_s=round(eval_s + time.time() - e0, 1),
                    s_per_step=round(train_s / done, 3), peak_rss_mb=round(peak_rss_mb(), 1))
        task.save_fn(run_dir, info)
    _save(acc, task, optimizer, scheduler, run_dir, opt_step, total_micro)
    if acc.trackers:
        acc.end_training()
    return {"steps": opt_step, "history": history, "eval": final_eval, "run_dir": str(run_dir),
            "elapsed_s": time.time() - t0, "world_size": world, "is_main": acc.is_main_process,
            "s_per_step": round(train_s / done, 3),
            "peak_rss_mb": round(peak_rss_mb(), 1)}


def _any_rank(acc, flag: bool) -> bool:
    if acc.num_processes == 1:
        return flag
    return bool(acc.reduce(torch.tensor(float(flag), device=acc.device), "sum") > 0)


def _save(acc, task: TrainTask, optimizer, scheduler, run_dir: Path, step: int, micro: int) -> None:
    try:
        _save_state(acc, task, optimizer, scheduler, run_dir, step, micro)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EFBIG):
            raise
        raise MemcliError(f"{run_dir}: could not write the state of step {step} ({e.strerror}); nothing half-written "
                          "was left, the previous state is kept: free space and rerun with training.resume=auto") from None


def _save_state(acc, task: TrainTask, optimizer, scheduler, run_dir: Path, step: int, micro: int) -> None:
    acc.wait_for_everyone()
    if not acc.is_main_process or acc.state.deepspeed_plugin is not None:
        return  # ZeRO partitions the optimizer across ranks; resumable states are written for DDP / 1 process only
    opt = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
    extra = {f"extra.{k}": v for k, v in (task.extra_state() if task.extra_state else {}).items()}
    S.save_state(run_dir, step, task.trainable_state(), opt, scheduler, {"micro_step": micro}, extra)
