"""The user's own knowledge in a trained run, without retraining: add, replace and remove bank entries.

A trained router is not tied to its bank (retrieval scores an entry by its content), so a run answers over
facts it never saw once their entries are in its bank. Every change here:

- checks all of its input before touching anything (an unknown uuid, a fact already stored, an empty text);
- recomputes the entry features of the changed rows only (``entry_key=hidden``: the base model's states);
- grows the bank to the next perfect square when the free (padding) rows do not suffice, keeping every
  row where it was (exact retrieval, or a fitted index, which is fitted again to the grown bank; a run whose
  product keys were trained with it cannot grow without new keys and training, and is refused);
- marks the changed rows in a fitted index (memcli/explicit/index.py): searched exactly until the next fit;
- is written as new ``bank/`` and ``memory/`` parts beside the old ones and swapped in, so a failure
  leaves the run as it was. The bank's ``index_id`` and the memory config follow the new row contents.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from memcli.data.bank import Bank, index_id, tokenize_entries
from memcli.errors import MemcliError
from memcli.explicit import index
from memcli.explicit.model import MemoryAugmentedLM
from memcli.records import atomic_dir

PADDING = {"uuid": None, "sentence": "", "subject": None, "predicate": None, "object": None}


@dataclass
class Change:
    added: list[int] = field(default_factory=list)
    replaced: list[int] = field(default_factory=list)
    removed: list[int] = field(default_factory=list)
    grown: tuple[int, int] | None = None  # (entries before, after)
    index: str | None = None  # a fitted index: re-fitted, or how many rows are searched exactly until the next fit

    def summary(self) -> dict:
        out = {"added": len(self.added), "replaced": len(self.replaced), "removed": len(self.removed)}
        if self.grown:
            out["bank grown"] = f"{self.grown[0]} -> {self.grown[1]} entries"
        if self.index:
            out["index"] = self.index
        return out


def write_rows(mem: MemoryAugmentedLM, bank: Bank, tok, rows: list[int], entries: list[dict], step: int,
               cache: Path | None = None, where: list[str] | None = None) -> None:
    """Token ids, entry records and validity of ``rows``; their features recomputed (or read from ``cache``). A text
    longer than an entry is refused, naming ``where`` it came from (default: its row), never stored cut."""
    where = where or [f"row {r}" for r in rows]
    ids, _ = tokenize_entries(tok, [e["sentence"] for e in entries], bank.knowledge_length, bank.pad_id, where)
    idx = torch.tensor(rows, dtype=torch.long)
    for r, e in zip(rows, entries):
        bank.entries[r] = dict(e, row=r)
    mem.entry_records = bank.entries  # what each entry is about, for the subject anchor
    bank.token_ids[idx] = ids.to(bank.token_ids.dtype)
    mem.bank[idx.to(mem.bank.device)] = ids.to(device=mem.bank.device, dtype=mem.bank.dtype)
    mem.valid[idx] = torch.tensor([e.get("uuid") is not None for e in entries])
    mem.usage[idx] = 0
    mem.last_updated[idx] = step
    bank.meta["index_id"] = index_id(bank.uuids())
    mem.cfg.index_id = bank.meta["index_id"]
    _refresh(mem, idx, cache=cache)
    index.mark_written(mem, idx)
    mem.texts_changed(idx)


def feature_cache(run_dir: str | Path) -> Path:
    """Where a run keeps the entry features it computed, by content (safe to delete: they are recomputed)."""
    return Path(run_dir) / "cache" / "entry-features"


FEATURE_CHUNK = 256  # entries per cached feature file


def _refresh(mem: MemoryAugmentedLM, rows: torch.Tensor, cache: Path | None = None) -> None:
    """Entry features of the changed rows only, with a progress bar (the base model runs over each entry).

    With ``cache``, each chunk's features are written there as soon as they are computed, named by what they
    depend on (the base model's weights, the layers, the chunk's token ids): an interrupted change run again,
    or the same entries added to another copy of the run, reads them instead of running the model."""
    from memcli.console import progress

    if mem.cfg.entry_key != "hidden":
        return  # pooled input embeddings are computed at every forward
    base = _base_fingerprint(mem) if cache is not None else ""
    chunk = FEATURE_CHUNK
    with progress() as bar:
        task = bar.add_task("entry features", total=len(rows))
        for s in range(0, len(rows), chunk):
            part = rows[s: s + chunk]
            f = None if cache is None else cache / f"{_chunk_key(mem, base, part)}.safetensors"
            if f is None or not _read_chunk(mem, part, f):
                mem.refresh_entry_features(part)
                if f is not None:
                    _write_chunk(mem, part, f)
            bar.advance(task, len(part))


def _base_fingerprint(mem: MemoryAugmentedLM) -> str:
    from memcli.backbone import backbone_checksum

    return f"{mem.cfg.backbone}|{backbone_checksum(mem.backbone):.12e}|{mem.cfg.pad_id}|{list(mem.cfg.memory_layers)}"


def _chunk_key(mem: MemoryAugmentedLM, base: str, rows: torch.Tensor) -> str:
    import hashlib

    ids = mem.bank[rows.to(mem.bank.device)].to(torch.int64).cpu().contiguous()
    return hashlib.sha256(base.encode() + str(tuple(ids.shape)).encode() + ids.numpy().tobytes()).hexdigest()[:32]


def _read_chunk(mem: MemoryAugmentedLM, rows: torch.Tensor, f: Path) -> bool:
    """Features of ``rows`` from a cached chunk; False (recompute) when it is absent or does not fit."""
    from safetensors.torch import load_file

    if not f.is_file():
        return False
    try:
        got = load_file(str(f))
    except Exception:  # a damaged cache file is recomputed and rewritten, never trusted
        return False
    bufs = {i: mem.entry_feats(i) for i in mem.cfg.memory_layers}
    want = {f"layer{i}": (len(rows), b.shape[1]) for i, b in bufs.items()}
    if {k: tuple(v.shape) for k, v in got.items()} != want:
        return False
    for i, b in bufs.items():
        b[rows.to(b.device)] = got[f"layer{i}"].to(device=b.device, dtype=b.dtype)
    return True


def _write_chunk(mem: MemoryAugmentedLM, rows: torch.Tensor, f: Path) -> None:
    from safetensors.torch import save

    from memcli.records import atomic_write_bytes

    feats = {f"layer{i}": mem.entry_feats(i)[rows.to(mem.bank.device)].detach().cpu().contiguous()
             for i in mem.cfg.memory_layers}
    atomic_write_bytes(f, save(feats))


def add(mem: MemoryAugmentedLM, bank: Bank, tok, entries: list[dict], step: int = 0, cache: Path | None = None,
        where: list[str] | None = None):
    """Store ``entries`` in free rows (growing the bank when needed) -> (model, bank, Change). A text longer than an
    entry is split into one entry per sentence (``memcli.data.bank.fit_entries``), or refused naming ``where``."""
    from memcli.data.bank import fit_entries

    entries, where = fit_entries(tok, entries, bank.knowledge_length, where or [f"fact {i + 1}" for i in range(len(entries))])
    have = bank.row_of_uuid()
    stored = [e["uuid"] for e in entries if e["uuid"] in have]
    if stored:
        raise MemcliError(f"{len(stored)} of the {len(entries)} facts are already in the bank (e.g. uuid '{stored[0]}' at "
                          f"row {have[stored[0]]}); use 'memcli memory replace' to change them")
    change = Change()
    free = [i for i, e in enumerate(bank.entries) if e.get("uuid") is None]
    if len(free) < len(entries):
        need = bank.knowledge_num - len(free) + len(entries)
        side = math.isqrt(need - 1) + 1
        mem, bank = grow(mem, bank, side * side)
        change.grown = (len(have) + len(free), bank.knowledge_num)
        free = [i for i, e in enumerate(bank.entries) if e.get("uuid") is None]
    rows = free[: len(entries)]
    write_rows(mem, bank, tok, rows, entries, step, cache, where)
    change.added = rows
    if change.grown and index.fitted(mem):  # new cells: the index is fitted to the grown bank
        fit = index.fit(mem, mem.cfg.index_pool, mem.cfg.topk_per_half or index.PROBE)
        change.index = f"re-fitted to {fit['cells']} cells ({fit['fit_s']} s)"
    return mem, bank, _noted(mem, change)


def replace_entries(mem: MemoryAugmentedLM, bank: Bank, tok, entries: list[dict], step: int = 0,
                    cache: Path | None = None, where: list[str] | None = None) -> Change:
    """Rewrite the entries whose uuids are given (a fact's new wording or object); a text longer than an entry is
    refused naming ``where`` (one uuid, one row: it cannot become several entries)."""
    have = bank.row_of_uuid()
    missing = [e["uuid"] for e in entries if e["uuid"] not in have]
    if missing:
        raise MemcliError(f"{len(missing)} of the {len(entries)} facts are not in the bank (e.g. uuid '{missing[0]}'); "
                          "use 'memcli memory add' to store new facts")
    rows = [have[e["uuid"]] for e in entries]
    write_rows(mem, bank, tok, rows, entries, step, cache, where)
    return _noted(mem, Change(replaced=rows))


def remove(mem: MemoryAugmentedLM, bank: Bank, tok, rows: list[int], step: int = 0) -> Change:
    """Turn ``rows`` into padding: they are never retrieved again, and ``add`` reuses them."""
    bad = [r for r in rows if not 0 <= r < bank.knowledge_num]
    if bad:
        raise MemcliError(f"row {bad[0]} is outside the bank [0, {bank.knowledge_num})")
    empty = [r for r in rows if bank.entries[r].get("uuid") is None]
    if empty:
        raise MemcliError(f"row {empty[0]} holds no entry (padding)")
    rows = sorted(set(rows))
    write_rows(mem, bank, tok, rows, [dict(PADDING) for _ in rows], step)
    return _noted(mem, Change(removed=rows))


def edit_entry(model: MemoryAugmentedLM, bank: Bank, tok, row: int, text: str, step: int = 0) -> tuple[str, str]:
    """Replace entry ``row`` with ``text`` (as ``memcli memory replace`` writes rows); returns (before, after) decoded.

    A subject or object the new text no longer states is dropped from the entry's record (so no question is cut
    from a sentence that does not hold its answer); a padding row becomes an entry with uuid ``edited-<row>``."""
    before = bank.decode(tok, [row])[0] if 0 <= row < bank.knowledge_num else ""
    if not tok(text, add_special_tokens=False)["input_ids"]:
        raise MemcliError("new entry text is empty")
    e = {k: v for k, v in bank.entries[row].items() if k != "row"}
    e.update(sentence=text, uuid=e.get("uuid") or f"edited-{row}")
    for k in ("subject", "object"):
        if e.get(k) and e[k] not in text:
            e[k] = None
    write_rows(model, bank, tok, [row], [e], step, where=[f"--edit of row {row}"])
    return before, bank.decode(tok, [row])[0]


def _noted(mem: MemoryAugmentedLM, change: Change) -> Change:
    if index.fitted(mem) and change.index is None:
        change.index = f"{index.written(mem)} rows written since the fit, searched exactly ('memcli memory index' re-fits)"
    return change


def grow(mem: MemoryAugmentedLM, bank: Bank, n: int):
    """The same model over a bank of ``n`` entries (a perfect square): rows keep their place, new rows are padding."""
    from memcli.explicit.io import load_memory_state_dict, memory_state_dict

    if mem.cfg.retrieval != "exact" and not index.fitted(mem):
        raise MemcliError("this run retrieves through product keys trained with its bank (model.retrieval=product): "
                          "growing it needs new keys (build-keys) and training; remove entries to make room")
    old_n, S = bank.knowledge_num, math.isqrt(n)
    ids = torch.full((n, bank.knowledge_length), bank.pad_id, dtype=bank.token_ids.dtype)
    ids[:old_n] = bank.token_ids
    entries = bank.entries + [dict(PADDING, row=i) for i in range(old_n, n)]
    new_bank = Bank(ids, entries, dict(bank.meta, knowledge_num=n, num_keys=S, index_id=index_id([e.get("uuid") for e
                                                                                                  in entries])), bank.path)
    sd = memory_state_dict(mem)
    gen = torch.Generator().manual_seed(n)
    for k, v in list(sd.items()):
        if k.endswith(".keys"):  # product keys: exact retrieval never reads them; new cells start random
            more = torch.randn(v.shape[0], S - v.shape[1], v.shape[2], generator=gen, dtype=v.dtype)
            sd[k] = torch.cat([v, torch.nn.functional.normalize(more, dim=-1)], dim=1)
    for h in mem._hooks:  # the new wrapper hooks the same backbone
        h.remove()
    cfg = replace(mem.cfg, knowledge_num=n, index_id=new_bank.meta["index_id"])
    new = MemoryAugmentedLM(mem.backbone, cfg, ids, new_bank.valid_rows())
    new.tok, new.entry_records = mem.tok, new_bank.entries
    load_memory_state_dict(new, sd, "grown memory")
    new.usage[:old_n] = mem.usage
    new.last_updated[:old_n] = mem.last_updated
    for i in cfg.memory_layers:
        if mem.entry_feats(i) is not None:
            new.entry_feats(i)[:old_n] = mem.entry_feats(i)
    new.memory_enabled = mem.memory_enabled
    return new.to(mem.bank.device).train(mem.training), new_bank


def save(run_dir: str | Path, mem: MemoryAugmentedLM, bank: Bank) -> None:
    """Write the run's new ``memory/`` and ``bank/`` parts: both are written whole beside the old ones, then renamed
    into place one after the other (a failure while writing leaves the run as it was)."""
    from memcli.explicit.io import BANK, MEMORY, write_memory_files

    d = Path(run_dir)
    with atomic_dir(d / MEMORY) as tm, atomic_dir(d / BANK) as tb:
        write_memory_files(tm, mem)
        Bank(mem.bank.detach().cpu(), bank.entries, bank.meta).write(tb)
