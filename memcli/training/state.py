"""Resumable training state without pickle: tensors in safetensors, everything else in JSON.

A state directory holds the trainable weights, the optimizer (flattened), the scheduler, the data
position and every RNG; ``latest.json`` beside the states is replaced last, so a kill -9 at any
moment leaves either the old or the new state, never half of one.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import numpy as np
import torch

from memcli.checkpoint import load_tensors, save_tensors
from memcli.errors import MemcliError
from memcli.records import atomic_dir, read_json_object, write_json


def _flatten_optimizer(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for idx, st in sd["state"].items():
        meta["state"][str(idx)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{idx}.{k}"] = v
                meta["state"][str(idx)][k] = "tensor"
            else:
                meta["state"][str(idx)][k] = v
    return tensors, meta


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state = {}
    for idx, st in meta["state"].items():
        state[int(idx)] = {k: (tensors[f"opt.{idx}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    py = random.getstate()
    np_state = np.random.get_state()
    tensors = {"rng.torch": torch.get_rng_state(), "rng.numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    meta = {"python": [py[0], list(py[1]), py[2]], "numpy": [np_state[0], int(np_state[2]), int(np_state[3]),
                                                             float(np_state[4])]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"].to(torch.uint8))
    p = meta["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    n = meta["numpy"]
    np.random.set_state((n[0], tensors["rng.numpy_keys"].numpy().astype(np.uint32), n[1], n[2], n[3]))


def save_state(run_dir: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler, extra: dict,
               extra_tensors: dict[str, torch.Tensor] | None = None, keep: int = 2) -> Path:
    states = run_dir / "states"
    target = states / f"step-{step:08d}"
    opt_t, opt_m = _flatten_optimizer(optimizer.state_dict())
    rng_t, rng_m = rng_state()
    with atomic_dir(target) as tmp:
        save_tensors(tmp / "trainable.safetensors", trainable)
        save_tensors(tmp / "optimizer.safetensors", dict(opt_t, **rng_t, **(extra_tensors or {})))
        write_json(tmp / "state.json", {"step": step, "optimizer": opt_m, "scheduler": scheduler.state_dict(),
                                        "rng": rng_m, **extra})
    write_json(states / "latest.json", {"state": target.name, "step": step})  # pointer moves last
    old = sorted(p for p in states.glob("step-*") if p.is_dir())
    for p in old[:-keep]:
        import shutil

        shutil.rmtree(p, ignore_errors=True)
    return target


def _follow(ptr: Path) -> Path:
    """The state ``latest.json`` points to; the name must be a ``step-NNNNNNNN`` sibling (no path may escape)."""
    name = read_json_object(ptr, "latest.json").get("state")
    if not isinstance(name, str) or not re.fullmatch(r"step-\d{8}", name):
        raise MemcliError(f"{ptr}: field 'state' is {name!r}, expected a state name like 'step-00000012'")
    target = ptr.parent / name
    if not (target / "state.json").is_file():
        raise MemcliError(f"{ptr}: points to {name}, which has no state.json (expected a complete state directory)")
    return target


def find_state(run_dir: Path, resume: str) -> Path | None:
    """``auto``: the latest state of this run, if any; else a path to a state directory."""
    if resume == "auto":
        ptr = run_dir / "states" / "latest.json"
        if not ptr.is_file():
            return None
        return _follow(ptr)
    p = Path(resume)
    if (p / "states" / "latest.json").is_file():
        return _follow(p / "states" / "latest.json")
    if not (p / "state.json").is_file():
        raise MemcliError(f"training.resume={resume}: no state.json there (expected 'auto', a run dir or a state dir)")
    return p


def load_state(path: Path) -> tuple[dict, dict, dict, dict]:
    meta = read_json_object(path / "state.json", "training state")
    train = load_tensors(path / "trainable.safetensors")
    other = load_tensors(path / "optimizer.safetensors")
    return meta, train, other, _unflatten_optimizer(other, meta["optimizer"])


def dump(obj) -> str:
    return json.dumps(obj)


def trainable_io(named: dict[str, torch.Tensor]):
    """(state_fn, load_fn) that snapshot / restore the named trainable tensors for resumable states."""

    def state() -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p in named.items()}

    def load(sd: dict[str, torch.Tensor]) -> None:
        from memcli.errors import MemcliError

        missing = set(named) - set(sd)
        if missing:
            raise MemcliError(f"resume state lacks {len(missing)} trainable tensors (e.g. {sorted(missing)[0]})")
        with torch.no_grad():
            for n, p in named.items():
                p.copy_(sd[n])

    return state, load

