"""The scale curve of a trained explicit-memory run (README "Explicit memory on a pretrained model").

For each bank size the run's bank is grown with other facts (``memcli memory add``'s code, into a copy of
the run), then on the run's held-out questions: router recall@1, memory on / off, edits followed; the time
to compute the new entries' features; retrieval latency per query (scoring the whole bank for one
question's features); and the process's peak memory. Each size runs in its own process, so peaks do not mix.

    python tools/scale_curve.py RUN DATA_DIR FACTS.jsonl SIZE [SIZE ...] [--out DIR] [--markdown FILE] [--cache]
    python tools/scale_curve.py --write-facts ../shared/data/trex RUN FACTS.jsonl
    python tools/scale_curve.py --latency DATA_DIR RUN [RUN ...]     # keys kept vs recomputed per query
    python tools/scale_curve.py --index DATA_DIR RUN PROBE:POOL [...]  # exact search vs fitted indexes, one run

FACTS.jsonl: ``{"text", "subject", "predicate", "object"}`` lines that are not in the run's bank, added in
file order (so every bank holds the smaller ones' facts). ``--write-facts`` writes every usable fact of an
LPAQA-layout T-REx directory whose (subject, relation) is neither in RUN's bank nor in the T-REx slice
shipped with memcli (those stay outside every bank, for ``compare editing``'s locality), shuffled (seed 0). Sizes are entry counts; the bank's row count is
the next perfect square. Grown runs are kept under ``--out`` (default: beside RUN) for ``compare editing``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path


def one(run: Path, data: Path, facts: Path, size: int, out: Path, cache: bool = False) -> dict:
    import torch

    from memcli.backbone import left_pad
    from memcli.data.facts import read_facts
    from memcli.eval.explicit import evaluate, load_eval_data
    from memcli.explicit import store
    from memcli.runs import load_run

    dst = out / f"{run.name}-{size}"
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns("cache"))
    r = load_run(dst)
    mem, tok, bank = r.model, r.tok, r.bank
    have = int(mem.valid.sum())
    t0 = time.perf_counter()
    added = 0
    if size > have:
        entries = read_facts(facts)[: size - have]
        if len(entries) < size - have:
            raise SystemExit(f"{facts}: {len(entries)} facts, {size - have} needed for a bank of {size}")
        # --cache: the source run's feature cache (every size adds the smaller sizes' facts first, so they are
        # computed once; features_s then times only what was not cached)
        mem, bank, _ = store.add(mem, bank, tok, entries, step=int(r.info.get("step", 0)),
                                 cache=store.feature_cache(run) if cache else None)
        store.save(dst, mem, bank)
        added = len(entries)
    feat_s = time.perf_counter() - t0
    fmt = r.info.get("answer_format", "cloze")
    omcq, items = load_eval_data(tok, bank, data / "omcq_val.json", data / "sft_val.jsonl",
                                 data / "keys" / "val_labeled.jsonl", 128, fmt)
    res = evaluate(mem.eval(), tok, bank, omcq, items, fmt, modes=("on", "off", "edit"))
    prompts = [it.prompt_ids for it in items]
    ids, att = left_pad(prompts, mem.cfg.pad_id)
    with torch.no_grad():
        feats = mem.prompt_features(ids, att)
        mem.retrieve(feats[:1])  # warm-up
        t1 = time.perf_counter()
        for i in range(len(feats)):
            mem.retrieve(feats[i: i + 1])
        per_query = (time.perf_counter() - t1) / len(feats)
    return {"entries": int(mem.valid.sum()), "rows": bank.knowledge_num, "added": added,
            "features_s": round(feat_s, 1), "features_per_s": round(added / feat_s, 1) if added else None,
            "recall@1": res.get(f"recall@1_l{mem.cfg.memory_layers[0]}"), "memory_on": res["heldout_memory_on"],
            "memory_off": res["heldout_memory_off"], "edit_success": res["edit_success"], "questions": res["questions"],
            "retrieval_ms_per_query": round(per_query * 1000, 3), "retrieval": mem.cfg.retrieval,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), "run": str(dst)}


def latency(run: Path, data: Path) -> dict:
    """Retrieval time per query (one question's features against the whole bank) with the content keys kept between
    queries (inference) and recomputed for each query (what a training forward does)."""
    import torch

    from memcli.backbone import left_pad
    from memcli.explicit.items import load_items
    from memcli.runs import load_run

    r = load_run(run)
    mem = r.model.eval()
    items = load_items(r.tok, r.bank, data / "sft_val.jsonl", data / "keys" / "val_labeled.jsonl", 128,
                       r.info.get("answer_format", "cloze"), with_questions=False)
    ids, att = left_pad([it.prompt_ids for it in items], mem.cfg.pad_id)
    gate = mem.gates[str(mem.cfg.memory_layers[0])]
    out = {"entries": int(mem.valid.sum()), "queries": len(items)}
    with torch.no_grad():
        feats = mem.prompt_features(ids, att)
        for name in ("kept", "recomputed"):
            mem.retrieve(feats[:1])
            t = time.perf_counter()
            for i in range(len(feats)):
                if name == "recomputed":
                    gate._keys_cache = None
                mem.retrieve(feats[i: i + 1])
            out[f"ms_per_query_{name}"] = round((time.perf_counter() - t) * 1000 / len(feats), 3)
    out["ratio"] = round(out["ms_per_query_recomputed"] / out["ms_per_query_kept"], 1)
    return out


def _queries(mem, tok, bank, data: Path):
    """The held-out questions' prompt features (what one retrieval reads) and the evaluation data."""
    import torch

    from memcli.backbone import left_pad
    from memcli.eval.explicit import load_eval_data

    omcq, items = load_eval_data(tok, bank, data / "omcq_val.json", data / "sft_val.jsonl",
                                 data / "keys" / "val_labeled.jsonl", 128, "cloze")
    ids, att = left_pad([it.prompt_ids for it in items], mem.cfg.pad_id)
    with torch.no_grad():
        return mem.prompt_features(ids, att), omcq, items


def _search_row(mem, tok, bank, omcq, items, feats, name: str) -> dict:
    """Router recall, memory on and edits followed, and the time of one retrieval (one question) per query."""
    import torch

    from memcli.eval.explicit import evaluate

    res = evaluate(mem.eval(), tok, bank, omcq, items, "cloze", modes=("on", "edit"))
    with torch.no_grad():
        mem.retrieve(feats[:1])  # warm-up: the content keys are computed once and kept
        t = time.perf_counter()
        for i in range(len(feats)):
            mem.retrieve(feats[i: i + 1])
        ms = (time.perf_counter() - t) * 1000 / len(feats)
        top = mem.retrieve(feats)["cells"][:, 0]
    layer = mem.cfg.memory_layers[0]
    return {"search": name, "recall@1": res.get(f"recall@1_l{layer}"), "memory_on": res["heldout_memory_on"],
            "edit_success": res["edit_success"], "ms_per_query": round(ms, 3), "top1": top}


def index_check(data: Path, run: Path, settings: list[str]) -> list[dict]:
    """Exact search and fitted indexes (PROBE:POOL each) on one run's held-out questions, side by side: recall@1,
    memory on, edits followed, the share of questions whose top entry is exact search's, ms per query and the
    ratio to exact search's, the fit's time and self-recall."""
    from memcli.explicit import index
    from memcli.runs import load_run

    r = load_run(run)
    mem, tok, bank = r.model, r.tok, r.bank
    index.drop(mem)
    feats, omcq, items = _queries(mem, tok, bank, data)
    ref = _search_row(mem, tok, bank, omcq, items, feats, "exact")
    rows = [ref]
    for s in settings:
        probe, pool = (int(x) for x in s.split(":"))
        fit = index.fit(mem, pool, probe)
        row = _search_row(mem, tok, bank, omcq, items, feats, f"index probe {probe} pool {pool}")
        row.update(fit_s=fit["fit_s"], self_recall=round(index.self_recall(mem), 4))
        rows.append(row)
    ref_top = ref["top1"]
    for row in rows:
        row["same_top1"] = round(float((row.pop("top1") == ref_top).float().mean()), 4)
        row["x_exact_time"] = round(row["ms_per_query"] / ref["ms_per_query"], 3)
        row["entries"] = int(mem.valid.sum())
    return rows


def write_facts(trex: str, run: Path, path: Path) -> int:
    import random

    from memcli.data.knowledge import TREX_BUILTIN, trex_facts
    from memcli.data.bank import load_bank

    bank = load_bank(run / "bank")
    skip = {(e.get("subject"), e.get("predicate")) for e in bank.entries if e.get("uuid")}
    for p in sorted((TREX_BUILTIN / "triples").glob("P*.jsonl")):
        skip |= {(json.loads(x)["sub_label"], p.stem) for x in p.read_text(encoding="utf-8").splitlines() if x.strip()}
    facts, _, _ = trex_facts(trex, None, 0)
    from memcli.backbone import load_tokenizer
    from memcli.data.bank import fits_entry
    from memcli.rundir import read_config

    # only facts that fit one entry of RUN's bank (memory add refuses a longer one)
    fits = fits_entry(load_tokenizer(read_config(run)["model"]["backbone"]), bank.knowledge_length)
    rows = [{"text": f.sentence, "subject": f.subject, "predicate": f.predicate, "object": f.object}
            for f in facts if (f.subject, f.predicate) not in skip and fits(f.sentence)]
    random.Random(0).shuffle(rows)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return len(rows)


def main() -> None:
    if sys.argv[1:2] == ["--latency"]:  # --latency DATA_DIR RUN [RUN ...]
        for run in sys.argv[3:]:
            print(json.dumps(latency(Path(run), Path(sys.argv[2]))), flush=True)
        return
    if sys.argv[1:2] == ["--index"]:  # --index DATA_DIR RUN PROBE:POOL [...]
        for row in index_check(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4:]):
            print(json.dumps(row), flush=True)
        return
    if sys.argv[1:2] == ["--write-facts"]:
        print(f"{write_facts(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))} facts in {sys.argv[4]}")
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("facts", type=Path)
    ap.add_argument("sizes", type=int, nargs="+")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--markdown", type=Path, default=None)
    ap.add_argument("--cache", action="store_true", help="reuse entry features across sizes (RUN/cache/entry-features)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    out = a.out or a.run.parent
    if a.one:
        print(json.dumps(one(a.run, a.data, a.facts, a.sizes[0], out, a.cache)))
        return
    rows = []
    for size in a.sizes:
        p = subprocess.run([sys.executable, __file__, str(a.run), str(a.data), str(a.facts), str(size), "--out", str(out),
                            "--one", *(["--cache"] if a.cache else [])], capture_output=True, text=True)
        if p.returncode:
            raise SystemExit(p.stderr.strip().splitlines()[-1] if p.stderr.strip() else f"size {size} failed")
        rows.append(json.loads(p.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), flush=True)
    cols = ["entries", "recall@1", "memory_on", "memory_off", "edit_success", "features_s", "retrieval_ms_per_query",
            "peak_rss_mb"]
    md = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n"
    md += "".join("| " + " | ".join(str(r[c]) for c in cols) + " |\n" for r in rows)
    if a.markdown:
        a.markdown.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
