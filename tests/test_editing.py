"""`memcli compare editing`: the knowledge-editing table. Its scoring against hand-computed values, its ranked
answers against a reference computed the slow way (the edit written with `memcli memory replace`, every option's
log-likelihood from a full forward), the run directory untouched, and the template split rule."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error


@pytest.fixture(scope="module")
def run(default_data, tmp_path_factory):
    """A tiny run with the pretrained recipe's retrieval (mean query, hidden-state entry keys, prefix read)."""
    from conftest import run_cli

    out = tmp_path_factory.mktemp("editing")
    code, _, err = run_cli(["train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={out}",
                            "model.entry_key=hidden", "model.query=mean", "model.read=prefix",
                            "dataset.answer_format=cloze", "model.finetuning_method=frozen", "training.max_steps=2",
                            "training.eval_interval=0", "training.final_eval_num_samples=8",
                            "logging.tensorboard=false"])
    assert code == 0, err
    return out / "memory"


def _digest(d: Path) -> dict:
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.rglob("*")) if p.is_file()}


def test_exact_match_normalises_and_stops_at_a_word_boundary():
    from memcli.eval.editing import exact_match, normalise

    assert normalise("The  Hinduism-religion, .") == "hinduism religion"
    assert exact_match(" Cairo, Egypt.", "Cairo")
    assert exact_match("the Cairo", "Cairo")  # articles are ignored
    assert exact_match("cairo", "Cairo")
    assert not exact_match(" Cairoville", "Cairo")  # not a word boundary
    assert not exact_match(" in Cairo", "Cairo")  # the answer must come first
    assert not exact_match("anything", "The")  # an answer that normalises to nothing never matches
    from memcli.eval.editing import answer_match

    assert answer_match("Basim was born in Cairo.\nHe moved", "Cairo")  # a chat answer may restate the question
    assert not answer_match("Basim was born.\nIn Cairo", "Cairo")  # only its first line counts
    assert not answer_match("He lives in Cairoville", "Cairo")


def test_scores_of_a_row_are_the_hand_counted_shares():
    from memcli.eval.editing import Case, Fact, right, share

    f = Fact(3, "Basim", "P19", "Basim was born in Cairo .", ["Cairo", "Tunis", "Oslo", "Lima", "Quito"], new=2)
    edited = Case(f, "own words", [1], [[2]] * 5, target=2)
    kept = Case(f, "own words", [1], [[2]] * 5, target=0)
    preds = [(2, " Oslo ."), (2, " Tunis"), (0, "Oslo")]  # ranked right + generated right; ranked only; generated only
    flags = [right(edited, p) for p in preds]
    assert flags == [(True, True), (True, False), (False, True)]
    assert share([r for r, _ in flags]) == pytest.approx(2 / 3) and share([g for _, g in flags]) == pytest.approx(2 / 3)
    assert right(kept, (0, "Cairo")) == (True, True) and share([]) is None
    asked = Case(f, "question", [1], [[2]] * 5, target=2)  # a question is right when its answer states the object
    assert right(asked, (2, "He was born in Oslo.")) == (True, True) and right(edited, (2, "He was born in Oslo.")) == (True, False)
    assert f.with_object(2) == "Basim was born in Oslo ."


def test_template_split_holds_out_the_best_paraphrase_and_skips_unusable_ones():
    from memcli.data.forms import cloze_prefix, load_forms, split_templates

    lines = ["[X] was born in [Y] .", "[X] was born in [Y].", "[X] is born in [Y].", "[Y] is where [X] was born.",
             "[X] [Y] was born.", "[X] comes from [Y].", "[X] was born at [Y].", "[X] is from [Y]."]
    train, held = split_templates(lines)
    # the 2nd line repeats the canonical one up to punctuation; [Y] before [X] and nothing between them are unusable
    assert held == ("[X] is born in [Y].", "[X] was born at [Y].") and train == ("[X] comes from [Y].", "[X] is from [Y].")
    assert cloze_prefix("The capital of [X] is [Y] .", "Peru") == "The capital of Peru is"
    forms = load_forms()
    assert len([k for k in forms if k.startswith("P")]) == 41
    assert all(f.question and f.heldout and not set(f.heldout) & set(f.train) for k, f in forms.items() if k.startswith("P"))


def _reference_rank(mem, tok, prompt: list[int], answers: list[list[int]]) -> int:
    """Each option's log-likelihood from one full forward of prompt + option (memory as the model reads it)."""
    best, arg = -float("inf"), -1
    for k, a in enumerate(answers):
        ids = torch.tensor([prompt + a])
        feats = mem.prompt_features(torch.tensor([prompt]), torch.ones(1, len(prompt), dtype=torch.long))
        logits = mem(input_ids=ids, attention_mask=torch.ones_like(ids), prompt_feats=feats).logits[0]
        lp = torch.log_softmax(logits.float(), -1)
        s = sum(float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(a))
        if s > best:
            best, arg = s, k
    return arg


def test_edited_answers_match_a_slow_reference_and_the_run_is_untouched(run, default_data, tmp_path, cli):
    from memcli.data.forms import load_forms
    from memcli.eval.editing import bank_facts, case, held_out_uuids
    from memcli.runs import load_run

    d = tmp_path / "run"
    shutil.copytree(run, d)
    before = _digest(d)
    code, out, err = cli("compare", "editing", "-m", d, "--data", default_data, "--edits", "1,4", "--num-samples", "4",
                         "--answers", tmp_path / "answers.jsonl", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert _digest(d) == before  # edits live in the loaded bank only
    assert [r["measure"] for r in res["rows"][:7]] == ["efficacy", "paraphrase", "question", "other question", "neighbours",
                                                       "outside bank", "unrelated"]
    assert res["modes"] == ["memory", "rag minilm", "rag bm25", "rag hybrid", "in prompt", "off"]
    unrelated = res["rows"][6]
    assert unrelated["n"] > 0 and {f"gen: {m}" for m in ("memory", "rag minilm", "rag bm25", "rag hybrid")} <= {
        k for k, v in unrelated.items() if v is not None}
    eff4 = next(r for r in res["rows"] if r["T"] == 4 and r["measure"] == "efficacy")
    assert eff4["n"] == 4
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    mine = [a for a in answers if a["T"] == 4 and a["measure"] == "efficacy" and a["mode"] == "memory"]
    assert eff4["rank: memory"] == pytest.approx(sum(a["rank_right"] for a in mine) / 4)
    # the reference: the same four edits written with `memcli memory replace`, then every option scored slowly
    run0 = load_run(d)
    facts = bank_facts(run0.bank, load_forms(), 0, held_out_uuids(default_data))[:4]
    lines = [dict({k: v for k, v in run0.bank.entries[f.row].items() if k in ("uuid", "subject", "predicate")},
                  text=f.with_object(f.new), object=f.options[f.new]) for f in facts]
    (tmp_path / "edits.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    code, _, err = cli("memory", "replace", "-m", d, "--from", tmp_path / "edits.jsonl")
    assert code == 0, err
    ref = load_run(d)
    by_subject = {a["subject"]: a for a in mine}
    for f in facts:
        c = case(ref.tok, ref.bank, load_forms(), f, "own words", f.new)
        with torch.no_grad():
            k = _reference_rank(ref.model, ref.tok, c.prompt, c.answers)
        assert by_subject[f.subject]["ranked"] == f.options[k], f.subject


def test_edit_counts_beyond_the_bank_are_refused(run, default_data, cli):
    code, _, err = cli("compare", "editing", "-m", run, "--data", default_data, "--edits", "1,100000")
    assert_one_line_error(code, err, "--edits", "expected counts from 0 (no edit) to")
    code, _, err = cli("compare", "editing", "-m", run, "--edits", "1,x")
    assert_one_line_error(code, err, "--edits '1,x'")
    code, _, err = cli("compare", "editing", "-m", run, "--data", default_data, "--edits", "1", "--abstain-below", "2")
    assert_one_line_error(code, err, "--abstain-below 2.0", "expected a cosine in [-1, 1]")


def test_paraphrase_items_use_training_templates_and_the_question_never_held_out_ones():
    from memcli.backbone import load_tokenizer
    from memcli.data.forms import cloze_prefix, load_forms
    from memcli.explicit.items import _other_forms, answer_ids, cloze_ids

    tok = load_tokenizer("tiny")
    fm = load_forms()["P19"]
    variants = {"Oslo": [5, 6], "Lima": [7, 8]}
    items = _other_forms(tok, fm, "Basim", "Cairo", variants, 128, (3, [3], [1.0]))
    prompts = [tok.decode(it.prompt_ids) for it in items]
    assert prompts[:-1] == [cloze_prefix(t, "Basim") for t in fm.train]
    assert "Where was Basim born?" in prompts[-1] and items[-1].answer_ids == answer_ids(tok, "Cairo")
    assert not {cloze_prefix(t, "Basim") for t in fm.heldout} & set(prompts)
    first = items[0]  # each form keeps the fact's entry, labels and counterfactual answers in that form
    assert (first.row, first.targets) == (3, [3]) and first.answer_ids == cloze_ids(tok, prompts[0], "Cairo")[1]
    assert [v for v, _ in first.cf] == [[5, 6], [7, 8]] and first.cf[1][1] == cloze_ids(tok, prompts[0], "Lima")[1]


def test_paraphrases_with_the_letter_format_is_refused(cli):
    code, _, err = cli("train", "memory", "dataset.answer_format=letter", "dataset.paraphrases=true")
    assert_one_line_error(code, err, "key 'dataset.paraphrases'", "answer_format is letter")


def test_chat_on_a_cloze_run_answers_a_question_alone_in_the_chat_template(run):
    from memcli.chat import GenOptions, explicit_session
    from memcli.runs import load_run

    r = load_run(run)
    session = explicit_session(r, GenOptions(max_new_tokens=6))
    session.reply("Tonem plays the")  # a cloze: completed as typed
    answer = session.reply("Where was Tonem born?")  # a question: the chat template, this message alone
    enc = r.tok.apply_chat_template([{"role": "user", "content": "Where was Tonem born?"}], tokenize=True,
                                    add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = r.model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=6,
                           do_sample=False, pad_token_id=r.tok.pad_token_id)
    assert answer == r.tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    plain = r.tok("Tonem plays the", return_tensors="pt")
    out = r.model.generate(**plain, max_new_tokens=6, do_sample=False, pad_token_id=r.tok.pad_token_id)
    assert session.history[1]["content"] == r.tok.decode(out[0, plain["input_ids"].shape[1]:], skip_special_tokens=True).strip()


ZSRE = [  # invented subjects: nothing in the tiny bank is about them
    {"subject": "Quorvex", "src": "Where was Quorvex born?", "alt": "Tarsk", "rephrase": "What is the birthplace of Quorvex?",
     "loc": "Where was Belnor born?", "loc_ans": "Oslo"},
    {"subject": "Mirelda", "src": "What does Mirelda play?", "alt": "lute", "rephrase": "Which instrument does Mirelda play?",
     "loc": "What does Tovan play?", "loc_ans": "drums"},
    {"subject": "Ostrav", "src": "Who does Ostrav work for?", "alt": "Ilse", "rephrase": "Who employs Ostrav?",
     "loc": "Who does Kellan work for?", "loc_ans": "Brannoch"},
    {"subject": "Vennik", "src": "Which country is Vennik in?", "alt": "Vel", "rephrase": "In which country is Vennik?",
     "loc": "Which country is Drosk in?", "loc_ans": "Norland"},
]


def test_an_edits_file_round_trips_with_metrics_computed_by_hand(run, tmp_path, cli):
    """Four ZsRE edits added with the memory add path: Rel / Gen / Loc from the answers written, and Rel's token
    accuracy against a slow reference (the same entries added with `memcli memory add`, a full forward per edit)."""
    from memcli.eval.edit_file import build
    from memcli.eval.editing import answer_match, normalise
    from memcli.explicit.items import prompt_ids
    from memcli.runs import load_run

    f = tmp_path / "edits.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in ZSRE))
    d = tmp_path / "run"
    shutil.copytree(run, d)
    before = _digest(d)
    code, out, err = cli("compare", "editing", "-m", d, "--edits-file", f, "--setups", "memory,rag bm25,in prompt,off",
                         "--answers", tmp_path / "answers.jsonl", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert _digest(d) == before and res["entries_added"] == 4 and res["scorings"] == ["token", "gen"]
    rel, gen, loc = res["rows"]
    assert [r["measure"] for r in res["rows"]] == ["reliability", "generalisation", "locality"]
    assert rel["n"] == gen["n"] == loc["n"] == 4
    answers = [json.loads(x) for x in (tmp_path / "answers.jsonl").read_text().splitlines()]
    for row, label in ((rel, "reliability"), (gen, "generalisation")):
        for mode in ("memory", "rag bm25", "in prompt", "off"):
            mine = [a for a in answers if a["measure"] == label and a["mode"] == mode]
            assert len(mine) == 4
            assert row[f"gen: {mode}"] == pytest.approx(sum(answer_match(a["generated"], a["answer"]) for a in mine) / 4)
    for mode in ("memory", "rag bm25"):
        mine = [a for a in answers if a["measure"] == "locality" and a["mode"] == mode]
        assert loc[f"gen: {mode}"] == pytest.approx(sum(normalise(a["before"]) == normalise(a["after"]) for a in mine) / 4)
    assert loc["gen: in prompt"] is None and loc["gen: off"] is None
    # the slow reference: the entries added to the run on disk, each question's retrieved entry placed by hand
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps({"text": f"{r['src']} {r['alt']} ."}) + "\n" for r in ZSRE))
    assert cli("memory", "add", "-m", d, "--from", tmp_path / "facts.jsonl")[0] == 0
    ref = load_run(d)
    mem, tok = ref.model, ref.tok
    accs = []
    for r in ZSRE:
        e = build(tok, "x", r)
        p = torch.tensor([prompt_ids(tok, r["src"])])
        with torch.no_grad():
            rows = mem.chosen_rows(mem.retrieve(mem.prompt_features(p, None), p, torch.ones_like(p)))
            full = torch.tensor([p[0].tolist() + e.rel.answer])
            ids, att = mem.prefixed(full, torch.ones_like(full), rows)
            logits = mem.backbone(input_ids=ids, attention_mask=att).logits[0]
        n = len(e.rel.answer)
        pred = logits[-n - 1: -1].argmax(-1).tolist()
        accs.append(sum(a == b for a, b in zip(pred, e.rel.answer)) / n)
    assert rel["token: memory"] == pytest.approx(sum(accs) / 4)


def test_a_counterfact_file_is_scored_too(run, tmp_path, cli):
    rec = {"case_id": 0, "requested_rewrite": {"prompt": "{} was born in", "subject": "Quorvex",
                                               "target_new": {"str": "Tarsk"}, "target_true": {"str": "Oslo"}},
           "paraphrase_prompts": ["Quorvex is originally from"], "neighborhood_prompts": ["Belnor was born in"]}
    # a second edit rewrites Belnor, the first edit's neighbour: that prompt is no longer unrelated and is left out
    other = {"case_id": 1, "requested_rewrite": {"prompt": "{} was born in", "subject": "Belnor",
                                                 "target_new": {"str": "Lima"}, "target_true": {"str": "Oslo"}},
             "paraphrase_prompts": [], "neighborhood_prompts": ["Drosk was born in", "Belnorian music is from"]}
    f = tmp_path / "cf.jsonl"
    f.write_text(json.dumps(rec) + "\n" + json.dumps(other) + "\n")
    code, out, err = cli("compare", "editing", "-m", run, "--edits-file", f, "--setups", "memory,off", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert [(r["measure"], r["n"]) for r in res["rows"]] == [("reliability", 2), ("generalisation", 1), ("locality", 2)]
    assert res["locality_about_edited"] == 1  # "Belnor was born in"; "Belnorian" names no edited subject


def test_an_edit_keeps_what_it_is_about():
    """Each edit's entry records its subject (what model.anchor=subject ties a question to): ZsRE's `subject`,
    CounterFact's `requested_rewrite.subject`; a ZsRE record without one is stored without."""
    from memcli.backbone import load_tokenizer
    from memcli.eval.edit_file import build

    tok = load_tokenizer("tiny")
    assert build(tok, "f:1", ZSRE[0]).subject == "Quorvex"
    assert build(tok, "f:2", {k: v for k, v in ZSRE[1].items() if k != "subject"}).subject is None
    cf = {"requested_rewrite": {"prompt": "{} was born in", "subject": "Quorvex", "target_new": {"str": "Tarsk"}}}
    e = build(tok, "f:3", cf)
    assert (e.subject, e.entry) == ("Quorvex", "Quorvex was born in Tarsk .")


@pytest.mark.parametrize("line,needle", [
    ({"src": "Where was Quorvex born?", "rephrase": "x"}, "missing field 'alt'"),
    ({"src": "", "alt": "Tarsk"}, "field 'src' is empty"),
    ({"src": "  ", "alt": "Tarsk"}, "field 'src' (the question) is empty"),
    ({"question": "Where?", "answer": "Tarsk"}, "unknown edit record"),
    ({"src": "Where?", "alt": "Tarsk", "loc": "Who?"}, "'loc' and 'loc_ans' go together"),
    ({"requested_rewrite": {"prompt": "born in", "subject": "Q", "target_new": {"str": "T"}}}, "no '{}' for the subject"),
])
def test_a_bad_edits_file_is_refused_in_one_line_with_its_line(run, tmp_path, cli, line, needle):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(ZSRE[0]) + "\n" + json.dumps(line) + "\n")
    code, _, err = cli("compare", "editing", "-m", run, "--edits-file", f)
    assert_one_line_error(code, err, "bad.jsonl:2", needle)
