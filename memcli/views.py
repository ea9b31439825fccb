"""Everything memcli shows: Rich tables, JSON for scripts, Markdown tables and PNG plots.

Core code returns plain data (dicts and lists); this module turns it into what a reader sees.
"""

from __future__ import annotations

import io
import json
import re
import sys
from pathlib import Path
from typing import Any, Iterable, Sequence

from rich.table import Table

from memcli.console import console

_MARKUP = re.compile(r"\[/?[a-z ]+\]")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> Table:
    t = Table(title=title, title_justify="left")
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[_fmt(v) for v in r])
    return t


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


def markdown_table(columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub Markdown table (Rich markup stripped from the cells)."""
    clean = [[_MARKUP.sub("", _fmt(c)) for c in r] for r in rows]
    return ("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n"
            + "".join("| " + " | ".join(r) + " |\n" for r in clean))


def write_markdown(path: str | Path | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]) -> None:
    if path is None:
        return
    from memcli.records import atomic_write_text

    atomic_write_text(path, markdown_table(columns, list(rows)))


def highlight(v: Any, best: bool) -> str:
    """A table cell, bold green when it is the best value of its row."""
    if v is None:
        return "-"
    s = f"{v:.4f}" if isinstance(v, float) else str(v)
    return f"[bold green]{s}[/bold green]" if best else s


def labels_of(paths: list) -> list[str]:
    """Column labels for runs: their directory names, or the whole paths when names repeat."""
    names = [Path(p).name or str(p) for p in paths]
    return names if len(set(names)) == len(names) else [str(p) for p in paths]


def metric_rows(metrics: dict, labels: list[str], diffs: bool = True) -> tuple[list[str], list[tuple]]:
    """One row per metric, one column per item, the best highlighted; Δ columns against the first item."""
    from memcli.eval.compare import lower_is_better

    cols = ["metric", *labels] + ([f"Δ {lb} vs {labels[0]}" for lb in labels[1:]] if diffs else [])
    rows = []
    for m, vals in metrics.items():
        nums = [v for v in vals if isinstance(v, (int, float))]
        best = (min(nums) if lower_is_better(m) else max(nums)) if len(nums) > 1 and len(set(nums)) > 1 else None
        cells = [highlight(v, best is not None and v == best) for v in vals]
        if diffs:
            cells += [(f"{v - vals[0]:+.4g}" if isinstance(v, (int, float)) and isinstance(vals[0], (int, float)) else "-")
                      for v in vals[1:]]
        rows.append((m, *cells))
    return cols, rows


# --------------------------------------------------------------------------- plots


def save_figure(fig, path: str | Path) -> None:
    """PNG written atomically (a half-written picture is never left behind)."""
    import matplotlib.pyplot as plt

    from memcli.records import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format=Path(path).suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_curves(curves: dict, out: Path, title: str, xlabel: str = "optimizer step") -> None:
    """One panel per metric, one line per run: ``{metric: {run: [(x, y), ...]}}``."""
    plt = _plt()
    n = max(1, len(curves))
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.4), squeeze=False)
    for ax, (m, by_run) in zip(axes[0], curves.items()):
        for name, pts in by_run.items():
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=Path(name).name or name, linewidth=1.4)
        ax.set_title(m)
        ax.set_xlabel(xlabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, out)


COUNTS = ("questions", "labelled_items", "eval_n", "dialogs", "count")


def plot_bars(metrics: dict, labels: list[str], out: Path, title: str) -> None:
    """One panel per metric, one bar per item: ``{metric: [value per label]}``."""
    plt = _plt()
    names = [m for m, vs in metrics.items() if m not in COUNTS and all(isinstance(v, (int, float)) for v in vs)]
    n = max(1, len(names))
    cols = min(n, 4)
    nrows = (n + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3.0 * nrows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    for ax, m in zip(axes.flat, names):
        vals = metrics[m]
        bars = ax.bar(range(len(vals)), vals, color=[f"C{i}" for i in range(len(vals))])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_xticks(range(len(vals)), [Path(x).name or x for x in labels], rotation=20, fontsize=8)
        ax.set_title(m, fontsize=9)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out)


def plot_usage(usage, path: str | Path) -> None:
    """Histogram and rank plot of per-entry usage (a 1-D array)."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].hist(usage, bins=40, color="#3b75af")
    axes[0].set_xlabel("usage (summed selection weight)")
    axes[0].set_ylabel("entries")
    axes[0].set_title("Usage histogram")
    axes[1].plot(sorted(usage, reverse=True), color="#c44e52")
    axes[1].set_yscale("symlog")
    axes[1].set_xlabel("entry rank")
    axes[1].set_ylabel("usage")
    axes[1].set_title("Usage by rank")
    fig.tight_layout()
    save_figure(fig, path)
