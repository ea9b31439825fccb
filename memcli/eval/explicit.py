"""Explicit memory evaluation: held-out multiple choice three ways (memory on / off / edited) and router recall."""

from __future__ import annotations

from pathlib import Path

from memcli import records
from memcli.config import DatasetConfig
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


def load_eval_data(tok, bank, omcq_path: Path, sft_val: Path, labels: Path, max_length: int):
    """Held-out questions and, when both files exist, the labelled items router recall is measured on."""
    omcq = records.read_json_list(omcq_path, records.OMCQ) if omcq_path.is_file() else []
    items = (X.load_items(tok, bank, sft_val, labels, bank.knowledge_length, max_length)
             if sft_val.is_file() and labels.is_file() else [])
    return omcq, items


def evaluate_checkpoint(mem, tok, bank, data_dir: str | Path, num_samples: int | None = None,
                        max_length: int = DatasetConfig.max_length) -> dict:
    """Evaluate a loaded checkpoint on ``data_dir``'s held-out questions (omcq_val.json) and labels."""
    d = Path(data_dir)
    omcq_path = d / "omcq_val.json"
    if not omcq_path.is_file():
        raise MemcliError(f"{omcq_path}: not found (expected the held-out questions written by 'memcli gen-data')")
    omcq, items = load_eval_data(tok, bank, omcq_path, d / "sft_val.jsonl", d / "keys" / "val_labeled.jsonl",
                                 max_length)
    omcq, items = omcq[:num_samples], items[:num_samples]
    res = evaluate(mem, tok, bank, omcq, items)
    return dict(res, questions=len(omcq), labelled_items=len(items))
