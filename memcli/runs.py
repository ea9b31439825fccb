"""``load_run(path)``: one loader for every kind of run directory (chat, inspect-memory, compare, eval use it).

It sits above the memory kinds (it dispatches to each kind's own loader by the ``kind`` recorded in
``checkpoint.json``); the run directory format itself is core (memcli/rundir.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memcli import rundir


@dataclass
class Run:
    kind: str  # explicit-memory | hippo | hrpo
    path: Path
    model: Any
    tok: Any
    info: dict
    bank: Any = None  # explicit memory only

    @property
    def method(self) -> str:
        return self.info.get("finetuning_method", "frozen")


def load_run(path: str | Path, device: str = "cpu") -> Run:
    p = Path(path)
    if (p / "hippo_config.json").is_file():  # a HIPPO part alone, on its base backbone
        kind = "hippo"
    else:
        kind = rundir.kind_of(p)
    if kind == "explicit-memory":
        from memcli.explicit.io import load_memory

        model, tok, bank, info = load_memory(p, device)
        return Run(kind, p, model, tok, info, bank)
    if kind == "hippo":
        from memcli.hippo.io import load_hippo

        model, tok, info = load_hippo(p, device)
        return Run(kind, p, model, tok, info)
    from memcli.hrpo.io import load_hrpo

    model, tok, info = load_hrpo(p, device)
    return Run(kind, p, model, tok, info)
