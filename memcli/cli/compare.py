"""``memcli compare``: results side by side. This release: ``compare bench`` (benchmark suites)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.views import console, emit, table

compare = typer.Typer(help="Put results side by side (benchmarks now; checkpoints and runs in later releases).",
                      no_args_is_help=True, rich_markup_mode="rich")

SUITES = ("explicit", "hippo", "hrpo", "kernels", "all")


@compare.command("bench")
def bench(
    suite: str = typer.Option("all", help=f"Benchmark suite: {', '.join(SUITES)}."),
    quick: bool = typer.Option(False, help="Small shapes (checks the harness in seconds)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """Time memcli's paths against reference / seed-style paths in one run and print the ratios.

    The explicit suite runs at the seed's shapes (knowledge_num 1,048,576, knowledge_length 16,
    num_candidates 16): product-key top-k vs brute force and the seed's grid, pooled memory read vs
    materialise-then-mean (time and peak memory), vectorised EMA vs a per-entry loop, and generation
    with KV cache vs recomputing every token. Takes about a minute on 2 CPU cores. The hippo suite
    times chat turns 1, 10 and 50 with the memory state vs the full history in the prompt. The
    kernels suite times the Triton kernels (CUDA only) against their PyTorch references and the
    seed-style paths, forward and forward+backward, with the token bag's achieved bandwidth. The
    hrpo suite compares hybrid-rollout tokens/s with HF generate and with a loop that re-decodes the
    text each step to find '####'.

    [bold]Examples[/bold]

      memcli compare bench
      memcli compare bench --quick --json
    """
    from memcli.errors import MemcliError

    if suite not in SUITES:
        raise MemcliError(f"--suite '{suite}': expected one of {', '.join(SUITES)}")
    from memcli.bench.explicit import run_explicit
    from memcli.bench.hippo import run_hippo

    rows = []
    if suite in ("explicit", "all"):
        rows += run_explicit(quick=quick)
    if suite in ("hippo", "all"):
        rows += run_hippo(quick=quick)
    if suite in ("hrpo", "all"):
        from memcli.bench.hrpo import run_hrpo

        rows += run_hrpo(quick=quick)
    if suite in ("kernels", "all"):
        from memcli.kernels.bench import run_kernels

        rows += run_kernels(quick=quick)
    cols = ["bench", "path", "median ms", "spread ms", "ratio (time / first row of its bench)", "note"]
    def num(x):
        return "-" if x is None else round(x, 2)

    data = [(r["bench"], r["path"], num(r["median_ms"]), num(r.get("spread_ms", 0.0)), num(r["ratio"]),
             r.get("note", "")) for r in rows]
    if markdown is not None:
        from memcli.records import atomic_write_text

        md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
        md += "".join("| " + " | ".join(str(c) for c in row) + " |\n" for row in data)
        atomic_write_text(markdown, md)
    emit(rows, as_json, lambda _: table(f"compare bench --suite {suite}", cols, data))


@compare.command("locomo")
def locomo(
    model_path: Optional[Path] = typer.Option(None, "--model-path", "-m", help="HIPPO run directory (default: newest under out/)."),
    data: Path = typer.Option(..., "--data", help="LoCoMo JSON (locomo10.json format)."),
    setups: str = typer.Option("hippo,none,full", help="Comma-separated: hippo (memory state), none (no history), full (history in context)."),
    conversations: Optional[int] = typer.Option(None, help="Only the first N conversations."),
    max_questions: Optional[int] = typer.Option(None, help="Only the first N questions of each conversation."),
    context_window: Optional[int] = typer.Option(None, help="Token budget of the full-history setup (default: the model's window)."),
    max_new_tokens: int = typer.Option(24, help="Answer length."),
    out_dir: Path = typer.Option(Path("out"), help="Where to look for the newest run."),
    answers: Optional[Path] = typer.Option(None, "--answers", help="Also write every question's answers and scores (JSONL)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """LoCoMo QA F1 per category for a HIPPO checkpoint: memory state vs no history vs full history.

    Each conversation's sessions are written into the memory turn by turn; then every question is
    answered three ways and scored with LoCoMo's token F1 (Porter stemming; category 1 split on
    commas, category 3 cut at ';', category 5 = abstention).

    [bold]Examples[/bold]

      memcli compare locomo --data locomo10.json -m out/hippo
      memcli compare locomo --data locomo10.json --conversations 2 --context-window 1024 --json
    """
    from memcli.chat import newest_run_of
    from memcli.eval.locomo import CATEGORIES, load_locomo, run_locomo
    from memcli.hippo.io import load_hippo
    from memcli.records import write_jsonl

    samples = load_locomo(data)
    path = newest_run_of(model_path, out_dir, "hippo")
    model, tok, _ = load_hippo(path)
    res = run_locomo(model, tok, samples, [s.strip() for s in setups.split(",") if s.strip()], conversations,
                     max_questions, max_new_tokens, context_window)
    if answers is not None:
        write_jsonl(answers, res["answers"])
    summ = res["summary"]
    names = list(summ)
    rows = []
    for key in [*CATEGORIES.values(), "overall", "count"]:
        vals = [summ[s][key] for s in names]
        best = max((v for v in vals if v is not None), default=None) if key != "count" else None
        rows.append((key, *[_cell(v, v == best and key != "count" and len(names) > 1) for v in vals]))
    out = {"checkpoint": str(path), "context_window": res["context_window"], "f1": summ}
    _write_md(markdown, ["category", *names], rows)
    emit(out, as_json, lambda _: table(f"LoCoMo token F1 · {path}", ["category", *names], rows))


def _cell(v, best: bool) -> str:
    if v is None:
        return "-"
    s = f"{v:.4f}" if isinstance(v, float) else str(v)
    return f"[bold green]{s}[/bold green]" if best else s


def _write_md(path: Optional[Path], cols: list[str], rows: list[tuple]) -> None:
    if path is None:
        return
    import re

    from memcli.records import atomic_write_text

    clean = [[re.sub(r"\[/?[a-z ]+\]", "", str(c)) for c in r] for r in rows]
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n" + "".join("| " + " | ".join(r) + " |\n" for r in clean)
    atomic_write_text(path, md)


def register(app: typer.Typer) -> None:
    app.add_typer(compare, name="compare")
