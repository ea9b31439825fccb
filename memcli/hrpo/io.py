"""HRPO checkpoints, each part loadable alone.

``<run>/thinking_residual/``  ``thinking_residual.safetensors`` + ``hrpo_config.json`` (gates, Lambda, projection)
``<run>/lora/``               a PEFT adapter (LoRA mode)
``<run>/backbone/``           the whole backbone + tokenizer as an HF directory (full mode)
``<run>/checkpoint.json``     kind "hrpo", finetuning method, evaluation; written last
"""

from __future__ import annotations

from pathlib import Path

from memcli.checkpoint import load_tensors, save_tensors
from memcli.errors import MemcliError
from memcli.hrpo.model import HrpoModel
from memcli.hrpo.residual import HrpoConfig
from memcli.records import atomic_dir, read_json_object, require_dir, write_json

KIND = "hrpo"


def save_hrpo(model: HrpoModel, tok, out: str | Path, method: str, info: dict | None = None) -> Path:
    from memcli.explicit.io import backbone_checksum

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bb = model.backbone
    with atomic_dir(out / "thinking_residual") as tmp:
        save_tensors(tmp / "thinking_residual.safetensors", model.residual_state_dict())
        cfg = model.cfg.to_dict()
        if method not in ("lora", "full"):
            cfg["backbone_checksum"] = backbone_checksum(bb)
        elif method == "lora":
            cfg["backbone_checksum"] = backbone_checksum(bb.get_base_model())
        write_json(tmp / "hrpo_config.json", cfg)
    if method == "lora":
        with atomic_dir(out / "lora") as tmp:
            bb.save_pretrained(str(tmp))
    elif method == "full":
        with atomic_dir(out / "backbone") as tmp:
            bb.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
    write_json(out / "checkpoint.json", dict({"kind": KIND, "finetuning_method": method}, **(info or {})))
    return out


def load_hrpo(path: str | Path, device: str = "cpu"):
    """-> (model, tokenizer, info) from a run directory."""
    from memcli.backbone import load_run_backbone

    d = require_dir(Path(path), "checkpoint directory")
    info = {}
    if (d / "checkpoint.json").is_file():
        info = read_json_object(d / "checkpoint.json", "checkpoint.json")
        if info.get("kind") != KIND:
            raise MemcliError(f"{d}/checkpoint.json: kind '{info.get('kind')}', expected '{KIND}'")
    rd = d / "thinking_residual"
    if not (rd / "hrpo_config.json").is_file():
        raise MemcliError(f"{d}: no thinking_residual/hrpo_config.json (expected the output of 'memcli train hrpo')")
    raw = read_json_object(rd / "hrpo_config.json", "hrpo config")
    want_sum = raw.pop("backbone_checksum", None)
    cfg = HrpoConfig.from_dict(raw, f"{rd}/hrpo_config.json")
    bb, tok, method = load_run_backbone(cfg.backbone, d / "backbone", d / "lora", want_sum, cfg.tokenizer_fingerprint,
                                        cfg.hidden_size, rd)
    model = HrpoModel(bb, cfg)
    model.load_residual_state_dict(load_tensors(rd / "thinking_residual.safetensors"), rd / "thinking_residual.safetensors")
    info = dict(info, finetuning_method=info.get("finetuning_method", method), loaded_as=method)
    return model.to(device).eval(), tok, info
