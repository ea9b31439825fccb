"""Rich rendering: one console for the whole program, progress bars and tables."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterable, Sequence

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def progress(transient: bool = True, **extra_columns) -> Progress:
    """A progress bar; silent when stderr is not a terminal or MEMCLI_QUIET is set (CI logs stay short)."""
    disable = bool(os.environ.get("MEMCLI_QUIET")) or not sys.stderr.isatty()
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}") if extra_columns.get("info") else TextColumn(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=disable,
    )


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def kv_table(title: str, data: dict) -> Table:
    return table(title, ["key", "value"], [(k, v) for k, v in data.items()])


def emit(obj: Any, as_json: bool, render=None) -> None:
    """Print ``obj`` as JSON (for scripts) or through ``render`` (a Rich renderable factory)."""
    if as_json:
        sys.stdout.write(json.dumps(obj, ensure_ascii=False, indent=2, default=str) + "\n")
    elif render is not None:
        console.print(render(obj))
    else:
        console.print(obj)
