"""memcli train retriever: the turn memory's sentence encoder fine-tuned on (question, evidence turn) pairs."""

import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import FIXTURES, assert_one_line_error
from memcli.eval import locomo as LC
from memcli.training import retriever as R
from memcli.hippo import turns as T
from memcli.retrieval.encoders import SentenceEncoder, dense_share_of

EXCERPT = FIXTURES / "locomo" / "excerpt.json"


def test_examples_pair_each_evidence_turn_with_the_question_and_bm25_hard_negatives():
    conv = LC.load_locomo(EXCERPT)[0]
    entries = LC.conversation_entries(conv)
    pos = {e["id"]: i for i, e in enumerate(entries)}
    ex = R.training_examples([conv], pool=4)
    want = [(q["question"], pos[x]) for q in conv["qa"] for x in LC.evidence_ids(q) if x in pos]
    assert [e.question for e in ex] == [q for q, _ in want] and len(ex) > len(conv["qa"]) // 2
    lexical = T.TurnMemory(retriever="lexical", **T.NO_PRIORS)  # BM25 alone
    lexical.add(entries)
    for e, (q, i) in zip(ex, want):
        assert e.positives == (T.context_text(entries, i), T.key_text(entries[i]))
        item = next(x for x in conv["qa"] if x["question"] == q)
        evidence = {pos[x] for x in LC.evidence_ids(item) if x in pos}
        ranked = [j for j in torch.argsort(-lexical.scores([q])[0], stable=True).tolist() if j not in evidence][:4]
        assert e.negatives == [T.context_text(entries, j) for j in ranked]  # best BM25 first, never the evidence


def test_observations_are_more_queries_each_paired_with_the_turns_it_names():
    conv = dict(LC.load_locomo(EXCERPT)[0])
    conv["observation"] = {  # LoCoMo's form: per session, per speaker, [statement, evidence]
        "session_1_observation": {"Caroline": [["Caroline went to an LGBTQ support group.", "D1:3"]],
                                  "Melanie": [["Melanie paints.", ["D1:12", "D1:14"]], ["Melanie skis.", "D9:9"]]},
        "session_2_observation": {"Caroline": [["Caroline researches adoption.", "D2:8; D2:10"]]}}
    plain = R.training_examples([conv], pool=4)
    more = R.training_examples([conv], pool=4, observations=True)
    assert more[: len(plain)] == plain
    extra = [(e.question, e.positives[1]) for e in more[len(plain):]]
    entries = {e["id"]: e for e in LC.conversation_entries(conv)}
    want = [("Caroline went to an LGBTQ support group.", "D1:3"), ("Melanie paints.", "D1:12"), ("Melanie paints.", "D1:14"),
            ("Caroline researches adoption.", "D2:8"), ("Caroline researches adoption.", "D2:10")]  # D9:9 is not there
    assert extra == [(q, T.key_text(entries[i])) for q, i in want]
    assert all(len(e.negatives) == 4 for e in more[len(plain):])
    assert R.observation_items({"qa": []}) == []


@pytest.fixture(scope="module")
def minilm():
    return SentenceEncoder("minilm").model


def test_batch_loss_is_the_in_batch_softmax_with_a_shared_positive_masked(minilm):
    a = R.Example("Where did Alice adopt her dog?", ("Alice: I adopted a puppy in Denver.",) * 2, ["Bob: I play violin."])
    b = R.Example("Which city did the puppy come from?", a.positives, ["Bob: My teacher moved to Lisbon."])
    c = R.Example("What does Bob play?", ("Bob: I play violin.",) * 2, ["Alice: Pepper chewed my shoes."])
    t = R.RetrieverTraining(hard_negatives=1, scale=20.0)
    minilm.eval()
    with torch.no_grad():
        got = R.batch_loss(minilm, [a, b, c], t, random.Random(0))
        docs = [a.positives[0], a.positives[0], c.positives[0], *a.negatives, *b.negatives, *c.negatives]
        enc = lambda xs: torch.as_tensor(minilm.encode(xs, normalize_embeddings=True))  # noqa: E731
        logits = 20.0 * enc([a.question, b.question, c.question]) @ enc(docs).T
    # a's and b's positive is one text: for a, b's copy is not a negative (and the other way round); a's hard
    # negative is c's positive: not a negative for c
    logits[0, 1] = logits[1, 0] = logits[2, 3] = float("-inf")
    assert got.item() == pytest.approx(F.cross_entropy(logits, torch.arange(3)).item(), abs=1e-4)


def _dense_recall_at_1(encoder, conv) -> float:
    return LC.recall_only([conv], encoder, ks=(1,), retriever="dense")["recall@1"]


def test_fine_tuning_pulls_questions_to_their_evidence_turns():
    """Learning check: on the excerpt's own questions, the fine-tuned dense keys rank the evidence first far more
    often than the untrained ones, and the loss falls."""
    conv = LC.load_locomo(EXCERPT)[0]
    enc = SentenceEncoder("minilm")
    before = _dense_recall_at_1(enc, conv)
    t = R.RetrieverTraining(epochs=6, learning_rate=1e-4, batch_size=8, hard_negatives=2, seed=0)
    losses = R.fit(enc.model, R.training_examples([conv], t.negative_pool), t)
    after = _dense_recall_at_1(enc, conv)
    assert sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert after >= before + 0.3, (before, after)


def test_train_retriever_cli_writes_an_encoder_that_compare_and_chat_read(cli, tmp_path):
    conv = LC.load_locomo(EXCERPT)[0]
    data = tmp_path / "two.json"
    data.write_text(json.dumps([conv, dict(conv, sample_id="copy")]))
    code, out, err = cli("train", "retriever", f"dataset.path={data}", "dataset.conversations=1", "training.epochs=1",
                         f"logging.out_dir={tmp_path}", "logging.run_name=enc", "--json")
    assert code == 0, err
    r = json.loads(out)
    enc_dir = tmp_path / "enc"
    assert r["encoder"] == str(enc_dir) and r["trained_conversations"] == [1] and r["held_out_conversations"] == [2]
    assert r["steps"] == 1 and r["recall_before"]["questions_with_evidence"] == r["recall_after"]["questions_with_evidence"] > 0
    meta = json.loads((enc_dir / R.META).read_text())
    assert meta["config"]["training"]["epochs"] == 1 and len(meta["losses"]) == 1
    # the share of the hybrid score it asks for is recorded, and its held-out recall was measured with it
    assert meta["dense_share"] == 0.8 and dense_share_of(str(enc_dir)) == 0.8
    assert r["recall_after"]["retriever"].startswith(f"hybrid/{enc_dir} at dense share 0.8 + ")
    assert r["recall_before"]["retriever"].startswith("hybrid/minilm + ")
    assert R.trained_conversations(enc_dir) == [1]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left beside it
    # compare reads it, and says so when the conversations measured are those it was trained on
    args = ("compare", "locomo", "--data", data, "--backbone", "tiny", "--recall-only",
            "--encoder", enc_dir, "--json")
    code, out, err = cli(*args, "--conversations", "1")
    assert code == 0 and "trained on conversation(s) 1" in err and "not held out" in err
    code, out, err = cli(*args, "--skip", "1")
    assert code == 0 and "warning" not in err
    assert json.loads(out)["recall@1"] == pytest.approx(r["recall_after"]["recall@1"])
    # a chat turn memory keyed by it; a session keyed by another encoder is refused
    from test_dialog_memory import _hippo_chat

    from memcli.errors import MemcliError

    f = tmp_path / "me.session"
    s = _hippo_chat(tmp_path, recall=2, session_path=f, encoder=str(enc_dir))
    s.reply("My dog is called Pepper.")
    assert s.memory.name == f"hybrid/{enc_dir}"
    with pytest.raises(MemcliError, match=f"keyed for retriever 'hybrid/{enc_dir}' \\(hybrid/sha256:[0-9a-f]{{16}}\\), "
                                          "this session uses 'hybrid/minilm' \\(hybrid/minilm\\)"):
        _hippo_chat(tmp_path, recall=2, session_path=f)
    # the same encoder spelled another way, or moved, reads the session; the same path retrained does not
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(enc_dir, moved)
    for spelled in (f"{enc_dir}/.", str(moved)):
        again = _hippo_chat(tmp_path, recall=2, session_path=f, encoder=spelled)
        assert again.memory.turns == s.memory.turns and torch.equal(again.memory.keys, s.memory.keys)
    (moved / "model.safetensors").write_bytes((moved / "model.safetensors").read_bytes()[:-1] + b" ")
    with pytest.raises(MemcliError, match="keyed for retriever"):
        _hippo_chat(tmp_path, recall=2, session_path=f, encoder=str(moved))
    with pytest.raises(MemcliError, match="needs --recall N or --session FILE"):
        _hippo_chat(tmp_path, encoder=str(enc_dir))


def test_train_retriever_refusals(cli, tmp_path):
    code, _, err = cli("train", "retriever")
    assert_one_line_error(code, err, "dataset.path", "LoCoMo-format JSON")
    code, _, err = cli("train", "retriever", f"dataset.path={EXCERPT}", "dataset.conversations=2")
    assert_one_line_error(code, err, "dataset.conversations", "has 1 conversations")
    code, _, err = cli("train", "retriever", f"dataset.path={EXCERPT}", "training.hard_negatives=9")
    assert_one_line_error(code, err, "training.negative_pool", "out of range")
    code, _, err = cli("train", "retriever", f"dataset.path={EXCERPT}", "model.dense_share=1.5")
    assert_one_line_error(code, err, "model.dense_share: 1.5", "out of range")
    code, _, err = cli("train", "retriever", "training.epoch=2")
    assert_one_line_error(code, err, "unknown key 'training.epoch'", "train retriever")
    code, _, err = cli("train", "retriever", f"dataset.path={tmp_path / 'none.json'}")
    assert_one_line_error(code, err, "none.json")
    code, out, _ = cli("train", "retriever", "--print-config")
    assert code == 0 and "negative_pool: 5" in out and "run_name: turn-encoder" in out


def test_example_yaml_is_the_default_with_a_path():
    from memcli.config import load_config

    f = FIXTURES.parent.parent / "examples" / "train_retriever.yaml"
    assert load_config(R.RetrieverRecipe, f).to_dict() == \
        load_config(R.RetrieverRecipe, overrides=["dataset.path=locomo10.json"]).to_dict()
