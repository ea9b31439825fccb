"""Data commands: gen-data, convert-omcq, build-cache, build-keys."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.views import console, emit, kv_table, table

gen = typer.Typer(help="Generate knowledge bases and dialogs.", no_args_is_help=True, rich_markup_mode="rich")


def _show(title: str, result: dict, as_json: bool) -> None:
    emit(result, as_json, lambda r: kv_table(title, r))


@gen.command("knowledge")
def gen_knowledge(
    out: Path = typer.Option(Path("data/default"), "--out", "-o", help="Output directory."),
    num_facts: int = typer.Option(1024, "--num-facts", "-n", help="Facts to generate (T-REx: at most this many)."),
    seed: int = typer.Option(0, help="Random seed (same seed, same files)."),
    heldout_fraction: float = typer.Option(0.2, help="Share of facts held out: in the bank, never asked in training."),
    trex: Optional[Path] = typer.Option(None, help="T-REx directory in the LPAQA layout (triples/, templates/)."),
    relations: Optional[str] = typer.Option(None, help="T-REx relations to use, comma separated (e.g. P19,P36)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Knowledge base ([cyan]sentence_trex_data.json[/cyan]) and multiple-choice questions in ExplicitLM's format.

    Writes sentence_trex_data.json, omcq_trex_data.json, omcq_train.json and omcq_val.json
    (questions about held-out facts). The default is a synthetic base of invented entities.

    [bold]Examples[/bold]

      memcli gen-data knowledge --out data/default
      memcli gen-data knowledge --trex ../shared/data/trex --num-facts 4096 --out data/trex
    """
    from memcli.data.pipeline import gen_knowledge as run

    rel = [r.strip() for r in relations.split(",") if r.strip()] if relations else None
    _show("gen-data knowledge", run(out, num_facts, seed, heldout_fraction, trex, rel), as_json)


@gen.command("dialog")
def gen_dialog(
    out: Path = typer.Option(Path("data/dialog"), "--out", "-o", help="Output directory."),
    num_train: int = typer.Option(2000, help="Training dialogs."),
    num_val: int = typer.Option(200, help="Validation dialogs."),
    turns: int = typer.Option(6, help="Turns per dialog."),
    min_distance: int = typer.Option(2, help="The asked fact is at least this many turns before the end."),
    facts_per_dialog: int = typer.Option(2, help="Attribute statements per dialog (one is asked)."),
    name_pool: int = typer.Option(0, help="Draw names/places from a fixed pool of this size (0: invent each one)."),
    min_turns: Optional[int] = typer.Option(None, help="Training dialogs get between this many and --turns turns (validation: --turns)."),
    seed: int = typer.Option(0, help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """HIPPO dialogs: [cyan]data_train.jsonl[/cyan] / [cyan]data_val.jsonl[/cyan] with dialog_history, memory_query, memory_answer.

    [bold]Examples[/bold]

      memcli gen-data dialog --out data/dialog --turns 12 --min-distance 6
      memcli gen-data dialog --name-pool 200 --min-turns 1 --num-train 20000
    """
    from memcli.data.pipeline import gen_dialog as run

    _show("gen-data dialog", run(out, num_train, num_val, seed, turns, min_distance, facts_per_dialog, name_pool,
                                     min_turns), as_json)


@gen.command("default")
def gen_default(
    out: Path = typer.Option(Path("data/default"), "--out", "-o", help="Output directory."),
    num_facts: int = typer.Option(1024, "--num-facts", "-n", help="Facts (the bank is the next perfect square)."),
    seed: int = typer.Option(0, help="Random seed."),
    trex: Optional[Path] = typer.Option(None, "--trex", help="T-REx directory (triples/ + templates/) instead of "
                                        "the synthetic facts."),
    knowledge_length: int = typer.Option(16, "--knowledge-length", "-l", help="Tokens per bank entry."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """The whole knowledge pipeline: knowledge -> convert-omcq -> build-cache -> build-keys.

    [bold]Examples[/bold]

      memcli gen-data default --out data/default
      memcli gen-data default --trex ../shared/data/trex -n 4096 -l 32 --out data/trex
    """
    from memcli.data.pipeline import default_data

    res = default_data(out, seed=seed, num_facts=num_facts, trex=trex, knowledge_length=knowledge_length)
    if as_json:
        emit(res, True)
        return
    for step, r in res.items():
        console.print(kv_table(step, {k: v for k, v in r.items() if not isinstance(v, dict)}))
    _print_recall(res["build-keys"])


def _print_recall(meta: dict) -> None:
    ks = list(meta["self_recall"])
    console.print(table(
        "self-recall (an entry's own embedding retrieves its own cell)",
        ["cells"] + ks,
        [["one-to-one balanced (memcli)"] + [meta["self_recall"][k] for k in ks],
         [f"nearest centroid, collisions (ExplicitLM; {meta['explicitlm_collided_entries']} entries collide)"]
         + [meta["self_recall_explicitlm"][k] for k in ks]],
    ))


def convert_omcq(
    input: Path = typer.Option(..., "--input", "-i", help="OMCQ JSON (ExplicitLM format)."),
    output: Path = typer.Option(..., "--output", "-o", help="SFT conversations JSONL to write."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Multiple-choice items -> SFT conversations (user: question, options, instruction; assistant: answer).

    Items with an empty field are skipped and counted.

    [bold]Example[/bold]

      memcli convert-omcq --input data/default/omcq_train.json --output data/default/sft_train.jsonl
    """
    from memcli.data.pipeline import convert_omcq as run

    _show("convert-omcq", run(input, output), as_json)


def build_cache(
    knowledge: Path = typer.Option(..., "--knowledge", "-k", help="Knowledge base JSON (sentence_trex_data.json)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache directory to write."),
    tokenizer: str = typer.Option("tiny", help="'tiny' or a local HF model/tokenizer directory."),
    knowledge_length: int = typer.Option(16, help="Tokens per entry (padded / truncated)."),
    knowledge_num: Optional[int] = typer.Option(None, help="Entries in the bank, a perfect square (default: the next one)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Tokenise the knowledge base into the memory bank \\[knowledge_num, knowledge_length] + a row mapping.

    [bold]Example[/bold]

      memcli build-cache --knowledge data/default/sentence_trex_data.json --out data/default/cache
    """
    from memcli.data.pipeline import build_cache as run

    _show("build-cache", run(knowledge, out, tokenizer, knowledge_length, knowledge_num), as_json)


def build_keys(
    cache: Path = typer.Option(..., "--cache", "-c", help="Cache directory from build-cache (reordered in place)."),
    out: Path = typer.Option(..., "--out", "-o", help="Keys directory to write."),
    embedder: str = typer.Option("backbone", help="'backbone' (pooled backbone embeddings), 'minilm', or a local sentence-transformers path."),
    backbone: str = typer.Option("tiny", help="Backbone for --embedder backbone."),
    sft: Optional[Path] = typer.Option(None, help="SFT conversations to label -> train_labeled.jsonl."),
    sft_val: Optional[Path] = typer.Option(None, help="Validation conversations to label -> val_labeled.jsonl."),
    top_k: int = typer.Option(8, help="Labels per query."),
    seed: int = typer.Option(0, help="k-means seed."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Product keys \\[2, sqrt(N), knowledge_dim/2] by k-means, one entry per cell, and router labels.

    The bank is reordered so that bank row i = key cell i = label index i. Prints self-recall
    next to the ExplicitLM recipe.

    [bold]Examples[/bold]

      memcli build-keys --cache data/default/cache --out data/default/keys --sft data/default/sft_train.jsonl
      memcli build-keys --cache data/trex/cache --out data/trex/keys --embedder minilm
    """
    from memcli.data.pipeline import build_keys as run

    meta = run(cache, out, embedder, backbone, sft, sft_val, top_k, seed)
    if as_json:
        emit(meta, True)
        return
    console.print(kv_table("build-keys", {k: v for k, v in meta.items() if not isinstance(v, dict)}))
    _print_recall(meta)


def register(app: typer.Typer) -> None:
    app.add_typer(gen, name="gen-data")
    app.command("convert-omcq")(convert_omcq)
    app.command("build-cache")(build_cache)
    app.command("build-keys")(build_keys)
