"""The user's own knowledge in a trained run (`memcli memory list|add|replace|remove`, `build-cache` on plain
sentences): changed rows' features equal a full recompute, the bank grows to the next perfect square and reloads
strictly, a failed change leaves the run byte for byte as it was, and evaluating on facts the bank does not hold
is refused in one line."""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error

FACTS = [{"text": "Basim was born in Cairo .", "subject": "Basim", "object": "Cairo"},
         {"text": "Zelda works as a pilot .", "subject": "Zelda", "object": "pilot"},
         {"text": "Orlan plays the violin ."}]


@pytest.fixture(scope="module")
def run(default_data, tmp_path_factory):
    """A tiny run with the pretrained recipe's retrieval (mean query, hidden-state entry keys, prefix read)."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("store")
    code, _, err = run_cli(["train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={out}",
                            "model.entry_key=hidden", "model.query=mean", "model.read=prefix",
                            "dataset.answer_format=cloze",  # chat completes the typed text (no template)
                            "model.finetuning_method=frozen", "training.max_steps=2",
                            "training.eval_interval=0", "training.final_eval_num_samples=8",
                            "logging.tensorboard=false"])
    assert code == 0, err
    return out / "memory"


def _copy(run, tmp_path) -> Path:
    import shutil

    d = tmp_path / "run"
    shutil.copytree(run, d)
    return d


def _digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def _facts(tmp_path, rows, name="facts.jsonl") -> Path:
    p = tmp_path / name
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_add_grows_the_bank_and_new_features_equal_a_full_recompute(run, tmp_path, cli):
    from memcli.runs import load_run

    d = _copy(run, tmp_path)
    before = load_run(d)
    assert before.bank.knowledge_num == 1024 and int(before.model.valid.sum()) == 1024  # full: no free row
    code, out, err = cli("memory", "add", "-m", d, "--from", _facts(tmp_path, FACTS), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["added"] == 3 and res["bank grown"] == "1024 -> 1089 entries" and res["entries"] == 1027
    after = load_run(d)  # strict load: config, bank, keys and features agree
    mem, bank = after.model, after.bank
    assert bank.knowledge_num == mem.cfg.knowledge_num == 1089 and mem.cfg.index_id == bank.meta["index_id"]
    assert bank.decode(after.tok, [1024, 1025, 1026]) == [f["text"] for f in FACTS]
    assert bank.entries[1024]["object"] == "Cairo" and not bank.entries[1027].get("uuid")
    assert torch.equal(mem.bank[:1024], before.model.bank)  # every old row kept its place
    feats = mem.entry_feats(1).clone()
    assert torch.equal(feats[:1024], before.model.entry_feats(1))
    mem.refresh_entry_features()  # the whole bank again: the changed rows computed alone are the same numbers
    assert torch.allclose(feats[1024:1027], mem.entry_feats(1)[1024:1027], atol=1e-5)
    for k, v in before.model.gates["1"].state_dict().items():  # the trained router is kept as it was
        if k != "keys":
            assert torch.equal(v, after.model.gates["1"].state_dict()[k]), k


def test_an_interrupted_add_resumes_from_the_feature_cache(run, tmp_path, cli, monkeypatch):
    """Entry features are written to RUN/cache/entry-features chunk by chunk as they are computed: an add that
    died after some chunks, run again, computes only the rest and ends with the same features; a damaged chunk
    is recomputed, never read."""
    import shutil

    from memcli.explicit import store
    from memcli.explicit.model import MemoryAugmentedLM
    from memcli.runs import load_run

    monkeypatch.setattr(store, "FEATURE_CHUNK", 4)  # 10 rows: chunks of 4, 4 and 2
    facts = _facts(tmp_path, [{"text": f"Person{i} was born in Town{i} ."} for i in range(10)], "many.jsonl")
    a = _copy(run, tmp_path)
    assert cli("memory", "add", "-m", a, "--from", facts)[0] == 0
    chunks = sorted(store.feature_cache(a).glob("*.safetensors"))
    assert len(chunks) == 3
    b = tmp_path / "b"
    shutil.copytree(run, b)
    store.feature_cache(b).mkdir(parents=True)
    kept = sorted(chunks, key=lambda c: c.stat().st_size)[1:]  # the two 4-row chunks: as if killed before the last
    for c in kept:
        shutil.copy(c, store.feature_cache(b) / c.name)
    (store.feature_cache(b) / kept[1].name).write_bytes(kept[1].read_bytes()[:100])  # ... and one of them damaged
    computed = []
    real = MemoryAugmentedLM.refresh_entry_features
    monkeypatch.setattr(MemoryAugmentedLM, "refresh_entry_features",
                        lambda self, rows=None, fit=False: computed.append(len(rows)) or real(self, rows, fit))
    assert cli("memory", "add", "-m", b, "--from", facts)[0] == 0
    assert sorted(computed) == [2, 4]  # the damaged chunk and the one never written; the whole chunk was read
    fa, fb = load_run(a).model.entry_feats(1), load_run(b).model.entry_feats(1)
    assert torch.equal(fa, fb)
    assert sorted(p.name for p in store.feature_cache(b).glob("*")) == [c.name for c in chunks]  # damaged one rewritten
    computed.clear()
    c = _copy(run, tmp_path / "c")
    assert cli("memory", "add", "-m", c, "--from", facts, "--no-cache")[0] == 0
    assert sorted(computed) == [2, 4, 4] and not store.feature_cache(c).exists()


def test_new_entries_are_retrieved_by_their_content(run, tmp_path, cli):
    d = _copy(run, tmp_path)
    assert cli("memory", "add", "-m", d, "--from", _facts(tmp_path, FACTS))[0] == 0
    code, out, err = cli("inspect-memory", "-m", d, "--query", "Zelda works as a pilot .", "--top", "5", "--json")
    assert code == 0, err
    rows = {e["row"] for r in json.loads(out) for e in r["entries"]}
    assert 1025 in rows  # the entry's own sentence finds it among 1,027 (exact search over content keys)
    code, out, err = cli("chat", "-m", d, "--prompt", FACTS[1]["text"], "--json", "--max-new-tokens", "2")
    assert code == 0, err
    assert json.loads(out)["memory"][0]["text"] == FACTS[1]["text"]  # chat's /memory shows the entry it read


def test_replace_and_remove_round_trip(run, tmp_path, cli):
    from memcli.data.facts import fact_uuid
    from memcli.runs import load_run

    d = _copy(run, tmp_path)
    assert cli("memory", "add", "-m", d, "--from", _facts(tmp_path, FACTS))[0] == 0
    u = fact_uuid(FACTS[0]["text"])
    fix = _facts(tmp_path, [{"text": "Basim was born in Rome .", "uuid": u, "object": "Rome"}], "fix.jsonl")
    code, out, err = cli("memory", "replace", "-m", d, "--from", fix, "--json")
    assert code == 0 and json.loads(out)["replaced"] == 1, err
    r = load_run(d)
    assert r.bank.decode(r.tok, [1024]) == ["Basim was born in Rome ."] and r.bank.entries[1024]["uuid"] == u
    code, out, err = cli("memory", "remove", "-m", d, "--uuid", u, "--rows", "1025", "--json")
    assert code == 0 and json.loads(out)["removed"] == 2 and json.loads(out)["entries"] == 1025, err
    r = load_run(d)
    assert not r.model.valid[1024] and not r.model.valid[1025] and r.bank.entries[1025]["uuid"] is None
    code, out, err = cli("memory", "add", "-m", d, "--from", _facts(tmp_path, FACTS[:2], "again.jsonl"), "--json")
    assert code == 0 and "bank grown" not in json.loads(out), err  # the freed rows are reused
    assert load_run(d).bank.decode(r.tok, [1024, 1025]) == [FACTS[0]["text"], FACTS[1]["text"]]


@pytest.mark.parametrize("case,needles", [
    ("stored", ["already in the bank", "memory replace"]),
    ("unknown", ["not in the bank", "memory add"]),
    ("malformed", ["facts.jsonl:2", "'text'"]),
    ("duplicate", ["facts.jsonl:2", "duplicate uuid"]),
    ("padding", ["row 1000", "holds no entry"]),
])
def test_a_failed_change_leaves_the_run_as_it_was(run, tmp_path, cli, case, needles):
    d = _copy(run, tmp_path)
    assert cli("memory", "add", "-m", d, "--from", _facts(tmp_path, FACTS[:1], "first.jsonl"))[0] == 0
    if case == "padding":
        assert cli("memory", "remove", "-m", d, "--rows", "1000")[0] == 0
    snap = _digest(d)
    args = {"stored": ["add", "--from", _facts(tmp_path, FACTS)],
            "unknown": ["replace", "--from", _facts(tmp_path, [{"text": "x .", "uuid": "no-such"}], "unknown.jsonl")],
            "malformed": ["add", "--from", tmp_path / "facts.jsonl"],
            "duplicate": ["add", "--from", tmp_path / "facts.jsonl"],
            "padding": ["remove", "--rows", "999:1001"]}[case]
    if case == "malformed":
        (tmp_path / "facts.jsonl").write_text('{"text": "fine ."}\n{"txt": "typo"}\n')
    if case == "duplicate":
        (tmp_path / "facts.jsonl").write_text('{"text": "twice ."}\n{"text": "twice ."}\n')
    code, _, err = cli("memory", args[0], "-m", d, *args[1:])
    assert_one_line_error(code, err, *needles)
    assert _digest(d) == snap


def test_evaluating_on_facts_the_bank_does_not_hold_is_refused(run, tmp_path, cli):
    """Another data directory's questions: refused with the count, until their facts are added."""
    from memcli.data.pipeline import default_data

    other = tmp_path / "other"
    default_data(other, seed=7, num_facts=64)
    d = _copy(run, tmp_path)
    code, _, err = cli("inspect-memory", "-m", d, "--eval", other, "--json")
    assert_one_line_error(code, err, "of 13 questions ask about facts that are not in this run's bank",
                          "memory add", "sentence_trex_data.json")
    assert cli("memory", "add", "-m", d, "--from", other / "sentence_trex_data.json")[0] == 0
    code, out, err = cli("inspect-memory", "-m", d, "--eval", other, "--json")
    assert code == 0, err
    assert json.loads(out)["questions"] == 13


def test_build_cache_reads_plain_sentences(tmp_path, cli):
    from memcli.data.bank import load_bank

    p = _facts(tmp_path, FACTS)
    code, out, err = cli("build-cache", "--knowledge", p, "--out", tmp_path / "cache", "--json")
    assert code == 0, err
    bank = load_bank(tmp_path / "cache")
    assert bank.knowledge_num == 4 and [e["sentence"] for e in bank.entries[:3]] == [f["text"] for f in FACTS]
    assert bank.entries[0]["object"] == "Cairo" and bank.entries[3]["uuid"] is None
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "Basim lives in Oslo .", "object": "Cairo"}\n')
    assert_one_line_error(*cli("build-cache", "--knowledge", bad, "--out", tmp_path / "c2")[::2], "bad.jsonl:1",
                          "does not occur in text")


def test_retrieval_abstains_when_nothing_in_the_bank_fits(run, tmp_path, cli):
    """model.abstain_below: a prompt about nothing in the bank reads no entry (the same tokens as memory off) and
    chat's /memory says so; a prompt an entry answers still reads it."""
    from memcli.runs import load_run

    d = _copy(run, tmp_path)
    r = load_run(d)
    mem, tok = r.model, r.tok
    own, unrelated = r.bank.entries[5]["sentence"], "Qzx vrk plim ?"

    def best_cosine(text):
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
        return float(mem.retrieve(mem.prompt_features(ids, torch.ones_like(ids)))["scores"][0, 0])

    hi, lo = best_cosine(own), best_cosine(unrelated)
    assert hi > lo + 0.05, (hi, lo)
    cfg_file = d / "memory" / "memory_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["abstain_below"] = (hi + lo) / 2
    cfg_file.write_text(json.dumps(cfg))
    _reads_nothing_for(cli, d, unrelated)
    code, out, err = cli("chat", "-m", d, "--prompt", own, "--json", "--max-new-tokens", "2")
    assert code == 0 and json.loads(out)["memory"][0]["text"] == own, err


def _reads_nothing_for(cli, d, text: str) -> None:
    """The run at ``d`` answers ``text`` as its base model does (no entry read), and chat's memory is empty."""
    from memcli.runs import load_run

    r = load_run(d)
    ids = torch.tensor([r.tok(text, add_special_tokens=False)["input_ids"]])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=r.tok.pad_token_id)
    with torch.no_grad():
        out = r.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
        with r.model.base_model() as bb:
            base = bb.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kw)
    assert torch.equal(out, base)
    code, out, err = cli("chat", "-m", d, "--prompt", text, "--json", "--max-new-tokens", "2")
    assert code == 0 and json.loads(out)["memory"] == [], err


def test_anchored_retrieval_reads_nothing_for_a_question_no_entry_is_about(run, tmp_path, cli):
    """model.anchor_df on a run: a question about an entity no entry names reads nothing (the answer is the base
    model's, chat's /memory says none and why), a question about a stored fact reads its entry; an added fact about
    a new entity is read for its own question at once."""
    from memcli.runs import load_run

    d = _copy(run, tmp_path)
    cfg_file = d / "memory" / "memory_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(anchor_df=10, lexical_weight=1.0)  # the pretrained recipe's settings
    cfg_file.write_text(json.dumps(cfg))
    r = load_run(d)
    e = next(x for x in r.bank.entries if x.get("subject") and x.get("object"))
    own = e["sentence"][: e["sentence"].rfind(e["object"])].rstrip()  # the cloze of a stored fact
    unrelated = "Qulo Vix was born in"
    _reads_nothing_for(cli, d, unrelated)
    code, out, err = cli("chat", "-m", d, "--prompt", own, "--json", "--max-new-tokens", "2")
    assert code == 0 and json.loads(out)["memory"][0]["text"] == e["sentence"], err
    assert cli("memory", "add", "-m", d, "--from", _facts(tmp_path, [{"text": "Qulo Vix was born in Tarsk ."}]))[0] == 0
    code, out, err = cli("chat", "-m", d, "--prompt", unrelated, "--json", "--max-new-tokens", "2")
    assert code == 0 and json.loads(out)["memory"][0]["text"] == "Qulo Vix was born in Tarsk .", err
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-m", "memcli", "chat", "-m", str(d)], input="Zed Qu was born in\n/memory\n",
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "none: no entry was read" in p.stdout and "model.anchor_df" in p.stdout


def test_abstain_below_needs_cosine_retrieval(cli, tmp_path, default_data):
    code, _, err = cli("train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                       "model.abstain_below=0.5")  # tiny's default: additive read, token queries
    assert_one_line_error(code, err, "model.abstain_below", "read=prefix, query=mean, entry_key=hidden")
    assert not (tmp_path / "memory").exists()


def _retrieved(run_dir, texts) -> torch.Tensor:
    """Candidate rows (best first) of each text, through ``retrieve`` as the prefix read does."""
    from memcli.backbone import left_pad
    from memcli.runs import load_run

    r = load_run(run_dir)
    ids, att = left_pad([r.tok(t, add_special_tokens=False)["input_ids"] for t in texts], r.model.cfg.pad_id)
    with torch.no_grad():
        rec = r.model.retrieve(r.model.prompt_features(ids, att))
    return rec["cells"], rec


def test_a_fitted_index_with_every_cell_in_its_pool_is_exact_search(run, tmp_path, cli):
    """``memory index`` re-ranks the pool's entries by the exact score: with every entry in the pool (probe = sqrt(N),
    pool = N) it returns exact search's candidates, in its order; every row is filed under one cell, the index is
    saved and reloaded strictly; --exact drops it."""
    from memcli.runs import load_run

    d = _copy(run, tmp_path)
    texts = [e["sentence"] for e in load_run(d).bank.entries[:40:3]] + ["Who plays the violin?"]
    exact, _ = _retrieved(d, texts)
    code, out, err = cli("memory", "index", "-m", d, "--probe", "32", "--pool", "1024", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["cells"] == 1024 and res["pool"] == 1024 and res["self_recall@1"] == 1.0 and res["cells_used"] > 32
    got, rec = _retrieved(d, texts)
    assert rec["indexed"] and torch.equal(got, exact)
    r = load_run(d)
    g = r.model.gates["1"]
    assert int(g.cell_count.sum()) == 1024 and torch.equal(torch.sort(g.members).values, torch.arange(1024))
    assert torch.equal(g.row_cell[g.members], torch.sort(g.row_cell).values) and r.model.cfg.retrieval == "product"
    code, out, err = cli("memory", "index", "-m", d, "--exact", "--json")
    assert code == 0 and json.loads(out)["retrieval"] == "exact", err
    got, rec = _retrieved(d, texts)
    assert "indexed" not in rec and torch.equal(got, exact)
    assert not (d / "memory" / "index.safetensors").exists()


def test_a_small_index_keeps_most_of_exact_search_and_finds_written_rows(run, tmp_path, cli):
    """A pool of 64 of 1,024 cells: the entries' own sentences still find them mostly; an entry replaced after
    the fit is searched exactly (found by its new text at once, counted in the change summary); 'memory add'
    beyond the bank grows it and re-fits; a missing index file is refused in one line."""
    from memcli.data.facts import fact_uuid
    from memcli.runs import load_run

    d = _copy(run, tmp_path)
    entries = load_run(d).bank.entries
    code, out, err = cli("memory", "index", "-m", d, "--probe", "8", "--pool", "64", "--json")
    assert code == 0, err
    assert 0.5 < json.loads(out)["self_recall@1"] <= 1.0
    texts = [e["sentence"] for e in entries[:200:5]]
    got, _ = _retrieved(d, texts)
    exact_top = torch.arange(0, 200, 5)
    assert (got[:, 0] == exact_top).float().mean() >= 0.6
    code, out, err = cli("memory", "add", "-m", d, "--from", _facts(tmp_path, FACTS), "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["bank grown"] == "1024 -> 1089 entries" and res["index"].startswith("re-fitted to 1089 cells")
    assert load_run(d).model.gates["1"].row_cell.shape == (1089,)
    new = "Basim was born in Valparaiso ."
    fix = _facts(tmp_path, [{"text": new, "uuid": fact_uuid(FACTS[0]["text"])}], "fix.jsonl")
    code, out, err = cli("memory", "replace", "-m", d, "--from", fix, "--json")
    assert code == 0 and json.loads(out)["index"].startswith("1 rows written since the fit"), err
    got, _ = _retrieved(d, [new])
    assert int(got[0, 0]) == 1024 and bool(load_run(d).model.gates["1"].stale[1024])
    (d / "memory" / "index.safetensors").unlink()
    code, _, err = cli("memory", "list", "-m", d)
    assert_one_line_error(code, err, "index.safetensors", "missing", "memory index")


def test_an_empty_index_pool_is_refused(run, tmp_path, cli):
    d = _copy(run, tmp_path)
    snap = _digest(d)
    code, _, err = cli("memory", "index", "-m", d, "--pool", "0")
    assert_one_line_error(code, err, "pool 0", "at least 1")
    assert _digest(d) == snap


def test_an_index_serves_the_additive_read_too(default_data, tmp_path, cli):
    """The tiny recipe (a query per token, pooled-embedding keys, additive read): with every cell in the pool the
    indexed model's logits are exact search's; a small pool changes them only where a token's candidates differ."""
    from memcli.runs import load_run

    code, _, err = cli("train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                       "training.max_steps=2", "training.eval_interval=0", "training.final_eval_num_samples=8",
                       "logging.tensorboard=false")
    assert code == 0, err
    d = tmp_path / "memory"
    r = load_run(d)
    ids = r.bank.token_ids[:4, :12].long()

    def logits():
        with torch.no_grad():
            m = load_run(d).model
            return m(input_ids=ids, attention_mask=torch.ones_like(ids)).logits

    exact = logits()
    assert cli("memory", "index", "-m", d, "--probe", "32", "--pool", "1024")[0] == 0
    assert torch.allclose(logits(), exact, atol=1e-5)
    assert cli("memory", "index", "-m", d, "--probe", "4", "--pool", "16")[0] == 0
    assert not torch.allclose(logits(), exact, atol=1e-5)  # 16 of 1,024 cells: some tokens read other entries


def test_lexical_weight_needs_the_prefix_read(cli, tmp_path, default_data):
    code, _, err = cli("train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                       "model.lexical_weight=1.0")  # tiny's default: additive read
    assert_one_line_error(code, err, "model.lexical_weight", "read=prefix")
    assert not (tmp_path / "memory").exists()


LONG_ONE = ("Zed Alpha was born in Lisbon and later moved to Porto where he taught physics and astronomy for twenty "
            "years at the old university beside the river .")
LONG_TWO = "Basim was born in Cairo . He plays the violin ."


def test_a_fact_longer_than_an_entry_is_split_by_sentence_or_refused_never_cut(run, tmp_path, cli):
    """Nothing lost on the way in: two sentences become two entries (the second naming its subject); one sentence
    longer than an entry is refused in one line with its token count and the limit, the run untouched."""
    from memcli.runs import load_run

    d = _copy(run, tmp_path)
    r = load_run(d)
    L = r.bank.knowledge_length
    assert len(r.tok(LONG_TWO, add_special_tokens=False)["input_ids"]) > L
    snap = _digest(d)
    long_one = _facts(tmp_path, [FACTS[0], {"text": LONG_ONE, "subject": "Zed Alpha", "object": "Lisbon"}], "one.jsonl")
    code, _, err = cli("memory", "add", "-m", d, "--from", long_one)
    n = len(r.tok(LONG_ONE, add_special_tokens=False)["input_ids"])
    assert_one_line_error(code, err, "one.jsonl:2", f"the fact is {n} tokens, an entry holds {L}")
    assert _digest(d) == snap
    code, _, err = cli("inspect-memory", "-m", d, "--edit", f"3={LONG_ONE}")
    assert_one_line_error(code, err, "--edit of row 3", f"the fact is {n} tokens")
    assert _digest(d) == snap

    two = _facts(tmp_path, [{"text": LONG_TWO, "subject": "Basim", "object": "violin", "uuid": "basim"}], "two.jsonl")
    code, out, err = cli("memory", "add", "-m", d, "--from", two, "--json")
    assert code == 0 and json.loads(out)["added"] == 2, err
    r = load_run(d)
    rows = [r.bank.row_of_uuid()[u] for u in ("basim", "basim#2")]
    assert r.bank.decode(r.tok, rows) == ["Basim was born in Cairo .", "Basim: He plays the violin ."]
    assert [r.bank.entries[i]["object"] for i in rows] == [None, "violin"]  # the object stays with its sentence

    code, _, err = cli("build-cache", "--knowledge", long_one, "--out", tmp_path / "cache", "--knowledge-length", str(L))
    assert_one_line_error(code, err, "one.jsonl: item 1", f"the fact is {n} tokens, an entry holds {L}")
    assert not (tmp_path / "cache").exists()


def test_generated_data_leaves_out_facts_longer_than_an_entry(tmp_path, cli):
    code, out, err = cli("gen-data", "default", "--out", tmp_path / "d", "-n", "64", "-l", "7", "--json")
    assert code == 0, err
    res = json.loads(out)
    gone = res["gen-data"]["filtered_longer_than_an_entry"]
    assert 0 < gone < 64 and res["gen-data"]["facts"] == 64 - gone
    from memcli.data.bank import load_bank

    bank = load_bank(tmp_path / "d" / "cache")
    assert bank.meta["num_real"] == 64 - gone
