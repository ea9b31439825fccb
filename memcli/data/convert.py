"""``convert-omcq``: ExplicitLM multiple-choice items -> SFT conversations."""

from __future__ import annotations

from dataclasses import dataclass

INSTRUCTION = "Answer with the letter and text of the correct option, for example A:text."


@dataclass
class ConvertReport:
    total: int
    written: int
    skipped_empty: int


def omcq_to_conversations(items: list[dict], instruction: str = INSTRUCTION) -> tuple[list[dict], ConvertReport]:
    """ExplicitLM's rule: first item of ``target``; user = question + options + instruction."""
    rows = []
    skipped = 0
    for item in items:
        t = item["target"][0]
        q, opts, ans = t["question"].strip(), t["options"].strip(), t["correct_answer"].strip()
        if not q or not opts or not ans:
            skipped += 1
            continue
        row = {"conversations": [
            {"role": "user", "content": f"{q}\n{opts}\n{instruction}"},
            {"role": "assistant", "content": ans},
        ]}
        if t.get("uuid"):
            row["uuid"] = t["uuid"]  # lets build-keys label the true entry (extra field, ignored by seeds)
        rows.append(row)
    return rows, ConvertReport(len(items), len(rows), skipped)
