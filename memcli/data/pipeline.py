"""The data commands as plain functions (the CLI is a thin layer over these)."""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from memcli import records
from memcli.checkpoint import save_tensors
from memcli.data import keys as K
from memcli.data.bank import build_bank, load_bank
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
                  trex: str | Path | None = None, relations: list[str] | None = None, fits=None) -> dict:
    """Write the knowledge base, all questions and the train / held-out question split into ``out``.

    ``trex``: an LPAQA-layout T-REx directory, or ``builtin`` (the slice shipped with memcli); None: synthetic.
    ``fits``: sentence -> whether it fits a bank entry (the pipeline knows the tokenizer and length); a fact that
    does not is left out with its questions (counted), after the split, so every other fact keeps its side.
    """
    filtered = {}
    if trex is not None:
        facts, pools, filtered = trex_facts(trex, num_facts, seed, relations)
    else:
        facts, pools = synthetic_facts(num_facts, seed)
    kb = build_knowledge(facts, pools, seed, heldout_fraction)
    if fits is not None:
        filtered["longer_than_an_entry"] = _drop_unfit(kb, fits)
    with atomic_dir(Path(out) / ".gen-knowledge") as tmp:
        write_json(tmp / KB_FILE, kb["knowledge"], indent=None)
        write_json(tmp / OMCQ_FILE, kb["omcq"], indent=None)
        write_json(tmp / OMCQ_TRAIN, kb["omcq_train"], indent=None)
        write_json(tmp / OMCQ_VAL, kb["omcq_val"], indent=None)
    _move_up(Path(out) / ".gen-knowledge")
    return {"facts": len(kb["knowledge"]), "questions": len(kb["omcq"]), "train_questions": len(kb["omcq_train"]),
            "heldout_questions": len(kb["omcq_val"]), "skipped_no_distractors": kb["skipped"],
            **{f"filtered_{k}": v for k, v in filtered.items()}, "source": "trex" if trex else "synthetic"}


def _drop_unfit(kb: dict, fits) -> int:
    """Leave out of ``kb`` the facts whose sentence does not fit an entry, and their questions; returns how many."""
    gone = {it["target"][0]["uuid"] for it in kb["knowledge"] if not fits(it["target"][0]["sentence"])}
    for k in ("knowledge", "omcq", "omcq_train", "omcq_val"):
        kb[k] = [it for it in kb[k] if it["target"][0]["uuid"] not in gone]
    return len(gone)


def _move_up(staged: Path) -> None:
    """Move the files of a completed staging directory into its parent (each rename is atomic)."""
    import os
    import shutil

    for f in sorted(staged.iterdir()):
        os.replace(f, staged.parent / f.name)
    shutil.rmtree(staged, ignore_errors=True)


def gen_dialog(out: str | Path, num_train: int = 2000, num_val: int = 200, seed: int = 0, turns: int = 6,
               min_distance: int = 2, facts_per_dialog: int = 2, name_pool: int = 0,
               min_turns: int | None = None, assistant_prob: float = 0.0) -> dict:
    """Train dialogs (lengths in [min_turns, turns] when given) and validation dialogs of ``turns`` turns."""
    train = generate_dialogs(num_train, seed, turns, min_distance, facts_per_dialog, name_pool=name_pool,
                             min_turns=min_turns, assistant_prob=assistant_prob)
    val = generate_dialogs(num_val, seed + 10_000, turns, min_distance, facts_per_dialog, name_pool=name_pool,
                           assistant_prob=assistant_prob)
    with atomic_dir(Path(out) / ".gen-dialog") as tmp:
        write_jsonl(tmp / "data_train.jsonl", train)
        write_jsonl(tmp / "data_val.jsonl", val)
    _move_up(Path(out) / ".gen-dialog")
    return {"train": len(train), "val": len(val), "turns": turns, "min_distance": min_distance, "name_pool": name_pool,
            "min_turns": min_turns if min_turns is not None else turns, "assistant_turns": assistant_prob}


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

    from memcli.data.facts import as_knowledge, read_facts

    # a knowledge base (sentence_trex_data.json) or plain sentences, one {"text": ...} per line
    kb = as_knowledge(read_facts(knowledge_path)) if Path(knowledge_path).suffix != ".json" else \
        records.read_json_list(knowledge_path, records.KNOWLEDGE)
    tok = load_tokenizer(tokenizer)
    bank, rep = build_bank(kb, tok, tokenizer, knowledge_length, knowledge_num, source=str(knowledge_path))
    bank.save(out)
    return {"knowledge_num": bank.knowledge_num, "knowledge_length": bank.knowledge_length, **rep}


def _first_user(row: dict) -> str:
    return next(m["content"] for m in row["conversations"] if m["role"] == "user")


def build_keys(cache: str | Path, out: str | Path, embedder: str = "backbone", backbone: str = "tiny",
               sft: str | Path | None = None, sft_val: str | Path | None = None, top_k: int = 8, seed: int = 0,
               recall_k: tuple[int, ...] = (1, 16), layer: int | None = None) -> dict:
    """Product keys over the bank, the bank reordered into cell order, labels for SFT files.

    ``embedder=backbone`` embeds an entry by the mean of the backbone's input embeddings of its tokens, or,
    with ``layer``, by the mean of its hidden states after that decoder layer (the keys a pretrained model's
    own states find; ``model.entry_key=hidden``).
    """
    bank = load_bank(cache)
    named = {"train_labeled.jsonl": sft, "val_labeled.jsonl": sft_val}
    sft_rows = {name: records.read_jsonl(p, records.CONVERSATION) for name, p in named.items() if p}  # validate first
    if top_k < 1:
        raise MemcliError(f"--top-k got {top_k}, expected a positive integer")
    valid = bank.valid_rows()
    emb, embed_texts = _embedder(bank, valid, embedder, backbone, layer)
    # centre: pooled embeddings share a large common component (frequent tokens) that carries no identity;
    # hidden states are also scaled per dimension (a few dimensions dominate their raw norms)
    emb = torch.where(valid.unsqueeze(1), _standardise(emb, emb[valid], scale=layer is not None), emb)
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

    labels = {name: _labels(rows, embed_texts, new_bank, new_emb, new_valid, top_k, layer)
              for name, rows in sft_rows.items()}

    meta = {
        "format": "memcli-keys-v1",
        "knowledge_num": N,
        "num_keys": math.isqrt(N),
        "knowledge_dim": int(keys.shape[0] * keys.shape[2]),
        "embedder": embedder,
        "backbone": backbone if embedder == "backbone" else None,
        "layer": layer if embedder == "backbone" else None,
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


def _embedder(bank, valid: torch.Tensor, embedder: str, backbone: str, layer: int | None):
    """-> (the entries' embeddings [N, D], a function embedding query texts the same way)."""
    if embedder == "backbone":
        from memcli.backbone import load_backbone

        model, tok = load_backbone(backbone)
        bank.check_tokenizer(tok, backbone)
        if layer is not None and not 0 <= layer < model.config.num_hidden_layers:
            raise MemcliError(f"--layer got {layer}, expected a decoder layer in [0, {model.config.num_hidden_layers})")
        emb = K.backbone_entry_embeddings(model, bank.token_ids, bank.pad_id, layer=layer)
        return emb, lambda texts: K.backbone_text_embeddings(model, tok, texts, layer=layer)
    st = K.sentence_embedder(embedder)
    dim_fn = getattr(st, "get_embedding_dimension", None) or st.get_sentence_embedding_dimension
    emb = torch.zeros(bank.knowledge_num, dim_fn())
    idx = torch.nonzero(valid).flatten()
    emb[idx] = K.st_embed(st, [bank.entries[i]["sentence"] for i in idx.tolist()])
    return emb, lambda texts: K.st_embed(st, texts)


def _labels(rows: list[dict], embed_texts, bank, emb: torch.Tensor, valid: torch.Tensor, top_k: int,
            layer: int | None) -> list[dict]:
    """Router labels of SFT conversations: the top entries by embedding similarity to each first user message."""
    row_of = bank.row_of_uuid()
    queries = [_first_user(r) for r in rows]
    q_emb = embed_texts([q.split("\n")[0] for q in queries])
    if layer is not None:
        q_emb = _standardise(q_emb, q_emb, scale=True)
    true_rows = [row_of.get(r.get("uuid")) if r.get("uuid") else None for r in rows]
    idx, sc = K.label_queries(q_emb, emb, valid, top_k, true_rows)
    return [dict({"query": q, "target_indices": i, "target_scores": s}, **({"uuid": r["uuid"]} if r.get("uuid") else {}))
            for q, i, s, r in zip(queries, idx, sc, rows)]


def _standardise(x: torch.Tensor, ref: torch.Tensor, scale: bool) -> torch.Tensor:
    x = x - ref.mean(0, keepdim=True)
    return x / ref.std(0, keepdim=True).clamp_min(1e-4) if scale and ref.shape[0] > 1 else x


def write_texts(d: str | Path) -> dict:
    """The knowledge base's sentences as pretraining text (MiniMind's ``{"text": ...}`` lines): ``text_train.jsonl``
    and, for the held-out facts (their entries exist only in the bank), ``text_val.jsonl``."""
    d = Path(d)
    kb = records.read_json_list(d / KB_FILE, records.KNOWLEDGE)
    held = {item["target"][0].get("uuid") for item in records.read_json_list(d / OMCQ_VAL, records.OMCQ)}
    rows = [(item["target"][0]["sentence"], item["target"][0]["uuid"] in held) for item in kb]
    write_jsonl(d / "text_train.jsonl", [{"text": t} for t, h in rows if not h])
    write_jsonl(d / "text_val.jsonl", [{"text": t} for t, h in rows if h])
    return {"train_texts": sum(not h for _, h in rows), "val_texts": sum(h for _, h in rows)}


def default_source(backbone: str) -> str:
    """Facts of the default data: the synthetic base for the tiny model trained from scratch (nothing to know
    beforehand); the shipped T-REx slice for a pretrained model (real entities it reads fluently; held-out facts
    exist only in memory, and edit success measures reading apart from knowing)."""
    return "synthetic" if backbone == "tiny" else "builtin"


def default_data(data_dir: str | Path = "data/default", seed: int = 0, num_facts: int = 1024, quiet: bool = False,
                 source: str | Path = "synthetic", backbone: str = "tiny", knowledge_length: int | None = None,
                 layer: int | None = None) -> dict:
    """gen-data knowledge -> convert-omcq -> build-cache -> build-keys, for ``backbone``'s tokenizer.

    ``source``: ``synthetic``, ``builtin`` (the shipped T-REx slice) or a T-REx directory. ``knowledge_length``
    defaults to 16 tokens (synthetic) or 32 (T-REx: 99% of its sentences fit in 23 SmolLM2 tokens).
    ``layer``: build hidden-state keys at that decoder layer (pretrained backbones).
    """
    d = Path(data_dir)
    if d.parent.is_dir():
        records.sweep_stale_temps(d.parent, recursive=False)  # what an interrupted build left beside it
    if not (d.is_dir() and any(d.iterdir())):
        with atomic_dir(d) as tmp:  # the directory appears whole or not at all: a failure leaves nothing behind
            return _default_data(tmp, seed, num_facts, source, backbone, knowledge_length, layer)
    # a directory with other files in it: build beside it, then move each output in (the user's files stay)
    tmp = Path(tempfile.mkdtemp(prefix=records.temp_prefix(d), suffix=".tmp", dir=d.parent))
    try:
        out = _default_data(tmp, seed, num_facts, source, backbone, knowledge_length, layer)
        for item in sorted(tmp.iterdir()):
            if (d / item.name).is_dir() and item.is_dir():
                shutil.rmtree(d / item.name)
            os.replace(item, d / item.name)
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _default_data(d: Path, seed: int, num_facts: int, source: str | Path, backbone: str, knowledge_length: int | None,
                  layer: int | None) -> dict:
    trex = None if str(source) == "synthetic" else source
    L = knowledge_length or (16 if trex is None else 32)
    out = {}
    from memcli.backbone import load_tokenizer
    from memcli.data.bank import fits_entry

    out["gen-data"] = gen_knowledge(d, num_facts=num_facts, seed=seed, trex=trex, fits=fits_entry(load_tokenizer(backbone), L))
    out["texts"] = write_texts(d)
    out["convert-omcq train"] = convert_omcq(d / OMCQ_TRAIN, d / "sft_train.jsonl")
    out["convert-omcq val"] = convert_omcq(d / OMCQ_VAL, d / "sft_val.jsonl")
    out["build-cache"] = build_cache(d / KB_FILE, d / "cache", tokenizer=backbone, knowledge_length=L)
    out["build-keys"] = build_keys(d / "cache", d / "keys", backbone=backbone, sft=d / "sft_train.jsonl",
                                   sft_val=d / "sft_val.jsonl", seed=seed, layer=layer)
    return out
