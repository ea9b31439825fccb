"""HIPPO's part of a run directory (memcli/rundir.py has the rest), loadable alone.

``<run>/hippo_model/``  encoder + gates (``hippo_model.safetensors``) and ``hippo_config.json``
``<run>/lora/`` or ``<run>/backbone/`` and ``checkpoint.json`` follow the rules every kind shares.
"""

from __future__ import annotations

from pathlib import Path

from memcli import rundir
from memcli.checkpoint import load_tensors
from memcli.errors import MemcliError
from memcli.kinds import HIPPO
from memcli.hippo.config import HippoConfig
from memcli.hippo.model import HippoModel
from memcli.records import read_json_object, require_dir

KIND = HIPPO
PART = "hippo_model"


def save_hippo(model: HippoModel, tok, run_dir: str | Path, method: str, info: dict | None = None) -> Path:
    return rundir.save_run(run_dir, KIND, PART, model.memory_state_dict(), "hippo_config.json", model.cfg.to_dict(),
                           model, tok, method, info)


def load_hippo(path: str | Path, device: str = "cpu"):
    """-> (model, tokenizer, info). ``path``: a run directory, or its ``hippo_model/`` alone (on the base backbone)."""
    d = require_dir(Path(path), "checkpoint directory")
    if (d / "hippo_config.json").is_file():  # the part alone: the base backbone it names, no run to check against
        hd, run, info = d, d, {}
    else:
        run, info = rundir.require_kind(d, KIND)
        hd = run / PART
        if not (hd / "hippo_config.json").is_file():
            raise MemcliError(f"{run}: no {PART}/hippo_config.json (expected the output of 'memcli train hippo')")
    cfg = HippoConfig.from_dict(read_json_object(hd / "hippo_config.json", "hippo config"), f"{hd}/hippo_config.json")
    if info:
        bb, tok, method = rundir.load_backbone_of(run, info, cfg.backbone)
    else:
        from memcli.backbone import load_backbone, tokenizer_fingerprint

        bb, tok = load_backbone(cfg.backbone)
        method = "frozen"
        if cfg.tokenizer_fingerprint and tokenizer_fingerprint(tok) != cfg.tokenizer_fingerprint:
            raise MemcliError(f"{hd}: tokenizer vocabulary differs from the one this memory was trained with")
    if bb.config.hidden_size != cfg.hidden_size:
        raise MemcliError(f"{hd}: hidden_size {cfg.hidden_size} does not match the backbone's ({bb.config.hidden_size})")
    model = HippoModel(bb, cfg)
    model.load_memory_state_dict(load_tensors(hd / "hippo_model.safetensors"), hd / "hippo_model.safetensors")
    info = dict(info, finetuning_method=info.get("finetuning_method", method), loaded_as=method)
    return model.to(device).eval(), tok, info


def open_run(path: str | Path, device: str = "cpu") -> dict:
    """The registry's loader (memcli/kinds.py): the parts of a :class:`memcli.runs.Run`."""
    model, tok, info = load_hippo(path, device)
    return {"model": model, "tok": tok, "info": info}
