"""``memcli compare``: checkpoints, runs, HIPPO variants, LoCoMo and benchmark suites side by side."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from memcli.errors import MemcliError
from memcli.views import emit, highlight, labels_of, metric_rows, table, write_markdown

compare = typer.Typer(help="Put results side by side: checkpoints, training runs, HIPPO variants, LoCoMo, benchmarks.",
                      no_args_is_help=True, rich_markup_mode="rich")

SUITES = ("explicit", "hippo", "hrpo", "kernels", "all")


@compare.command("bench")
def bench(
    suite: str = typer.Option("all", help=f"Benchmark suite: {', '.join(SUITES)}."),
    quick: bool = typer.Option(False, help="Small shapes (checks the harness in seconds)."),
    turns: int = typer.Option(50, help="hippo suite: chat turns to time (marks 1, 10, 50, 100, 300, 600 up to it; "
                                       "the full-history path stops at 50, where the tiny model's 2,048 positions "
                                       "fill)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """Time memcli's paths against reference / seed-style paths in one run and print the ratios.

    The explicit suite runs at the seed's shapes (knowledge_num 1,048,576, knowledge_length 16,
    num_candidates 16): product-key top-k vs brute force and the seed's grid, pooled memory read vs
    materialise-then-mean (time and peak memory), vectorised EMA vs a per-entry loop, and generation
    with KV cache vs recomputing every token. Takes about 4 minutes on 2 CPU cores. The hippo suite
    times chat turns 1, 10 and 50 (to 600 with --turns) with the memory state, the state + the turn
    memory (--recall 5), and the full history in the prompt. The
    kernels suite times the Triton kernels (CUDA only) against their PyTorch references and the
    seed-style paths, forward and forward+backward, with the token bag's achieved bandwidth. The
    hrpo suite compares hybrid-rollout tokens/s with HF generate and with a loop that re-decodes the
    text each step to find '####'.

    [bold]Examples[/bold]

      memcli compare bench
      memcli compare bench --quick --json
      memcli compare bench --suite hippo --turns 600
    """
    from memcli.errors import MemcliError

    if suite not in SUITES:
        raise MemcliError(f"--suite '{suite}': expected one of {', '.join(SUITES)}")
    if turns < 1:
        raise MemcliError(f"--turns {turns}: expected a number of chat turns >= 1")
    from memcli.bench.explicit import run_explicit
    from memcli.bench.hippo import run_hippo

    rows = []
    if suite in ("explicit", "all"):
        rows += run_explicit(quick=quick)
    if suite in ("hippo", "all"):
        rows += run_hippo(quick=quick, turns=turns)
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
    write_markdown(markdown, cols, data)
    emit(rows, as_json, lambda _: table(f"compare bench --suite {suite}", cols, data))


@compare.command("locomo")
def locomo(
    model_path: Optional[Path] = typer.Option(None, "--model-path", "-m", help="HIPPO run directory (default: newest under "
                                              "out/, unless --backbone)."),
    backbone: Optional[str] = typer.Option(None, "--backbone", "-b", help="Answer with this backbone alone (tiny, "
                                           "smollm2-135m, a path) instead of a HIPPO run: the setups without a state."),
    data: Path = typer.Option(..., "--data", help="LoCoMo JSON (locomo10.json format)."),
    setups: Optional[str] = typer.Option(None, help="Comma-separated, of: none, full, oracle, turns, hippo, hippo+turns, "
                                         "hippo+oracle (default: all that the model allows)."),
    retriever: str = typer.Option("hybrid", help="How the turns setups rank turns: hybrid (BM25 + dense, z-fused), dense, "
                                  "or lexical (BM25)."),
    encoder: str = typer.Option("minilm", help="Dense turn keys: minilm (all-MiniLM-L6-v2, offline), mpnet "
                                "(all-mpnet-base-v2, fetched once), backbone (mean states of a backbone layer) or a "
                                "sentence-transformers directory ('train retriever')."),
    top_k: int = typer.Option(5, "--top-k", help="Turns read per question by the turns setups."),
    rerank_with: Optional[str] = typer.Option(None, "--rerank-with", help="Re-order each question's best turns by "
                                              "this backbone's log p(question | turn) (tiny, smollm2-135m, a path)."),
    rerank_candidates: int = typer.Option(20, help="Turns re-ordered per question with --rerank-with."),
    neighbor_weight: float = typer.Option(0.5, help="Turn prior: x the better score of a turn's neighbours (0: off)."),
    speaker_weight: float = typer.Option(8.0, help="Turn prior: for the turns of the one speaker a question names."),
    date_weight: float = typer.Option(8.0, help="Turn prior: for the turns on the date a question names (0: off)."),
    dense_share: Optional[float] = typer.Option(None, help="Hybrid: the dense half's share of the score (default: the "
                                                "encoder's: 0.5, or what 'train retriever' recorded, 0.8)."),
    conversations: Optional[int] = typer.Option(None, help="Only N conversations (from --skip on)."),
    skip: int = typer.Option(0, help="Skip the first N conversations (e.g. --skip 5: the held-out half)."),
    max_questions: Optional[int] = typer.Option(None, help="Only the first N questions of each conversation."),
    sample: Optional[int] = typer.Option(None, "--sample", help="N questions per conversation drawn at random (seed 0) "
                                         "instead of the first N: every category represented."),
    categories: Optional[str] = typer.Option(None, "--categories", help="Only these question categories, comma-separated "
                                             "(1 multi-hop, 2 temporal, 3 open-domain, 4 single-hop, 5 adversarial); "
                                             "--sample and --max-questions then count within them."),
    context_window: Optional[int] = typer.Option(None, help="Token budget of the full-history setup (default: the model's window)."),
    max_new_tokens: int = typer.Option(24, help="Answer length."),
    batch: int = typer.Option(8, help="Questions generated together (latency is each question's share of its batch)."),
    recall_only: bool = typer.Option(False, "--recall-only", help="Only the retriever's evidence recall@1/5/10 (no "
                                     "answers generated: seconds, and the same for any model size)."),
    out_dir: Path = typer.Option(Path("out"), help="Where to look for the newest run."),
    answers: Optional[Path] = typer.Option(None, "--answers", help="Also write every question's answers, scores and "
                                           "turns read (JSONL)."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """LoCoMo QA per category: memory state, retrieved turns, no history, full history and the evidence oracle.

    Each conversation is written into the memory (the HIPPO state turn by turn; the turns as retrievable
    entries), then every question is answered in each setup and scored with LoCoMo's token F1 (Porter
    stemming; category 1 split on commas, category 3 cut at ';', category 5 = abstention) and BLEU-1.
    "overall" is categories 1-4, as the field reports; adversarial (5) is apart. Evidence recall@k is the
    share of a question's evidence turns among the top k retrieved (all@k: every evidence turn there).

    [bold]Examples[/bold]

      memcli compare locomo --data locomo10.json -m out/hippo
      memcli compare locomo --data locomo10.json --backbone smollm2-135m \\
          --setups none,oracle,turns
      memcli compare locomo --data locomo10.json --backbone smollm2-135m \\
          --recall-only --encoder backbone
      memcli compare locomo --data locomo10.json --backbone tiny --recall-only \\
          --rerank-with smollm2-135m
    """
    from memcli.eval.locomo import load_locomo

    samples = _only_categories(load_locomo(data), categories)
    _at_least_one(**{"--top-k": top_k, "--batch": batch, "--sample": sample, "--rerank-candidates": rerank_candidates})
    priors = _turn_priors(neighbor_weight=neighbor_weight, speaker_weight=speaker_weight, date_weight=date_weight,
                          dense_share=dense_share)
    _check_selection(data, len(samples), skip, sample, max_questions, retriever)
    model, tok, bb, path, allowed = _locomo_model(backbone, model_path, out_dir)
    chosen = _locomo_setups(setups, allowed, backbone is not None)
    enc = _turn_encoder(encoder, retriever, bb, tok, skip, conversations, len(samples))
    reranker = _reranker(rerank_with, rerank_candidates, (bb, tok) if rerank_with == str(path) else None)
    common = dict(retriever=retriever, first=skip, sample=sample, reranker=reranker, priors=priors)
    if recall_only:
        return _show_recall(_locomo_pass(samples, None, conversations, max_questions, enc, common), as_json, markdown)
    res = _locomo_pass(samples, chosen, conversations, max_questions, enc, common, model=model, tok=tok,
                       max_new_tokens=max_new_tokens, context_window=context_window, batch=batch, top_k=top_k)
    _show_locomo(res, str(path), as_json, markdown, answers)


def _locomo_pass(samples: list[dict], chosen: Optional[list[str]], conversations: Optional[int],
                 max_questions: Optional[int], enc, common: dict, **answer) -> dict:
    """One pass over the selected questions under a progress bar: recall only (``chosen`` None) or every setup's answers."""
    from memcli.console import progress
    from memcli.eval.locomo import pick_questions, recall_only, run_locomo

    total = sum(len(pick_questions(s["qa"], max_questions, common["sample"], 0))
                for s in samples[common["first"]:][:conversations])
    with progress() as bar:
        task = bar.add_task("retrieving" if chosen is None else "answering", total=total * len(chosen or [None]))
        advance = lambda _, n: bar.advance(task, n)  # noqa: E731
        if chosen is None:
            return recall_only(samples, enc, conversations, max_questions, **common, progress_cb=advance)
        return run_locomo(answer["model"], answer["tok"], samples, chosen, conversations, max_questions,
                          answer["max_new_tokens"], answer["context_window"], batch=answer["batch"],
                          top_k=answer["top_k"], encoder=enc, **common, progress_cb=advance)


def _turn_priors(dense_share: Optional[float], **weights: float) -> dict:
    """``TurnMemory``'s weights as given (the dense share only when given: else the encoder's own)."""
    for key, w in weights.items():
        if not w >= 0:
            raise MemcliError(f"--{key.replace('_', '-')} {w}: expected a number >= 0 (0 turns the prior off)")
    if dense_share is None:
        return weights
    if not 0 <= dense_share <= 1:
        raise MemcliError(f"--dense-share {dense_share}: expected a number from 0 to 1")
    return {**weights, "dense_share": dense_share}


def _turn_encoder(encoder: str, retriever: str, bb, tok, skip: int, conversations: Optional[int], n: int):
    """The dense turn encoder (None for BM25 alone). A 'train retriever' encoder measured on the conversations it
    learnt from reports a fit, not recall: said in one line."""
    from memcli.console import err_console
    from memcli.retrieval.encoders import make_encoder
    from memcli.training.retriever import trained_conversations

    if retriever == "lexical":
        return None
    enc = make_encoder(encoder, bb, tok)
    trained = set(trained_conversations(encoder) or ())
    seen = sorted(trained & set(range(skip + 1, min(n, skip + (conversations or n)) + 1)))
    if seen:
        err_console.print(f"warning: --encoder {encoder} was trained on conversation(s) {', '.join(map(str, seen))} "
                          "evaluated here: their figures are not held out", highlight=False, soft_wrap=True)
    return enc


def _only_categories(samples: list[dict], spec: Optional[str]) -> list[dict]:
    if spec is None:
        return samples
    from memcli.eval.locomo import CATEGORIES

    try:
        cats = {int(x) for x in spec.split(",") if x.strip()}
    except ValueError:
        cats = set()
    if not cats or not cats <= set(CATEGORIES):
        raise MemcliError(f"--categories {spec!r}: expected comma-separated categories among "
                          f"{', '.join(f'{c} ({n})' for c, n in CATEGORIES.items())}")
    return [dict(s, qa=[q for q in s["qa"] if q["category"] in cats]) for s in samples]


def _check_selection(data: Path, n: int, skip: int, sample: Optional[int], max_questions: Optional[int],
                     retriever: str) -> None:
    from memcli.hippo.turns import RETRIEVERS

    if retriever not in RETRIEVERS:
        raise MemcliError(f"--retriever '{retriever}': expected one of {', '.join(RETRIEVERS)}")
    if skip < 0 or skip >= n:
        raise MemcliError(f"--skip {skip}: {data} has {n} conversations")
    if sample is not None and max_questions is not None:
        raise MemcliError("--sample and --max-questions: give one")


def _at_least_one(**options) -> None:
    for name, v in options.items():
        if v is not None and v < 1:
            raise MemcliError(f"{name} {v}: expected at least 1")


def _reranker(spec: Optional[str], candidates: int, loaded: Optional[tuple] = None):
    """A likelihood re-ranker over ``spec``'s backbone (``loaded``: the answering model's, already in memory)."""
    if spec is None:
        return None
    from memcli.backbone import load_backbone
    from memcli.hippo.turns import LikelihoodReranker

    bb, tok = loaded or load_backbone(spec)
    return LikelihoodReranker(bb, tok, candidates=candidates, name=spec)


def _locomo_model(backbone: Optional[str], model_path: Optional[Path], out_dir: Path):
    """(model, tokenizer, backbone, name, setups it allows): a backbone alone, or a HIPPO run with its state."""
    from memcli.eval.locomo import SETUPS, PlainModel

    if backbone is not None and model_path is not None:
        raise MemcliError("--backbone and --model-path: give one (a backbone alone, or a HIPPO run)")
    if backbone is not None:
        from memcli.backbone import load_backbone

        bb, tok = load_backbone(backbone)
        return PlainModel(bb), tok, bb, backbone, ("none", "full", "oracle", "turns")
    from memcli.rundir import newest_run, require_kind
    from memcli.runs import load_run

    path = model_path or newest_run(out_dir, "hippo")
    require_kind(path, "hippo")
    run = load_run(path)
    return run.model, run.tok, run.model.backbone, path, SETUPS


def _locomo_setups(setups: Optional[str], allowed: tuple, plain: bool) -> list[str]:
    chosen = [x.strip() for x in setups.split(",") if x.strip()] if setups else list(allowed)
    for x in chosen:
        if x not in allowed:
            why = " (a HIPPO run's state; --backbone has none)" if x.startswith("hippo") and plain else ""
            raise MemcliError(f"--setups: '{x}' is not a setup here{why}, expected some of {', '.join(allowed)}")
    if not chosen:
        raise MemcliError("--setups: no setup given")
    return chosen


def _show_recall(r: dict, as_json: bool, markdown: Optional[Path]) -> None:
    from memcli.eval.locomo import RECALL_KS

    cols = ["k", "recall (evidence turns)", "all evidence turns"]
    rows = [(f"recall@{k}", highlight(r[f"recall@{k}"], False), highlight(r[f"all@{k}"], False)) for k in RECALL_KS]
    write_markdown(markdown, cols, rows)
    emit(r, as_json, lambda _: table(f"LoCoMo evidence recall · {r['retriever']} · {r['questions_with_evidence']} "
                                     "questions", cols, rows))


_LOCOMO_COSTS = (("evidence_in_prompt", "evidence turns in prompt"), ("prompt_tokens_mean", "prompt tokens"),
                 ("latency_s_mean", "latency s (mean)"), ("latency_s_p95", "latency s (p95)"),
                 ("write_s_per_conversation", "write s / conversation"))


def _show_locomo(res: dict, path: str, as_json: bool, markdown: Optional[Path], answers: Optional[Path] = None) -> None:
    """Setups as columns: F1 and BLEU-1 per category (best highlighted), counts, costs; recall below. ``answers``:
    every question's answers written there first (JSONL)."""
    from memcli.eval.locomo import CATEGORIES, RECALL_KS
    from memcli.records import write_jsonl

    if answers is not None:
        write_jsonl(answers, res["answers"])

    summ = res["summary"]
    names = list(summ)
    rows = []
    for metric in ("f1", "bleu1"):
        for key in [*(v for c, v in CATEGORIES.items() if c != 5), "overall"] + (["adversarial"] if metric == "f1" else []):
            vals = [summ[s][metric][key] for s in names]
            best = max((v for v in vals if v is not None), default=None)
            rows.append((f"{metric} {key}", *[highlight(v, v == best and len(names) > 1) for v in vals]))
    for key in ("overall", "adversarial"):
        rows.append((f"questions {key}", *[summ[s]["count"][key] for s in names]))
    rows += [(label, *[highlight(summ[s][key], False) for s in names]) for key, label in _LOCOMO_COSTS]
    out = {"checkpoint": path, "context_window": res["context_window"], "top_k": res["top_k"],
           "f1": {s: summ[s]["f1"] for s in names}, "bleu1": {s: summ[s]["bleu1"] for s in names},
           "count": summ[names[0]]["count"], **{k: {s: summ[s][k] for s in names} for k, _ in _LOCOMO_COSTS}}
    if "retrieval" in res:
        out["retrieval"] = res["retrieval"]
    cols = ["metric", *names]
    write_markdown(markdown, cols, rows)

    def show(_):
        from rich.console import Group

        t = table(f"LoCoMo · {path}", cols, rows)
        if "retrieval" not in res:
            return t
        r = res["retrieval"]
        return Group(t, f"evidence recall ({r['retriever']}, {r['questions_with_evidence']} questions): " + ", ".join(
            f"@{k} {r[f'recall@{k}']:.3f} (all {r[f'all@{k}']:.3f})" for k in RECALL_KS))

    emit(out, as_json, show)


def register(app: typer.Typer) -> None:
    app.add_typer(compare, name="compare")


@compare.command("checkpoints")
def checkpoints(
    paths: List[Path] = typer.Argument(..., help="Two or more run directories of the same kind."),
    data: Path = typer.Option(..., "--data", help="Evaluation data: a data directory (explicit memory), a dialog JSONL "
                                                  "(HIPPO) or a GSM8K JSONL (HRPO)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="First N evaluation items only."),
    max_new_tokens: int = typer.Option(64, help="HRPO: completion length for the greedy evaluation."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write a bar chart (PNG) here."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """The same evaluation on every checkpoint, one table, the best value per row highlighted.

    Explicit memory: held-out accuracy with memory on / off / edited and router recall
    (inspect-memory --eval). HIPPO: exact match with the memory state and without history. HRPO:
    greedy GSM8K accuracy, each run decoded as trained (hybrid or plain). Checkpoints must be of one
    kind and share a tokenizer.

    [bold]Examples[/bold]

      memcli compare checkpoints out/memory out/memory_lora --data data/default
      memcli compare checkpoints out/hippo_matrix out/hippo_selective --data \\
          data/dialog/data_val.jsonl --plot em.png
      memcli compare checkpoints out/hrpo out/hrpo_plain --data gsm8k/test.jsonl \\
          --num-samples 200 --json
    """
    from memcli.eval.compare import compare_checkpoints
    from memcli.views import plot_bars

    if num_samples is not None and num_samples < 1:
        raise MemcliError(f"--num-samples got {num_samples}, expected a positive integer")
    res = compare_checkpoints(list(paths), data, num_samples, max_new_tokens)
    labels = labels_of(paths)
    cols, rows = metric_rows(res["metrics"], labels)
    write_markdown(markdown, cols, rows)
    if plot is not None:
        plot_bars(res["metrics"], labels, plot, f"compare checkpoints ({res['kind']}) on {data}")
        res["plot"] = str(plot)
    emit(res, as_json, lambda _: table(f"compare checkpoints · {res['kind']} · {data}", cols, rows))


@compare.command("formats")
def formats(
    model_path: Optional[Path] = typer.Option(None, "--model-path", "-m", help="Explicit-memory run (default: the newest under out/)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data directory with omcq_val.json (default: the run's)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="First N held-out questions only."),
    out_dir: Path = typer.Option(Path("out"), help="Where to look for the newest run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """What a backbone can show in each answer format: ExplicitLM's letter format, a chat answer, a plain cloze.

    For the held-out questions of a run: accuracy with no fact, with the fact written in the prompt,
    following an edited fact written in the prompt (the ceilings of reading), and through the run's
    memory (on, and following an edited entry). Chance is 20% (five options).

    [bold]Examples[/bold]

      memcli compare formats -m out/real
      memcli compare formats -m out/memory --num-samples 100 --markdown formats.md
    """
    from memcli.eval.compare import FORMAT_COLUMNS, compare_formats
    from memcli.kinds import EXPLICIT
    from memcli.rundir import newest_run, read_info

    if num_samples is not None and num_samples < 1:
        raise MemcliError(f"--num-samples got {num_samples}, expected a positive integer")
    path = model_path or newest_run(out_dir, EXPLICIT)
    if data is None:
        data = Path(read_info(path)[1].get("data_dir") or "data/default")
    res = compare_formats(Path(path), data, num_samples)
    cols = ["format", *[label for _, label in FORMAT_COLUMNS], "questions"]
    rows = [(f + (" (the run's)" if f == res["recipe_format"] else ""), *[r[label] for _, label in FORMAT_COLUMNS],
             r["questions"]) for f, r in res["formats"].items()]
    write_markdown(markdown, cols, rows)
    emit(res, as_json, lambda _: table(f"compare formats · {path} · {data}", cols, rows))


@compare.command("editing")
def editing(
    model_path: Optional[Path] = typer.Option(None, "--model-path", "-m", help="Explicit-memory run (default: the newest under out/)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Data directory whose held-out facts are edited first (default: the run's)."),
    edits: str = typer.Option("1,10,100,1000", "--edits", help="Numbers of edits T after which everything is scored."),
    edits_file: Optional[Path] = typer.Option(None, "--edits-file", help="Score your own edits instead: a JSONL of ZsRE "
                                              "(subject, src, alt, rephrase, loc, loc_ans) or CounterFact "
                                              "(requested_rewrite, paraphrase_prompts, neighborhood_prompts) records, "
                                              "added with the code of 'memory add'; reliability / generalisation / "
                                              "locality as WISE reports them."),
    num_samples: int = typer.Option(200, "--num-samples", help="Facts (or edits) scored per row (a seeded sample when more qualify)."),
    setups: str = typer.Option(",".join(("memory", "rag minilm", "rag bm25", "rag hybrid", "in prompt", "off")),
                               "--setups", help="What is scored, comma-separated: memory, rag minilm (all-MiniLM-L6-v2 "
                               "top entry, FAISS where installed), rag bm25, rag hybrid (both z-fused), in prompt "
                               "(the fact written where memory writes it: the ceiling), off."),
    trex: str = typer.Option("builtin", "--trex", help="LPAQA-layout T-REx directory: templates, questions, outside facts."),
    seed: int = typer.Option(0, "--seed", help="Edit order, options and samples."),
    answers: Optional[Path] = typer.Option(None, "--answers", help="Write every scored answer here (JSON lines)."),
    placement: Optional[str] = typer.Option(None, "--placement", help="Measure with this model.placement instead of the run's: prefix, system, user_before, user_after."),
    abstain_below: Optional[float] = typer.Option(None, "--abstain-below", help="Measure with this model.abstain_below instead of the run's."),
    anchor_df: Optional[int] = typer.Option(None, "--anchor-df", help="Measure with this model.anchor_df instead of the run's."),
    anchor: Optional[str] = typer.Option(None, "--anchor", help="Measure with this model.anchor (subject, word) instead of the run's."),
    lexical_weight: Optional[float] = typer.Option(None, "--lexical-weight", help="Measure with this model.lexical_weight instead of the run's."),
    dense_weight: Optional[float] = typer.Option(None, "--dense-weight", help="Measure with this model.dense_weight instead of the run's."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="Measure with this model.encoder (minilm, mpnet, a directory) instead of the run's."),
    out_dir: Path = typer.Option(Path("out"), help="Where to look for the newest run."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """The knowledge-editing table: T edits written into the bank, then efficacy, generalisation, locality.

    Efficacy asks an edited fact in its entry's own words; generalisation asks it with a held-out LPAQA
    paraphrase and as a natural question in the chat template, in the trained wording and in held-out ones;
    locality counts unchanged answers of unedited facts of the edited relations, right answers to facts
    outside the bank, and unchanged answers to natural questions that no entry is about. Two scorings: five
    options ranked by log-likelihood, and the greedy answer (a cloze must continue with the object, a
    question's first line must state it). Beside memory: plain RAG setups over the same bank and read, the
    fact written in the prompt where memory writes it (memory off: the ceiling), and memory off; the ceiling
    at every placement is shown once. The run directory is not changed.

    [bold]Examples[/bold]

      memcli compare editing -m out/real --edits 1,10,100 --num-samples 100 \\
          --markdown editing.md
      memcli compare editing -m out/real --edits-file my_edits.jsonl \\
          --num-samples 100
      memcli compare editing -m out/real --setups "memory,in prompt,off" \\
          --placement system
    """
    from memcli.eval.editing import compare_editing
    from memcli.kinds import EXPLICIT
    from memcli.rundir import newest_run, read_info

    counts, modes = _editing_options(edits, num_samples, setups)
    path = model_path or newest_run(out_dir, EXPLICIT)
    settings = dict(placement=placement, abstain_below=abstain_below, anchor_df=anchor_df, lexical_weight=lexical_weight,
                    dense_weight=dense_weight, encoder=encoder, anchor=anchor)
    if edits_file is not None:
        from memcli.eval.edit_file import compare_edit_file

        res = compare_edit_file(Path(path), edits_file, num_samples, seed, modes, **settings)
    else:
        if data is None:
            data = Path(read_info(path)[1].get("data_dir") or "data/default")
        res = compare_editing(Path(path), data, counts, num_samples, trex, seed, modes, **settings)
    _show_editing(res, path, edits_file, answers, as_json, markdown)


def _editing_options(edits: str, num_samples: int, setups: str) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """``--edits`` as counts and ``--setups`` as names, or a one-line error naming the option."""
    try:
        counts = tuple(int(x) for x in edits.split(",") if x.strip())
    except ValueError:
        raise MemcliError(f"--edits '{edits}': expected comma-separated counts, e.g. 1,10,100,1000") from None
    if num_samples < 1:
        raise MemcliError(f"--num-samples got {num_samples}, expected a positive integer")
    return counts, tuple(m.strip() for m in setups.split(",") if m.strip())


def _show_editing(res: dict, path, edits_file: Optional[Path], answers: Optional[Path], as_json: bool,
                  markdown: Optional[Path]) -> None:
    """Write the answers (when asked), then the table: one column per scoring x setup, the memory's read share last."""
    from memcli.eval.editing import MODES, SCORINGS, SHORT
    from memcli.records import atomic_write_text

    records = res.pop("answers")
    if answers is not None:
        atomic_write_text(answers, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        res["answers"] = str(answers)
    shown = [m for m in MODES if m in res["modes"]]
    scorings = res.get("scorings", SCORINGS)
    keys = ["T", "measure", "n", *[f"{s}: {m}" for s in scorings for m in shown], "memory read"]
    cols = ["T", "measure", "n", *[f"{s} {SHORT[m]}" for s in scorings for m in shown], "read"]
    rows = [["-" if r.get(k) is None else round(r[k], 3) if isinstance(r[k], float) else r[k] for k in keys]
            for r in res["rows"]]
    write_markdown(markdown, cols, rows)
    title = f"compare editing · {path} · " + (f"{res['edits_file']}" if edits_file else f"{res['facts']} editable facts")
    emit(res, as_json, lambda _: table(title, cols, rows))


@compare.command("pretrain")
def pretrain(
    data: Path = typer.Option(Path("data/pretrain"), "--data", help="Data directory (gen-data default output with "
                              "text_train.jsonl / text_val.jsonl); written from the shipped T-REx slice when absent."),
    steps: int = typer.Option(1000, help="Optimizer steps per variant."),
    batch_size: int = typer.Option(32, help="Texts per step."),
    out_dir: Path = typer.Option(Path("out/pretrain"), help="Where the variants' runs go."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """MiniMind's experiment: pretrain a small LM from scratch on sentences, with a token memory of their facts.

    Variants on the same texts and steps: the memory model (validation with memory on and off), the
    memory model with EMA updates (every 5 steps, decay 0.9, the seed's balance loss at 0.1), and a
    dense model of the same parameter count. Reports held-out validation loss, perplexity, training
    tokens/s and peak memory. About 5 minutes per variant at 1,000 steps on 2 CPU cores.

    [bold]Example[/bold]

      memcli compare pretrain --steps 1000 --markdown pretrain.md
    """
    from memcli.training.pretrain import pretrain_comparison

    if steps < 1 or batch_size < 1:
        raise MemcliError(f"--steps/--batch-size got {steps}/{batch_size}, expected positive integers")
    res = pretrain_comparison(data, out_dir, steps, batch_size)
    r = res["rows"]
    cols = ["variant", "val loss", "val perplexity", "parameters", "tokens/s", "peak RSS MB"]
    rows = [("memory on", r["memory"]["val_loss"], r["memory"]["val_ppl"], r["memory"]["params"],
             r["memory"]["tokens_per_s"], r["memory"]["peak_rss_mb"]),
            ("memory off (same model)", r["memory"]["val_loss_memory_off"], r["memory"]["val_ppl_memory_off"],
             r["memory"]["params"], "-", "-"),
            ("memory + EMA on", r["memory + EMA"]["val_loss"], r["memory + EMA"]["val_ppl"],
             r["memory + EMA"]["params"], r["memory + EMA"]["tokens_per_s"], r["memory + EMA"]["peak_rss_mb"]),
            ("memory + EMA, memory off", r["memory + EMA"]["val_loss_memory_off"],
             r["memory + EMA"]["val_ppl_memory_off"], r["memory + EMA"]["params"], "-", "-"),
            ("dense, same parameters", r["dense"]["val_loss"], r["dense"]["val_ppl"], r["dense"]["params"],
             r["dense"]["tokens_per_s"], r["dense"]["peak_rss_mb"])]
    write_markdown(markdown, cols, rows)
    emit(res, as_json, lambda _: table(f"compare pretrain · {data} · {steps} steps", cols, rows))


@compare.command("runs")
def runs(
    dirs: List[Path] = typer.Argument(..., help="Run directories (each with metrics.jsonl)."),
    metric: Optional[List[str]] = typer.Option(None, "--metric", help="Metric to compare (repeatable; default: loss, "
                                                                      "reward_mean and every eval/ metric)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write the curves overlaid (PNG) here."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output (includes the curves)."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """Training curves of runs side by side: last and best value of each metric, curves overlaid with --plot.

    [bold]Examples[/bold]

      memcli compare runs out/memory out/memory_lora --plot curves.png
      memcli compare runs out/hippo out/hippo_sel --metric loss --metric \\
          eval/exact_match_memory
    """
    from memcli.eval.compare import compare_runs
    from memcli.views import plot_curves

    res = compare_runs(list(dirs), list(metric or []))
    labels = labels_of(dirs)
    cols, rows = metric_rows(res["metrics"], labels, diffs=len(labels) > 1)
    write_markdown(markdown, cols, rows)
    if plot is not None:
        plot_curves(res["curves"], plot, "compare runs")
        res["plot"] = str(plot)
    emit(res, as_json, lambda _: table("compare runs", cols, rows))


@compare.command("hippo")
def hippo(
    checkpoint: Optional[List[Path]] = typer.Option(None, "--checkpoint", "-m", help="Trained HIPPO runs to score "
                                                                                     "(repeatable; e.g. a matrix and a selective run)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Dialog JSONL for exact match (with --checkpoint)."),
    num_samples: Optional[int] = typer.Option(None, "--num-samples", help="First N dialogs only."),
    turns: int = typer.Option(50, help="Chat turns timed (latency at turns 1, 5, 10, 20, ... 50 when reached, and the last)."),
    repeats: int = typer.Option(3, help="Timing repeats (median reported)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Also write latency vs turn (PNG) here."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
    markdown: Optional[Path] = typer.Option(None, "--markdown", help="Also write the table as Markdown here."),
):
    """HIPPO encoder variants side by side: matrix vs selective, plus no memory and full history.

    Parameters and fp32 / fp16 bytes of each encoder on the tiny backbone, chat latency per turn
    (memory state vs the whole history in the prompt), and, with --checkpoint and --data, exact
    match of each trained run with its state, without history, and with the history in the prompt.

    [bold]Examples[/bold]

      memcli compare hippo
      memcli compare hippo -m out/hippo -m out/hippo_selective --data \\
          data/dialog/data_val.jsonl --plot hippo.png
    """
    from memcli.eval.compare import compare_hippo
    from memcli.views import plot_curves

    if turns < 1 or repeats < 1:
        raise MemcliError(f"--turns/--repeats got {turns}/{repeats}, expected positive integers")
    res = compare_hippo(list(checkpoint or []), data, num_samples, turns, repeats)
    keys = []
    for r in res["rows"].values():
        keys += [k for k in r if k not in keys]
    metrics = {k: [res["rows"][s].get(k) for s in res["setups"]] for k in keys}
    cols, rows = metric_rows(metrics, res["setups"], diffs=False)
    write_markdown(markdown, cols, rows)
    if plot is not None:
        curves = {"chat turn latency (ms)": {s: [(int(k.split()[1]), v) for k, v in r.items() if k.startswith("turn ")]
                                             for s, r in res["rows"].items()}}
        plot_curves(curves, plot, "compare hippo (tiny backbone)", xlabel="chat turn")
        res["plot"] = str(plot)
    emit(res, as_json, lambda _: table("compare hippo (tiny backbone)", cols, rows))
