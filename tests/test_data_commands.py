import hashlib
import json
from pathlib import Path

import pytest
import torch

from memcli import records
from memcli.data.bank import load_bank
from memcli.data.knowledge import LETTERS, parse_options
from memcli.checkpoint import load_tensors
from conftest import FIXTURES, assert_one_line_error


def _digest(d: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_gen_knowledge_formats_and_split(cli, tmp_path):
    code, out, err = cli("gen-data", "knowledge", "--out", tmp_path, "--num-facts", "200", "--json")
    assert code == 0, err
    rep = json.loads(out)
    kb = records.read_json_list(tmp_path / "sentence_trex_data.json", records.KNOWLEDGE)
    qs = records.read_json_list(tmp_path / "omcq_trex_data.json", records.OMCQ)
    train = records.read_json_list(tmp_path / "omcq_train.json", records.OMCQ)
    val = records.read_json_list(tmp_path / "omcq_val.json", records.OMCQ)
    assert len(kb) == 200 and len(qs) == 200 and rep["heldout_questions"] == len(val) == 40
    tu = {q["target"][0]["uuid"] for q in train}
    vu = {q["target"][0]["uuid"] for q in val}
    assert not tu & vu and tu | vu == {k["target"][0]["uuid"] for k in kb}
    facts = {k["target"][0]["uuid"]: k["target"][0] for k in kb}
    letters = []
    for q in qs:
        t = q["target"][0]
        opts = parse_options(t["options"])
        assert [l for l, _ in opts] == list(LETTERS)
        assert len({o for _, o in opts}) == 5
        letter, obj = t["correct_answer"].split(":", 1)
        assert dict(opts)[letter] == obj == facts[t["uuid"]]["object"]
        assert facts[t["uuid"]]["subject"] in t["question"]
        letters.append(letter)
    counts = [letters.count(l) for l in LETTERS]
    assert max(counts) - min(counts) <= 1  # answer letters balanced


def test_gen_data_is_deterministic_by_seed(cli, tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        assert cli("gen-data", "knowledge", "--out", tmp_path / name, "-n", "64", "--seed", seed)[0] == 0
        assert cli("gen-data", "dialog", "--out", tmp_path / name / "dlg", "--num-train", "20", "--num-val", "5",
                   "--seed", seed)[0] == 0
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")


def test_gen_dialog_rows(cli, tmp_path):
    code, _, err = cli("gen-data", "dialog", "--out", tmp_path, "--num-train", "50", "--num-val", "10", "--turns", "8",
                       "--min-distance", "3")
    assert code == 0, err
    rows = records.read_jsonl(tmp_path / "data_train.jsonl", records.DIALOG)
    assert len(rows) == 50
    for r in rows:
        assert len(r["dialog_history"]) == 8
        pos = [i for i, t in enumerate(r["dialog_history"]) if r["memory_answer"] in t["content"]]
        assert pos and min(pos) <= 8 - 1 - 3  # stated at least min-distance turns before the end
        assert {t["role"] for t in r["dialog_history"]} == {"user"}  # --assistant-turns 0: the user states it all
    assert_one_line_error(*cli("gen-data", "dialog", "--out", tmp_path, "--turns", "3", "--min-distance", "3")[::2],
                          "--min-distance")
    code, _, err = cli("gen-data", "dialog", "--out", tmp_path / "both", "--num-train", "20", "--num-val", "2",
                       "--assistant-turns", "1")
    assert code == 0, err
    for r in records.read_jsonl(tmp_path / "both" / "data_train.jsonl", records.DIALOG):
        roles = [t["role"] for t in r["dialog_history"]]
        assert roles[0] == "user" and "assistant" in roles
        assert all(a != b for a, b in zip(roles, roles[1:]))  # a reply follows each user turn
        assert any(r["memory_answer"] in t["content"] for t in r["dialog_history"] if t["role"] == "user")


def test_gen_dialog_curriculum_and_name_pool(cli, tmp_path):
    code, _, err = cli("gen-data", "dialog", "--out", tmp_path, "--num-train", "300", "--num-val", "20", "--turns", "6",
                       "--min-turns", "1", "--name-pool", "7")
    assert code == 0, err
    train = records.read_jsonl(tmp_path / "data_train.jsonl", records.DIALOG)
    val = records.read_jsonl(tmp_path / "data_val.jsonl", records.DIALOG)
    assert {len(r["dialog_history"]) for r in train} == set(range(1, 7))  # lengths 1..6
    assert {len(r["dialog_history"]) for r in val} == {6}
    from memcli.data.dialog import ATTRIBUTES, name_pools

    pools = name_pools(7)
    named = [r for r in train + val if ATTRIBUTES[[a for a, v in ATTRIBUTES.items() if v[1] == r["memory_query"]][0]][2] == "name"]
    assert named and {r["memory_answer"] for r in named} <= set(pools["name"])
    for r in train:
        assert any(r["memory_answer"] in t["content"] for t in r["dialog_history"])
    assert_one_line_error(*cli("gen-data", "dialog", "--out", tmp_path, "--min-turns", "9")[::2], "--min-turns")
    assert_one_line_error(*cli("gen-data", "dialog", "--out", tmp_path, "--name-pool", "-1")[::2], "--name-pool")


def test_convert_omcq_rule_and_skips(cli, tmp_path):
    items = [
        {"target": [{"question": "Q1?", "options": "A:a,B:b,C:c,D:d,E:e", "correct_answer": "B:b", "uuid": "u1"}]},
        {"target": [{"question": "", "options": "A:a,B:b,C:c,D:d,E:e", "correct_answer": "B:b"}]},
        {"target": [{"question": "Q3?", "options": "A:a,B:b,C:c,D:d,E:e", "correct_answer": "E:e"}]},
    ]
    src = tmp_path / "o.json"
    src.write_text(json.dumps(items))
    code, out, err = cli("convert-omcq", "--input", src, "--output", tmp_path / "s.jsonl", "--json")
    assert code == 0, err
    assert json.loads(out) == {"items": 3, "written": 2, "skipped_empty": 1}
    rows = records.read_jsonl(tmp_path / "s.jsonl", records.CONVERSATION)
    assert rows[0]["conversations"][0]["content"].startswith("Q1?\nA:a,B:b,C:c,D:d,E:e\n")
    assert rows[0]["conversations"][1] == {"role": "assistant", "content": "B:b"}
    assert rows[0]["uuid"] == "u1" and "uuid" not in rows[1]


def test_build_cache_square_padding_and_errors(cli, tmp_path):
    assert cli("gen-data", "knowledge", "--out", tmp_path, "-n", "50")[0] == 0
    kb = tmp_path / "sentence_trex_data.json"
    code, out, err = cli("build-cache", "-k", kb, "-o", tmp_path / "c", "--json")
    rep = json.loads(out)
    assert code == 0 and rep["knowledge_num"] == 64 and rep["padded"] == 14 and rep["dropped"] == 0
    bank = load_bank(tmp_path / "c")
    assert bank.token_ids.shape == (64, 16) and int(bank.valid_rows().sum()) == 50
    assert (bank.token_ids[50:] == bank.pad_id).all()
    code, out, _ = cli("build-cache", "-k", kb, "-o", tmp_path / "c36", "--knowledge-num", "36", "--json")
    assert json.loads(out)["dropped"] == 14
    assert_one_line_error(*cli("build-cache", "-k", kb, "-o", tmp_path / "c2", "--knowledge-num", "50")[::2],
                          "--knowledge-num", "perfect square")
    assert not (tmp_path / "c2").exists()


def _labels_agree_with_bank(keys_dir, cache_dir):
    bank = load_bank(cache_dir)
    meta = json.loads((keys_dir / "meta.json").read_text())
    assert meta["index_id"] == bank.meta["index_id"] and bank.meta["ordered_by_keys"]
    labels = records.read_jsonl(keys_dir / "train_labeled.jsonl", records.LABELED)
    for lab in labels:
        row = lab["target_indices"][0]
        assert bank.entries[row]["uuid"] == lab["uuid"]  # label index i == bank row i
        assert bank.entries[row]["subject"] in lab["query"]
    return bank, labels


def test_index_space_invariant_on_default(default_data):
    bank, labels = _labels_agree_with_bank(default_data / "keys", default_data / "cache")
    from memcli.backbone import load_backbone
    from memcli.data.keys import backbone_entry_embeddings

    t = load_tensors(default_data / "keys" / "keys.safetensors")
    model, _ = load_backbone("tiny")
    emb = backbone_entry_embeddings(model, bank.token_ids, bank.pad_id)
    emb = emb - emb[bank.valid_rows()].mean(0)
    # entry_embeddings row i is the pooled embedding of bank row i
    assert torch.allclose(t["entry_embeddings"], emb, atol=1e-5)
    S = t["keys"].shape[1]
    assert t["keys"].shape == (2, 32, 128) and S * S == bank.knowledge_num
    meta = json.loads((default_data / "keys" / "meta.json").read_text())
    # one-to-one cells beat the collision recipe by a wide margin
    assert meta["self_recall"]["@16"] > meta["self_recall_explicitlm"]["@16"] + 0.3


def test_build_keys_on_trex_slice_and_minilm(cli, tmp_path):
    code, out, err = cli("gen-data", "knowledge", "--trex", FIXTURES / "trex", "-n", "100", "--out", tmp_path, "--json")
    assert code == 0, err
    rep = json.loads(out)  # the slice holds 120 triples; same/contained and ambiguous ones are left out and counted
    assert 0 < rep["facts"] <= 100 and rep["facts"] + rep["filtered_same_or_contained"] + rep["filtered_ambiguous_subject"] <= 120
    kb = records.read_json_list(tmp_path / "sentence_trex_data.json", records.KNOWLEDGE)
    assert any(k["target"][0]["predicate"] == "P36" for k in kb)
    assert cli("convert-omcq", "-i", tmp_path / "omcq_train.json", "-o", tmp_path / "sft.jsonl")[0] == 0
    # T-REx sentences need 32-token entries (gen-data default's length for them); at 16 one is refused, never cut
    code, _, err = cli("build-cache", "-k", tmp_path / "sentence_trex_data.json", "-o", tmp_path / "short")
    assert code == 2 and "an entry holds 16 (knowledge_length)" in err and not (tmp_path / "short").exists()
    assert cli("build-cache", "-k", tmp_path / "sentence_trex_data.json", "-o", tmp_path / "cache",
               "--knowledge-length", "32")[0] == 0
    code, out, err = cli("build-keys", "-c", tmp_path / "cache", "-o", tmp_path / "keys", "--embedder", "minilm",
                         "--sft", tmp_path / "sft.jsonl", "--json")
    assert code == 0, err
    meta = json.loads(out)
    assert meta["knowledge_dim"] == 384 and meta["embedder"] == "minilm"
    _labels_agree_with_bank(tmp_path / "keys", tmp_path / "cache")


def test_build_keys_bad_input_leaves_everything_untouched(cli, tmp_path, default_data):
    import shutil

    d = tmp_path / "d"
    shutil.copytree(default_data, d)
    before = _digest(d)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"conversations": [{"role": "user", "content": "q"}]}\n')
    code, _, err = cli("build-keys", "-c", d / "cache", "-o", d / "keys", "--sft", bad)
    assert_one_line_error(code, err, "bad.jsonl:1", "assistant")
    assert _digest(d) == before
    # a bank made with another tokenizer than the backbone's
    meta = json.loads((d / "cache" / "meta.json").read_text())
    meta["tokenizer_fingerprint"] = "0" * 16
    (d / "cache" / "meta.json").write_text(json.dumps(meta))
    assert_one_line_error(*cli("build-keys", "-c", d / "cache", "-o", d / "k2")[::2], "tokenizer")
    assert not (d / "k2").exists()


@pytest.mark.parametrize("args,needle", [
    (["build-cache", "-k", "{missing}", "-o", "{out}"], "not found"),
    (["build-cache", "-k", "{empty}", "-o", "{out}"], "empty file"),
    (["build-cache", "-k", "{badjson}", "-o", "{out}"], "badjson.json:2: invalid JSON"),
    (["build-cache", "-k", "{dir}", "-o", "{out}"], "found a directory"),
    (["convert-omcq", "-i", "{badjson}", "-o", "{out}/x.jsonl"], "invalid JSON"),
    (["build-keys", "-c", "{missing}", "-o", "{out}"], "not found"),
    (["build-keys", "-c", "{dir}", "-o", "{out}"], "meta.json"),
    (["gen-data", "knowledge", "--trex", "{missing}", "--out", "{out}"], "not found"),
    (["gen-data", "knowledge", "--num-facts", "0", "--out", "{out}"], "--num-facts"),
    (["build-cache", "--bogus"], "No such option"),
])
def test_bad_input_one_line_exit_2_no_output(cli, tmp_path, args, needle):
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "badjson.json").write_text("[\n{oops}\n]")
    (tmp_path / "dir").mkdir()
    paths = {"missing": tmp_path / "missing.json", "empty": tmp_path / "empty.json", "badjson": tmp_path / "badjson.json",
             "dir": tmp_path / "dir", "out": tmp_path / "out"}
    code, out, err = cli(*[a.format(**paths) for a in args])
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "out").exists()


def test_trex_filters_unanswerable_facts(tmp_path):
    """Subject == object, one containing the other, and a subject with two objects in a relation never reach the bank."""
    from memcli.data.knowledge import trex_facts

    (tmp_path / "triples").mkdir()
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "P36.txt").write_text("The capital of [X] is [Y] .\n")
    rows = [("Arlon", "Arlon"), ("Paris FC", "Paris"), ("Kent", "Maidstone"), ("Kent", "Canterbury"),
            ("Lazio", "Rome"), ("Oslo county", "Oslo"), ("Bavaria", "Munich")]
    (tmp_path / "triples" / "P36.jsonl").write_text(
        "".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in rows))
    facts, pools, report = trex_facts(tmp_path, None, 0)
    assert sorted(f.subject for f in facts) == ["Bavaria", "Lazio"]
    assert report == {"same_or_contained": 3, "ambiguous_subject": 2}
    assert all(f.sentence == f"The capital of {f.subject} is {f.object} ." for f in facts)


def test_builtin_trex_slice(cli, tmp_path):
    code, out, err = cli("gen-data", "knowledge", "--trex", "builtin", "-n", "300", "--out", tmp_path, "--json")
    assert code == 0, err
    assert json.loads(out)["facts"] == 300
    kb = records.read_json_list(tmp_path / "sentence_trex_data.json", records.KNOWLEDGE)
    for item in kb:
        e = item["target"][0]
        assert e["subject"].casefold() not in e["object"].casefold() and e["object"].casefold() not in e["subject"].casefold()
    assert len({item["target"][0]["predicate"] for item in kb}) > 20  # facts from many relations
