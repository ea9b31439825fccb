"""The explicit memory model: identity at start, gradients, causality, retrieval, EMA, editing, I/O."""

import math

import pytest
import torch

from memcli.explicit import losses
from memcli.explicit.ema import EmaAccumulator, ema_update, ema_update_reference, frozen_rows
from memcli.explicit.io import build_model, load_memory, save_bank_edit, save_memory
from memcli.explicit.store import edit_entry
from memcli.kernels.reference import (product_key_select_bruteforce, product_key_select_ref, token_bag_materialised,
                                      token_bag_ref)
from memcli.errors import MemcliError


@pytest.fixture(scope="module", params=["exact", "product"])
def mem(default_data, request):
    torch.manual_seed(0)
    model, tok, bank = build_model("tiny", default_data / "cache", default_data / "keys", memory_layers=[1, 3],
                                   num_candidates=8, retrieval=request.param)
    return model, tok, bank


def _randomise_fusion(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for f in model.fusions.values():
            f.out.weight.copy_(torch.randn(f.out.weight.shape, generator=g) * 0.05)


def _batch(tok, texts):
    tok.padding_side = "left"
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@pytest.mark.parametrize("retrieval", ["exact", "product"])
def test_zero_init_reproduces_base_logits_exactly(default_data, retrieval):
    from memcli.backbone import load_backbone

    base, tok = load_backbone("tiny")
    model, _, _ = build_model("tiny", default_data / "cache", default_data / "keys", retrieval=retrieval)
    b = _batch(tok, ["Where was someone born?", "Hello there, friend of mine"])
    with torch.no_grad():
        ref = base(**b).logits
        out = model(**b).logits
    assert torch.equal(ref, out)


def test_gradient_reaches_every_trainable_memory_parameter(mem):
    model, tok, _ = mem
    _randomise_fusion(model)
    model.train()
    b = _batch(tok, ["What does Zorbax work as? A:x", "The pet of Qir is a Mol ."])
    out = model(**b, labels=b["input_ids"], collect=True)
    loss = out.loss
    for rec in out.memory_records:
        gate = model.gates[str(rec["layer"])]
        loss = loss + losses.balance_loss(rec, model.cfg.knowledge_num) + losses.similarity_loss(rec, gate) \
            + losses.diversity_loss(rec, gate)
    model.zero_grad()
    loss.backward()
    for name, p in model.named_parameters():
        if name.startswith(("gates", "mem_norms", "fusions")) and p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval()


def test_causality_future_tokens_change_nothing_before(mem):
    model, tok, _ = mem
    _randomise_fusion(model, 1)
    ids = tok("Where was Velmora born ? The answer is", return_tensors="pt")["input_ids"]
    t = 4
    ids2 = ids.clone()
    ids2[0, t + 1:] = torch.randint(10, 8000, (ids.shape[1] - t - 1,))
    with torch.no_grad():
        a = model(input_ids=ids).logits
        b = model(input_ids=ids2).logits
    assert torch.allclose(a[0, : t + 1], b[0, : t + 1], atol=1e-6)
    assert not torch.allclose(a[0, t + 1:], b[0, t + 1:])


def test_padding_positions_get_no_memory(mem):
    model, tok, _ = mem
    _randomise_fusion(model, 2)
    b = _batch(tok, ["short", "a much longer prompt than the other"])
    with torch.no_grad():
        out = model(**b, collect=True)
    for rec in out.memory_records:
        assert rec["mask"].sum() == b["attention_mask"].sum()
    # the short prompt's real positions equal an unpadded run
    single = tok(["short"], return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        ref = model(**single).logits
    n = single["input_ids"].shape[1]
    assert torch.allclose(out.logits[0, -n:], ref[0], atol=1e-4)


@pytest.mark.parametrize("S,k,kh", [(32, 8, 8), (17, 5, 5), (64, 16, 16), (9, 7, 7)])
def test_product_key_topk_equals_bruteforce(S, k, kh):
    g = torch.Generator().manual_seed(S * k)
    s1, s2 = torch.randn(50, S, generator=g), torch.randn(50, S, generator=g)
    v, c = product_key_select_ref(s1, s2, k, kh)
    vb, cb = product_key_select_bruteforce(s1, s2, k)
    assert torch.allclose(v, vb) and torch.equal(c, cb)
    # with excluded cells (bank padding) the grid is no longer exact, but what comes back is valid,
    # scored correctly, and never better than the exact masked top-k
    valid = torch.rand(S * S, generator=g) > 0.3
    v, c = product_key_select_ref(s1, s2, k, kh, valid)
    vb, _ = product_key_select_bruteforce(s1, s2, k, valid)
    ok = torch.isfinite(v)
    assert valid[c[ok]].all()
    full = (s1.unsqueeze(-1) + s2.unsqueeze(-2)).flatten(1)
    assert torch.allclose(v[ok], full.gather(1, c)[ok])
    assert (v[ok] <= vb[ok] + 1e-6).all()


def test_token_bag_matches_materialised_and_excludes_padding():
    g = torch.Generator().manual_seed(0)
    N, L, D, V, pad = 49, 7, 12, 50, 0
    bank = torch.randint(1, V, (N, L), generator=g)
    bank[3] = pad  # an entry of all padding
    bank[5, 4:] = pad
    emb = torch.randn(V, D, generator=g, requires_grad=True)
    cells = torch.randint(0, N, (11, 5), generator=g)
    cells[0, 0] = 3
    w = torch.softmax(torch.randn(11, 5, generator=g), -1).requires_grad_()
    a = token_bag_ref(bank, cells, w, emb, pad)
    b = token_bag_materialised(bank, cells, w, emb, pad)
    assert torch.allclose(a, b, atol=1e-6)
    ga = torch.autograd.grad(a.square().sum(), (emb, w))
    gb = torch.autograd.grad(b.square().sum(), (emb, w))
    assert all(torch.allclose(x, y, atol=1e-5) for x, y in zip(ga, gb))
    # entry 5 pools only its 4 real tokens
    one = token_bag_ref(bank, torch.tensor([[5]]), None, emb, pad)
    assert torch.allclose(one[0], emb[bank[5, :4]].mean(0), atol=1e-6)


def test_bank_and_keys_index_agreement(mem, default_data):
    model, tok, bank = mem
    from memcli import records

    labels = records.read_jsonl(default_data / "keys" / "train_labeled.jsonl", records.LABELED)
    for lab in labels[:50]:
        row = lab["target_indices"][0]
        text = tok.decode([t for t in model.bank[row].tolist() if t != model.cfg.pad_id])
        assert bank.entries[row]["subject"] in text and bank.entries[row]["uuid"] == lab["uuid"]


def test_mismatched_keys_and_bank_are_refused(default_data, tmp_path):
    import shutil

    from memcli.data.pipeline import build_cache

    build_cache(default_data / "sentence_trex_data.json", tmp_path / "cache")  # same entries, unordered
    with pytest.raises(MemcliError, match="another row order"):
        build_model("tiny", tmp_path / "cache", default_data / "keys")
    shutil.copytree(default_data / "keys", tmp_path / "keys")
    build_cache(default_data / "sentence_trex_data.json", tmp_path / "c2", knowledge_num=900)
    with pytest.raises(MemcliError, match="30 x 30|32 x 32"):
        build_model("tiny", tmp_path / "c2", tmp_path / "keys")


def test_ema_update_matches_slow_reference():
    g = torch.Generator().manual_seed(0)
    N, L, D, V, pad = 25, 6, 8, 40, 0
    bank = torch.randint(1, V, (N, L), generator=g)
    bank[:, 5] = pad
    emb = torch.randn(V, D, generator=g)
    acc = EmaAccumulator(N, D)
    for _ in range(3):
        cells = torch.randint(0, N, (10, 4), generator=g)
        acc.add(cells, torch.softmax(torch.randn(10, 4, generator=g), -1), torch.randn(10, D, generator=g),
                torch.rand(10, generator=g) > 0.2)
    frozen = frozen_rows(N, 0.2, seed=1)
    rows, sums, counts = acc.touched()
    dense_s, dense_c = torch.zeros(N, D).index_add_(0, rows, sums), torch.zeros(N).index_add_(0, rows, counts)
    ref = ema_update_reference(bank, emb, emb, dense_s, dense_c, 0.5, frozen, pad)
    new = bank.clone()
    rows = ema_update(new, emb, emb, acc, 0.5, frozen, pad)
    assert torch.equal(new, ref)
    assert not frozen[rows].any() and (new[frozen] == bank[frozen]).all()
    assert (new[:, 5] == pad).all() and not torch.equal(new, bank)
    assert acc.count.numel() == 0 and (acc.slot < 0).all()  # accumulator reset


def test_ema_accumulator_is_sparse_and_bounded():
    """At the seed's 1M entries x 2,560 a dense accumulator is 10.7 GB; the sparse one holds only touched rows."""
    N, D = 1 << 20, 2560
    acc = EmaAccumulator(N, D)
    cells = torch.tensor([[5, 900_000], [5, 77]])
    acc.add(cells, torch.ones(2, 2), torch.randn(2, D), torch.ones(2, dtype=torch.bool))
    rows, sums, counts = acc.touched()
    assert sorted(rows.tolist()) == [5, 77, 900_000] and sums.shape == (3, D)
    assert counts[rows.tolist().index(5)] == 2
    assert acc.nbytes() < 4 * N + 4 * 3 * D + 64 * 3  # the row index plus three rows, not N x D
    acc.reset()
    assert acc.touched()[1].shape == (0, D)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here: the accumulator-on-device check needs one")
def test_ema_accumulator_follows_the_model_device():
    dev = torch.device("cuda")
    acc = EmaAccumulator(64, 8)  # made before the model was moved, as in training
    acc.add(torch.tensor([[1, 2]], device=dev), torch.ones(1, 2, device=dev), torch.randn(1, 8, device=dev),
            torch.ones(1, dtype=torch.bool, device=dev))
    assert acc.sum.device.type == "cuda" and acc.slot.device.type == "cuda"
    bank = torch.randint(1, 10, (64, 3), device=dev)
    emb = torch.randn(10, 8, device=dev)
    rows = ema_update(bank, emb, emb, acc, 0.5, torch.zeros(64, dtype=torch.bool, device=dev), 0)
    assert sorted(rows.tolist()) == [1, 2]


def test_editing_changes_what_is_read(mem, default_data, tmp_path):
    model, tok, bank = mem
    _randomise_fusion(model, 3)
    prompt = tok("Where was he born?", return_tensors="pt")
    with torch.no_grad():
        row = int(model(**prompt, collect=True).memory_records[0]["cells"][-1, 0])
        before_logits = model(**prompt).logits
    old = model.bank[row].clone()
    before, after = edit_entry(model, bank, tok, row, "Different text about Zqxwv .")
    assert after == "Different text about Zqxwv ." and before != after
    # the entry's record follows its text: the old subject and object are no longer stated, so they are dropped
    assert bank.entries[row]["subject"] is None and bank.entries[row]["object"] is None
    with torch.no_grad():
        after_logits = model(**prompt).logits
    assert not torch.allclose(before_logits, after_logits)
    # the edit persists through an atomic save and a strict reload
    save_memory(model, tok, bank, tmp_path / "ck", {"step": 1})
    m2, _, b2, _ = load_memory(tmp_path / "ck")
    assert torch.equal(m2.bank[row], model.bank[row])
    assert b2.entries[row]["sentence"] == "Different text about Zqxwv ."
    with torch.no_grad():
        assert torch.allclose(m2(**prompt).logits, after_logits, atol=1e-5)
    model.set_entry(row, [t for t in old.tolist() if t != model.cfg.pad_id])
    save_bank_edit(tmp_path / "ck", model, bank)


def test_checkpoint_roundtrip_is_strict(mem, tmp_path):
    model, tok, bank = mem
    _randomise_fusion(model, 4)
    save_memory(model, tok, bank, tmp_path / "ck", {"step": 3})
    m2, _, _, info = load_memory(tmp_path / "ck")
    ids = tok("The pet of Qir is a", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(m2(**ids).logits, model(**ids).logits, atol=1e-5)
    assert info["step"] == 3
    from memcli.checkpoint import load_tensors, save_tensors

    sd = load_tensors(tmp_path / "ck" / "memory" / "memory.safetensors")
    sd.pop(next(k for k in sd if "fusions" in k))
    save_tensors(tmp_path / "ck" / "memory" / "memory.safetensors", sd)
    with pytest.raises(MemcliError, match="missing"):
        load_memory(tmp_path / "ck")
    with pytest.raises(MemcliError, match="checkpoint.json"):
        load_memory(tmp_path)


def test_cached_generation_equals_uncached_batched_left_padded(mem):
    model, tok, _ = mem
    _randomise_fusion(model, 5)
    b = _batch(tok, ["Where was Velmora born?", "Hi"])
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(**b, use_cache=True, **kw)
        uncached = model.generate(**b, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    # and the cached path retrieves only for new positions
    with torch.no_grad():
        records = []
        model.generate(**b, use_cache=True, records=records, max_new_tokens=3, do_sample=False,
                       pad_token_id=tok.pad_token_id)
    shapes = [r["shape"] for r in records if r["layer"] == 1]
    assert shapes[0][1] == b["input_ids"].shape[1] and all(s[1] == 1 for s in shapes[1:])


def test_usage_stats_no_sync_and_values():
    u = torch.tensor([0.0, 0.0, 1.0, 3.0])
    s = losses.usage_stats(u, torch.tensor([True, True, True, True]))
    assert s["coverage"] == 0.5 and s["dead"] == 2 and s["hottest"][0] == (3, 3.0)
    assert math.isclose(losses.gini(torch.ones(10)).item(), 0.0, abs_tol=1e-6)
    assert losses.gini(torch.tensor([0.0] * 9 + [1.0])).item() > 0.85


def test_tail_lm_loss_equals_full_sequence_loss(mem, default_data):
    """The answer-tail loss (logits for a few positions) equals HF's full-sequence loss."""
    from memcli.explicit import items as X

    model, tok, bank = mem
    items = X.load_items(tok, bank, default_data / "sft_train.jsonl", default_data / "keys" / "train_labeled.jsonl", 128)
    b = X.collate(items[:6], tok.pad_token_id, 0, 0.5)
    if "override_rows" in b:
        model.set_override(b["override_rows"], b["override_ids"])
    with torch.no_grad():
        full = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        tail, _ = X.tail_lm_loss(model, b)
    model.set_override(None)
    assert torch.allclose(full, tail, atol=1e-5)
    # router positions start right after the subject and stay inside the real tokens
    assert (b["router_pos"] <= b["attention_mask"].bool()).all()


# ---------------------------------------------------------------------------- the pretrained-backbone recipe's parts


@pytest.fixture(scope="module")
def prefix_mem(default_data):
    torch.manual_seed(0)
    return build_model("tiny", default_data / "cache", default_data / "keys", memory_layers=[1], read="prefix",
                       query="mean", entry_key="hidden", finetuning_method="frozen")


def test_prefix_read_is_the_base_model_on_entry_plus_input(prefix_mem):
    from memcli.backbone import load_backbone

    model, tok, _ = prefix_mem
    base, _ = load_backbone("tiny")
    ids = tok("Where was Velmora born?", return_tensors="pt")["input_ids"]
    rows = torch.tensor([[5, 9]])
    entry = lambda r: [t for t in model.bank[r].tolist() if t != model.cfg.pad_id]  # noqa: E731
    sep = model.cfg.prefix_separator
    model.cfg.prefix_entries = 2
    try:
        full = torch.tensor([entry(5) + sep + entry(9) + sep + ids[0].tolist()])
        with torch.no_grad():
            got = model(input_ids=ids, rows=rows).logits
            ref = base(input_ids=full).logits[:, -ids.shape[1]:]
            assert torch.allclose(got, ref, atol=1e-5)  # logits keep the input's positions
            model.memory_enabled = False
            assert torch.allclose(model(input_ids=ids).logits, base(input_ids=ids).logits, atol=1e-6)
            model.memory_enabled = True
            # generate: the input followed by the new tokens; the same tokens as the base model after the prefix
            kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), rows=rows, **kw)
            ref_out = base.generate(input_ids=full, attention_mask=torch.ones_like(full), **kw)
        assert torch.equal(out[:, : ids.shape[1]], ids) and torch.equal(out[:, ids.shape[1]:], ref_out[:, full.shape[1]:])
    finally:
        model.cfg.prefix_entries = 1


def test_prefix_retrieval_reads_the_prompt_only_and_keys_follow_edits(prefix_mem):
    model, tok, bank = prefix_mem
    gate = model.gates["1"]
    # keys and queries start as one map of one space (cosine), so the untrained gate already ranks by similarity
    assert torch.equal(gate.content.weight, gate.query.weight) and gate.cosine
    row = 12
    text = tok.decode([t for t in model.bank[row].tolist() if t != model.cfg.pad_id])
    ids = tok(text, return_tensors="pt")["input_ids"]
    feats = model.prompt_features(ids, torch.ones_like(ids))
    with torch.no_grad():
        assert int(model.retrieve(feats)["cells"][0, 0]) == row  # an entry's own text finds it
        old = model.bank[row].clone()
        before = model.entry_feats(1)[row].clone()
        model.set_entry(row, tok("Zqxwv Plonk Frabble is a made up sentence .", add_special_tokens=False)["input_ids"])
        assert not torch.allclose(model.entry_feats(1)[row], before)  # the key follows the new content
        assert int(model.retrieve(feats)["cells"][0, 0]) != row
        model.set_entry(row, [t for t in old.tolist() if t != model.cfg.pad_id])
        assert torch.allclose(model.entry_feats(1)[row], before, atol=1e-5)
    # a prompt's features do not depend on how much padding its batch had
    a = model.prompt_features(*_pad_left(tok, ["Where was Velmora born?"]))
    b = model.prompt_features(*_pad_left(tok, ["Where was Velmora born?", "a much longer prompt than that one, really"]))
    assert torch.allclose(a[0], b[0], atol=1e-4)


def _pad_left(tok, texts):
    b = _batch(tok, texts)
    return b["input_ids"], b["attention_mask"]


def test_counterfactual_override_is_batch_local_and_rescored(prefix_mem):
    model, tok, _ = prefix_mem
    ids = tok("The pet of Qir is a", return_tensors="pt")["input_ids"]
    feats = model.prompt_features(ids, torch.ones_like(ids))
    row = int(model.retrieve(feats)["cells"][0, 0])
    new = tok("Entirely unrelated words about Zqxwv", add_special_tokens=False)["input_ids"][: model.cfg.knowledge_length]
    new = torch.tensor([new + [model.cfg.pad_id] * (model.cfg.knowledge_length - len(new))])
    with torch.no_grad():
        s0 = model.retrieve(feats)["full_scores"][0, row]
        model.set_override(torch.tensor([row]), new)
        s1 = model.retrieve(feats)["full_scores"][0, row]
        model.set_override(None)
        s2 = model.retrieve(feats)["full_scores"][0, row]
    assert not torch.isclose(s0, s1) and torch.isclose(s0, s2)  # rescored from the rewritten row, then restored


def test_mean_query_additive_cached_generation_equals_uncached(default_data):
    torch.manual_seed(0)
    model, tok, _ = build_model("tiny", default_data / "cache", default_data / "keys", memory_layers=[1],
                                query="mean", finetuning_method="frozen")
    _randomise_fusion(model, 6)
    ids = tok(["Where was Velmora born?"], return_tensors="pt")["input_ids"]
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    with torch.no_grad():
        cached = model.generate(input_ids=ids, use_cache=True, **kw)
        uncached = model.generate(input_ids=ids, use_cache=False, **kw)
    assert torch.equal(cached, uncached)  # the running mean continues across KV-cached steps


@pytest.mark.parametrize("which", ["additive", "prefix"])
def test_option_scores_with_a_shared_prompt_equal_full_sequences(which, mem, prefix_mem):
    """The evaluation runs each prompt once (KV cache) and only the option tokens after it; the log-likelihoods
    equal those of whole prompt+option sequences."""
    from memcli.eval.explicit import option_logprobs

    model, tok, _ = mem if which == "additive" else prefix_mem
    if which == "additive":
        _randomise_fusion(model, 7)
    prompts = [tok("Where was Velmora born? A:x", add_special_tokens=False)["input_ids"],
               tok("The pet of Qir is a", add_special_tokens=False)["input_ids"]]
    answers = [[tok(" Tarsk", add_special_tokens=False)["input_ids"], tok(" Mol ab", add_special_tokens=False)["input_ids"]],
               [tok(" cat", add_special_tokens=False)["input_ids"], tok(" dog", add_special_tokens=False)["input_ids"],
                tok(" Frabble Zq", add_special_tokens=False)["input_ids"]]]
    rows = torch.tensor([[3], [40]]) if which == "prefix" else None
    got = option_logprobs(model, prompts, answers, rows)
    for q, (p, opts) in enumerate(zip(prompts, answers)):
        for j, a in enumerate(opts):
            ids = torch.tensor([p + a])
            with torch.no_grad():
                kw = {"rows": rows[q: q + 1]} if rows is not None else {}
                lp = torch.log_softmax(model(input_ids=ids, **kw).logits[0].float(), -1)
            want = sum(float(lp[len(p) - 1 + i, t]) for i, t in enumerate(a))
            assert got[q][j].item() == pytest.approx(want, abs=1e-3), (q, j)


def test_collate_uses_every_build_keys_label():
    """build-keys --top-k 32 writes 32 labels per query: the batch carries all 32 (was cut to 8)."""
    from memcli.explicit.items import Item, collate

    items = [Item(prompt_ids=[5, 6, 7], answer_ids=[8], row=i, targets=list(range(i, i + 32)),
                  scores=[1.0 - 0.01 * j for j in range(32)], cf=[]) for i in range(3)]
    b = collate(items, pad_id=0, step_seed=0, cf_prob=0.0)
    assert b["target_rows"].shape == (3, 32)
    assert b["target_rows"][1].tolist() == list(range(1, 33))
    assert torch.allclose(b["target_weights"].sum(1), torch.ones(3))


def test_exact_retrieval_reuses_keys_only_while_their_sources_are_unchanged():
    from memcli.explicit.gate import MemoryGate

    torch.manual_seed(0)
    gate = MemoryGate(16, 64, 8, num_candidates=4, retrieval="exact", query="mean", entry_key="hidden")
    gate.content_norm.fit(torch.randn(64, 16))
    feats, q = torch.randn(64, 16), torch.randn(3, 16)
    bank, emb = torch.zeros(64, 4, dtype=torch.long), torch.randn(10, 16)

    def fresh():  # the keys computed from scratch, as a training forward does
        with torch.enable_grad():
            return gate(q, bank, emb, 0, None, feats, read=False)["full_scores"].detach()

    with torch.no_grad():
        first = gate(q, bank, emb, 0, None, feats, read=False)["full_scores"]
        assert torch.equal(first, fresh()) and gate._keys_cache is None  # a grad forward drops the cache
        gate(q, bank, emb, 0, None, feats, read=False)
        kept = gate._keys_cache[3]
        assert gate(q, bank, emb, 0, None, feats, read=False) and gate._keys_cache[3] is kept  # reused
        feats[5] = torch.randn(16)  # an edited entry (in place, as refresh_entry_features writes)
        assert torch.allclose(gate(q, bank, emb, 0, None, feats, read=False)["full_scores"], fresh())
        gate.content.weight.mul_(2.0)  # an optimizer step on the key map
        assert torch.allclose(gate(q, bank, emb, 0, None, feats, read=False)["full_scores"], fresh())
        other = feats.clone()  # a copy (an override's bank) is another source
        other[7] = torch.randn(16)
        got = gate(q, bank, emb, 0, None, other, read=False)["full_scores"]
        with torch.enable_grad():
            assert torch.allclose(got, gate(q, bank, emb, 0, None, other, read=False)["full_scores"].detach())
