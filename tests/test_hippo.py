"""HIPPO: discretisation, recurrence against a closed form, exact identity at init, KV cache, save/load, CLI."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch

from conftest import assert_one_line_error
from memcli.hippo.config import HippoConfig
from memcli.hippo.encoder import build_encoder, legs_matrix, s4d_real, zoh

VARIANTS = [("matrix", "s4d_real"), ("matrix", "legs"), ("selective", "s4d_real"), ("selective", "legs")]


@pytest.fixture(scope="module")
def tiny():
    from memcli.backbone import load_backbone

    return load_backbone("tiny")


def _model(tiny, variant="matrix", init="s4d_real", live=False, **kw):
    """A HippoModel on the shared tiny backbone; ``live``: a non-zero fusion projection, as after training."""
    from memcli.hippo.model import HippoModel

    bb, tok = tiny
    torch.manual_seed(0)
    m = HippoModel(bb, HippoConfig(hippo_variant=variant, hippo_init=init, hidden_size=bb.config.hidden_size, **kw))
    if live:
        _liven(m)
    return m.eval()


def _liven(m, std=0.05):
    with torch.no_grad():
        for r in m.encoder.readers.values():
            (r.W_o if hasattr(r, "W_o") else r.out_proj).weight.normal_(0, std)


def _remove(m):
    for h in m._hooks:
        h.remove()


def test_legs_matrix_matches_definition():
    A = legs_matrix(3).double()
    want = torch.tensor([[-1, 0, 0], [-np.sqrt(3), -2, 0], [-np.sqrt(5), -np.sqrt(15), -3]], dtype=torch.float64)
    assert torch.allclose(A, want, atol=1e-6)
    assert torch.equal(s4d_real(3), torch.tensor([-1.0, -2.0, -3.0]))


def test_zoh_matches_scipy_expm_and_diagonal_closed_form():
    A = legs_matrix(5)
    dt = torch.tensor([0.05, 0.3])
    Abar, Bbar = zoh(A.expand(2, 5, 5), dt)
    for h, d in enumerate(dt.tolist()):
        ref = scipy.linalg.expm(d * A.double().numpy())
        assert np.allclose(Abar[h].numpy(), ref, atol=1e-5)
        assert np.allclose(Bbar[h].numpy(), np.linalg.solve(A.double().numpy(), ref - np.eye(5)), atol=1e-5)
    a = s4d_real(4).expand(2, 4)
    Ad, Bd = zoh(a, dt)
    # a diagonal A is the dense case restricted to its diagonal
    Af, Bf = zoh(torch.diag_embed(a), dt)
    assert torch.allclose(Ad, torch.diagonal(Af, dim1=-2, dim2=-1), atol=1e-6)
    assert torch.allclose(Bd, torch.diagonal(Bf, dim1=-2, dim2=-1), atol=1e-6)
    # a stable A never flips the state's sign (the seed's defect: -A used directly as the transition)
    assert (Ad > 0).all() and (Ad < 1).all()


def test_matrix_recurrence_equals_closed_form_sum():
    """S_T = sum_t Abar^(T-t) Bbar k_t v_t^T for the time-invariant (matrix, diagonal) encoder."""
    torch.manual_seed(0)
    cfg = HippoConfig(hidden_size=16, hippo_heads=2, hippo_state_dim=4, hippo_value_dim=3)
    enc = build_encoder(cfg)
    x = torch.randn(2, 5, 16)
    S = enc.scan(x)
    Abar, Bbar = zoh(enc.trans.matrix(), torch.exp(enc.log_dt))
    k = torch.nn.functional.normalize(enc.W_k(x).view(2, 5, 2, 4), dim=-1)
    v = enc.W_v(x).view(2, 5, 2, 3)
    ref = torch.zeros_like(S)
    for t in range(5):
        ref += (Abar ** (4 - t))[None, :, :, None] * (Bbar * k[:, t])[..., None] * v[:, t, :, None, :]
    assert torch.allclose(S, ref, atol=1e-5)


@pytest.mark.parametrize("variant,init", VARIANTS)
def test_state_is_zero_at_start_and_padded_turns_do_not_change_it(variant, init):
    torch.manual_seed(0)
    enc = build_encoder(HippoConfig(hippo_variant=variant, hippo_init=init, hidden_size=32, hippo_heads=2, hippo_state_dim=8, hippo_value_dim=8))
    S0 = enc.init_state(3)
    assert S0.abs().sum() == 0
    x = torch.randn(3, 4, 32)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    S = enc.scan(x, mask)
    assert torch.allclose(S[1], enc.scan(x[1:2, :2])[0], atol=1e-6)
    assert torch.allclose(S[2], enc.scan(x[2:3, :1])[0], atol=1e-6)
    # the same parameters serve any number of turns (nothing is sized by sequence length)
    assert enc.scan(torch.randn(1, 60, 32)).shape == S0[:1].shape


@pytest.mark.parametrize("variant,init", VARIANTS)
def test_zero_gate_reproduces_base_model_exactly(tiny, variant, init):
    bb, tok = tiny
    m = _model(tiny, variant, init)
    ids = tok(["My pet's name is Zorvak.", "I grew up in Pelmor."], return_tensors="pt", padding=True)
    S = m.write_turns(m.init_state(2), ids.input_ids, ids.attention_mask)
    assert S.abs().sum() > 0
    q = tok(["What is my pet's name?"] * 2, return_tensors="pt")
    try:
        base = bb(**q).logits
        assert torch.equal(m(q.input_ids, q.attention_mask, state=S).logits, base)
        _liven(m)
        assert not torch.allclose(m(q.input_ids, q.attention_mask, state=S).logits, base)
        # an empty state reads exactly zero (D starts at zero): no history = the base model
        assert torch.allclose(m(q.input_ids, q.attention_mask, state=m.init_state(2)).logits, base, atol=1e-6)
    finally:
        _remove(m)


def test_turn_features_ignore_padding(tiny):
    bb, tok = tiny
    for pool in ("last", "mean", "tokens"):
        m = _model(tiny, hippo_pool=pool)
        a = tok(["I grew up in Pelmor."], return_tensors="pt")
        b = tok(["I grew up in Pelmor.", "My lucky number is 42 and it has been for years."], return_tensors="pt", padding=True)
        fa = m.turn_features(a.input_ids, a.attention_mask)
        fb = m.turn_features(b.input_ids, b.attention_mask)
        Sa = m.write_turns(m.init_state(1), a.input_ids, a.attention_mask)
        Sb = m.write_turns(m.init_state(2), b.input_ids, b.attention_mask)
        _remove(m)
        La = a.input_ids.shape[1]
        assert torch.allclose(fa[0], fb[0, :La] if pool == "tokens" else fb[0], atol=1e-5), pool
        assert torch.allclose(Sa[0], Sb[0], atol=1e-5), pool  # padded positions write nothing


@pytest.mark.parametrize("variant", ["matrix", "selective"])
def test_cached_generation_equals_recompute_with_memory(tiny, variant):
    bb, tok = tiny
    m = _model(tiny, variant, live=True)
    try:
        ids = tok(["My boss is named Quilor."], return_tensors="pt")
        S = m.write_turns(m.init_state(1), ids.input_ids, ids.attention_mask)
        q = tok(["What is my boss named?"], return_tensors="pt").input_ids
        out = m.generate(q, torch.ones_like(q), state=S, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                         pad_token_id=tok.pad_token_id, use_cache=True)
        seq = q
        with torch.no_grad():
            for _ in range(8):
                nxt = m(seq, torch.ones_like(seq), state=S, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], 1)
        assert torch.equal(out, seq)
        with torch.no_grad():  # the state is read at every generated position
            assert not torch.allclose(m(out, state=S).logits, bb(out).logits, atol=1e-3)
    finally:
        _remove(m)


def test_gradient_reaches_encoder_gates_and_backbone_features(tiny):
    from memcli.hippo.data import collate, load_dialogs
    from memcli.data.dialog import generate_dialogs
    from memcli.records import write_jsonl

    bb, tok = tiny
    import tempfile, pathlib

    with tempfile.TemporaryDirectory() as d:
        p = pathlib.Path(d) / "d.jsonl"
        write_jsonl(p, generate_dialogs(4, seed=1))
        items = load_dialogs(tok, p, 64, 128)
    m = _model(tiny)
    m.train()
    try:
        loss = m.answer_loss(collate(items, tok.pad_token_id))
        loss.backward()
        # at step 0 the fusion projection is zero: it gets the gradient (a zero per-channel gate on a
        # random projection would instead leave the memory path without signal)
        assert m.encoder.readers["1"].W_o.weight.grad.abs().sum() > 0
        _liven(m)
        m.zero_grad()
        m.answer_loss(collate(items, tok.pad_token_id)).backward()
        assert all(g.grad is not None and g.grad.abs().sum() > 0 for g in m.gates.values())
        for name, p in m.encoder.named_parameters():
            if name.endswith(".D") or "norm" in name or ".W_q." in name or ".W_o." in name or "log_dt" in name \
                    or "A_log" in name or "W_k" in name or "W_v" in name:
                assert p.grad is not None and p.grad.abs().sum() > 0, name
        emb = bb.get_input_embeddings().weight
        assert emb.grad is not None and emb.grad.abs().sum() > 0  # features come from the backbone, under grad
    finally:
        m.zero_grad()
        bb.zero_grad()
        _remove(m)


@pytest.mark.parametrize("method", ["frozen", "lora", "full"])
def test_save_load_round_trip_and_parts_load_alone(tiny, tmp_path, method):
    from memcli.backbone import load_backbone
    from memcli.hippo.io import load_hippo, save_hippo
    from memcli.hippo.model import HippoModel
    from memcli.backbone import tokenizer_fingerprint

    bb, tok = load_backbone("tiny")
    torch.manual_seed(1)
    m = HippoModel(bb, HippoConfig(hidden_size=256, tokenizer_fingerprint=tokenizer_fingerprint(tok)))
    with torch.no_grad():
        for p in m.memory_parameters():
            p.add_(torch.randn_like(p) * 0.05)
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        m.backbone = get_peft_model(m.backbone, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
        with torch.no_grad():
            for n, p in m.backbone.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    elif method == "full":
        with torch.no_grad():
            bb.model.layers[0].mlp.up_proj.weight.mul_(1.5)
    m.eval()
    ids = tok(["I drive a Falcor."], return_tensors="pt")
    q = tok(["What car do I drive?"], return_tensors="pt")
    with torch.no_grad():
        S = m.write_turns(m.init_state(1), ids.input_ids, ids.attention_mask)
        want = m(q.input_ids, q.attention_mask, state=S).logits
    save_hippo(m, tok, tmp_path / "run", method, {"note": "x"})
    assert (tmp_path / "run" / "hippo_model" / "hippo_model.safetensors").is_file()
    part = {"lora": "lora", "full": "backbone"}.get(method)
    if part:
        assert (tmp_path / "run" / part).is_dir()
    m2, tok2, info = load_hippo(tmp_path / "run")
    assert info["kind"] == "hippo" and info["finetuning_method"] == method
    with torch.no_grad():
        S2 = m2.write_turns(m2.init_state(1), ids.input_ids, ids.attention_mask)
        got = m2(q.input_ids, q.attention_mask, state=S2).logits
    assert torch.allclose(got, want, atol=1e-5)
    # each part alone: the memory on the base backbone; the adapter / full model with plain HF / PEFT
    alone, _, _ = load_hippo(tmp_path / "run" / "hippo_model")
    assert torch.equal(alone.encoder.W_k.weight, m.encoder.W_k.weight)
    if method == "lora":
        from peft import PeftModel

        base, _ = load_backbone("tiny")
        pm = PeftModel.from_pretrained(base, str(tmp_path / "run" / part))
        assert torch.allclose(pm(**q).logits, m.backbone(**q).logits, atol=1e-5)
    if method == "full":
        full, _ = load_backbone(str(tmp_path / "run" / part))
        assert torch.equal(full.model.layers[0].mlp.up_proj.weight, bb.model.layers[0].mlp.up_proj.weight)


def test_load_refuses_other_kinds_and_mismatched_configs(tmp_path, tiny):
    from memcli.errors import MemcliError
    from memcli.hippo.io import load_hippo, save_hippo

    m = _model(tiny)
    _remove(m)
    save_hippo(m, tiny[1], tmp_path / "r", "frozen")
    (tmp_path / "r" / "checkpoint.json").write_text(json.dumps({"kind": "explicit-memory"}))
    with pytest.raises(MemcliError, match="kind 'explicit-memory', expected 'hippo'"):
        load_hippo(tmp_path / "r")
    cfg = json.loads((tmp_path / "r" / "hippo_model" / "hippo_config.json").read_text())
    cfg["hippo_state_dim"] = 16
    (tmp_path / "r" / "hippo_model" / "hippo_config.json").write_text(json.dumps(cfg))
    with pytest.raises(MemcliError, match="does not fit this HIPPO encoder"):
        load_hippo(tmp_path / "r" / "hippo_model")


# ---- CLI
@pytest.fixture(scope="module")
def dialogs(tmp_path_factory):
    from memcli.data.pipeline import gen_dialog

    d = tmp_path_factory.mktemp("dialog")
    gen_dialog(d, num_train=64, num_val=8, seed=0)
    return d


@pytest.fixture(scope="module")
def hippo_run(tmp_path_factory, dialogs):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("hippo_out")
    code, _, err = run_cli(["train", "hippo", f"dataset.data_dir={dialogs}", f"logging.out_dir={out}",
                            "training.batch_size=8", "training.epochs=2", "training.stage1_epochs=1",
                            "training.eval_num_samples=4", "logging.tensorboard=false"])
    assert code == 0, err
    return out / "hippo"


def test_train_hippo_stages(hippo_run):
    """Stage 1 (one epoch = 8 steps) moves only the memory; stage 2 unfreezes the backbone."""
    from memcli.backbone import load_backbone
    from memcli.hippo.io import load_hippo

    rows = [json.loads(ln) for ln in (hippo_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == [1.0] * 8 + [2.0] * 8
    info = json.loads((hippo_run / "checkpoint.json").read_text())
    assert info["kind"] == "hippo" and info["finetuning_method"] == "full" and info["stage1_steps"] == 8
    assert set(info["eval"]) == {"exact_match_memory", "exact_match_no_history", "val_loss"}
    m, _, _ = load_hippo(hippo_run)
    base, _ = load_backbone("tiny")
    assert not torch.equal(m.backbone.model.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)


@pytest.mark.parametrize("keep", [True, False])
def test_load_best_model_ends_with_the_weights_of_the_lowest_validation_loss(cli, dialogs, tmp_path, monkeypatch,
                                                                                keep):
    """The seed's --load_best_model. Evaluations every 2 steps log the validation loss; the losses the selection
    sees are scripted (step 4 lowest, the end worse) so the test does not hang on an optimiser's path, and the
    weights are real: with the key on, the saved memory equals the weights kept at step 4."""
    from safetensors.torch import load_file

    import memcli.training.hippo as H

    script = iter([5.0, 1.0, 3.0, 4.0])  # steps 2, 4, 6, then the end (the summary's own evaluation stays real)
    real = H.evaluate

    def scripted(model, tok, dialogs, *a, **kw):
        res = real(model, tok, dialogs, *a, **kw)
        return dict(res, val_loss=next(script, res["val_loss"]))

    monkeypatch.setattr(H, "evaluate", scripted)
    code, _, err = cli("train", "hippo", f"dataset.data_dir={dialogs}", f"logging.out_dir={tmp_path}",
                       "training.batch_size=8", "training.stage1_epochs=8", "training.max_steps=8",
                       "training.eval_interval=2", "training.eval_num_samples=4", "training.final_eval_num_samples=4",
                       f"training.load_best_model={str(keep).lower()}", "logging.tensorboard=false")
    assert code == 0, err
    run = tmp_path / "hippo"
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert {r["step"]: r["eval/val_loss"] for r in rows if "eval/val_loss" in r} == {2: 5.0, 4: 1.0, 6: 3.0}
    final = json.loads((run / "checkpoint.json").read_text())["eval"]
    saved = load_file(next((run / "hippo_model").glob("*.safetensors")))
    if keep:
        assert final["best_step"] == 4 and "keeping the weights of step 4" in err
        best = load_file(run / "states" / "best.safetensors")
        assert int(best["step"]) == 4
        kept = [t for k, t in best.items() if k.startswith("memory.")]
        assert len(kept) and all(any(torch.equal(t, v) for v in saved.values()) for t in kept)
    else:
        assert "best_step" not in final and not (run / "states" / "best.safetensors").exists()


def test_stage1_only_keeps_backbone_frozen(cli, dialogs, tmp_path):
    from memcli.backbone import load_backbone
    from memcli.hippo.io import load_hippo

    code, _, err = cli("train", "hippo", f"dataset.data_dir={dialogs}", f"logging.out_dir={tmp_path}",
                       "training.batch_size=8", "training.epochs=1", "training.stage1_epochs=1", "training.max_steps=3",
                       "training.eval_num_samples=2", "logging.tensorboard=false")
    assert code == 0, err
    m, _, _ = load_hippo(tmp_path / "hippo")
    base, _ = load_backbone("tiny")
    for (n, p), (_, q) in zip(m.backbone.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n
    assert m.encoder.readers["1"].W_o.weight.abs().sum() > 0  # the memory trained (its projection starts at zero)


def test_chat_hippo_state_persists_and_resets(hippo_run, monkeypatch, capsys):
    import io

    from conftest import run_cli

    monkeypatch.setattr("sys.stdin", io.StringIO(
        "My pet's name is Zorvak.\n/state\nWhat is my pet's name?\n/state\nreset_hidden\n/state\n/reset_hidden\n/memory\n"))
    code, out, err = run_cli(["chat", "-t", "hippo", "-m", hippo_run, "--max-new-tokens", "3"], capsys)
    assert code == 0, err
    states = [ln for ln in out.splitlines() if ln.startswith("state:")]
    # each exchange writes the user's message and the model's answer when it has one (a dialog has both)
    n = [int(s.split(",")[0].split()[1]) for s in states]
    assert n[0] in (1, 2) and n[1] - n[0] in (1, 2) and n[2] == 0 and max(n) > 2
    assert "norm 0.0000" in states[2] and "norm 0.0000" not in states[0]
    assert out.count("memory state cleared") == 2 and "none: no turn was read" in out
    code, out, err = run_cli(["chat", "-t", "hippo", "-m", hippo_run, "-p", "hello", "--json", "--max-new-tokens", "2"],
                             capsys)
    assert code == 0, err
    assert json.loads(out)["state"]["turns"] == 2  # "hello" and the answer


def test_chat_hippo_session_file_reopens_across_runs(hippo_run, tmp_path, capsys):
    from conftest import assert_one_line_error, run_cli

    f = tmp_path / "s" / "chat.session"
    args = ["chat", "-t", "hippo", "-m", hippo_run, "--session", f, "--recall", "2", "--json", "--max-new-tokens", "2"]
    code, out, err = run_cli([*args, "-p", "My pet's name is Zorvak."], capsys)
    assert code == 0, err
    first = json.loads(out)
    assert first["memory"] == [] and f.is_file()  # nothing to read before the first turn
    code, out, err = run_cli([*args, "-p", "What is my pet's name?"], capsys)
    assert code == 0, err
    second = json.loads(out)
    # each exchange writes the message, and the answer when there is one
    assert second["state"]["turns"] - first["state"]["turns"] in (1, 2)
    assert second["state"]["state_norm"] != first["state"]["state_norm"]
    assert any("Zorvak" in t["text"] for t in second["memory"])  # the earlier turn, read back from the reopened file
    code, out, err = run_cli(["chat", "-t", "hippo", "-m", hippo_run, "--session", f, "-p", "hi", "--json"], capsys)
    assert code == 0, err  # reopened without --recall: the state and the turns go on, nothing is read
    third = json.loads(out)
    assert third["state"]["turns"] - second["state"]["turns"] in (1, 2) and third["memory"] == []
    f.write_bytes(f.read_bytes()[:100])  # cut short
    code, _, err = run_cli(["chat", "-t", "hippo", "-m", hippo_run, "--session", f, "-p", "hi"], capsys)
    assert_one_line_error(code, err, str(f), "not a memcli chat session file")
    before = f.read_bytes()
    code, _, err = run_cli(["chat", "-t", "hrpo", "-m", hippo_run, "--session", f, "-p", "hi"], capsys)
    assert code == 2 and f.read_bytes() == before


def test_chat_session_prompt_never_carries_history(hippo_run):
    """The same message gives the same prompt ids at turn 1 and turn 5; only the state differs."""
    from memcli.chat import GenOptions, open_session

    s, _ = open_session(hippo_run, "hippo", GenOptions(max_new_tokens=2))
    calls = []
    orig = s.model.generate
    s.model.generate = lambda ids, att, **kw: calls.append(ids.clone()) or orig(ids, att, **kw)
    for text in ["I drive a Falcor.", "hi", "My boss is named Quilor.", "ok", "What car do I drive?"]:
        s.reply(text)
    s.reset_hidden()
    s.reply("What car do I drive?")
    from memcli.hippo.data import prompt_ids

    assert torch.equal(calls[4], calls[5])
    assert calls[4][0].tolist() == prompt_ids(s.tok, "What car do I drive?")
    assert s.turns == 2  # the question and the answer


@pytest.mark.parametrize("line,needle", [
    ('{"dialog_history": ["a"], "memory_query": "q"}', ":2: missing field 'memory_answer'"),
    ('{"dialog_history": "a", "memory_query": "q", "memory_answer": "x"}', ":2: field 'dialog_history'"),
    ("{not json", ":2:"),
    ('{"dialog_history": [3], "memory_query": "q", "memory_answer": "x"}', ":2: dialog_history[0] is int"),
])
def test_bad_dialog_data_one_line_error(cli, tmp_path, line, needle):
    d = tmp_path / "d"
    d.mkdir()
    good = json.dumps({"dialog_history": ["My pet's name is Zorvak."], "memory_query": "q", "memory_answer": "Zorvak"})
    (d / "data_train.jsonl").write_text(good + "\n" + line + "\n")
    code, _, err = cli("train", "hippo", f"dataset.data_dir={d}", f"logging.out_dir={tmp_path / 'o'}", "training.batch_size=1")
    assert_one_line_error(code, err, "data_train.jsonl", needle)
    assert not (tmp_path / "o").exists()  # nothing written before the data is known good


def test_train_hippo_refuses_bad_keys(cli, dialogs, tmp_path):
    code, _, err = cli("train", "hippo", f"dataset.data_dir={dialogs}", "model.hippo_variant=vector")
    assert_one_line_error(code, err, "model.hippo_variant", "matrix, selective")
    code, _, err = cli("train", "hippo", f"dataset.data_dir={dialogs}", "model.hipo_heads=2")
    assert_one_line_error(code, err, "model.hippo_heads")
    code, _, err = cli("chat", "-t", "hippo", "-m", tmp_path)
    assert_one_line_error(code, err, "checkpoint.json")


# ---- LoCoMo
from memcli.eval import locomo as LC  # noqa: E402
from conftest import FIXTURES  # noqa: E402


@pytest.mark.parametrize("pred,gold,want", [
    ("The cats, and a dog!", "dog cat", 1.0),  # articles, commas, punctuation dropped; cats -> cat
    ("red car", "red bike", 0.5),
    ("running", "runs", 1.0),  # Porter: run / run
    ("", "Paris", 0.0),
    ("Paris Paris", "Paris", 2 * (0.5 * 1.0) / 1.5),  # repeated tokens count once against one gold token
    ("7 May 2023", "7 May, 2023", 1.0),
])
def test_locomo_token_f1(pred, gold, want):
    assert LC.f1_score(pred, gold) == pytest.approx(want)


def test_locomo_category_rules():
    # category 1: split both on commas; each gold part takes its best predicted part; mean over gold parts
    assert LC.score("Paris, London", {"category": 1, "answer": "London, Berlin"}) == pytest.approx(0.5)
    assert LC.score("adoption agencies", {"category": 1, "answer": "Adoption agencies"}) == 1.0
    # category 3: the gold answer is cut at the first ';'
    assert LC.score("Sweden", {"category": 3, "answer": "Sweden; she moved there in 2019"}) == 1.0
    assert LC.score("Sweden", {"category": 2, "answer": "Sweden; she moved there in 2019"}) < 0.5
    # category 5: abstention is the right answer
    assert LC.score("Not mentioned in the conversation", {"category": 5, "adversarial_answer": "x"}) == 1.0
    assert LC.score("No information available.", {"category": 5, "adversarial_answer": "x"}) == 1.0
    assert LC.score("(b) self-care is important", {"category": 5, "adversarial_answer": "self-care is important"}) == 0.0
    # numbers in the file are scored as text
    assert LC.score("2022", {"category": 2, "answer": 2022}) == 1.0


def test_locomo_harness_on_excerpt(tiny):
    data = LC.load_locomo(FIXTURES / "locomo" / "excerpt.json")
    turns = LC.conversation_turns(data[0])
    assert turns[0].startswith("[Session 1, ") and turns[1].startswith("Caroline: ")
    assert len(turns) == 2 + len(data[0]["conversation"]["session_1"]) + len(data[0]["conversation"]["session_2"])
    m = _model(tiny, live=True)
    bb, tok = tiny
    try:
        # batched turn features + one scan == writing the turns one by one, as chat does
        from memcli.chat import GenOptions, HippoChatSession

        s = HippoChatSession(m, tok, GenOptions())
        for t in turns[:9]:
            s.remember(t)
        assert torch.allclose(LC.hippo_state(m, tok, turns[:9], batch=4), s.state, atol=1e-5)
        res = LC.run_locomo(m, tok, data, setups=("hippo", "none", "full", "hippo+turns", "oracle", "hippo+oracle"),
                            max_new_tokens=3, context_window=256, batch=4, retriever="lexical")
    finally:
        _remove(m)
    summ = res["summary"]
    assert set(summ) == {"hippo", "none", "full", "hippo+turns", "oracle", "hippo+oracle"}
    order = {e["id"]: i for i, e in enumerate(LC.conversation_entries(data[0]))}
    for r, q in zip(res["answers"], data[0]["qa"]):
        ev = sorted((x for x in LC.evidence_ids(q) if x in order), key=order.get)
        # both oracles read exactly the evidence turns; the hippo one in the run's trained form, beside the state
        assert r["hippo+oracle_read"] == r["oracle_read"] == ev and r["hippo_read"] == []
    assert summ["hippo+oracle"]["evidence_in_prompt"] == 1.0
    assert summ["hippo+oracle"]["prompt_tokens_mean"] != summ["oracle"]["prompt_tokens_mean"]
    cats = [q["category"] for q in data[0]["qa"]]
    assert all(sum(summ[s]["count"][n] for n in LC.CATEGORIES.values()) == len(cats) for s in summ)
    # the table's numbers are the means of the per-question scores, which are LoCoMo's score of the answers
    for setup in summ:
        for c, name in LC.CATEGORIES.items():
            per = [r[f"{setup}_f1"] for r in res["answers"] if r["category"] == c]
            assert summ[setup]["f1"][name] == (pytest.approx(sum(per) / len(per)) if per else None)
        for r, q in zip(res["answers"], data[0]["qa"]):
            assert r[f"{setup}_f1"] == LC.score(r[setup], q)


def test_full_history_prompt_fits_window_and_keeps_the_end(tiny):
    from memcli.hippo.turns import context_prompt

    _, tok = tiny
    history = tok("\n".join(f"turn {i}: something happened" for i in range(300)), add_special_tokens=False)["input_ids"]
    ids = LC.full_history_prompt(tok, history, "Question: what? Short answer:", 200)
    assert len(ids) <= 200
    text = tok.decode(ids)
    assert "turn 299: something happened" in text and "Question: what?" in text and "turn 0:" not in text
    short = LC.full_history_prompt(tok, history[:20], "Q?", 200)
    # the backbone's own chat form: the history as system context, the question as the user's message
    assert short == context_prompt(tok, "Conversation:\n" + tok.decode(history[:20]), "Q?")


@pytest.mark.parametrize("content,needle", [
    ("{}", "expected a non-empty JSON list"),
    ('[{"conversation": {}, "qa": []}]', "no session_N lists"),
    ('[{"conversation": {"session_1": [{"speaker": "A"}]}, "qa": []}]', "session_1: a turn without"),
    ('[{"conversation": {"session_1": []}, "qa": [{"question": "q", "category": 9}]}]', "qa[0]: expected"),
    ('[{"conversation": {"session_1": []}, "qa": [{"question": "q", "category": 2}]}]', "without 'answer'"),
])
def test_locomo_bad_file_one_line_error(cli, tmp_path, content, needle):
    p = tmp_path / "locomo.json"
    p.write_text(content)
    code, _, err = cli("compare", "locomo", "--data", p, "-m", tmp_path)
    assert_one_line_error(code, err, str(p), needle)


def test_compare_locomo_cli_on_excerpt(cli, hippo_run, tmp_path):
    code, out, err = cli("compare", "locomo", "--data", FIXTURES / "locomo" / "excerpt.json", "-m", hippo_run,
                         "--context-window", "256", "--max-new-tokens", "3", "--json", "--markdown", tmp_path / "t.md",
                         "--answers", tmp_path / "a.jsonl")
    assert code == 0, err
    r = json.loads(out)
    setups = ["hippo", "none", "full", "oracle", "turns", "hippo+turns", "hippo+oracle"]
    assert list(r["f1"]) == setups and sum(r["count"][n] for n in LC.CATEGORIES.values()) == 12
    assert r["evidence_in_prompt"]["oracle"] == 1.0 and r["retrieval"]["retriever"] == \
        "hybrid/minilm + neighbours x0.5, named speaker x8, named date x8"
    rows = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(f"{s}_bleu1" in rows[0] for s in setups)
    md = (tmp_path / "t.md").read_text()
    assert md.startswith("| metric | " + " | ".join(setups) + " |") and "[bold" not in md


def test_bench_hippo_quick(cli):
    code, out, err = cli("compare", "bench", "--suite", "hippo", "--quick", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["bench"] for r in rows] == ["chat turn 1"] * 3 + ["chat turn 4"] * 3
    assert [r["path"] for r in rows[:3]] == ["memcli hippo (matrix state)", "state + turn memory (--recall 2)",
                                             "full history in the prompt"]
    for r in rows[1:3]:  # ratios against the state's turn
        assert r["ratio"] == pytest.approx(r["median_ms"] / rows[0]["median_ms"])
    from conftest import assert_one_line_error

    assert_one_line_error(*cli("compare", "bench", "--suite", "hippo", "--turns", "0")[::2], "--turns 0")


def test_selective_legs_lora_run_saves_adapter_and_chats(cli, dialogs, tmp_path):
    code, out, err = cli("train", "hippo", f"dataset.data_dir={dialogs}", f"logging.out_dir={tmp_path}",
                         "model.hippo_variant=selective", "model.hippo_init=legs", "model.finetuning_method=lora",
                         "model.hippo_pool=tokens", "model.hippo_feature_layer=2", "training.batch_size=8",
                         "training.stage1_epochs=0", "training.max_steps=3", "training.eval_num_samples=2",
                         "logging.tensorboard=false", "--json")
    assert code == 0, err
    assert json.loads(out)["optimizer steps"] == 3
    run = tmp_path / "hippo"
    assert (run / "lora" / "adapter_config.json").is_file() and not (run / "backbone").exists()
    cfg = json.loads((run / "hippo_model" / "hippo_config.json").read_text())
    assert (cfg["hippo_variant"], cfg["hippo_init"], cfg["hippo_pool"], cfg["hippo_feature_layer"]) == \
        ("selective", "legs", "tokens", 2)
    code, out, err = cli("chat", "-t", "hippo", "-m", run, "-p", "I drive a Falcor.", "--json", "--max-new-tokens", "2")
    assert code == 0, err
    assert json.loads(out)["state"]["state_shape"] == [1, 4, 32, 128]  # selective: value dim = 2 * 256 / 4


def test_train_hippo_reads_a_hugging_face_dataset_directory(cli, dialogs, tmp_path):
    """dataset.train_path may be a datasets save_to_disk directory (as the HIPPO seed loads its data); rows are
    validated like JSONL lines, and the roles of the turns are kept."""
    import datasets

    from memcli import records

    datasets.disable_progress_bars()  # save_to_disk's own bar would land in the captured stderr
    rows = records.read_jsonl(dialogs / "data_train.jsonl", records.DIALOG)[:16]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    code, out, err = cli("train", "hippo", f"dataset.train_path={tmp_path / 'hf'}",
                         f"dataset.eval_path={dialogs / 'data_val.jsonl'}", f"logging.out_dir={tmp_path / 'o'}",
                         "training.batch_size=8", "training.max_steps=1", "training.eval_num_samples=2",
                         "training.final_eval_num_samples=2", "training.stage1_epochs=0", "logging.tensorboard=false",
                         "--json")
    assert code == 0, err
    bad = [dict(rows[0], memory_answer=7)]
    datasets.Dataset.from_list(bad).save_to_disk(str(tmp_path / "bad"))
    code, _, err = cli("train", "hippo", f"dataset.train_path={tmp_path / 'bad'}", f"logging.out_dir={tmp_path / 'o2'}")
    assert_one_line_error(code, err, "bad: row 0", "memory_answer")
    code, _, err = cli("train", "hippo", f"dataset.train_path={tmp_path}", f"logging.out_dir={tmp_path / 'o3'}")
    assert_one_line_error(code, err, "save_to_disk")


def test_dialog_roles(tmp_path):
    """Plain strings alternate user / assistant (the seed's dialog_history); objects keep their role; a turn is its
    chat block without the template's default system prompt."""
    from memcli.backbone import load_tokenizer
    from memcli.hippo.data import message_block, turn_text

    assert [turn_text(t, i)[0] for i, t in enumerate(["a", "b", "c"])] == ["user", "assistant", "user"]
    assert turn_text({"role": "assistant", "content": "x"}, 0) == ("assistant", "x")
    assert turn_text({"speaker": "Ann", "text": "hi"}, 1) == ("user", "Ann: hi")
    tok = load_tokenizer("tiny")
    block = tok.decode(message_block(tok, "assistant", "Got it."))
    assert block.startswith("<|im_start|>assistant\nGot it.<|im_end|>")


def test_prefix_read_stores_a_turns_words_and_reads_them_back(tmp_path):
    """read=prefix (the pretrained-backbone read): a turn's words are the values; read back by a question, they come
    out as memory tokens equal (up to scale) to the turn's token embeddings, after the learned prompt; the model sees
    [prompt][memory tokens][input]; an empty state reads zeros; save and load round-trip."""
    from memcli.backbone import load_backbone, tokenizer_fingerprint
    from memcli.hippo.data import content_ids, prompt_ids, turn_ids
    from memcli.hippo.io import load_hippo, save_hippo
    from memcli.hippo.model import HippoModel

    bb, tok = load_backbone("tiny")
    cfg = HippoConfig(hidden_size=256, hippo_read="prefix", hippo_memory_tokens=6, hippo_prompt_tokens=3, memory_layers=[1],
                      hippo_feature_layer=2, hippo_pool="mean", tokenizer_fingerprint=tokenizer_fingerprint(tok))
    m = HippoModel(bb, cfg).eval()
    S0 = m.init_state(1)
    assert S0.shape == (1, 4, 32, 6 * 256 // 4)
    text = "My pet's name is Zorvak."
    ids = torch.tensor([turn_ids(tok, "user", text, 64)])
    words = torch.tensor([content_ids(tok, text)])
    with torch.no_grad():
        S = m.write_turns(S0, ids, torch.ones_like(ids), None, words, torch.ones_like(words))
        q = torch.tensor([prompt_ids(tok, "What is my pet's name?")])
        soft = m.encoder.read(S, m.question_features(q, torch.ones_like(q)))
        empty = m.encoder.read(S0, m.question_features(q, torch.ones_like(q)))
    assert soft.shape == (1, 3 + 6, 256) and torch.equal(soft[0, :3], m.encoder.prompt)
    last = words[0, -6:]
    emb = bb.get_input_embeddings()(last)
    cos = torch.nn.functional.cosine_similarity(soft[0, 3:], emb, dim=-1)
    assert (cos > 0.99).all()  # one turn in the state: its last 6 words come back, in order
    assert torch.count_nonzero(empty[0, 3:]) == 0
    with torch.no_grad():
        out = m(q, torch.ones_like(q), state=S).logits
        ref = bb(inputs_embeds=torch.cat([soft, bb.get_input_embeddings()(q)], 1)).logits[:, -q.shape[1]:]
        assert torch.allclose(out, ref, atol=1e-5)
        gen = m.generate(q, torch.ones_like(q), state=S, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                         eos_token_id=None)
    assert torch.equal(gen[:, : q.shape[1]], q) and gen.shape[1] == q.shape[1] + 3
    save_hippo(m, tok, tmp_path / "run", "frozen", {"step": 0})
    m2, _, _ = load_hippo(tmp_path / "run")
    with torch.no_grad():
        assert torch.allclose(m2(q, torch.ones_like(q), state=S).logits, out, atol=1e-5)
