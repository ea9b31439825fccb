"""``memcli compare``: results side by side. This release: ``compare bench`` (benchmark suites)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.views import console, emit, table

compare = typer.Typer(help="Put results side by side (benchmarks now; checkpoints and runs in later releases).",
                      no_args_is_help=True, rich_markup_mode="rich")

SUITES = ("explicit",)


@compare.command("bench")
def bench(
    suite: str = typer.Option("explicit", help=f"Benchmark suite: {', '.join(SUITES)}."),
    quick: bool = typer.Option(False, help="Small shapes (checks the harness in seconds)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """Time memcli's paths against reference / seed-style paths in one run and print the ratios.

    The explicit suite runs at the seed's shapes (knowledge_num 1,048,576, knowledge_length 16,
    num_candidates 16): product-key top-k vs brute force and the seed's grid, pooled memory read vs
    materialise-then-mean (time and peak memory), vectorised EMA vs a per-entry loop, and generation
    with KV cache vs recomputing every token. Takes about a minute on 2 CPU cores.

    [bold]Examples[/bold]

      memcli compare bench
      memcli compare bench --quick --json
    """
    from memcli.errors import MemcliError

    if suite not in SUITES:
        raise MemcliError(f"--suite '{suite}': expected one of {', '.join(SUITES)}")
    from memcli.bench.explicit import run_explicit

    rows = run_explicit(quick=quick)
    cols = ["bench", "path", "median ms", "spread ms", "ratio (x slower than memcli)", "note"]
    data = [(r["bench"], r["path"], round(r["median_ms"], 2), round(r.get("spread_ms", 0.0), 2), round(r["ratio"], 2),
             r.get("note", "")) for r in rows]
    if markdown is not None:
        from memcli.records import atomic_write_text

        md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        md += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in data)
        atomic_write_text(markdown, md)
    emit(rows, as_json, lambda _: table(f"compare bench --suite {suite}", cols, data))


def register(app: typer.Typer) -> None:
    app.add_typer(compare, name="compare")
