"""``memcli gen-data edits``: records the scorer reads, and no locality prompt about an edited subject."""

import json

import pytest

from memcli.data.edits import _away_from_edits
from memcli.data.forms import Forms
from memcli.eval.edit_file import read_edits
from memcli.retrieval.lexical import names


def _subject(r: dict) -> str:
    return r["subject"] if "src" in r else r["requested_rewrite"]["subject"]


@pytest.mark.parametrize("fmt", ["zsre", "counterfact"])
def test_generated_edits_are_read_back_and_stay_away_from_edited_subjects(cli, tmp_path, fmt):
    out = tmp_path / f"{fmt}.jsonl"
    code, stdout, err = cli("gen-data", "edits", "--format", fmt, "-n", "300", "--out", out, "--json")
    assert code == 0, err
    assert json.loads(stdout)["edits"] == 300
    recs = [r for _, r in read_edits(out)]  # the scorer's own reader accepts every record
    assert len(recs) == 300
    subjects = [_subject(r) for r in recs]
    assert len(set(subjects)) == 300  # one edit per subject
    if fmt == "zsre":
        asked = [r["loc"] for r in recs]
        assert all(r["alt"] not in r["answers"] for r in recs)
        assert all(r["src"] != r["rephrase"] and r["subject"] in r["rephrase"] for r in recs)
    else:
        asked = [p for r in recs for p in r["neighborhood_prompts"]]
        rw = [r["requested_rewrite"] for r in recs]
        assert all(x["target_new"]["str"] != x["target_true"]["str"] for x in rw)
        assert len(asked) > 300  # neighbours are kept, only those about edited subjects go
    assert not [(q, s) for q in asked for s in subjects if names(q, s)]


def test_a_locality_question_about_a_later_edit_is_replaced_and_a_neighbour_dropped():
    form = Forms(canonical="[X] was born in [Y] .", question="Where was [X] born?")
    forms = {"P19": form}
    records = [
        {"subject": "Ada", "src": "Where was Ada born?", "alt": "Oslo", "loc": "Where was Bo Lind born?", "loc_ans": "Rome"},
        {"subject": "Bo Lind", "src": "Where was Bo Lind born?", "alt": "Lima", "loc": "Where was Cy born?", "loc_ans": "Kyiv"},
        {"case_id": 2, "requested_rewrite": {"subject": "Dee"},
         "neighborhood_prompts": ["Ada was born in", "Ed was born in", "Adam was born in"]},
    ]
    used = {"Ada", "Bo Lind", "Dee", "Cy"}
    locs = iter([("P19", {"sub_label": "Bo Lind Jr", "obj_label": "Pisa"}),  # names an edit: skipped
                 ("P19", {"sub_label": "Cy", "obj_label": "Kyiv"}),  # already used
                 ("P19", {"sub_label": "Fay", "obj_label": "Bonn"})])
    _away_from_edits(records, locs, used, forms)
    assert (records[0]["loc"], records[0]["loc_ans"]) == ("Where was Fay born?", "Bonn")
    assert "Fay" in used
    assert records[1]["loc"] == "Where was Cy born?"  # names no edit: kept
    assert records[2]["neighborhood_prompts"] == ["Ed was born in", "Adam was born in"]  # "Adam" does not name "Ada"
    # no unrelated question left: the record is dropped (the caller then refuses too few edits)
    records = [dict(records[1], loc="Where was Ada born?"), {"subject": "Ada", "src": "s", "alt": "a", "loc": "l", "loc_ans": "x"}]
    _away_from_edits(records, iter([]), used, forms)
    assert [r["subject"] for r in records] == ["Ada"]
