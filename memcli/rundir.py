"""One run directory format for every kind of memory, and the backbone rules they share.

::

    out/<run>/
      checkpoint.json   kind, step, evaluation, backbone spec, finetuning method, tokenizer fingerprint and,
                        when the backbone is not saved (frozen, LoRA), the checksum of its base weights;
                        written last: a run is complete (and loadable) only when it exists
      config.yaml       the resolved config of the run
      metrics.jsonl     one line per optimizer step; states/ resumable states
      backbone/         the whole backbone + tokenizer (finetuning_method=full)
      lora/             a PEFT adapter (finetuning_method=lora)
      memory/ bank/ router/       explicit memory    hippo_model/   HIPPO    thinking_residual/   HRPO
      cache/            explicit memory: entry features that ``memcli memory`` computed, by content (disposable)

Every part is written whole (temporary directory, then rename); a kind adds its own parts between
:func:`begin` and :func:`finish`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from memcli.errors import MemcliError
from memcli.kinds import KINDS, get as get_kind
from memcli.records import atomic_dir, read_json_object, require_dir, write_json

INFO = "checkpoint.json"
CONFIG = "config.yaml"
FULL, LORA = "backbone", "lora"


def begin(run_dir: Path) -> None:
    """A save starts: the run stops being loadable until :func:`finish` writes checkpoint.json again."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / INFO).unlink(missing_ok=True)


def finish(run_dir: Path, kind: str, info: dict) -> None:
    write_json(run_dir / INFO, dict({"kind": kind}, **info))


def save_run(run_dir: str | Path, kind: str, part: str, tensors: dict, config_name: str, config: dict, model, tok,
             method: str, info: dict | None = None) -> Path:
    """A kind whose own part is one directory (``<part>/<part>.safetensors`` + its config JSON) saves through this:
    the part, what the run changed of the backbone, then checkpoint.json."""
    from memcli.checkpoint import save_tensors

    run_dir = Path(run_dir)
    begin(run_dir)
    with atomic_dir(run_dir / part) as tmp:
        save_tensors(tmp / f"{part}.safetensors", tensors)
        write_json(tmp / config_name, config)
    info = dict(info or {}, backbone=config["backbone"], **save_backbone(run_dir, model.backbone, tok, method))
    finish(run_dir, kind, info)
    return run_dir


def save_backbone(run_dir: Path, backbone, tok, method: str) -> dict:
    """Save what the run changed of the backbone; returns the fields checkpoint.json records about it."""
    from memcli.backbone import backbone_checksum, tokenizer_fingerprint

    out = {"finetuning_method": method, "tokenizer_fingerprint": tokenizer_fingerprint(tok)}
    for name in (FULL, LORA):  # parts of an earlier run in the same directory would contradict this one
        if (run_dir / name).exists() and name != {"full": FULL, "lora": LORA}.get(method):
            shutil.rmtree(run_dir / name)
    if method == "full":
        with atomic_dir(run_dir / FULL) as tmp:
            backbone.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
        return out
    if method == "lora":
        with atomic_dir(run_dir / LORA) as tmp:
            backbone.save_pretrained(str(tmp))
        out["backbone_checksum"] = backbone_checksum(backbone.get_base_model())
        return out
    out["backbone_checksum"] = backbone_checksum(backbone)
    return out


def load_backbone_of(run_dir: Path, info: dict, spec: str, where: Path | None = None):
    """The backbone a run was trained on -> ``(model, tokenizer, method)``.

    Full runs carry their backbone; otherwise the base is re-loaded from ``spec``, its weights checked
    against the recorded checksum, and the LoRA adapter applied when the run has one.
    """
    from memcli.backbone import backbone_checksum, load_backbone, same_checksum, tokenizer_fingerprint

    where = where or run_dir
    if (run_dir / FULL).is_dir():
        bb, tok = load_backbone(str(run_dir / FULL))
        method = "full"
    else:
        bb, tok = load_backbone(spec)
        method = "frozen"
        want = info.get("backbone_checksum")
        if want is not None:
            got = backbone_checksum(bb)
            if not same_checksum(got, want):
                raise MemcliError(f"{where}: backbone '{spec}' does not have the weights this run was trained on "
                                  f"(checksum {got:.6g}, expected {want:.6g})")
        if (run_dir / LORA).is_dir():
            from peft import PeftModel

            bb = PeftModel.from_pretrained(bb, str(run_dir / LORA))
            method = "lora"
    fp = info.get("tokenizer_fingerprint")
    if fp and tokenizer_fingerprint(tok) != fp:
        raise MemcliError(f"{where}: tokenizer vocabulary differs from the one this run was trained with")
    return bb, tok, method


def read_info(path: str | Path) -> tuple[Path, dict]:
    """``(run_dir, checkpoint.json)`` of a run directory."""
    d = require_dir(Path(path), "run directory")
    if not (d / INFO).is_file():
        if any(d.glob("*.json")) or (d / "states").is_dir():
            raise MemcliError(f"{d}: no {INFO} (an unfinished run, or not a run directory written by 'memcli train')")
        raise MemcliError(f"{d}: no {INFO} (expected a run directory written by 'memcli train')")
    info = read_json_object(d / INFO, INFO)
    if info.get("kind") not in KINDS:
        raise MemcliError(f"{d / INFO}: unknown kind '{info.get('kind')}', expected one of {', '.join(KINDS)}")
    return d, info


def kind_of(path: str | Path) -> str:
    return read_info(path)[1]["kind"]


def require_kind(path: str | Path, kind: str) -> tuple[Path, dict]:
    d, info = read_info(path)
    if info["kind"] != kind:
        raise MemcliError(f"{d}/{INFO}: kind '{info['kind']}', expected '{kind}' (a run of 'memcli train "
                          f"{get_kind(kind).train_command}')")
    return d, info


def newest_run(out_dir: str | Path = "out", kind: str | None = None) -> Path:
    """The most recently finished run under ``out_dir`` (of ``kind`` when given)."""
    root = Path(out_dir)
    cands = []
    for p in root.glob(f"*/{INFO}") if root.is_dir() else []:
        try:
            k = json.loads(p.read_text()).get("kind")
        except (OSError, ValueError):
            continue
        if k in KINDS and (kind is None or k == kind):
            cands.append(p)
    if not cands:
        k = get_kind(kind) if kind else next(iter(KINDS.values()))
        what = k.label if kind else "run"
        raise MemcliError(f"{root}: no {what} found (train one with 'memcli train {k.train_command}', or pass --model-path)")
    return max(cands, key=lambda p: p.stat().st_mtime).parent


def read_config(run_dir: str | Path) -> dict:
    """The run's resolved config (config.yaml), ``{}`` when it has none (a part saved alone)."""
    import yaml

    p = Path(run_dir) / CONFIG
    if not p.is_file():
        return {}
    try:
        return yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError:
        raise MemcliError(f"{p}: invalid YAML (expected the config a 'memcli train' run wrote)") from None
