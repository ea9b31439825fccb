"""Facts a user brings, as bank entries: a JSONL of sentences (``{"text": ...}``, optional ``subject``,
``predicate``, ``object``, ``uuid``) or an ExplicitLM knowledge base (``sentence_trex_data.json``).

An entry is ``{"uuid", "sentence", "subject", "predicate", "object"}``, the row format of a bank's
``entries.jsonl``. A sentence without a uuid gets one derived from its text, so adding the same file
twice is refused instead of storing the fact twice.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from memcli import records
from memcli.errors import MemcliError


def fact_uuid(text: str) -> str:
    return "fact-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def read_facts(path: str | Path) -> list[dict]:
    """Entries from a facts JSONL or a knowledge base JSON; duplicate uuids are refused with both lines named."""
    return read_facts_where(path)[0]


def read_facts_where(path: str | Path) -> tuple[list[dict], list[str]]:
    """``read_facts`` and where each entry came from (``FILE:LINE`` or ``FILE: item N``), for messages about one."""
    p = Path(path)
    if p.suffix == ".json":
        rows = records.read_json_list(p, records.KNOWLEDGE)
        out = [{k: r["target"][0].get(k) for k in ("uuid", "sentence", "subject", "predicate", "object")} for r in rows]
        where = [f"{p}: item {i}" for i in range(len(rows))]
    else:
        out, where = [], []
        for lineno, r in records.iter_jsonl(p, records.FACTS):
            out.append({"uuid": r.get("uuid") or fact_uuid(r["text"]), "sentence": r["text"],
                        "subject": r.get("subject"), "predicate": r.get("predicate"), "object": r.get("object")})
            where.append(f"{p}:{lineno}")
        if not out:
            raise MemcliError(f"{p}: empty file, expected at least one {{\"text\": ...}} line")
    first: dict[str, str] = {}
    for e, w in zip(out, where):
        if e["uuid"] in first:
            raise MemcliError(f"{w}: duplicate uuid '{e['uuid']}' (first at {first[e['uuid']]}), expected one entry "
                              "per fact")
        first[e["uuid"]] = w
    return out, where


def as_knowledge(entries: list[dict]) -> list[dict]:
    """Entries in the knowledge-base item form build-cache reads."""
    return [{"target": [{"sentence": e["sentence"], "uuid": e["uuid"],
                         **{k: e[k] for k in ("subject", "predicate", "object") if e.get(k) is not None}}]}
            for e in entries]
