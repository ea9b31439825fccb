"""Explicit memory evaluation: held-out multiple choice three ways (memory on / off / edited) and router recall."""

from __future__ import annotations

from pathlib import Path

from memcli import records
from memcli.errors import MemcliError
from memcli.explicit import train as X


def evaluate(mem, tok, bank, omcq: list[dict], val_items: list) -> dict:
    """Accuracy with memory on, with memory off (fusion disabled), after editing the evaluated facts' entries
    to new objects (edit success: answers that follow the edit), and router recall@k on labelled items."""
    was = mem.training
    mem.eval()
    out = {}
    if omcq:
        out["heldout_memory_on"] = X.mcq_accuracy(mem, tok, omcq, bank, "on")
        out["heldout_memory_off"] = X.mcq_accuracy(mem, tok, omcq, bank, "off")
        out["edit_success"] = X.mcq_accuracy(mem, tok, omcq, bank, "edit")
    if val_items:
        out.update(X.router_recall(mem, val_items))
    mem.train(was)
    return out


def evaluate_checkpoint(mem, tok, bank, data_dir: str | Path, num_samples: int | None = None,
                        max_length: int = 128) -> dict:
    """Evaluate a loaded checkpoint on ``data_dir``'s held-out questions (omcq_val.json) and labels."""
    d = Path(data_dir)
    omcq_path = d / "omcq_val.json"
    if not omcq_path.is_file():
        raise MemcliError(f"{omcq_path}: not found (expected the held-out questions written by 'memcli gen-data')")
    omcq = records.read_json_list(omcq_path, records.OMCQ)[:num_samples]
    sft_val, labels = d / "sft_val.jsonl", d / "keys" / "val_labeled.jsonl"
    items = []
    if sft_val.is_file() and labels.is_file():
        items = X.load_items(tok, bank, sft_val, labels, bank.knowledge_length, max_length)[:num_samples]
    res = evaluate(mem, tok, bank, omcq, items)
    return dict(res, questions=len(omcq), labelled_items=len(items))
