"""The token memory bank on disk (``build-cache``): ``[knowledge_num, knowledge_length]`` token ids.

Layout of a cache directory::

    memory_bank.safetensors   token_ids int32 [knowledge_num, knowledge_length]
    entries.jsonl             row -> uuid, sentence, subject, predicate, object (padding rows: uuid null)
    meta.json                 sizes, pad id, tokenizer fingerprint, index_id (order of rows)

``index_id`` fingerprints the row order. build-keys reorders the bank into its product-key cell
order and stamps the same id into the keys, so bank row i, key cell i and label i are one entry.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from memcli.backbone import tokenizer_fingerprint
from memcli.checkpoint import check_shape, is_perfect_square, load_tensors, save_tensors
from memcli.errors import MemcliError
from memcli.records import atomic_dir, read_json_object, require_dir, write_json, write_jsonl, iter_jsonl

BANK_FILE = "memory_bank.safetensors"
ENTRIES_FILE = "entries.jsonl"
META_FILE = "meta.json"


def index_id(uuids: list) -> str:
    return hashlib.sha256(json.dumps(uuids).encode()).hexdigest()[:16]


@dataclass
class Bank:
    token_ids: torch.Tensor  # int [N, L]
    entries: list[dict]  # one per row
    meta: dict
    path: Path | None = None

    @property
    def knowledge_num(self) -> int:
        return self.token_ids.shape[0]

    @property
    def knowledge_length(self) -> int:
        return self.token_ids.shape[1]

    @property
    def pad_id(self) -> int:
        return int(self.meta["pad_id"])

    def valid_rows(self) -> torch.Tensor:
        return torch.tensor([e.get("uuid") is not None for e in self.entries], dtype=torch.bool)

    def uuids(self) -> list:
        return [e.get("uuid") for e in self.entries]

    def row_of_uuid(self) -> dict[str, int]:
        return {e["uuid"]: i for i, e in enumerate(self.entries) if e.get("uuid") is not None}

    def decode(self, tok, rows) -> list[str]:
        out = []
        for r in rows:
            ids = [int(t) for t in self.token_ids[r] if int(t) != self.pad_id]
            out.append(tok.decode(ids))
        return out

    def permuted(self, order: list[int]) -> "Bank":
        """New bank whose row i is this bank's row ``order[i]``."""
        ids = self.token_ids[torch.as_tensor(order, dtype=torch.long)]
        entries = [dict(self.entries[j], row=i) for i, j in enumerate(order)]
        meta = dict(self.meta, index_id=index_id([e.get("uuid") for e in entries]))
        return Bank(ids, entries, meta, self.path)

    def check_tokenizer(self, tok, backbone: str) -> str:
        """The fingerprint of ``tok``, after checking the bank was tokenised with it."""
        fp = tokenizer_fingerprint(tok)
        if self.meta.get("tokenizer_fingerprint") != fp:
            raise MemcliError(f"{self.path / META_FILE}: bank was tokenised with '{self.meta.get('tokenizer')}' "
                              f"(tokenizer fingerprint {self.meta.get('tokenizer_fingerprint')}), expected backbone "
                              f"'{backbone}''s tokenizer (fingerprint {fp}); rebuild the cache with build-cache "
                              f"--tokenizer {backbone}")
        return fp

    def save(self, path: str | Path) -> None:
        with atomic_dir(path) as tmp:
            self.write(tmp)
        self.path = Path(path)

    def write(self, d: Path) -> None:
        """The bank's files into directory ``d`` (callers stage it: :func:`memcli.records.atomic_dir`)."""
        save_tensors(d / BANK_FILE, {"token_ids": self.token_ids.to(torch.int32)})
        write_jsonl(d / ENTRIES_FILE, self.entries)
        write_json(d / META_FILE, self.meta)


def fits_entry(tok, length: int):
    """A predicate: does a sentence fit one entry of ``length`` tokens whole (the test every writer of entries uses
    to keep only facts that need no cut)."""
    return lambda sentence: len(tok(sentence, add_special_tokens=False)["input_ids"]) <= length


def tokenize_entries(tok, sentences: list[str], length: int, pad_id: int,
                     where: list[str] | None = None) -> tuple[torch.Tensor, int]:
    """Token ids ``[n, length]`` padded with ``pad_id``, and how many sentences were cut to fit. With ``where`` (what
    names each sentence to a user: a file and line, a row) a sentence longer than an entry is refused instead, in one
    line naming it, its token count and the limit: an entry that was cut no longer says what the fact says."""
    enc = tok(sentences, add_special_tokens=False)["input_ids"]
    out = torch.full((len(sentences), length), pad_id, dtype=torch.int32)
    truncated = 0
    for i, ids in enumerate(enc):
        if len(ids) > length:
            if where is not None:
                raise MemcliError(f"{where[i]}: the fact is {len(ids)} tokens, an entry holds {length} (knowledge_length): "
                                  f"'{sentences[i][:60]}...'; write it as shorter facts (one sentence each) or build the bank with longer entries")
            truncated += 1
            ids = ids[:length]
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.int32)
    return out, truncated


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=\S)")


def fit_entries(tok, entries: list[dict], length: int, where: list[str]) -> tuple[list[dict], list[str]]:
    """Entries whose sentences fit ``length`` tokens: a longer text is split at its sentence ends into one entry per
    sentence, each keeping what it is about (a sentence that does not name the entry's subject starts with it:
    "Zed Alpha: He moved to Porto ."), the first keeping the uuid and the others ``<uuid>#2``, ``#3``, ...; the object
    stays with the sentence that states it. A sentence that alone exceeds an entry is refused (``tokenize_entries``)."""
    out, out_where = [], []
    for e, w in zip(entries, where):
        text = e["sentence"]
        if len(tok(text, add_special_tokens=False)["input_ids"]) <= length:
            out.append(e)
            out_where.append(w)
            continue
        parts = [p for p in _SENTENCE_END.split(text.strip()) if p]
        if len(parts) < 2:
            tokenize_entries(tok, [text], length, 0, [w])  # one sentence too long: refused with its numbers
        subject = e.get("subject")
        for k, part in enumerate(parts):
            if subject and subject not in part:
                part = f"{subject}: {part}"
            out.append(dict(e, sentence=part, uuid=e["uuid"] if k == 0 else f"{e['uuid']}#{k + 1}",
                            object=e.get("object") if e.get("object") and e["object"] in part else None))
            out_where.append(f"{w} (sentence {k + 1} of {len(parts)})")
    tokenize_entries(tok, [e["sentence"] for e in out], length, 0, out_where)  # every part fits, or one line says not
    return out, out_where


def build_bank(knowledge: list[dict], tok, tokenizer_spec: str, knowledge_length: int = 16,
               knowledge_num: int | None = None, source: str = "knowledge base") -> tuple[Bank, dict]:
    if knowledge_length < 1:
        raise MemcliError(f"--knowledge-length got {knowledge_length}, expected a positive integer")
    facts = [{"uuid": it["target"][0]["uuid"], "sentence": it["target"][0]["sentence"],
              **{k: it["target"][0].get(k) for k in ("subject", "predicate", "object")}} for it in knowledge]
    facts, _ = fit_entries(tok, facts, knowledge_length, [f"{source}: item {i}" for i in range(len(facts))])
    n_items, n_given = len(facts), len(knowledge)
    if knowledge_num is None:  # smallest perfect square that holds every entry
        side = math.isqrt(n_items)
        knowledge_num = (side + (side * side < n_items)) ** 2
    elif not is_perfect_square(knowledge_num):
        lo = math.isqrt(knowledge_num) ** 2
        raise MemcliError(
            f"--knowledge-num got {knowledge_num}, expected a perfect square (product keys need sqrt(N) x sqrt(N) cells;"
            f" nearest are {lo} and {(math.isqrt(knowledge_num) + 1) ** 2})"
        )
    kept = facts[:knowledge_num]
    dropped = n_items - len(kept)
    padded = knowledge_num - len(kept)
    entries = [dict(e, row=i) for i, e in enumerate(kept)]
    seen: set[str] = set()
    for i, e in enumerate(entries):
        if e["uuid"] in seen:
            raise MemcliError(f"{source}: item {i}: duplicate uuid '{e['uuid']}', expected unique uuids")
        seen.add(e["uuid"])
    for i in range(len(kept), knowledge_num):
        entries.append({"row": i, "uuid": None, "sentence": "", "subject": None, "predicate": None, "object": None})
    pad_id = tok.pad_token_id
    ids, _ = tokenize_entries(tok, [e["sentence"] for e in entries[: len(kept)]], knowledge_length, pad_id)
    token_ids = torch.full((knowledge_num, knowledge_length), pad_id, dtype=torch.int32)
    token_ids[: len(kept)] = ids
    meta = {
        "format": "memcli-bank-v1",
        "knowledge_num": knowledge_num,
        "knowledge_length": knowledge_length,
        "num_keys": math.isqrt(knowledge_num),
        "pad_id": pad_id,
        "vocab_size": len(tok),
        "tokenizer": tokenizer_spec,
        "tokenizer_fingerprint": tokenizer_fingerprint(tok),
        "num_real": len(kept),
        "num_padded": padded,
        "num_dropped": dropped,
        "num_split": n_items - n_given,
        "ordered_by_keys": False,
        "index_id": index_id([e["uuid"] for e in entries]),
    }
    return Bank(token_ids, entries, meta), {"entries": n_items, "padded": padded, "dropped": dropped,
                                            "split": n_items - n_given}


def load_bank(path: str | Path) -> Bank:
    d = require_dir(Path(path), "memory bank cache directory (from build-cache)")
    meta = read_json_object(d / META_FILE, "bank meta.json")
    for k in ("knowledge_num", "knowledge_length", "pad_id", "index_id"):
        if k not in meta:
            raise MemcliError(f"{d / META_FILE}: missing field '{k}'")
    t = load_tensors(d / BANK_FILE)
    if "token_ids" not in t:
        raise MemcliError(f"{d / BANK_FILE}: no tensor 'token_ids', expected the memory bank")
    ids = t["token_ids"]
    check_shape(d / BANK_FILE, "token_ids", ids, (meta["knowledge_num"], meta["knowledge_length"]), "int")
    if not is_perfect_square(ids.shape[0]):
        raise MemcliError(f"{d / BANK_FILE}: knowledge_num {ids.shape[0]} is not a perfect square")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= int(meta.get("vocab_size", 1 << 62))):
        raise MemcliError(f"{d / BANK_FILE}: token ids outside [0, {meta.get('vocab_size')}), expected ids of the tokenizer")
    entries = [row for _, row in iter_jsonl(d / ENTRIES_FILE)]
    if len(entries) != ids.shape[0]:
        raise MemcliError(f"{d / ENTRIES_FILE}: {len(entries)} rows, expected {ids.shape[0]} (one per bank row)")
    if index_id([e.get("uuid") for e in entries]) != meta["index_id"]:
        raise MemcliError(f"{d / ENTRIES_FILE}: row order does not match meta.json index_id (files from different runs?)")
    return Bank(ids.long(), entries, meta, d)
