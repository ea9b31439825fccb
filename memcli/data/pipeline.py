"""The data commands as plain functions (the CLI is a thin layer over these)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from memcli import records
from memcli.checkpoint import save_tensors
from memcli.data import keys as K
from memcli.data.bank import Bank, build_bank, load_bank
from memcli.data.convert import omcq_to_conversations
from memcli.data.dialog import generate_dialogs
from memcli.data.knowledge import build_knowledge, synthetic_facts, trex_facts
from memcli.errors import MemcliError
from memcli.records import atomic_dir, write_json, write_jsonl

KB_FILE = "sentence_trex_data.json"
OMCQ_FILE = "omcq_trex_data.json"
OMCQ_TRAIN = "omcq_train.json"
OMCQ_VAL = "omcq_val.json"
KEYS_FILE = "keys.safetensors"


def gen_knowledge(out: str | Path, num_facts: int = 1024, seed: int = 0, heldout_fraction: float = 0.2,
                  trex: str | Path | None = None, relations: list[str] | None = None) -> dict:
    """Write the knowledge base, all questions and the train / held-out question split into ``out``."""
    if trex is not None:
        facts, pools = trex_facts(trex, num_facts, seed, relations)
    else:
        facts, pools = synthetic_facts(num_facts, seed)
    kb = build_knowledge(facts, pools, seed, heldout_fraction)
    with atomic_dir(Path(out) / ".gen-knowledge") as tmp:
        write_json(tmp / KB_FILE, kb["knowledge"], indent=None)
        write_json(tmp / OMCQ_FILE, kb["omcq"], indent=None)
        write_json(tmp / OMCQ_TRAIN, kb["omcq_train"], indent=None)
        write_json(tmp / OMCQ_VAL, kb["omcq_val"], indent=None)
    _move_up(Path(out) / ".gen-knowledge")
    return {"facts": len(kb["knowledge"]), "questions": len(kb["omcq"]), "train_questions": len(kb["omcq_train"]),
            "heldout_questions": len(kb["omcq_val"]), "skipped_no_distractors": kb["skipped"],
            "source": "trex" if trex else "synthetic"}


def _move_up(staged: Path) -> None:
    """Move the files of a completed staging directory into its parent (each rename is atomic)."""
    import os
    import shutil

    for f in sorted(staged.iterdir()):
        os.replace(f, staged.parent / f.name)
    shutil.rmtree(staged, ignore_errors=True)


def gen_dialog(out: str | Path, num_train: int = 2000, num_val: int = 200, seed: int = 0, turns: int = 6,
               min_distance: int = 2, facts_per_dialog: int = 2, name_pool: int = 0,
               min_turns: int | None = None) -> dict:
    """Train dialogs (lengths in [min_turns, turns] when given) and validation dialogs of ``turns`` turns."""
    train = generate_dialogs(num_train, seed, turns, min_distance, facts_per_dialog, name_pool=name_pool,
                             min_turns=min_turns)
    val = generate_dialogs(num_val, seed + 10_000, turns, min_distance, facts_per_dialog, name_pool=name_pool)
    with atomic_dir(Path(out) / ".gen-dialog") as tmp:
        write_jsonl(tmp / "data_train.jsonl", train)
        write_jsonl(tmp / "data_val.jsonl", val)
    _move_up(Path(out) / ".gen-dialog")
    return {"train": len(train), "val": len(val), "turns": turns, "min_distance": min_distance, "name_pool": name_pool,
            "min_turns": min_turns if min_turns is not None else turns}


def convert_omcq(input_path: str | Path, output_path: str | Path) -> dict:
    items = records.read_json_list(input_path, records.OMCQ)
    rows, rep = omcq_to_conversations(items)
    if not rows:
        raise MemcliError(f"{input_path}: every item has an empty field; nothing to write")
    records.write_jsonl(output_path, rows)
    return {"items": rep.total, "written": rep.written, "skipped_empty": rep.skipped_empty}


def build_cache(knowledge_path: str | Path, out: str | Path, tokenizer: str = "tiny", knowledge_length: int = 16,
                knowledge_num: int | None = None) -> dict:
    from memcli.backbone import load_tokenizer

    kb = records.read_json_list(knowledge_path, records.KNOWLEDGE)
    tok = load_tokenizer(tokenizer)
    bank, rep = build_bank(kb, tok, tokenizer, knowledge_length, knowledge_num)
    bank.save(out)
    return {"knowledge_num": bank.knowledge_num, "knowledge_length": bank.knowledge_length, **rep}


@dataclass
class KeysResult:
    keys: torch.Tensor
    bank: Bank
    entry_emb: torch.Tensor
    meta: dict


def _first_user(row: dict) -> str:
    return next(m["content"] for m in row["conversations"] if m["role"] == "user")


def build_keys(cache: str | Path, out: str | Path, embedder: str = "backbone", backbone: str = "tiny",
               sft: str | Path | None = None, sft_val: str | Path | None = None, top_k: int = 8, seed: int = 0, recall_k: tuple[int, ...] = (1, 16)) -> dict:
    """Product keys over the bank, the bank reordered into cell order, labels for SFT files."""
    bank = load_bank(cache)
    named = {"train_labeled.jsonl": sft, "val_labeled.jsonl": sft_val}
    sft_rows = {name: records.read_jsonl(p, records.CONVERSATION) for name, p in named.items() if p}  # validate first
    if top_k < 1:
        raise MemcliError(f"--top-k got {top_k}, expected a positive integer")
    valid = bank.valid_rows()
    if embedder == "backbone":
        from memcli.backbone import load_backbone

        model, tok = load_backbone(backbone)
        bank.check_tokenizer(tok, backbone)
        emb = K.backbone_entry_embeddings(model, bank.token_ids, bank.pad_id)

        def embed_texts(texts):
            return K.backbone_text_embeddings(model, tok, texts)
    else:
        st = K.sentence_embedder(embedder)
        dim_fn = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
        emb = torch.zeros(bank.knowledge_num, dim_fn())
        idx = torch.nonzero(valid).flatten()
        emb[idx] = K.st_embed(st, [bank.entries[i]["sentence"] for i in idx.tolist()])

        def embed_texts(texts):
            return K.st_embed(st, texts)

    # centre: pooled embeddings share a large common component (frequent tokens) that carries no identity
    emb = torch.where(valid.unsqueeze(1), emb - emb[valid].mean(0, keepdim=True), emb)
    keys, cell = K.build_product_keys(emb, valid, seed)
    order = torch.argsort(cell).tolist()
    new_bank = bank.permuted(order)
    new_emb = emb[torch.as_tensor(order)]
    new_valid = new_bank.valid_rows()
    N = bank.knowledge_num
    ours = {k: K.self_recall(new_emb, keys, torch.arange(N), new_valid, k) for k in recall_k}
    ek, ecell, owner = K.explicitlm_cells(emb, valid, seed)
    seed_recipe = {k: K.self_recall(emb, ek, ecell, valid, k, owner=owner) for k in recall_k}
    collided = int(valid.sum()) - int((owner >= 0).sum())

    labels = {}
    row_of = new_bank.row_of_uuid()
    for name, rows in sft_rows.items():
        queries = [_first_user(r) for r in rows]
        q_emb = embed_texts([q.split("\n")[0] for q in queries])
        true_rows = [row_of.get(r.get("uuid")) if r.get("uuid") else None for r in rows]
        idx, sc = K.label_queries(q_emb, new_emb, new_valid, top_k, true_rows)
        labels[name] = [dict({"query": q, "target_indices": i, "target_scores": s}, **({"uuid": r["uuid"]} if r.get("uuid") else {}))
                     for q, i, s, r in zip(queries, idx, sc, rows)]

    meta = {
        "format": "memcli-keys-v1",
        "knowledge_num": N,
        "num_keys": math.isqrt(N),
        "knowledge_dim": int(keys.shape[0] * keys.shape[2]),
        "embedder": embedder,
        "backbone": backbone if embedder == "backbone" else None,
        "index_id": new_bank.meta["index_id"],
        "tokenizer_fingerprint": bank.meta.get("tokenizer_fingerprint"),
        "seed": seed,
        "self_recall": {f"@{k}": round(v, 4) for k, v in ours.items()},
        "self_recall_explicitlm": {f"@{k}": round(v, 4) for k, v in seed_recipe.items()},
        "explicitlm_collided_entries": collided,
        "labels": {name: len(v) for name, v in labels.items()},
    }
    new_bank.meta["ordered_by_keys"] = True
    # keys first, then the reordered bank: if a crash falls between, index ids disagree and loaders say so
    with atomic_dir(out) as tmp:
        save_tensors(tmp / KEYS_FILE, {"keys": keys.float(), "entry_embeddings": new_emb.float()})
        write_json(tmp / "meta.json", meta)
        for name, rows in labels.items():
            write_jsonl(tmp / name, rows)
    new_bank.save(cache)
    return meta


def default_data(data_dir: str | Path = "data/default", seed: int = 0, num_facts: int = 1024, quiet: bool = False,
                 trex: str | Path | None = None, knowledge_length: int = 16) -> dict:
    """gen-data knowledge -> convert-omcq -> build-cache -> build-keys (synthetic default, or T-REx with ``trex``)."""
    d = Path(data_dir)
    out = {}
    out["gen-data"] = gen_knowledge(d, num_facts=num_facts, seed=seed, trex=trex)
    out["convert-omcq train"] = convert_omcq(d / OMCQ_TRAIN, d / "sft_train.jsonl")
    out["convert-omcq val"] = convert_omcq(d / OMCQ_VAL, d / "sft_val.jsonl")
    out["build-cache"] = build_cache(d / KB_FILE, d / "cache", knowledge_length=knowledge_length)
    out["build-keys"] = build_keys(d / "cache", d / "keys", sft=d / "sft_train.jsonl",
                                    sft_val=d / "sft_val.jsonl", seed=seed)
    return out
