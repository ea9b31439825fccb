"""``memcli memory list|add|replace|remove|index``: the user's own facts in a trained explicit-memory run, no
retraining, and the index that searches a large bank."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from memcli.views import emit, kv_table

memory = typer.Typer(help="List, add, replace and remove the facts in a trained explicit-memory run's bank.",
                     no_args_is_help=True, rich_markup_mode="rich")

_RUN = typer.Option(None, "--model-path", "-m", help="Explicit-memory run directory (default: the newest under out/).")
_OUT = typer.Option(Path("out"), help="Where to look for the newest run.")
_FROM = typer.Option(..., "--from", "-f", help="Facts: a JSONL file of {\"text\": ...} lines (optional subject: "
                     "what a question must name to read the entry; predicate, object, uuid) or a knowledge base JSON "
                     "(sentence_trex_data.json).")
_JSON = typer.Option(False, "--json", help="Machine-readable output.")
_CACHE = typer.Option(True, "--cache/--no-cache", help="Keep the computed entry features in RUN/cache/entry-features, "
                      "by content: an interrupted change run again resumes from them (safe to delete).")


def _open(model_path: Optional[Path], out_dir: Path):
    from memcli.kinds import EXPLICIT
    from memcli.rundir import newest_run, require_kind
    from memcli.runs import load_run

    path = model_path or newest_run(out_dir, EXPLICIT)
    require_kind(path, EXPLICIT)
    return load_run(path)


def _done(run, mem, bank, change, as_json: bool) -> None:
    from memcli.explicit import store

    store.save(run.path, mem, bank)
    res = dict(run=str(run.path), **change.summary(), entries=int(mem.valid.sum()), bank_size=bank.knowledge_num)
    emit(res, as_json, lambda r: kv_table("memory changed", r))


@memory.command("list")
def list_entries(model_path: Optional[Path] = _RUN, out_dir: Path = _OUT,
                 rows: Optional[str] = typer.Option(None, "--rows", help="Rows to show, START:END (default 0:20)."),
                 search: Optional[str] = typer.Option(None, "--search", help="Entries whose text contains this."),
                 as_json: bool = _JSON):
    """The bank's entries: row, text, usage, last change.

    [bold]Examples[/bold]

      memcli memory list -m out/real --search Basim
      memcli memory list --rows 1000:1030 --json
    """
    from memcli.cli.inspect import show_entries

    run = _open(model_path, out_dir)
    show_entries(run, run.path, rows, search, as_json)


@memory.command("add")
def add(facts: Path = _FROM, model_path: Optional[Path] = _RUN, out_dir: Path = _OUT, cache: bool = _CACHE,
        as_json: bool = _JSON):
    """Store new facts: free rows first, the bank grows to the next perfect square when they run out.

    The entries' features are computed for the new rows only; the run answers over them at once.

    [bold]Examples[/bold]

      memcli memory add -m out/real --from my_facts.jsonl
      memcli memory add -m out/real --from data/other/sentence_trex_data.json
    """
    from memcli.data.facts import read_facts_where
    from memcli.explicit import store

    entries, where = read_facts_where(facts)  # every line checked before the run is opened
    run = _open(model_path, out_dir)
    mem, bank, change = store.add(run.model, run.bank, run.tok, entries, step=int(run.info.get("step", 0)),
                                  cache=store.feature_cache(run.path) if cache else None, where=where)
    _done(run, mem, bank, change, as_json)


@memory.command("replace")
def replace(facts: Path = _FROM, model_path: Optional[Path] = _RUN, out_dir: Path = _OUT, cache: bool = _CACHE,
            as_json: bool = _JSON):
    """Rewrite stored facts, matched by uuid: each line names the uuid of the fact it rewrites ('memory list --json'
    shows them; a fact added without one got "fact-" + a hash of its text).

    [bold]Example[/bold]

      memcli memory replace -m out/real --from corrections.jsonl
    """
    from memcli.data.facts import read_facts_where
    from memcli.explicit import store

    entries, where = read_facts_where(facts)
    run = _open(model_path, out_dir)
    change = store.replace_entries(run.model, run.bank, run.tok, entries, step=int(run.info.get("step", 0)),
                                   cache=store.feature_cache(run.path) if cache else None, where=where)
    _done(run, run.model, run.bank, change, as_json)


@memory.command("remove")
def remove(model_path: Optional[Path] = _RUN, out_dir: Path = _OUT,
           rows: Optional[str] = typer.Option(None, "--rows", help="Rows to remove: 12, 3:9, or 1,5,7."),
           uuid: Optional[List[str]] = typer.Option(None, "--uuid", help="Remove the entry with this uuid (repeatable)."),
           facts: Optional[Path] = typer.Option(None, "--from", "-f", help="Remove the facts of this file (by uuid)."),
           as_json: bool = _JSON):
    """Forget facts: their rows become padding, are never retrieved, and are reused by the next add.

    [bold]Examples[/bold]

      memcli memory remove -m out/real --rows 12
      memcli memory remove -m out/real --from my_facts.jsonl
    """
    from memcli.data.facts import read_facts
    from memcli.errors import MemcliError
    from memcli.explicit import store

    if not (rows or uuid or facts):
        raise MemcliError("memory remove: give --rows, --uuid or --from")
    ids = list(uuid or []) + ([e["uuid"] for e in read_facts(facts)] if facts else [])
    run = _open(model_path, out_dir)
    have = run.bank.row_of_uuid()
    missing = [u for u in ids if u not in have]
    if missing:
        raise MemcliError(f"memory remove: {len(missing)} uuid(s) are not in the bank (e.g. '{missing[0]}')")
    targets = [have[u] for u in ids] + (_rows(rows, run.bank.knowledge_num) if rows else [])
    change = store.remove(run.model, run.bank, run.tok, targets, step=int(run.info.get("step", 0)))
    _done(run, run.model, run.bank, change, as_json)


@memory.command("index")
def index_cmd(model_path: Optional[Path] = _RUN, out_dir: Path = _OUT,
              pool: int = typer.Option(1024, "--pool", help="Entries re-ranked by the exact score per query."),
              probe: int = typer.Option(64, "--probe", help="Best half keys taken per half (cells walked: among "
                                        "probe^2)."),
              exact: bool = typer.Option(False, "--exact", help="Drop the index: search every entry exactly."),
              seed: int = typer.Option(0, "--seed", help="Seed of the k-means that places the cells."),
              as_json: bool = _JSON):
    """Fit a product-key index (an inverted multi-index) to the run's trained content keys, or re-fit it: a query
    then scores 2 x sqrt(N) half keys and re-ranks the --pool entries of its best cells instead of scoring all N
    (no training; rows changed later are searched exactly until the next fit; 'memory add' re-fits a grown bank).

    [bold]Examples[/bold]

      memcli memory index -m out/big            # fit (or re-fit) the index
      memcli memory index -m out/big --exact    # back to exact search
    """
    from memcli.explicit import index, store

    run = _open(model_path, out_dir)
    mem = run.model
    if exact:
        index.drop(mem)
        res = {"run": str(run.path), "retrieval": "exact", "entries": int(mem.valid.sum())}
    else:
        res = dict(run=str(run.path), retrieval="fitted product-key index", **index.fit(mem, pool, probe, seed))
        res["self_recall@1"] = round(index.self_recall(mem), 4)
    store.save(run.path, mem, run.bank)
    emit(res, as_json, lambda r: kv_table("memory index", r))


def _rows(spec: str, n: int) -> list[int]:
    from memcli.explicit.inspect import parse_rows

    return [r for part in spec.split(",") for r in parse_rows(part.strip(), n)]


def register(app: typer.Typer) -> None:
    app.add_typer(memory, name="memory")
