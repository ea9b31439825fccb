"""Build an explicit-memory model from bank + keys, and save / load it as a checkpoint directory.

Checkpoint layout (memory saved apart from the backbone, like a PEFT adapter)::

    memory_config.json        MemoryConfig (sizes, layers, backbone spec, tokenizer fingerprint, index id)
    memory.safetensors        gates (query, keys), MemoryNorm, GatedMemoryFusion of every memory layer
    usage.safetensors         usage counts and last-updated step per entry (for inspect-memory)
    bank/                     the token bank in build-cache format (edits are saved here)
    backbone/                 full weights + tokenizer, when the backbone was trained in full
    lora/                     PEFT adapter, when it was trained with LoRA
    checkpoint.json           kind, step, metrics; written last
"""

from __future__ import annotations

from pathlib import Path

import torch

from memcli.checkpoint import check_shape, load_tensors, save_tensors
from memcli.data.bank import Bank, load_bank, tokenizer_fingerprint
from memcli.errors import MemcliError
from memcli.explicit.model import MemoryAugmentedLM, MemoryConfig
from memcli.records import atomic_dir, read_json_object, require_dir, write_json

KIND = "explicit-memory"


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


EXACT_LIMIT = 16384  # banks up to this size use exact content-key search under retrieval=auto


def resolve_retrieval(mode: str, knowledge_num: int) -> str:
    if mode == "auto":
        return "exact" if knowledge_num <= EXACT_LIMIT else "product"
    if mode not in ("exact", "product"):
        raise MemcliError(f"key 'model.retrieval' got {mode!r}, expected one of auto, exact, product")
    return mode


def build_model(backbone: str, cache_path, keys_path, memory_layers=(1, 3), num_candidates: int = 16,
                topk_per_half: int | None = None, gate_rank: int = 0, fusion_rank: int = 0,
                freeze_keys: bool = False, mode: str = "full", seed: int = 0, rerank: bool = True,
                retrieval: str = "auto", trust_remote_code: bool = False):
    from memcli.backbone import load_backbone

    bank = load_bank(cache_path)
    keys, kmeta = load_keys(keys_path)
    check_bank_keys(bank, keys, kmeta, keys_path)
    torch.manual_seed(seed)
    model, tok = load_backbone(backbone, trust_remote_code=trust_remote_code)
    fp = bank.check_tokenizer(tok, backbone)
    if int(bank.token_ids.max()) >= model.get_input_embeddings().weight.shape[0]:
        raise MemcliError(f"{cache_path}: bank holds token ids beyond the backbone's vocabulary")
    cfg = MemoryConfig(
        knowledge_num=bank.knowledge_num, knowledge_length=bank.knowledge_length,
        knowledge_dim=int(keys.shape[0] * keys.shape[2]), hidden_size=model.config.hidden_size,
        vocab_size=len(tok), pad_id=bank.pad_id, memory_layers=list(memory_layers),
        num_candidates=num_candidates, topk_per_half=topk_per_half, gate_rank=gate_rank, fusion_rank=fusion_rank,
        freeze_keys=freeze_keys, rerank=rerank, retrieval=resolve_retrieval(retrieval, bank.knowledge_num),
        backbone=backbone, mode=mode, tokenizer_fingerprint=fp,
        index_id=bank.meta["index_id"],
    )
    mem = MemoryAugmentedLM(model, cfg, bank.token_ids, bank.valid_rows(), keys)
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
    # checkpoints written before 0.1.0 stored the gate temperature as a 0-d tensor
    sd = {k: (v.reshape(1) if k.endswith(".log_scale") and v.dim() == 0 else v) for k, v in sd.items()}
    for k, v in sd.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise MemcliError(f"{where}: tensor '{k}' has shape {list(v.shape)}, expected {list(own[k].shape)}")
    for prefix, mod in _memory_parts(model):
        part = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
        mod.load_state_dict(part, strict=True)


def backbone_checksum(backbone) -> float:
    """Sum of the base weights (LoRA adapters excluded): catches a different model behind the same spec."""
    total = 0.0
    for n, p in backbone.named_parameters():
        if "lora_" not in n:
            total += float(p.detach().double().sum())
    return total


def save_checkpoint(model: MemoryAugmentedLM, tok, entries: list[dict], bank_meta: dict, out: str | Path,
                    info: dict | None = None) -> Path:
    """Write the whole checkpoint into a temp directory, then swap it in (never half-written)."""
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_tensors(tmp / "memory.safetensors", memory_state_dict(model))
        write_json(tmp / "memory_config.json", model.cfg.to_dict())
        save_tensors(tmp / "usage.safetensors", {"usage": model.usage, "last_updated": model.last_updated})
        Bank(model.bank.detach().cpu(), entries, dict(bank_meta)).save(tmp / "bank")
        bb = model.backbone
        info = dict(info or {})
        if hasattr(bb, "peft_config"):  # a PeftModel: save the adapter only
            bb.save_pretrained(str(tmp / "lora"))
        elif model.cfg.mode == "full":
            bb.save_pretrained(str(tmp / "backbone"))
            tok.save_pretrained(str(tmp / "backbone"))
        if not (tmp / "backbone").is_dir():  # the base is re-loaded from its spec: record what it must be
            info["backbone_checksum"] = backbone_checksum(bb)
        write_json(tmp / "checkpoint.json", dict({"kind": KIND}, **info))
    return out


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """-> (model, tokenizer, bank, info). Strict: config, bank, weights and tokenizer must agree."""
    from memcli.backbone import load_backbone

    d = require_dir(Path(path), "checkpoint directory")
    if not (d / "checkpoint.json").exists() and (d / "model" / "checkpoint.json").exists():
        d = d / "model"  # a run directory: its exported model
    info = read_json_object(d / "checkpoint.json", "checkpoint.json")
    if info.get("kind") != KIND:
        raise MemcliError(f"{d}/checkpoint.json: kind '{info.get('kind')}', expected '{KIND}'")
    cfg = MemoryConfig.from_dict(read_json_object(d / "memory_config.json", "memory config"), f"{d}/memory_config.json")
    bank = load_bank(d / "bank")
    if (bank.knowledge_num, bank.knowledge_length) != (cfg.knowledge_num, cfg.knowledge_length):
        raise MemcliError(f"{d}/bank: bank is [{bank.knowledge_num}, {bank.knowledge_length}], memory config expects "
                          f"[{cfg.knowledge_num}, {cfg.knowledge_length}]")
    if (d / "backbone").is_dir():
        model, tok = load_backbone(str(d / "backbone"))
    else:
        model, tok = load_backbone(cfg.backbone)
    if tokenizer_fingerprint(tok) != cfg.tokenizer_fingerprint or bank.meta.get("tokenizer_fingerprint") != cfg.tokenizer_fingerprint:
        raise MemcliError(f"{d}: tokenizer vocabulary differs from the one the memory was built with")
    want = info.get("backbone_checksum")
    if want is not None and not (d / "backbone").is_dir():
        got = backbone_checksum(model)
        if abs(got - want) > 1e-6 * max(1.0, abs(want)):
            raise MemcliError(f"{d}: backbone '{cfg.backbone}' does not have the weights this memory was trained on "
                              f"(checksum {got:.6g}, expected {want:.6g})")
    if (d / "lora").is_dir():
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(d / "lora"))
    mem = MemoryAugmentedLM(model, cfg, bank.token_ids, bank.valid_rows())
    load_memory_state_dict(mem, load_tensors(d / "memory.safetensors"), d / "memory.safetensors")
    if (d / "usage.safetensors").is_file():
        u = load_tensors(d / "usage.safetensors")
        if u.get("usage") is not None and u["usage"].shape == mem.usage.shape:
            mem.usage.copy_(u["usage"])
            mem.last_updated.copy_(u["last_updated"])
    return mem.to(device).eval(), tok, bank, info


def edit_entry(model: MemoryAugmentedLM, bank: Bank, tok, row: int, text: str, step: int = 0) -> tuple[str, str]:
    """Replace entry ``row`` with ``text`` (re-tokenised); returns (before, after) decoded."""
    before = bank.decode(tok, [row])[0] if 0 <= row < bank.knowledge_num else ""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise MemcliError("new entry text is empty")
    model.set_entry(row, ids, step)
    bank.token_ids[row] = model.bank[row].to(bank.token_ids.dtype).cpu()
    e = bank.entries[row]
    was_padding = e.get("uuid") is None
    e.update({"sentence": text, "uuid": e.get("uuid") or f"edited-{row}"})
    if was_padding:  # a padding row became an entry: the row fingerprint changes with it
        from memcli.data.bank import index_id

        bank.meta["index_id"] = index_id(bank.uuids())
    after = bank.decode(tok, [row])[0]
    return before, after


def save_bank_edit(ckpt: str | Path, model: MemoryAugmentedLM, bank: Bank) -> None:
    """Persist an edited bank into ``<ckpt>/bank`` atomically."""
    Bank(model.bank.detach().cpu(), bank.entries, bank.meta).save(Path(ckpt) / "bank")
    save_tensors(Path(ckpt) / "usage.safetensors", {"usage": model.usage, "last_updated": model.last_updated})


