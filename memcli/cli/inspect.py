"""``memcli inspect-memory``: read, search, query, measure and edit the explicit memory of a checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from memcli.views import console, emit, kv_table, table


def inspect_memory(
    checkpoint: Optional[Path] = typer.Option(None, "--model-path", "-m", "--checkpoint", "-c",
                                              help="Explicit-memory run directory (default: the newest under out/)."),
    out_dir: Path = typer.Option(Path("out"), help="Where to look for the newest run."),
    rows: Optional[str] = typer.Option(None, "--rows", help="Rows to show, START:END (default 0:20)."),
    search: Optional[str] = typer.Option(None, "--search", help="Entries whose text contains this."),
    query: Optional[str] = typer.Option(None, "--query", "-q", help="Show what each token of this text retrieves."),
    top: int = typer.Option(3, help="Entries per token for --query."),
    stats: bool = typer.Option(False, "--stats", help="Coverage, dead entries, Gini, hottest entries, histogram."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="With --stats: write a usage histogram PNG here."),
    edit: Optional[List[str]] = typer.Option(None, "--edit", help="ROW and new text: --edit 12 --edit 'new text' or --edit '12=new text'."),
    eval_data: Optional[Path] = typer.Option(None, "--eval", help="Evaluate on this data directory's held-out "
                                             "questions: memory on / off / edited, router recall."),
    eval_samples: Optional[int] = typer.Option(None, "--eval-samples", help="With --eval: first N questions only."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Readable, editable memory: decoded entries, per-token retrieval, usage statistics, edits.

    [bold]Examples[/bold]

      memcli inspect-memory  # newest run, rows 0:20
      memcli inspect-memory --rows 100:120 --search Quinbar
      memcli inspect-memory --query "Where was Velmora born?"
      memcli inspect-memory --stats --plot usage.png
      memcli inspect-memory --edit "12=Velmora was born in Tarsk ."
      memcli inspect-memory --eval data/default --eval-samples 200
    """
    from memcli.explicit.io import KIND
    from memcli.rundir import newest_run, require_kind
    from memcli.runs import load_run

    ck = checkpoint or newest_run(out_dir, KIND)
    require_kind(ck, KIND)
    run = load_run(ck)
    if eval_data is not None:
        _evaluate(run, ck, eval_data, eval_samples, as_json)
    elif edit:
        _edit(run, ck, edit, as_json)
    elif query is not None:
        _query(run, ck, query, top, as_json)
    elif stats:
        _stats(run, ck, plot, as_json)
    else:
        show_entries(run, ck, rows, search, as_json)


def _evaluate(run, ck: Path, eval_data: Path, eval_samples: Optional[int], as_json: bool) -> None:
    from memcli.eval.explicit import evaluate_run

    res = evaluate_run(run.model, run.tok, run.bank, eval_data, run.info.get("answer_format", "letter"), eval_samples)
    if as_json:
        emit(res, True)
    else:
        console.print(kv_table(f"evaluation of {ck} on {eval_data}",
                               {k: round(v, 4) if isinstance(v, float) else v for k, v in res.items()}))


def _edit(run, ck: Path, spec: List[str], as_json: bool) -> None:
    from memcli.errors import MemcliError
    from memcli.explicit.io import save_bank_edit
    from memcli.explicit.store import edit_entry

    bank = run.bank
    if len(spec) == 1 and "=" in spec[0]:
        spec = spec[0].split("=", 1)
    if len(spec) != 2:
        raise MemcliError("--edit: expected ROW and new text ('--edit 12 --edit \"text\"' or '--edit \"12=text\"')")
    try:
        row = int(spec[0])
    except ValueError:
        raise MemcliError(f"--edit: row '{spec[0]}' is not an integer") from None
    if not 0 <= row < bank.knowledge_num:
        raise MemcliError(f"--edit: row {row} outside [0, {bank.knowledge_num})")
    before, after = edit_entry(run.model, bank, run.tok, row, spec[1], step=int(run.info.get("step", 0)))
    save_bank_edit(ck, run.model, bank)
    res = {"checkpoint": str(ck), "row": row, "before": before, "after": after}
    emit(res, as_json, lambda r: kv_table("edited entry", r))


def _query(run, ck: Path, query: str, top: int, as_json: bool) -> None:
    from memcli.explicit import inspect as I

    res = I.query_view(run.model, run.bank, run.tok, query, top)
    read = res[0].get("read", "n/a") if res else "n/a"
    note = "" if read == "n/a" else f" · read: {'none (abstains)' if read is None else f'row {read}'}"
    emit(res, as_json, lambda r: table(f"retrieval for {query!r} ({ck}){note}",
                                       ["layer", "pos", "token", "row", "weight", "entry"],
                                       [(x["layer"], x["position"], repr(x["token"]), e["row"], e["weight"], e["text"])
                                        for x in r for e in x["entries"]]))


def _stats(run, ck: Path, plot: Optional[Path], as_json: bool) -> None:
    from memcli.explicit import inspect as I

    model, bank, tok = run.model, run.bank, run.tok
    s = I.stats_view(model)
    if plot is not None:
        from memcli.views import plot_usage

        plot_usage(model.usage[model.valid].cpu().numpy(), plot)
        s["plot"] = str(plot)
    if as_json:
        emit(s, True)
        return
    console.print(kv_table(f"memory usage ({ck})", {k: v for k, v in s.items() if k not in ("hottest", "histogram")}))
    console.print(table("hottest entries", ["row", "usage", "entry"],
                        [(r, u, bank.decode(tok, [r])[0]) for r, u in s["hottest"]]))
    h = s["histogram"]
    peak = max(h["counts"]) or 1
    console.print(table("usage histogram", ["usage range", "entries", ""],
                        [(f"{h['edges'][i]:.3g}..{h['edges'][i + 1]:.3g}", c, "█" * int(round(40 * c / peak)))
                         for i, c in enumerate(h["counts"])]))


def show_entries(run, ck: Path, rows: Optional[str], search: Optional[str], as_json: bool) -> None:
    from memcli.explicit import inspect as I

    bank, tok = run.bank, run.tok
    if search is not None:
        rs = I.search_rows(bank, tok, search)
    else:
        rs = list(I.parse_rows(rows or f"0:{min(20, bank.knowledge_num)}", bank.knowledge_num))
    res = I.entries_view(run.model, bank, tok, rs)
    emit(res, as_json, lambda r: table(f"memory entries ({ck}, {bank.knowledge_num} x {bank.knowledge_length})",
                                       ["row", "text", "usage", "last updated"],
                                       [(e["row"], e["text"], e["usage"], e["last_updated"]) for e in r]))


def register(app: typer.Typer) -> None:
    app.command("inspect-memory")(inspect_memory)
