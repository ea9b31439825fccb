"""HRPO's part of a run directory (memcli/rundir.py has the rest).

``<run>/thinking_residual/``  ``thinking_residual.safetensors`` + ``hrpo_config.json`` (gates, Lambda, projection)
``<run>/lora/`` or ``<run>/backbone/`` and ``checkpoint.json`` follow the rules every kind shares.
"""

from __future__ import annotations

from pathlib import Path

from memcli import rundir
from memcli.checkpoint import load_tensors
from memcli.errors import MemcliError
from memcli.kinds import HRPO
from memcli.hrpo.model import HrpoModel
from memcli.hrpo.config import HrpoConfig
from memcli.records import read_json_object

KIND = HRPO
PART, CONFIG = "thinking_residual", "hrpo_config.json"


def save_hrpo(model: HrpoModel, tok, run_dir: str | Path, method: str, info: dict | None = None) -> Path:
    return rundir.save_run(run_dir, KIND, PART, model.residual_state_dict(), CONFIG, model.cfg.to_dict(), model, tok,
                           method, info)


def load_hrpo(path: str | Path, device: str = "cpu"):
    """-> (model, tokenizer, info) from a run directory."""
    d, info = rundir.require_kind(path, KIND)
    rd = d / PART
    if not (rd / "hrpo_config.json").is_file():
        raise MemcliError(f"{d}: no {PART}/hrpo_config.json (expected the output of 'memcli train hrpo')")
    raw = read_json_object(rd / "hrpo_config.json", "hrpo config")
    raw.setdefault("hybrid", bool(info.get("hybrid", True)))  # runs saved before the flag moved into hrpo_config
    if "thinking_temperature" not in raw:  # runs saved before it was recorded: their rollouts' temperature
        raw["thinking_temperature"] = (rundir.read_config(d).get("training") or {}).get("temperature")
    cfg = HrpoConfig.from_dict(raw, f"{rd}/hrpo_config.json")
    bb, tok, method = rundir.load_backbone_of(d, info, cfg.backbone)
    if bb.config.hidden_size != cfg.hidden_size:
        raise MemcliError(f"{rd}: hidden_size {cfg.hidden_size} does not match the backbone's ({bb.config.hidden_size})")
    model = HrpoModel(bb, cfg)
    model.load_residual_state_dict(load_tensors(rd / "thinking_residual.safetensors"), rd / "thinking_residual.safetensors")
    tok.padding_side = "left"
    info = dict(info, finetuning_method=info.get("finetuning_method", method), loaded_as=method)
    return model.to(device).eval(), tok, info


def open_run(path: str | Path, device: str = "cpu") -> dict:
    """The registry's loader (memcli/kinds.py): the parts of a :class:`memcli.runs.Run`."""
    model, tok, info = load_hrpo(path, device)
    return {"model": model, "tok": tok, "info": info}
