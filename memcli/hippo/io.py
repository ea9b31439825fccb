"""HIPPO checkpoints, in the seed's layout, each part loadable alone.

``<run>/hippo_model/``               encoder + gates (``hippo_model.safetensors``) and ``hippo_config.json``
``<run>/lora_finetuning/``           a PEFT adapter for the backbone (when trained with LoRA)
``<run>/full_parameter_finetuning/`` the whole backbone + tokenizer, an HF model directory (full mode)
``<run>/checkpoint.json``            kind, finetuning method, evaluation; written last
"""

from __future__ import annotations

from pathlib import Path

from memcli.checkpoint import load_tensors, save_tensors
from memcli.errors import MemcliError
from memcli.hippo.encoder import HippoConfig
from memcli.hippo.model import HippoModel
from memcli.records import atomic_dir, read_json_object, require_dir, write_json

KIND = "hippo"
PARTS = {"lora": "lora_finetuning", "full": "full_parameter_finetuning"}


def save_hippo(model: HippoModel, tok, out: str | Path, method: str, info: dict | None = None) -> Path:
    from memcli.explicit.io import backbone_checksum

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bb = model.backbone
    with atomic_dir(out / "hippo_model") as tmp:
        save_tensors(tmp / "hippo_model.safetensors", model.memory_state_dict())
        cfg = model.cfg.to_dict()
        if method not in PARTS:  # the base is re-loaded from its spec: record which weights it must have
            cfg["backbone_checksum"] = backbone_checksum(bb)
        write_json(tmp / "hippo_config.json", cfg)
    if method == "lora":
        with atomic_dir(out / PARTS["lora"]) as tmp:
            bb.save_pretrained(str(tmp))
    elif method == "full":
        with atomic_dir(out / PARTS["full"]) as tmp:
            bb.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
    write_json(out / "checkpoint.json", dict({"kind": KIND, "finetuning_method": method}, **(info or {})))
    return out


def _hippo_dir(d: Path) -> Path:
    if (d / "hippo_config.json").is_file():
        return d
    if (d / "hippo_model" / "hippo_config.json").is_file():
        return d / "hippo_model"
    raise MemcliError(f"{d}: no hippo_model/hippo_config.json (expected the output of 'memcli train hippo')")


def load_hippo(path: str | Path, device: str = "cpu"):
    """-> (model, tokenizer, info). ``path``: a run directory, or its ``hippo_model/`` alone (base backbone)."""
    from memcli.backbone import load_run_backbone

    d = require_dir(Path(path), "checkpoint directory")
    info = {}
    if (d / "checkpoint.json").is_file():
        info = read_json_object(d / "checkpoint.json", "checkpoint.json")
        if info.get("kind") != KIND:
            raise MemcliError(f"{d}/checkpoint.json: kind '{info.get('kind')}', expected '{KIND}'")
    hd = _hippo_dir(d)
    run = hd.parent if hd.name == "hippo_model" else None
    raw = read_json_object(hd / "hippo_config.json", "hippo config")
    want_sum = raw.pop("backbone_checksum", None)
    cfg = HippoConfig.from_dict(raw, f"{hd}/hippo_config.json")
    full = run / PARTS["full"] if run is not None else None
    lora = run / PARTS["lora"] if run is not None else None
    bb, tok, method = load_run_backbone(cfg.backbone, full, lora, want_sum, cfg.tokenizer_fingerprint,
                                        cfg.hidden_size, hd)
    model = HippoModel(bb, cfg)
    model.load_memory_state_dict(load_tensors(hd / "hippo_model.safetensors"), hd / "hippo_model.safetensors")
    info = dict(info, finetuning_method=info.get("finetuning_method", method), loaded_as=method)
    return model.to(device).eval(), tok, info
