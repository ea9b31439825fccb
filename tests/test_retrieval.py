"""The retrieval core (memcli/retrieval/): z-normalised, weighted fusion against hand-computed z-scores, and both
memories ranking through it: the explicit memory's router fused with BM25 and a sentence encoder over a hand-made
bank, and the dialog memory's turns over a hand-made conversation."""

import numpy as np
import pytest
import torch

from memcli.retrieval.fusion import fuse, zscore


def _z(x: np.ndarray) -> np.ndarray:
    """z-scores by hand: mean and unbiased standard deviation along the last axis."""
    x = np.asarray(x, dtype=np.float64)
    return (x - x.mean(-1, keepdims=True)) / x.std(-1, ddof=1, keepdims=True)


def test_zscore_and_fuse_against_hand_computed_values():
    a = torch.tensor([[1.0, 2.0, 4.0, 9.0]])
    b = torch.tensor([[0.3, 0.1, 0.2, 0.0]])
    np.testing.assert_allclose(zscore(a).numpy(), _z(a.numpy()), rtol=1e-6)
    np.testing.assert_allclose(fuse([(a, 1.0), (b, 0.5)]).numpy(), _z(a.numpy()) + 0.5 * _z(b.numpy()), rtol=1e-6)
    # a part with weight 0 is left out; an excluded entry (-inf) stays out of the statistics and the sum
    np.testing.assert_allclose(fuse([(a, 2.0), (b, 0.0)]).numpy(), 2 * _z(a.numpy()), rtol=1e-6)
    c = torch.tensor([[1.0, float("-inf"), 4.0, 9.0]])
    got = zscore(c)
    assert got[0, 1] == float("-inf")
    np.testing.assert_allclose(got[0, [0, 2, 3]].numpy(), _z(np.array([1.0, 4.0, 9.0])), rtol=1e-6)
    assert torch.equal(zscore(torch.ones(1, 3)), torch.zeros(1, 3))  # no spread: the scorer adds nothing
    with pytest.raises(ValueError):
        fuse([(a, 0.0)])


BANK = ["Velmora was born in Tarsk .", "Quillon was born in Oskar .", "Velmora plays the lute .",
        "Tarsk is the capital of Vel .", "Brannoch works for Ilse ."]


@pytest.fixture(scope="module")
def explicit():
    """A tiny explicit-memory model whose bank holds the five sentences above (the rest padding)."""
    from memcli.backbone import load_backbone
    from memcli.data.bank import tokenize_entries
    from memcli.explicit.config import MemoryConfig
    from memcli.explicit.io import separator_ids
    from memcli.explicit.model import MemoryAugmentedLM

    model, tok = load_backbone("tiny")
    N, L = 9, 16
    ids, _ = tokenize_entries(tok, BANK, L, tok.pad_token_id)
    bank = torch.full((N, L), tok.pad_token_id, dtype=torch.long)
    bank[: len(BANK)] = ids
    valid = torch.zeros(N, dtype=torch.bool)
    valid[: len(BANK)] = True
    cfg = MemoryConfig(knowledge_num=N, knowledge_length=L, knowledge_dim=32, hidden_size=model.config.hidden_size,
                       vocab_size=len(tok), pad_id=tok.pad_token_id, memory_layers=[1], num_candidates=N,
                       retrieval="exact", query="mean", entry_key="hidden", read="prefix",
                       prefix_separator=separator_ids(tok), placement="user_before", lexical_weight=0.7, dense_weight=1.3)
    torch.manual_seed(0)
    mem = MemoryAugmentedLM(model, cfg, bank, valid).eval()
    mem.tok = tok
    mem.refresh_entry_features(fit=True)
    return mem, tok


def test_the_explicit_memory_fuses_its_router_with_bm25_and_a_sentence_encoder(explicit):
    from memcli.explicit.items import prompt_ids
    from memcli.retrieval.encoders import SentenceEncoder
    from memcli.retrieval.lexical import BM25Index, words

    mem, tok = explicit
    question = "Where was Velmora born?"
    ids = torch.tensor([prompt_ids(tok, question)])
    with torch.no_grad():
        router = mem.gates["1"](mem.prompt_features(ids, None), mem.bank, mem.embed_weight(), mem.cfg.pad_id, mem.valid,
                                mem.entry_feats(1), read=False)["full_scores"][0, :5].numpy()
        rec = mem.retrieve(mem.prompt_features(ids, None), ids, torch.ones_like(ids))
    enc = SentenceEncoder("minilm")
    dense = (enc.encode([question]) @ enc.encode(BANK).T)[0].numpy()
    index = BM25Index()
    index.add(BANK)
    lexical = index.scores_of_tokens(words([question]))[0].numpy()
    want = _z(router) + 1.3 * _z(dense) + 0.7 * _z(lexical)
    order = np.argsort(-want, kind="stable")
    live = rec["cells"][0] < 5  # padding rows are excluded (-inf) and rank last
    assert rec["cells"][0][live].tolist() == order.tolist()
    np.testing.assert_allclose(rec["fused"][0][live].numpy(), want[order], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(rec["scores"][0][live].numpy(), router[order], rtol=1e-5)  # the router's own scores
    np.testing.assert_allclose(rec["lexical"][0][live].numpy(), lexical[order], rtol=1e-5)
    assert rec["cells"][0, 0] == 0  # the entry about Velmora's birthplace is read


def test_an_edited_entry_is_scored_by_its_new_text(explicit):
    """write_rows keeps the text scorers in step: an entry rewritten to name 'Lisbon' is found by that word."""
    from memcli.explicit.items import prompt_ids

    mem, tok = explicit
    before = mem.bank[4].clone()
    ids = torch.tensor([prompt_ids(tok, "Who lives in Lisbon?")])
    try:
        from memcli.data.bank import tokenize_entries

        new, _ = tokenize_entries(tok, ["Brannoch lives in Lisbon ."], mem.cfg.knowledge_length, mem.cfg.pad_id)
        mem.bank[4] = new[0].to(mem.bank.dtype)
        mem.refresh_entry_features(torch.tensor([4]))
        mem.texts_changed(torch.tensor([4]))
        with torch.no_grad():
            rec = mem.retrieve(mem.prompt_features(ids, None), ids, torch.ones_like(ids))
        assert rec["lexical"][0, rec["cells"][0].tolist().index(4)] > 0
        assert int(rec["cells"][0, 0]) == 4
    finally:
        mem.bank[4] = before
        mem.refresh_entry_features(torch.tensor([4]))
        mem.texts_changed(torch.tensor([4]))


def test_the_dialog_memory_fuses_its_keys_through_the_same_core():
    from memcli.hippo.turns import NO_PRIORS, TurnMemory, context_text, key_text
    from memcli.retrieval.encoders import SentenceEncoder
    from memcli.retrieval.lexical import BM25Index, words

    turns = [{"id": f"D1:{i}", "speaker": s, "text": t, "session": 1} for i, (s, t) in enumerate([
        ("Ann", "I adopted a beagle last week."), ("Bob", "What is its name?"), ("Ann", "Pepper, after my aunt."),
        ("Bob", "I ran the marathon in May."), ("Ann", "How long did it take?")])]
    enc = SentenceEncoder("minilm")
    mem = TurnMemory(enc, "hybrid", dense_share=0.7, **NO_PRIORS)
    mem.add(turns)
    q = "What is the name of Ann's dog?"
    alone, ctx = [key_text(t) for t in turns], [context_text(turns, i) for i in range(len(turns))]
    qv = enc.encode([q])
    want = 1.4 * (_z((qv @ enc.encode(alone).T)[0].numpy()) + _z((qv @ enc.encode(ctx).T)[0].numpy()))
    for texts in (alone, ctx):
        ix = BM25Index()
        ix.add(texts)
        want += 0.6 * _z(ix.scores_of_tokens(words([q]))[0].numpy())
    np.testing.assert_allclose(mem.scores([q])[0].numpy(), want, rtol=1e-4, atol=1e-5)
    assert mem.read(q, 1)[0]["id"] == turns[int(np.argmax(want))]["id"]


def test_rarest_shared_word_against_hand_counted_document_frequencies():
    from memcli.retrieval.lexical import BM25Index, words

    index = BM25Index()
    index.add(BANK)
    q = words(["Where was Velmora born?"])[0]  # lower case, stemmed, bm25s's stop words ('was') out
    assert sorted(q) == ["born", "velmora", "where"]
    assert index.df("velmora") == 2 and index.df("born") == 2 and index.df("tarsk") == 2
    assert index.rarest_shared(q, 0) == 2  # velmora and born, each in two entries
    assert index.rarest_shared(words(["Where was Quillon born?"])[0], 1) == 1  # quillon: one entry
    assert index.rarest_shared(q, 4) is None  # nothing shared with Brannoch's entry


def test_anchored_abstention_reads_nothing_for_a_question_no_entry_is_about(explicit):
    """model.anchor_df: an entry is read only when it shares with the question a word held by at most that many
    entries. A question about an entity no entry names shares only common words (here 'born', in two entries) with
    its nearest entry and reads nothing at anchor 1; the entity's own question reads its entry."""
    from memcli.explicit.items import prompt_ids

    mem, tok = explicit

    def read(question, anchor):
        ids = torch.tensor([prompt_ids(tok, question)])
        with torch.no_grad(), mem.retrieval_setting(anchor_df=anchor):
            return int(mem.chosen_rows(mem.retrieve(mem.prompt_features(ids, None), ids, torch.ones_like(ids)))[0, 0])

    assert read("Where was Quillon born?", 1) == 1
    assert read("Where was Zorbin born?", None) >= 0  # without the anchor the nearest entry is always read
    assert read("Where was Zorbin born?", 1) == -1
    assert read("Where was Zorbin born?", 2) >= 0  # 'born' is held by two entries: anchor 2 lets it tie them
    assert read("Where was Velmora born?", 2) == 0


def test_names_matches_a_whole_name_whatever_its_case_spacing_and_dashes():
    from memcli.retrieval.lexical import names

    assert names("Who owns Hammond–Whiting?", "Hammond-Whiting")  # en dash in the question, hyphen in the record
    assert not names("Who owns Hammond–Whiting?", "Whites")  # a name inside a longer word is not named
    assert names("Where was EMACHINES  founded?", "eMachines")
    assert names("What is Paris's river?", "Paris") and not names("A Parisian café", "Paris")
    assert names("Who makes the R-73?", "R-73") and not names("Who makes the R-730?", "R-73")
    assert not names("anything", "") and not names("anything", "   ")


def test_subject_anchor_reads_the_best_candidate_whose_subject_the_question_names(explicit):
    """model.anchor=subject: of the fused candidates, the first whose recorded subject the question names is read (a
    better-scored entry that only mentions the name, or none, is passed over); no candidate named: nothing is read;
    an entry without a recorded subject falls back to the word rule."""
    from memcli.explicit.items import prompt_ids

    mem, tok = explicit
    subjects = ["Velmora", "Quillon", "Velmora", "Tarsk", None]
    mem.entry_records = [{"subject": s} for s in subjects] + [{"subject": None}] * (mem.bank.shape[0] - len(subjects))

    def read(question, anchor, anchor_df=1):
        ids = torch.tensor([prompt_ids(tok, question)])
        with torch.no_grad(), mem.retrieval_setting(anchor_df=anchor_df, anchor=anchor):
            rec = mem.retrieve(mem.prompt_features(ids, None), ids, torch.ones_like(ids))
            return int(mem.chosen_rows(rec)[0, 0]), [int(r) for r in rec["cells"][0]]

    try:
        got, cells = read("Where was Velmora born, in Tarsk?", "subject", 2)
        # by hand: the first candidate in the fused order whose subject the question names (Velmora's or Tarsk's)
        assert got == next(r for r in cells if 0 <= r < len(subjects) and subjects[r] in ("Velmora", "Tarsk"))
        assert read("Which country is Tarsk the capital of?", "subject", 2)[0] == 3  # not Velmora's 'born in Tarsk'
        assert read("Where was Quillon born?", "subject")[0] == 1
        assert read("Where was Zorbin born?", "subject", 2)[0] == -1  # 'born' ties it under the word rule at 2 ...
        assert read("Where was Zorbin born?", "word", 2)[0] >= 0  # ... but names no subject
        assert read("Who does Brannoch work for?", "subject")[0] == 4  # no subject recorded: 'brannoch', one entry
        assert read("What does Velmora play?", "subject")[0] in (0, 2)
    finally:
        mem.entry_records = None
