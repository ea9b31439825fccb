import json
import pickle

import pytest
import torch
from hypothesis import given, settings, strategies as st

from memcli import records
from memcli.checkpoint import load_tensors, save_tensors
from memcli.errors import MemcliError


def test_jsonl_roundtrip_and_atomic(tmp_path):
    rows = [{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}] * 3
    p = tmp_path / "x.jsonl"
    assert records.write_jsonl(p, rows) == 3
    assert records.read_jsonl(p, records.CONVERSATION) == rows
    assert not [f for f in tmp_path.iterdir() if f.name.startswith(".")]  # no temp files left


def test_jsonl_errors_name_file_and_line(tmp_path):
    p = tmp_path / "bad.jsonl"
    good = json.dumps({"dialog_history": ["a"], "memory_query": "q", "memory_answer": "x"})
    p.write_text(good + "\n" + '{"dialog_history": ["a"], "memory_query": 3, "memory_answer": "x"}\n')
    with pytest.raises(MemcliError, match=r"bad.jsonl:2: field 'memory_query' is int, expected a string"):
        records.read_jsonl(p, records.DIALOG)
    p.write_text(good + "\n{broken\n")
    with pytest.raises(MemcliError, match=r"bad.jsonl:2: invalid JSON"):
        records.read_jsonl(p, records.DIALOG)
    p.write_bytes(b'{"a": "\xff\xfe"}\n')
    with pytest.raises(MemcliError, match=r"bad.jsonl:1: not UTF-8"):
        records.read_jsonl(p, records.DIALOG)
    p.write_text("")
    with pytest.raises(MemcliError, match="empty file"):
        records.read_jsonl(p, records.DIALOG)
    p.write_text(good.replace('"memory_answer": "x"', '"other": 1') + "\n")
    with pytest.raises(MemcliError, match=r":1: missing field 'memory_answer'"):
        records.read_jsonl(p, records.DIALOG)


def test_labeled_checks_lengths_and_numbers(tmp_path):
    p = tmp_path / "l.jsonl"
    p.write_text(json.dumps({"query": "q", "target_indices": [1, 2], "target_scores": [0.5]}) + "\n")
    with pytest.raises(MemcliError, match="target_indices has 2 items but target_scores has 1"):
        records.read_jsonl(p, records.LABELED)
    p.write_text('{"query": "q", "target_indices": [1], "target_scores": [NaN]}\n')
    with pytest.raises(MemcliError, match="finite"):
        records.read_jsonl(p, records.LABELED)


def test_json_list_errors(tmp_path):
    p = tmp_path / "k.json"
    p.write_text('{"target": []}')
    with pytest.raises(MemcliError, match="top level is dict, expected a JSON list"):
        records.read_json_list(p, records.KNOWLEDGE)
    p.write_text('[{"target": [{"sentence": "s", "uuid": 5}]}]')
    with pytest.raises(MemcliError, match=r"item 0: target\[0\]: field 'uuid' is int"):
        records.read_json_list(p, records.KNOWLEDGE)
    with pytest.raises(MemcliError, match="found a directory"):
        records.read_json_list(tmp_path, records.KNOWLEDGE)


@settings(max_examples=80, deadline=None)
@given(st.binary(max_size=200))
def test_reader_never_crashes_on_arbitrary_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("fuzz") / "f.jsonl"
    p.write_bytes(data)
    for fmt in (records.DIALOG, records.CONVERSATION, records.LABELED, records.GSM8K):
        try:
            records.read_jsonl(p, fmt)
        except MemcliError as e:
            assert "\n" not in str(e) and str(p) in str(e)


def test_safetensors_roundtrip_and_nan_refused(tmp_path):
    t = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int32)}
    save_tensors(tmp_path / "comp.safetensors", t)
    back = load_tensors(tmp_path / "comp.safetensors")
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    save_tensors(tmp_path / "nan.safetensors", {"w": torch.tensor([1.0, float("nan")])})
    with pytest.raises(MemcliError, match="'w' holds NaN"):
        load_tensors(tmp_path / "nan.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(MemcliError, match="not a valid safetensors file"):
        load_tensors(tmp_path / "junk.safetensors")


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("echo pwned > /tmp/memcli_pwned",))


def test_malicious_pickle_in_pt_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    with open(p, "wb") as f:
        pickle.dump({"w": _Evil()}, f)
    with pytest.raises(MemcliError, match="refused to load"):
        load_tensors(p)
    import os
    assert not os.path.exists("/tmp/memcli_pwned")


def test_legacy_pt_state_dict_loads(tmp_path):
    p = tmp_path / "ok.pt"
    torch.save({"w": torch.ones(2)}, p)
    assert torch.equal(load_tensors(p)["w"], torch.ones(2))


# structured fuzzing: JSON values built from the formats' own field names, so rows get deep into the validators
_FIELDS = ["conversations", "role", "content", "query", "target_indices", "target_scores", "dialog_history",
           "memory_query", "memory_answer", "question", "answer", "target", "sentence", "uuid", "options",
           "correct_answer", "subject", "user", "assistant", "text"]
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 3000) | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["", "user", "assistant", "system", "x", "#### 4"]),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(_FIELDS), c, max_size=4),
    max_leaves=16)


@settings(max_examples=150, deadline=None)
@given(st.lists(_json, min_size=0, max_size=4))
def test_readers_on_structured_rows_accept_only_valid_rows(tmp_path_factory, rows):
    d = tmp_path_factory.mktemp("sfuzz")
    p, q = d / "f.jsonl", d / "f.json"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    q.write_text(json.dumps(rows))
    for fmt in (records.DIALOG, records.CONVERSATION, records.LABELED, records.GSM8K):
        try:
            got = records.read_jsonl(p, fmt)
        except MemcliError as e:
            assert "\n" not in str(e) and str(p) in str(e)
            continue
        assert got and all(isinstance(r, dict) for r in got)
        if fmt is records.CONVERSATION:  # what the trainers rely on
            assert all(any(m["role"] == "assistant" for m in r["conversations"]) for r in got)
        if fmt is records.LABELED:
            assert all(len(r["target_indices"]) == len(r["target_scores"]) for r in got)
    for fmt in (records.KNOWLEDGE, records.OMCQ):
        try:
            got = records.read_json_list(q, fmt)
        except MemcliError as e:
            assert "\n" not in str(e) and str(q) in str(e)
            continue
        assert all(isinstance(r["target"][0], dict) for r in got)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300))
def test_tensor_reader_never_crashes_on_arbitrary_bytes(tmp_path_factory, data):
    p = tmp_path_factory.mktemp("tfuzz") / "t.safetensors"
    p.write_bytes(data)
    try:
        load_tensors(p)
    except MemcliError as e:
        assert "\n" not in str(e) and str(p) in str(e)


@settings(max_examples=80, deadline=None)
@given(_json)
def test_resume_pointer_never_leaves_the_states_directory(tmp_path_factory, obj):
    from memcli.training.state import find_state

    run = tmp_path_factory.mktemp("ptr")
    (run / "states" / "step-00000001").mkdir(parents=True)
    (run / "states" / "step-00000001" / "state.json").write_text("{}")
    (run / "states" / "latest.json").write_text(json.dumps(obj if not isinstance(obj, dict) else {"state": obj.get("text", obj.get("target")), **obj}))
    try:
        st_dir = find_state(run, "auto")
    except MemcliError as e:
        assert "\n" not in str(e) and "latest.json" in str(e)
    else:
        assert st_dir.resolve().parent == (run / "states").resolve()


def test_sweep_removes_only_dead_writers_temporaries(tmp_path):
    import os
    import subprocess
    import sys

    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(p.stdout)  # that process has exited: its pid names no running writer
    (tmp_path / "run" / "states").mkdir(parents=True)
    top = tmp_path / f".run.{dead}.x1y2z3ab.tmp"
    nested_dir = tmp_path / "run" / "states" / f".step-00000002.{dead}.q9w8e7r6.tmp"
    nested_dir.mkdir()
    (nested_dir / f".state.json.{dead}.aaaabbbb.tmp").write_text("{}")
    old = tmp_path / "run" / f".model.old-{dead}"
    live = tmp_path / "run" / f".metrics.jsonl.{os.getpid()}.abcd1234.tmp"
    user = tmp_path / "run" / ".notes.tmp"  # not a memcli temporary: no writer's pid in the name
    for f in (top, old, live, user):
        f.write_text("x")
    assert records.sweep_stale_temps(tmp_path, recursive=False) == [top]  # a shared parent: its own entries only
    assert nested_dir.is_dir() and old.exists()
    assert set(records.sweep_stale_temps(tmp_path)) == {nested_dir, old}  # the directory goes whole, once
    assert sorted(f.name for f in tmp_path.rglob("*")) == sorted(["run", "states", live.name, user.name])
