"""``load_run(path)``: one loader for every kind of run directory (chat, inspect-memory, compare, eval use it).

The kind recorded in ``checkpoint.json`` names the loader in the registry (memcli/kinds.py); the run
directory format itself is core (memcli/rundir.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memcli import kinds, rundir


@dataclass
class Run:
    kind: str  # a name in memcli.kinds.KINDS
    path: Path
    model: Any
    tok: Any
    info: dict
    bank: Any = None  # explicit memory only

    @property
    def method(self) -> str:
        return self.info.get("finetuning_method", "frozen")

    @property
    def config(self) -> dict:
        """The resolved config the run was trained with (config.yaml; empty for a part loaded alone)."""
        return rundir.read_config(self.path)


def load_run(path: str | Path, device: str = "cpu") -> Run:
    p = Path(path)
    part = next((k for k in kinds.KINDS.values() if k.part_config and (p / k.part_config).is_file()), None)
    kind = part or kinds.get(rundir.kind_of(p))  # a kind's part alone (hippo_model/) loads on its base backbone
    parts = kinds.resolve_ref(kind.loader)(p, device)
    return Run(kind.name, p, **parts)
