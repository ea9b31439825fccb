"""Dialog turn memory (memcli.hippo.turns) and the LoCoMo harness around it: evidence recall, the oracle,
BLEU-1 / F1 under LoCoMo's category rules, BM25 against its formula, and chat sessions saved and reopened."""

import datetime
import json
import math
import re

import pytest
import torch

from memcli.errors import MemcliError
from memcli.eval import locomo as LC
from memcli.hippo import turns as T
from memcli.retrieval.encoders import dense_share_of, make_encoder
from memcli.retrieval.fusion import zscore
from memcli.retrieval.lexical import BM25Index, words


def _conversation():
    """Two sessions; each question's evidence is known by hand."""
    s1 = [("Alice", "I adopted a puppy from the shelter in Denver last week."),
          ("Bob", "That is lovely. What breed is it?"),
          ("Alice", "A beagle. His name is Pepper."),
          ("Bob", "I started learning the violin in March.")]
    s2 = [("Alice", "Pepper chewed my running shoes yesterday."),
          ("Bob", "My violin teacher moved to Lisbon."),
          ("Alice", "I am training for the Boston marathon in April.")]
    conv = {"speaker_a": "Alice", "speaker_b": "Bob", "session_1_date_time": "1 May 2023",
            "session_2_date_time": "9 June 2023",
            "session_1": [{"speaker": a, "text": t, "dia_id": f"D1:{i + 1}"} for i, (a, t) in enumerate(s1)],
            "session_2": [{"speaker": a, "text": t, "dia_id": f"D2:{i + 1}"} for i, (a, t) in enumerate(s2)]}
    qa = [{"question": "Where is the shelter Alice adopted from?", "answer": "Denver", "evidence": ["D1:1"], "category": 4},
          {"question": "Who moved to Lisbon?", "answer": "Bob's violin teacher", "evidence": ["D2:2"], "category": 4},
          # two evidence turns: only the marathon turn shares words with the question
          {"question": "Which marathon is Alice training for, and what is her dog's breed?", "answer": "Boston, beagle",
           "evidence": ["D2:3", "D1:3"], "category": 1},
          {"question": "What did Bob say about cooking?", "adversarial_answer": "pasta", "evidence": [], "category": 5}]
    return {"sample_id": "hand", "conversation": conv, "qa": qa}


def test_bleu1_and_f1_against_hand_computed_values():
    assert LC.bleu1("red car", "red bike") == pytest.approx(0.5)  # 1 of 2 unigrams, no brevity penalty
    assert LC.bleu1("car", "red car") == pytest.approx(math.exp(1 - 2 / 1))  # precision 1, brevity e^(1-2)
    assert LC.bleu1("the red red red car", "red car") == pytest.approx(0.5)  # clipped: red once, car once, of 4
    assert LC.bleu1("", "Paris") == 0.0
    # category rules: 3 cuts the gold answer at ';', 5 has no text to match
    assert LC.bleu_score("Sweden", {"category": 3, "answer": "Sweden; moved in 2019"}) == pytest.approx(1.0)
    assert LC.bleu_score("x", {"category": 5, "adversarial_answer": "x"}) is None
    assert LC.bleu_score("2022", {"category": 2, "answer": 2022}) == 1.0
    # F1 of the multi-hop rule: each gold part takes its best predicted part
    assert LC.score("beagle, Boston", {"category": 1, "answer": "Boston, beagle"}) == pytest.approx(1.0)
    assert LC.score("Boston", {"category": 1, "answer": "Boston, beagle"}) == pytest.approx(0.5)


@pytest.mark.parametrize("ev,want", [
    (["D1:3"], ["D1:3"]), (["D8:6; D9:17"], ["D8:6", "D9:17"]), (["D:11:26"], ["D11:26"]), (["D30:05"], ["D30:5"]),
    (["D"], []), (["D9:1 D4:4 D4:6"], ["D9:1", "D4:4", "D4:6"]), (["D1:2", "D1:2"], ["D1:2"]), ([], [])])
def test_evidence_references_as_locomo_writes_them(ev, want):
    assert LC.evidence_ids({"evidence": ev}) == want


def test_bm25_matches_its_formula():
    """Lucene BM25 (k1 1.2, b 0.75) on words that neither stemming nor stop words change."""
    docs = ["cat dog", "dog dog bird", "fish"]
    index = BM25Index()
    index.add(docs)
    got = index.scores(["dog bird", "zebra"])
    N, k1, b = 3, 1.2, 0.75
    lens = [2, 3, 1]
    avg = sum(lens) / N

    def idf(df):
        return math.log(1 + (N - df + 0.5) / (df + 0.5))

    def part(tf, dl, df):
        return idf(df) * tf / (tf + k1 * (1 - b + b * dl / avg))

    want = [part(1, 2, 2), part(2, 3, 2) + part(1, 3, 1), 0.0]
    assert got[0].tolist() == pytest.approx(want, rel=1e-5)
    assert got[1].tolist() == [0.0, 0.0, 0.0]  # nothing in common: no turn scores


def test_growing_bm25_index_scores_as_bm25s_does():
    """Turns added one at a time score exactly as bm25s over the whole corpus (stemming, stop words, a word
    repeated in the query), so a chat's lexical index never has to be rebuilt."""
    import bm25s

    docs = ["Caroline went to the LGBTQ support group yesterday.", "Melanie is painting a sunset by the lake.",
            "I ran a charity race for mental health last Saturday!", "The support group was so supportive.",
            "", "Painting lakes and sunsets relaxes me; I painted two lakes.", "ok"]
    queries = ["When did Caroline go to the support group?", "What does Melanie paint? paint lakes",
               "zebra", "the"]
    index = BM25Index()
    for d in docs:
        index.add([d])
    ref = bm25s.BM25(k1=1.2, b=0.75)
    ref.index(words(docs), show_progress=False)
    for j, q in enumerate(words(queries)):
        q = [w for w in q if w in ref.vocab_dict]
        want = ref.get_scores(q) if q else [0.0] * len(docs)
        assert index.scores(queries)[j].tolist() == pytest.approx(list(want), rel=1e-5, abs=1e-6), queries[j]
    assert index.scores(queries)[1].count_nonzero() == 2  # paint / painting / painted share a stem


def test_turn_memory_indexes_only_new_turns(monkeypatch):
    """A search after each new turn tokenises each turn once, and gives what a memory written at once gives."""
    conv = LC.conversation_entries(_conversation())
    seen = []
    real = words
    from memcli.retrieval import lexical

    counted = lambda texts: seen.extend(texts) or real(texts)  # noqa: E731
    monkeypatch.setattr(lexical, "words", counted)  # the index's documents
    monkeypatch.setattr(T, "words", counted)  # the queries
    grown = T.TurnMemory(retriever="lexical")
    for t in conv:
        grown.add([t])
        grown.search(["beagle"], 2)
    assert len(seen) == 2 * len(conv) + len(conv)  # every turn alone and in context once, plus the queries
    whole = T.TurnMemory(retriever="lexical")
    whole.add(conv)
    q = ["What breed is the dog?", "When was the marathon?"]
    assert torch.equal(grown.scores(q), whole.scores(q))


def test_evidence_recall_on_a_two_session_conversation():
    data = [_conversation()]
    r = LC.recall_only(data, None, retriever="lexical", ks=(1, 2, 7))
    assert r["questions_with_evidence"] == 3  # the adversarial question has none
    # Q1 and Q2 find their one turn first; Q3 finds the marathon turn first, the beagle turn is not in its top 2
    assert r["recall@1"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert r["all@1"] == pytest.approx(2 / 3)
    assert r["recall@7"] == 1.0 and r["all@7"] == 1.0  # all 7 turns brought back


def test_turn_priors_against_hand_computed_values():
    s = torch.tensor([[1.0, 2.0, 3.0, -1.0, 5.0], [0.0, -1.0, -2.0, 4.0, 1.0]])
    # the better of the turns before and after in the same session; a missing side counts 0
    assert T.neighbor_scores(s, [1, 1, 1, 2, 2]).tolist() == [[2, 3, 2, 5, 0], [0, 0, 0, 1, 4]]
    assert T.neighbor_scores(s, ["a"] * 5).tolist() == [[2, 3, 2, 5, 0], [0, 0, 4, 1, 4]]
    speakers = ["Caroline", "Melanie Smith", "Caroline", None, "Melanie Smith"]
    got = T.named_speaker_mask(["What did Caroline's mom say?", "Did melanie and Caroline meet?", "Where is Carol?",
                                "What did MELANIE paint?"], speakers)
    assert got.tolist() == [[1, 0, 1, 0, 0], [0] * 5, [0] * 5, [0, 1, 0, 0, 1]]  # whole first names, any case
    assert T.named_speaker_mask(["Caroline?"], ["Caroline", "Caroline"]).tolist() == [[0, 0]]  # one speaker: nothing
    # dates: the most precise one a question names, against each turn's date (LoCoMo writes "time on day month, year")
    for text, want in [("4:04 pm on 20 January, 2023", (2023, 1, 20)), ("What happened on March 3rd, 2021?", (2021, 3, 3)),
                       ("the 2023-01-20 meeting", (2023, 1, 20)), ("Which city in Sept. 2021?", (2021, 9)),
                       ("What did John do in 2024?", (2024,)), ("marching band", None), ("May I ask?", None),
                       ("What did I say on 30 November?", (None, 11, 30)), ("on May 7th about 2024", (None, 5, 7)),
                       ("I ran 5 marathons in 2 decades", None), ("What did I say yesterday?", None)]:
        assert T.parse_date(text) == want, text
    # "today" / "yesterday" only against a clock's day (a chat's); a named day still comes first
    day = datetime.date(2026, 3, 1)
    assert T.parse_date("What did I say yesterday?", day) == (2026, 2, 28)
    assert T.parse_date("Anything today?", day) == (2026, 3, 1)
    assert T.parse_date("yesterday or on 8 May, 2022?", day) == (2022, 5, 8)
    assert T.named_date_mask(["on 20 January", "yesterday"], ["20 January, 2023", "20 January, 2024", "21 January, 2024"],
                             datetime.date(2024, 1, 22)).tolist() == [[1, 1, 0], [0, 0, 1]]
    dates = ["4:04 pm on 20 January, 2023", "1:00 pm on 21 January, 2023", "8 May, 2022", None, "someday"]
    got = T.named_date_mask(["What did Jon say on 20 January, 2023?", "in January 2023", "during 2022", "When?"], dates)
    assert got.tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0] * 5]


def test_relative_times_are_anchored_to_the_day_a_turn_was_said():
    said = "1:56 pm on 8 May, 2023"  # a Monday
    cases = [("I adopted him last Friday!", "I adopted him last Friday (5 May, 2023)!"),
             ("Yesterday was great", "Yesterday (7 May, 2023) was great"),
             ("last Monday and last sunday", "last Monday (1 May, 2023) and last sunday (7 May, 2023)"),
             ("two weeks ago, 3 days ago", "two weeks ago (24 April, 2023), 3 days ago (5 May, 2023)"),
             ("a few days ago", "a few days ago (a few days before 8 May, 2023)"),
             ("last week; last weekend", "last week (the week before 8 May, 2023); last weekend (the weekend before "
                                         "8 May, 2023)"),
             ("next month, last month, last year, two years ago",
              "next month (June 2023), last month (April 2023), last year (2022), two years ago (2021)"),
             ("an hour ago, this lastly", "an hour ago, this lastly")]
    for text, want in cases:
        assert T.anchor_relative_dates(text, said) == want
    assert T.anchor_relative_dates("last month", "2:00 pm on 9 January, 2023") == "last month (December 2022)"
    for date in (None, "May 2023", "someday", "30 February, 2023"):  # no day to count from: unchanged
        assert T.anchor_relative_dates("yesterday", date) == "yesterday"
    # the prompt shows the anchored text; the key (what retrieval matches) stays as said
    turn = {"speaker": "Jon", "text": "I went yesterday.", "date": said}
    assert T.entry_text(turn) == f"[{said}] Jon: I went yesterday (7 May, 2023)."
    assert T.key_text(turn) == "Jon: I went yesterday."


def test_turn_priors_add_to_the_fused_scores_and_change_the_ranking():
    s1 = [("Alice", "Guess what, I finally did it last weekend!"), ("Bob", "Did what? Tell me."),
          ("Alice", "I ran my first marathon, in Boston."), ("Bob", "Amazing, congratulations.")]
    s2 = [("Alice", "Hiking, hiking, more hiking: the Alps are where I hike every summer."),
          ("Bob", "I hike in Norway."), ("Alice", "My sister finally moved to Oslo."), ("Bob", "Nice, say hi to her.")]
    dates = {1: "1:00 pm on 8 May, 2023", 2: "7:30 pm on 9 June, 2023"}
    entries = [{"id": f"D{n}:{i + 1}", "session": n, "date": dates[n], "speaker": a, "text": t}
               for n, turns in ((1, s1), (2, s2)) for i, (a, t) in enumerate(turns)]

    def memory(neighbor, speaker, date):
        m = T.TurnMemory(retriever="lexical", neighbor_weight=neighbor, speaker_weight=speaker, date_weight=date)
        m.add(entries)
        return m

    def top(m, q, k):
        return [entries[i]["id"] for i in m.search([q], k)[0][0].tolist()]

    plain, every = memory(0, 0, 0), memory(0.7, 3, 2)
    qs = ["Where does Bob go hiking?", "What did Alice finally do last weekend?", "Norway", "Who spoke on 9 June, 2023?"]
    base = plain.scores(qs)
    want = (base + 0.7 * T.neighbor_scores(base, [e["session"] for e in entries])
            + 3 * T.named_speaker_mask(qs, [e["speaker"] for e in entries])
            + 2 * T.named_date_mask(qs, [e["date"] for e in entries]))
    assert torch.allclose(every.scores(qs), want)
    assert set(top(memory(0, 0, 1), qs[3], 4)) == {f"D2:{i}" for i in range(1, 5)}  # session 2 is that day
    # BM25 prefers Alice's thrice-said hiking; the question is about Bob's
    assert top(plain, qs[0], 1) == ["D2:1"] and top(memory(0, 8, 0), qs[0], 1) == ["D2:2"]
    # the marathon turn shares no word with the question; the turn before it does
    assert "D1:3" not in top(plain, qs[1], 3) and "D1:3" in top(memory(0.5, 0, 0), qs[1], 3)
    with pytest.raises(MemcliError, match="speaker_weight -1"):
        T.TurnMemory(retriever="lexical", speaker_weight=-1)


def test_dense_share_weighs_the_hybrids_halves():
    enc = make_encoder("minilm")
    entries = LC.conversation_entries(_conversation())
    qs = ["Which marathon is Alice training for?", "What did Bob cook?"]

    def memory(share=None, retriever="hybrid"):
        m = T.TurnMemory(enc, retriever, dense_share=share, **T.NO_PRIORS)
        m.add(entries)
        return m

    m = memory()
    assert m.dense_share == 0.5  # the untrained MiniLM asks for equal weights
    v = enc.encode(qs)
    dense = zscore(v @ m.keys[:, 0].T) + zscore(v @ m.keys[:, 1].T)
    lexical = sum(zscore(ix.scores(qs)) for ix in m._lexical_indexes())
    for share in (0.5, 0.8, 0.0, 1.0):
        assert torch.allclose(memory(share).scores(qs), 2 * share * dense + 2 * (1 - share) * lexical, atol=1e-5)
    assert torch.equal(memory(1.0).search(qs, 4)[0], memory(None, "dense").search(qs, 4)[0])
    assert torch.equal(memory(0.0).search(qs, 4)[0], memory(None, "lexical").search(qs, 4)[0])
    with pytest.raises(MemcliError, match="dense_share 1.2: expected a number from 0 to 1"):
        T.TurnMemory(enc, dense_share=1.2)


def test_a_trained_encoders_directory_records_its_dense_share(tmp_path):
    assert dense_share_of("minilm") == 0.5 and dense_share_of(str(tmp_path)) == 0.5  # no record: equal
    meta = tmp_path / "memcli_turn_encoder.json"
    meta.write_text(json.dumps({"dense_share": 0.8}))
    assert dense_share_of(str(tmp_path)) == 0.8
    for bad, why in (('{"dense_share": 2}', "dense_share 2, expected a number from 0 to 1"),
                     ('{"dense_share": "high"}', "dense_share 'high'"), ("[1]", "not a JSON object"),
                     ("{", "not a JSON object")):
        meta.write_text(bad)
        with pytest.raises(MemcliError, match=re.escape(f"{meta}: {why}")):
            dense_share_of(str(tmp_path))


def test_likelihood_reranker_scores_are_the_question_log_likelihood():
    """log p(question | turn) from the re-ranker's batched, right-padded pass (vocabulary projection on the
    question's positions only) equals the sum read off the model's full logits, one turn at a time."""
    from memcli.backbone import load_backbone

    bb, tok = load_backbone("tiny")
    r = T.LikelihoodReranker(bb, tok)
    turns = ["Alice: I adopted a beagle from the shelter in Denver last week.", "Bob: violin"]
    question = "What breed is Alice's dog?"
    got = r.scores(turns, question)
    q = tok(" " + question, add_special_tokens=False)["input_ids"]
    for i, t in enumerate(turns):
        x = tok(t + "\nQuestion:", add_special_tokens=False)["input_ids"] + q
        with torch.no_grad():
            logp = torch.log_softmax(bb(input_ids=torch.tensor([x])).logits.float(), -1)[0]
        start = len(x) - len(q)
        want = sum(logp[start - 1 + j, w].item() for j, w in enumerate(q))
        assert got[i].item() == pytest.approx(want, abs=1e-3)


def test_reranking_reorders_only_the_retrievers_candidates():
    from memcli.backbone import load_backbone

    bb, tok = load_backbone("tiny")
    entries = LC.conversation_entries(_conversation())
    plain = T.TurnMemory(retriever="lexical")
    plain.add(entries)
    ranked = T.TurnMemory(retriever="lexical", reranker=T.LikelihoodReranker(bb, tok, candidates=3))
    ranked.add(entries)
    qs = [q["question"] for q in _conversation()["qa"]]
    top3 = plain.search(qs, 3)[0]
    idx, sc = ranked.search(qs, 2)
    for j, q in enumerate(qs):
        assert set(idx[j].tolist()) <= set(top3[j].tolist())  # nothing outside the first 3 comes back
        lm = ranked.reranker.scores([T.key_text(entries[i]) for i in top3[j].tolist()], q)
        first = plain.scores([q])[0][top3[j]]
        fused = zscore(lm[None])[0] + zscore(first[None])[0]
        assert idx[j].tolist() == top3[j][torch.argsort(-fused, stable=True)[:2]].tolist()
    r = LC.recall_only([_conversation()], None, retriever="lexical", ks=(1, 2),
                       reranker=T.LikelihoodReranker(bb, tok, candidates=7))
    assert r["retriever"] == "lexical + neighbours x0.5, named speaker x8, named date x8 + lm re-ranking of the top 7"
    assert r["questions_with_evidence"] == 3


def test_turn_memory_written_turn_by_turn_equals_written_at_once():
    enc = make_encoder("minilm")
    entries = LC.conversation_entries(_conversation())
    whole = T.TurnMemory(enc)
    whole.add(entries)
    step = T.TurnMemory(enc)
    for e in entries:
        step.add([e])
    assert torch.allclose(whole.keys, step.keys, atol=1e-5)  # keys depend on a turn and the one before only
    q = "Which marathon is Alice training for?"
    assert whole.read(q, 3) == step.read(q, 3)
    hits = whole.read(q, 3)
    assert [h["row"] for h in hits] == sorted(h["row"] for h in hits)  # read in conversation order
    assert any(h["id"] == "D2:3" for h in hits)


def test_oracle_reads_exactly_the_evidence_and_turns_read_their_top_k():
    from memcli.backbone import load_backbone

    bb, tok = load_backbone("tiny")
    data = [_conversation()]
    res = LC.run_locomo(LC.PlainModel(bb), tok, data, setups=("none", "oracle", "turns"), max_new_tokens=2, batch=2,
                        top_k=2, retriever="lexical")
    entries = LC.conversation_entries(data[0])
    mem = T.TurnMemory(None, "lexical")
    mem.add(entries)
    for row, q in zip(res["answers"], data[0]["qa"]):
        ev = LC.evidence_ids(q)
        order = {e["id"]: i for i, e in enumerate(entries)}
        assert row["oracle_read"] == sorted(ev, key=order.get)  # exactly the evidence, in conversation order
        assert row["oracle_evidence_in_prompt"] == (1.0 if ev else None)
        top = mem.search([q["question"]], 2)[0][0].tolist()
        assert row["turns_read"] == [entries[i]["id"] for i in sorted(top)]
        assert row["none_read"] == [] and row["none_evidence_in_prompt"] in (0.0, None)
        for s in ("none", "oracle", "turns"):
            assert row[f"{s}_f1"] == LC.score(row[s], q) and row[f"{s}_bleu1"] == LC.bleu_score(row[s], q)
    summ = res["summary"]
    assert summ["oracle"]["evidence_in_prompt"] == 1.0 and summ["none"]["evidence_in_prompt"] == 0.0
    assert summ["turns"]["evidence_in_prompt"] == LC.recall_only(data, None, retriever="lexical", ks=(2,))["recall@2"]
    assert summ["none"]["count"] == {"multi-hop": 1, "temporal": 0, "open-domain": 0, "single-hop": 2,
                                     "adversarial": 1, "overall": 3}
    # "overall" is categories 1-4: the mean of the three scored rows, the adversarial row apart
    rows = res["answers"]
    assert summ["turns"]["f1"]["overall"] == pytest.approx(sum(r["turns_f1"] for r in rows[:3]) / 3)
    assert summ["turns"]["f1"]["adversarial"] == rows[3]["turns_f1"]
    assert summ["oracle"]["prompt_tokens_mean"] > summ["none"]["prompt_tokens_mean"]
    assert summ["turns"]["latency_s_p95"] >= summ["turns"]["latency_s_mean"] * 0.5 > 0


def _hippo_chat(tmp_path, **kw):
    from memcli.backbone import load_backbone
    from memcli.chat import GenOptions, HippoChatSession
    from memcli.hippo.config import HippoConfig
    from memcli.hippo.model import HippoModel

    bb, tok = load_backbone("tiny")
    torch.manual_seed(0)
    m = HippoModel(bb, HippoConfig(hidden_size=bb.config.hidden_size)).eval()
    return HippoChatSession(m, tok, GenOptions(max_new_tokens=3), **kw)


def test_chat_session_memory_survives_save_and_reopen(tmp_path):
    f = tmp_path / "me.session"
    a = _hippo_chat(tmp_path, recall=2, session_path=f)
    for text in ["My dog is called Pepper.", "I live in Denver.", "I play the violin."]:
        a.reply(text)
    assert f.is_file() and a.turns >= 3
    b = _hippo_chat(tmp_path, recall=2, session_path=f)  # a new process would do the same
    assert b.turns == a.turns and b.memory.turns == a.memory.turns
    assert torch.equal(b.state, a.state) and torch.equal(b.memory.keys, a.memory.keys)
    # both continue identically: same turns read, same answer, same state after
    q = "What is my dog called?"
    assert a.reply(q) == b.reply(q)
    assert [t["id"] for t in a.last_read] == [t["id"] for t in b.last_read] and a.last_read
    assert any("Pepper" in t["text"] for t in a.last_read)
    assert torch.allclose(a.state, b.state)
    # /memory shows what was read; a reset clears the file's memory too
    title, _, rows = b.command("/memory")
    assert "turns read" in title and len(rows) == len(b.last_read)
    b.command("/reset_hidden")
    c = _hippo_chat(tmp_path, recall=2, session_path=f)
    assert c.turns == 0 and len(c.memory) == 0 and float(c.state.norm()) == 0.0


def test_chat_turns_carry_when_they_were_said_and_which_sitting(tmp_path):
    f = tmp_path / "me.session"
    now = [datetime.datetime(2026, 2, 27, 21, 5)]
    a = _hippo_chat(tmp_path, recall=2, session_path=f, clock=lambda: now[0])
    for text in ["My dog is called Pepper.", "I live in Denver."]:
        a.reply(text)
    now[0] = datetime.datetime(2026, 2, 28, 9, 30)  # the next morning, the file reopened
    b = _hippo_chat(tmp_path, recall=2, session_path=f, clock=lambda: now[0])
    b.reply("I play the violin.")
    turns = b.memory.turns
    assert turns[0]["date"] == "9:05 pm on 27 February, 2026" and turns[-1]["date"] == "9:30 am on 28 February, 2026"
    assert T.parse_date(turns[0]["date"]) == (2026, 2, 27)
    assert {t["session"] for t in turns[:a.turns]} == {0} and {t["session"] for t in turns[a.turns:]} == {1}
    now[0] = datetime.datetime(2026, 2, 28, 10, 0)
    b.reply("What did I say yesterday?")  # the day before the clock's: only the first sitting's turns are read
    assert b.last_read and {t["session"] for t in b.last_read} == {0}
    b.reply("What did I tell you on 28 February?")
    assert b.last_read and {t["session"] for t in b.last_read} == {1}
    title, cols, rows = b.command("/memory")
    assert cols[1] == "said" and all(r[1].endswith("28 February, 2026") for r in rows)


def test_chat_session_file_errors(tmp_path):
    from memcli.errors import MemcliError

    bad = tmp_path / "bad.session"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(MemcliError, match="not a memcli chat session file"):
        _hippo_chat(tmp_path, session_path=bad)
    assert bad.read_bytes() == b"not a safetensors file"  # left as it was
    other = tmp_path / "other.session"
    T.save_session(other, {"state": torch.zeros(1, 3)}, {"format": "memcli-hippo-chat", "turns": "[]",
                                                          "turn_retriever": "hybrid/minilm"})
    with pytest.raises(MemcliError, match="another run"):
        _hippo_chat(tmp_path, session_path=other)
    with pytest.raises(MemcliError, match="--recall -1"):
        _hippo_chat(tmp_path, recall=-1)


def test_compare_locomo_recall_only_and_refusals(cli, tmp_path):
    p = tmp_path / "conv.json"
    p.write_text(json.dumps([_conversation()]))
    code, out, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--recall-only", "--retriever", "lexical",
                         "--neighbor-weight", "0", "--speaker-weight", "0", "--date-weight", "0", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["retriever"] == "lexical" and r["recall@1"] == pytest.approx(2.5 / 3) and r["recall@10"] == 1.0
    code, out, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--recall-only", "--retriever", "lexical",
                         "--speaker-weight", "2", "--date-weight", "0", "--json")
    assert code == 0, err
    assert json.loads(out)["retriever"] == "lexical + neighbours x0.5, named speaker x2"
    from conftest import assert_one_line_error

    for flag in ("--neighbor-weight", "--speaker-weight", "--date-weight"):
        code, _, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", flag, "-1")
        assert_one_line_error(code, err, f"{flag} -1.0", ">= 0")
    code, _, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--dense-share", "1.5")
    assert_one_line_error(code, err, "--dense-share 1.5", "from 0 to 1")

    code, _, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--setups", "hippo")
    assert_one_line_error(code, err, "--setups", "'hippo'", "--backbone has none")
    code, _, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--retriever", "fuzzy")
    assert_one_line_error(code, err, "--retriever 'fuzzy'", "hybrid, dense, lexical")
    code, _, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--skip", "1")
    assert_one_line_error(code, err, "--skip 1", "has 1 conversations")
    code, out, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--recall-only", "--retriever",
                         "lexical", "--rerank-with", "tiny", "--rerank-candidates", "7", "--sample", "2", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["retriever"] == "lexical + neighbours x0.5, named speaker x8, named date x8 + tiny re-ranking of the top 7"
    assert r["recall@10"] == 1.0
    picked = LC.pick_questions(_conversation()["qa"], None, 2, 0)  # --sample 2 of the 4 questions (seed 0)
    assert r["questions_with_evidence"] == sum(bool(q["evidence"]) for q in picked) == 1
    code, _, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--rerank-candidates", "0")
    assert_one_line_error(code, err, "--rerank-candidates 0", "at least 1")
    # --categories: only the multi-hop question (two evidence turns, one found at rank 1 by BM25 here)
    code, out, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--recall-only", "--retriever",
                         "lexical", "--categories", "1", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["questions_with_evidence"] == 1 and r["recall@1"] == 0.5 and r["recall@10"] == 1.0
    for bad in ("6", "2,x", ""):
        code, _, err = cli("compare", "locomo", "--data", p, "--backbone", "tiny", "--categories", bad)
        assert_one_line_error(code, err, f"--categories {bad!r}", "1 (multi-hop)")


def test_backbone_setups_use_the_chat_templates_own_form():
    """Context in the system message (after the template's default one), the question as the user's message,
    asked for a short answer."""
    import copy

    from memcli.backbone import load_backbone
    from memcli.retrieval.placement import layout

    _, tok = load_backbone("tiny")
    assert layout(tok).default_system == ""  # the tiny template writes no system message of its own
    assert tok.decode(T.context_prompt(tok, "Conversation excerpts:\nA: hi", "Q?")) == (
        "<|im_start|>system\nConversation excerpts:\nA: hi<|im_end|>\n<|im_start|>user\nQ?\n"
        "Give only the answer, as short as possible.<|im_end|>\n<|im_start|>assistant\n")
    smol = copy.deepcopy(tok)  # SmolLM2's template: a default system message when none is given
    smol.chat_template = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                          "{{ '<|im_start|>system\nBe brief<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role']"
                          " + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
                          "{{ '<|im_start|>assistant\n' }}{% endif %}")
    assert layout(smol).default_system == "Be brief"
    head = "<|im_start|>system\nBe brief"
    tail = f"<|im_end|>\n<|im_start|>user\nQ?\n{T.SHORT_ANSWER}<|im_end|>\n<|im_start|>assistant\n"
    assert smol.decode(T.context_prompt(smol, "ctx", "Q?")) == head + ".\n\nctx" + tail
    assert smol.decode(T.context_prompt(smol, None, "Q?")) == head + tail
    assert smol.decode(T.context_prompt(smol, None, "Q?", "")) == head + tail.replace(f"\n{T.SHORT_ANSWER}", "")
    # the oracle setup writes its excerpts that way; the HIPPO setups keep their trained one-user-message form
    e = [{"speaker": "A", "text": "hi", "date": "1 May 2023"}]
    assert smol.decode(T.excerpt_prompt(smol, e, "Q?", native=True)) == (
        head + ".\n\nConversation excerpts:\n[1 May 2023] A: hi" + tail)
    assert "Be brief" not in smol.decode(T.excerpt_prompt(smol, e, "Q?"))
    # compare locomo: the backbone's setups ask the question, then for a short answer; the HIPPO setups wrap it
    # in LoCoMo's QA prompt, as their run was trained
    none, _ = LC._setup_prompts("none", tok, ["Q?"], e, ["A: hi"], [[0]], None, 5, 100)
    assert tok.decode(none[0]).endswith(f"user\nQ?\n{T.SHORT_ANSWER}<|im_end|>\n<|im_start|>assistant\n")
    hippo, _ = LC._setup_prompts("hippo+oracle", tok, ["Q?"], e, ["A: hi"], [[0]], None, 5, 100)
    assert LC.QA_PROMPT.format("Q?") in tok.decode(hippo[0]) and T.SHORT_ANSWER not in tok.decode(hippo[0])


def _answers_file(path, f1s: dict, order=(0, 1, 2)):
    """An answers JSONL as `compare locomo --answers` writes it, with hand-set F1 values per setup."""
    qs = [("conv-1", 4, "Where?"), ("conv-1", 2, "When?"), ("conv-1", 4, "Where?")]  # the same question twice
    rows = []
    for j in order:
        sid, cat, q = qs[j]
        r = {"sample_id": sid, "category": cat, "question": q, "gold": "x", "evidence": ["D1:1"]}
        for s, v in f1s.items():
            r.update({s: "a", f"{s}_f1": v[j], f"{s}_bleu1": v[j] / 2, f"{s}_read": [], f"{s}_evidence_in_prompt": 0.0})
        rows.append(r)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_locomo_table_puts_two_runs_answers_side_by_side(tmp_path):
    """tools/locomo_table.py: FILE=LABEL joins another run's answers to the same questions (matched by
    conversation, category, question text and, for a repeated question, its order), refuses clashes and gaps."""
    import subprocess
    import sys
    from pathlib import Path

    script = str(Path(__file__).parent.parent / "tools" / "locomo_table.py")
    a = _answers_file(tmp_path / "frozen.jsonl", {"none": [0.0, 0.5, 1.0], "turns": [1.0, 0.5, 0.0]})
    b = _answers_file(tmp_path / "hippo.jsonl", {"none": [0.2, 0.4, 0.6]}, order=(1, 0, 2))

    def run(*args):
        return subprocess.run([sys.executable, script, *map(str, args)], capture_output=True, text=True)

    r = run(a, f"{b}=run")
    assert r.returncode == 0, r.stderr
    assert "1 conversations, 3 questions" in r.stdout
    assert "| category (questions) | none | turns | run:none |" in r.stdout
    # single-hop: the first and third question; run:none's values follow the questions, not the file order
    assert "| single-hop (2) | 0.500 ± 0.500 | 0.500 ± 0.500 | 0.400 ± 0.200 |" in r.stdout
    assert "| temporal (1) | 0.500 ± 0.000 | 0.500 ± 0.000 | 0.400 ± 0.000 |" in r.stdout
    # paired run:none - none over 3 questions: (0.2, -0.1, -0.4) -> mean -0.1, se sqrt(0.18 / 2 / 3) = 0.173
    assert "run:none - none, paired over the 3 questions: -0.100 ± 0.173" in r.stdout
    flipped = run(a, f"{b}=run", "--by-setup")
    assert flipped.returncode == 0, flipped.stderr
    assert ("| setup | temporal (1) | single-hop (2) | **overall 1-4** (3) | BLEU-1 overall 1-4 | "
            "evidence turns in the prompt |") in flipped.stdout
    assert "| run:none | 0.400 ± 0.000 | 0.400 ± 0.200 | 0.400 ± 0.115 | 0.200 | 0.000 |" in flipped.stdout
    clash = run(a, b)
    assert clash.returncode != 0 and "setup 'none' answers 'When?' twice" in clash.stderr
    gap = run(a, f"{_answers_file(tmp_path / 'one.jsonl', {'full': [0.1, 0.1, 0.1]}, order=(0, 1))}=x")
    assert gap.returncode != 0 and "1 questions lack some setup's answer" in gap.stderr
    missing = run(tmp_path / "nope.jsonl")
    assert missing.returncode != 0 and "nope.jsonl: no such answers file" in missing.stderr
