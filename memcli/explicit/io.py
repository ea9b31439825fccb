"""Build an explicit-memory model from bank + keys, and save / load it in the run directory format.

The explicit kind's parts of a run directory (memcli/rundir.py has the rest)::

    memory/memory_config.json     MemoryConfig (sizes, layers, read, backbone spec, tokenizer fingerprint, index id)
    memory/memory.safetensors     gates (query, keys, statistics), MemoryNorm, GatedMemoryFusion of every memory layer
    memory/usage.safetensors      usage counts and last-updated step per entry (for inspect-memory)
    memory/entry_features.safetensors   hidden-state features of the entries (entry_key=hidden)
    bank/                         the token bank in build-cache format (edits are saved here)
"""

from __future__ import annotations

from pathlib import Path

import torch

from memcli import rundir
from memcli.checkpoint import check_shape, load_tensors, save_tensors
from memcli.data.bank import Bank, load_bank
from memcli.errors import MemcliError
from memcli.explicit import index
from memcli.kinds import EXPLICIT
from memcli.explicit.config import MemoryConfig
from memcli.explicit.model import MemoryAugmentedLM
from memcli.records import atomic_dir, read_json_object, require_dir, write_json

KIND = EXPLICIT
MEMORY, BANK = "memory", "bank"
EXACT_LIMIT = 16384  # banks up to this size use exact content-key search under retrieval=auto


def load_keys(keys_path: str | Path) -> tuple[torch.Tensor, dict]:
    d = require_dir(Path(keys_path), "keys directory (from build-keys)")
    meta = read_json_object(d / "meta.json", "keys meta.json")
    t = load_tensors(d / "keys.safetensors")
    if "keys" not in t:
        raise MemcliError(f"{d / 'keys.safetensors'}: no tensor 'keys', expected product keys")
    k = t["keys"]
    check_shape(d / "keys.safetensors", "keys", k, (2, None, None), "float")
    return k.float(), meta


def check_bank_keys(bank: Bank, keys: torch.Tensor, kmeta: dict, keys_path) -> None:
    S = keys.shape[1]
    if S * S != bank.knowledge_num:
        raise MemcliError(f"{keys_path}: keys have {S} x {S} cells but the bank has {bank.knowledge_num} entries")
    if kmeta.get("index_id") != bank.meta.get("index_id"):
        raise MemcliError(f"{keys_path}: keys were built for another row order than bank {bank.path} "
                          "(re-run build-keys on this cache)")


def resolve_retrieval(mode: str, knowledge_num: int) -> str:
    if mode == "auto":
        return "exact" if knowledge_num <= EXACT_LIMIT else "product"
    if mode not in ("exact", "product"):
        raise MemcliError(f"key 'model.retrieval' got {mode!r}, expected one of auto, exact, product")
    return mode


def separator_ids(tok) -> list[int]:
    """Token ids placed between prefix entries and the input: a newline."""
    return tok("\n", add_special_tokens=False)["input_ids"]


def build_model(backbone: str, cache_path, keys_path, seed: int = 0, trust_remote_code: bool = False,
                retrieval: str = "auto", **fields):
    """-> (model, tokenizer, bank). ``fields``: MemoryConfig fields by name (a recipe passes its ``model`` section's,
    :func:`memcli.config.model_fields`); sizes, ids and fingerprints come from the bank, keys and backbone.
    Hidden-state entry features are computed (and their statistics fitted) here."""
    from memcli.backbone import load_backbone

    bank = load_bank(cache_path)
    keys, kmeta = load_keys(keys_path)
    check_bank_keys(bank, keys, kmeta, keys_path)
    torch.manual_seed(seed)
    model, tok = load_backbone(backbone, trust_remote_code=trust_remote_code)
    fp = bank.check_tokenizer(tok, backbone)
    if int(bank.token_ids.max()) >= model.get_input_embeddings().weight.shape[0]:
        raise MemcliError(f"{cache_path}: bank holds token ids beyond the backbone's vocabulary")
    fields = {k: v for k, v in fields.items() if k not in ("knowledge_num", "knowledge_length", "knowledge_dim")}
    read = fields.get("read", "additive")
    cfg = MemoryConfig.from_dict(dict(
        fields, knowledge_num=bank.knowledge_num, knowledge_length=bank.knowledge_length,
        knowledge_dim=int(keys.shape[0] * keys.shape[2]), hidden_size=model.config.hidden_size,
        vocab_size=len(tok), pad_id=bank.pad_id, retrieval=resolve_retrieval(retrieval, bank.knowledge_num),
        prefix_separator=separator_ids(tok) if read == "prefix" else [],
        backbone=backbone, tokenizer_fingerprint=fp, index_id=bank.meta["index_id"]), "model config")
    mem = MemoryAugmentedLM(model, cfg, bank.token_ids, bank.valid_rows(), keys)
    mem.tok, mem.entry_records = tok, bank.entries
    mem.refresh_entry_features(fit=True)
    return mem, tok, bank


def _memory_parts(model: MemoryAugmentedLM):
    return (("gates", model.gates), ("mem_norms", model.mem_norms), ("fusions", model.fusions))


def memory_state_dict(model: MemoryAugmentedLM) -> dict[str, torch.Tensor]:
    out = {}
    for prefix, mod in _memory_parts(model):
        for k, v in mod.state_dict().items():
            out[f"{prefix}.{k}"] = v
    return out


def load_memory_state_dict(model: MemoryAugmentedLM, sd: dict[str, torch.Tensor], where) -> None:
    """Strict: every memory tensor present with the right shape, nothing extra."""
    own = memory_state_dict(model)
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    if missing or extra:
        raise MemcliError(f"{where}: memory weights do not match the config (missing {missing[:3]}, unexpected {extra[:3]})")
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise MemcliError(f"{where}: tensor '{k}' has shape {list(v.shape)}, expected {list(own[k].shape)}")
    for prefix, mod in _memory_parts(model):
        part = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        mod.load_state_dict(part, strict=True)


def _entry_feats(model: MemoryAugmentedLM) -> dict[str, torch.Tensor]:
    return {str(i): model.entry_feats(i) for i in model.cfg.memory_layers if model.entry_feats(i) is not None}


def write_memory_files(d: Path, model: MemoryAugmentedLM) -> None:
    """The memory part's files into directory ``d`` (callers stage it whole with ``atomic_dir``)."""
    save_tensors(d / "memory.safetensors", memory_state_dict(model))
    write_json(d / "memory_config.json", model.cfg.to_dict())
    save_tensors(d / "usage.safetensors", {"usage": model.usage, "last_updated": model.last_updated})
    if _entry_feats(model):
        save_tensors(d / "entry_features.safetensors", _entry_feats(model))
    if index.fitted(model):
        save_tensors(d / index.FILE, index.tensors(model))


def save_memory(model: MemoryAugmentedLM, tok, bank: Bank, run_dir: str | Path, info: dict,
                extra_parts=None) -> Path:
    """Write the run's parts (memory/, bank/, backbone/ or lora/), then checkpoint.json."""
    run_dir = Path(run_dir)
    rundir.begin(run_dir)
    with atomic_dir(run_dir / MEMORY) as tmp:
        write_memory_files(tmp, model)
    Bank(model.bank.detach().cpu(), bank.entries, dict(bank.meta)).save(run_dir / BANK)
    if extra_parts is not None:
        extra_parts(run_dir)
    info = dict(info, backbone=model.cfg.backbone,
                **rundir.save_backbone(run_dir, model.backbone, tok, model.cfg.finetuning_method))
    rundir.finish(run_dir, KIND, info)
    return run_dir


def load_memory(path: str | Path, device: str = "cpu"):
    """-> (model, tokenizer, bank, info) from a run directory. Strict: config, bank, weights, tokenizer agree."""
    d, info = rundir.require_kind(path, KIND)
    md = require_dir(d / MEMORY, "memory part (memory/)")
    cfg = MemoryConfig.from_dict(read_json_object(md / "memory_config.json", "memory config"), f"{md}/memory_config.json")
    bank = load_bank(d / BANK)
    if (bank.knowledge_num, bank.knowledge_length) != (cfg.knowledge_num, cfg.knowledge_length):
        raise MemcliError(f"{d / BANK}: bank is [{bank.knowledge_num}, {bank.knowledge_length}], memory config expects "
                          f"[{cfg.knowledge_num}, {cfg.knowledge_length}]")
    if bank.meta.get("tokenizer_fingerprint") != cfg.tokenizer_fingerprint:
        raise MemcliError(f"{d / BANK}: tokenised with another tokenizer than the memory was built with")
    model, tok, method = rundir.load_backbone_of(d, info, cfg.backbone)
    mem = MemoryAugmentedLM(model, cfg, bank.token_ids, bank.valid_rows())
    mem.tok, mem.entry_records = tok, bank.entries
    load_memory_state_dict(mem, load_tensors(md / "memory.safetensors"), md / "memory.safetensors")
    u = load_tensors(md / "usage.safetensors") if (md / "usage.safetensors").is_file() else {}
    if u.get("usage") is not None and u["usage"].shape == mem.usage.shape:
        mem.usage.copy_(u["usage"])
        mem.last_updated.copy_(u["last_updated"])
    if cfg.entry_key == "hidden":
        ef = load_tensors(md / "entry_features.safetensors") if (md / "entry_features.safetensors").is_file() else {}
        for i in cfg.memory_layers:
            if str(i) in ef and ef[str(i)].shape == mem.entry_feats(i).shape:
                mem.entry_feats(i).copy_(ef[str(i)])
            else:
                mem.refresh_entry_features()
    if index.fitted(mem):
        f = md / index.FILE
        if not f.is_file():
            raise MemcliError(f"{f}: missing; this run retrieves through a fitted index (run 'memcli memory index' on "
                              "it again, or 'memcli memory index --exact' to search exactly)")
        index.load(mem, load_tensors(f), f)
    return mem.to(device).eval(), tok, bank, dict(info, finetuning_method=info.get("finetuning_method", method))


def save_bank_edit(run_dir: str | Path, model: MemoryAugmentedLM, bank: Bank) -> None:
    """Persist an edited bank (and what follows from it) into the run directory."""
    d = Path(run_dir)
    Bank(model.bank.detach().cpu(), bank.entries, bank.meta).save(d / BANK)
    save_tensors(d / MEMORY / "usage.safetensors", {"usage": model.usage, "last_updated": model.last_updated})
    if _entry_feats(model):
        save_tensors(d / MEMORY / "entry_features.safetensors", _entry_feats(model))
    if index.fitted(model):
        save_tensors(d / MEMORY / index.FILE, index.tensors(model))


def open_run(path: str | Path, device: str = "cpu") -> dict:
    """The registry's loader (memcli/kinds.py): the parts of a :class:`memcli.runs.Run`."""
    model, tok, bank, info = load_memory(path, device)
    return {"model": model, "tok": tok, "bank": bank, "info": info}
