"""One console for the whole program (stdout for results, stderr for progress and notes) and progress bars."""

from __future__ import annotations

import os
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def quiet() -> bool:
    """Progress bars are off when stderr is not a terminal or MEMCLI_QUIET is set (CI logs stay short)."""
    return bool(os.environ.get("MEMCLI_QUIET")) or not sys.stderr.isatty()


def progress(transient: bool = True, **extra_columns) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}") if extra_columns.get("info") else TextColumn(""),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=quiet(),
    )
