"""HRPO: marker detection, hybrid decoding vs HF generate, cache agreement, gradients, the GRPO loss vs a
slow per-sequence reference and TRL's conventions, rewards, CLI runs (tiny default, GSM8K slice,
LoRA / full save and reload, chat), bad input."""

import json
import math
import random
import statistics
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_one_line_error
from memcli.errors import MemcliError
from memcli.hrpo.grpo import group_advantages, grpo_loss
from memcli.hrpo.config import HrpoConfig
from memcli.hrpo.residual import ThinkingResidual
from memcli.hrpo.rewards import extract_answer, gsm8k_reward, normalise_number
from memcli.hrpo.rollout import _eos_ids, completion_logps, hybrid_generate, marker_table, reference_logps

GSM = Path(__file__).parent / "fixtures" / "gsm8k"


@pytest.fixture(scope="module")
def tiny():
    from memcli.backbone import load_backbone

    torch.manual_seed(0)
    bb, tok = load_backbone("tiny")
    tok.padding_side = "left"
    return bb.eval(), tok


def _prompts(tok, texts):
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc["input_ids"], enc["attention_mask"]


def _residual(bb, source="probs", seed=0):
    torch.manual_seed(seed)
    W = bb.get_input_embeddings().weight
    res = ThinkingResidual(HrpoConfig(hidden_size=bb.config.hidden_size, thinking_source=source),
                           float(W.detach().norm(dim=-1).mean()))
    with torch.no_grad():  # open the gate well away from a = 1 so mixing changes what the model sees
        res.thinking_residual_Lambda.fill_(1.5)  # a = exp(-8 softplus(-1.5) r) ~ 0.45 at r = 0.5
    return res


# --------------------------------------------------------------------------- marker detection

def test_marker_state_machine_agrees_with_text(tiny):
    _, tok = tiny
    table = marker_table(tok)
    rng = random.Random(0)
    alphabet = ["#", "##", "###", " #", "a", " 5", "x#", "# ", "\n", "1,2"]
    for _ in range(60):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        ids = tok(text, add_special_tokens=False)["input_ids"]
        s = 0
        for j, t in enumerate(ids):
            s = int(table[t, s])
            assert (s == 4) == ("####" in tok.decode(ids[:j + 1])), (text, j)


# --------------------------------------------------------------------------- decoding

def test_gate_forced_to_one_reproduces_hf_sampling(tiny):
    bb, tok = tiny
    ids, mask = _prompts(tok, ["What is 2 + 3?", "Hi", "Sam has 4 pens and buys 5 more."])
    res = _residual(bb)
    res.force_a = 1.0
    torch.manual_seed(11)
    ro = hybrid_generate(bb, res, tok, ids, mask, 24, temperature=0.7)
    torch.manual_seed(11)
    hf = bb.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=0.7, top_k=0, top_p=1.0,
                     max_new_tokens=24, pad_token_id=tok.pad_token_id, eos_token_id=sorted(_eos_ids(tok)))
    new = hf[:, ids.shape[1]:]
    T = min(new.shape[1], ro.completion_ids.shape[1])
    assert T >= 5
    assert torch.equal(ro.completion_ids[:, :T], new[:, :T])
    assert ro.mix_mask.any()  # mixing was on, and with a = 1 it is exactly the token embedding


@pytest.mark.parametrize("source", ["probs", "projection"])
def test_cached_and_uncached_hybrid_decoding_agree(tiny, source):
    bb, tok = tiny
    ids, mask = _prompts(tok, ["Count: one two", "A much longer prompt about pens and apples"])
    res = _residual(bb, source)
    if source == "projection":
        torch.nn.init.normal_(res.thinking_projection.weight, std=0.05)
    torch.manual_seed(3)
    a = hybrid_generate(bb, res, tok, ids, mask, 16, temperature=0.8)
    torch.manual_seed(3)
    b = hybrid_generate(bb, res, tok, ids, mask, 16, temperature=0.8, use_cache=False)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.thinking, b.thinking, atol=1e-4, rtol=1e-4)
    # and the hybrid inputs matter: plain decoding with the same seed diverges
    torch.manual_seed(3)
    c = hybrid_generate(bb, res, tok, ids, mask, 16, temperature=0.8, hybrid=False)
    assert not torch.equal(a.completion_ids, c.completion_ids)


class _Force:
    """Logits forced to a fixed continuation (a forward hook on the real model; the decoding loop is real)."""

    def __init__(self, bb, seq):
        self.seq, self.n = seq, 0
        self.h = bb.register_forward_hook(self)

    def __call__(self, mod, args, out):
        t = self.seq[min(self.n, len(self.seq) - 1)]
        self.n += 1
        out.logits[..., :] = -1e4
        out.logits[..., t] = 1e4
        return out


def test_mixing_stops_at_the_marker_and_replay_matches_rollout(tiny):
    bb, tok = tiny
    ids, mask = _prompts(tok, ["Sam has 3 pens."])
    # the marker split over tokens: "so 3 ##" then "## 7 done"
    text_ids = tok("so 3 ##", add_special_tokens=False)["input_ids"] + tok("## 7 done", add_special_tokens=False)["input_ids"]
    f = _Force(bb, text_ids)
    try:
        res = _residual(bb)
        ro = hybrid_generate(bb, res, tok, ids, mask, len(text_ids), temperature=1.0)
    finally:
        f.h.remove()
    assert ro.completion_ids[0].tolist() == text_ids
    dec = [tok.decode(text_ids[:j + 1]) for j in range(len(text_ids))]
    want = [("####" not in d) for d in dec]  # the token that completes the marker is already plain
    assert ro.mix_mask[0].tolist() == want
    assert any(want) and not all(want)
    # the replay feeds exactly what the rollout fed: its logits reproduce the rollout's sampling distribution
    lp, _ = completion_logps(bb, res, ro, 1.0)
    ref = reference_logps(bb, ro, 1.0)
    assert torch.allclose(lp[0, 0], ref[0, 0])  # first completion token: prompt only, never mixed
    assert not torch.allclose(lp[0, 1:], ref[0, 1:])  # later ones see the mixed inputs


def test_replay_equals_rollout_logprobs_left_padded(tiny):
    bb, tok = tiny
    ids, mask = _prompts(tok, ["Hi", "A longer prompt with more tokens in it"])
    res = _residual(bb)
    gen = torch.Generator().manual_seed(5)

    # record the rollout's own sampling log-probs through a hook on the model output
    seen = []
    h = bb.register_forward_hook(lambda m, a, o: seen.append(o.logits[:, -1].float().clone()))
    try:
        ro = hybrid_generate(bb, res, tok, ids, mask, 10, temperature=0.9, generator=gen)
    finally:
        h.remove()
    roll = torch.stack([torch.log_softmax(x / 0.9, -1) for x in seen[:ro.completion_ids.shape[1]]], 1)
    roll = roll.gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        lp, _ = completion_logps(bb, res, ro, 0.9)
    m = ro.completion_mask.bool()
    torch.testing.assert_close(lp[m], roll[m], atol=2e-4, rtol=1e-4)


def test_gradient_reaches_gates_lambda_and_projection(tiny):
    bb, tok = tiny
    ids, mask = _prompts(tok, ["Think: 1 2 3", "More"])
    res = _residual(bb, "projection")
    torch.manual_seed(0)
    ro = hybrid_generate(bb, res, tok, ids, mask, 8, temperature=1.0)
    assert ro.mix_mask.any()
    lp, stats = completion_logps(bb, res, ro, 1.0)
    (lp * ro.completion_mask).sum().backward()
    for name, p in res.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert 0 < stats["gate_a"] < 1 and 0 < stats["hidden_share"] < 1


def test_gradient_checkpointing_recomputes_layers_and_keeps_gradients(tiny):
    """``training.gradient_checkpointing``: the replay's backward recomputes each decoder layer's insides (so their
    activations are not kept) and gives the same gradients to the backbone and the thinking residual."""
    import copy

    from memcli.backbone import decoder_layers, enable_checkpointing

    bb0, tok = tiny
    ids, mask = _prompts(tok, ["Think: 1 2 3", "More words here"])
    res0 = _residual(bb0, "projection")
    torch.manual_seed(0)
    ro = hybrid_generate(bb0, res0, tok, ids, mask, 8, temperature=1.0)
    grads, calls = {}, {}
    for ckpt in (False, True):
        bb, res = copy.deepcopy(bb0).train(), copy.deepcopy(res0)
        if ckpt:
            enable_checkpointing(bb)
        n = [0]
        hook = decoder_layers(bb)[0].mlp.register_forward_pre_hook(  # pre: the recompute stops inside the MLP
            lambda *a: n.__setitem__(0, n[0] + 1))
        lp, _ = completion_logps(bb, res, ro, 1.0)
        (lp * ro.completion_mask).sum().backward()
        hook.remove()
        calls[ckpt] = n[0]
        grads[ckpt] = {k: p.grad.clone() for k, p in list(bb.named_parameters()) + list(res.named_parameters())
                       if p.grad is not None}
    assert calls == {False: 1, True: 2}
    assert grads[False].keys() == grads[True].keys() and len(grads[True]) > 10
    for k in grads[False]:
        torch.testing.assert_close(grads[True][k], grads[False][k], atol=1e-6, rtol=1e-5, msg=k)


def test_a_plain_grpo_run_decodes_plain_and_says_so_on_disk(tiny, tmp_path):
    """``training.hybrid=false`` is stored with the run: evaluation and chat decode it with token inputs only, as it
    was trained; a hybrid run mixes. The flag round-trips through the run directory."""
    from memcli.hrpo.io import load_hrpo, save_hrpo
    from memcli.hrpo.model import HrpoModel

    bb, tok = tiny
    ids, mask = _prompts(tok, ["Think: 1 2 3", "More"])
    for hybrid in (True, False):
        model = HrpoModel(bb, HrpoConfig(hidden_size=bb.config.hidden_size, hybrid=hybrid))
        with torch.no_grad():
            model.residual.thinking_residual_Lambda.fill_(1.5)
        save_hrpo(model, tok, tmp_path / str(hybrid), "full")
        loaded, ltok, _ = load_hrpo(tmp_path / str(hybrid))
        assert loaded.cfg.hybrid is hybrid
        ro = loaded.generate(ltok, ids, mask, 6)
        assert bool(ro.mix_mask.any()) is hybrid
        plain = loaded.generate(ltok, ids, mask, 6, hybrid=False)
        if not hybrid:
            assert torch.equal(ro.completion_ids, plain.completion_ids)
    # a run saved before the flag lived in hrpo_config.json: checkpoint.json's "hybrid" decides
    run = tmp_path / "False"
    cfg_file = run / "thinking_residual" / "hrpo_config.json"
    d = json.loads(cfg_file.read_text())
    del d["hybrid"]
    cfg_file.write_text(json.dumps(d))
    info = json.loads((run / "checkpoint.json").read_text())
    for flag in (False, True):
        (run / "checkpoint.json").write_text(json.dumps(dict(info, hybrid=flag)))
        assert load_hrpo(run)[0].cfg.hybrid is flag


def test_greedy_decoding_weights_the_thinking_vector_at_the_rollouts_temperature(tiny, tmp_path):
    """A run's thinking vectors were made from its rollouts' distribution (training.temperature): decoding
    greedily, or at another temperature, weights them the same way, not by a temperature-1 distribution. The
    temperature round-trips through the run directory; a run saved before it was recorded reads config.yaml."""
    from memcli.hrpo.io import load_hrpo, save_hrpo
    from memcli.hrpo.model import HrpoModel

    bb, tok = tiny
    ids, mask = _prompts(tok, ["Think: 1 2 3", "More"])
    W = bb.get_input_embeddings().weight
    with torch.no_grad():
        first = bb(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits[:, -1]
    want = {t: ThinkingResidual.probs_vector(torch.softmax(first / t, -1), W) for t in (0.5, 1.0)}
    assert (want[0.5] - want[1.0]).norm() > 0.1 * want[1.0].norm()  # the two temperatures differ visibly
    model = HrpoModel(bb, HrpoConfig(hidden_size=bb.config.hidden_size, thinking_temperature=0.5))
    with torch.no_grad():
        model.residual.thinking_residual_Lambda.fill_(1.5)
    for temperature in (0.0, 0.9):
        ro = model.generate(tok, ids, mask, 3, temperature=temperature, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(ro.thinking[:, 0], want[0.5], atol=1e-5, rtol=1e-4)
    # without a recorded temperature, the decoding temperature weights it (1 when greedy): the rule before
    ro = hybrid_generate(bb, model.residual, tok, ids, mask, 3, temperature=1.0, greedy=True)
    torch.testing.assert_close(ro.thinking[:, 0], want[1.0], atol=1e-5, rtol=1e-4)
    save_hrpo(model, tok, tmp_path / "run", "full")
    assert load_hrpo(tmp_path / "run")[0].cfg.thinking_temperature == 0.5
    cfg_file = tmp_path / "run" / "thinking_residual" / "hrpo_config.json"
    d = json.loads(cfg_file.read_text())
    del d["thinking_temperature"]
    cfg_file.write_text(json.dumps(d))
    assert load_hrpo(tmp_path / "run")[0].cfg.thinking_temperature is None  # no config.yaml: the old rule
    (tmp_path / "run" / "config.yaml").write_text("training:\n  temperature: 0.7\n")
    assert load_hrpo(tmp_path / "run")[0].cfg.thinking_temperature == 0.7
    with pytest.raises(MemcliError, match="thinking_temperature 0.0, expected a number > 0"):
        HrpoConfig(hidden_size=8, thinking_temperature=0.0)


def test_lambda_initialisation_range():
    res = ThinkingResidual(HrpoConfig(hidden_size=64, thinking_r_min=0.9, thinking_r_max=0.95))
    a, _ = res.gate(torch.zeros(1, 64))
    # r = sigmoid(W 0 + b) lies in (0, 1), so a lies in [r_min^1, 1): at r = 1 exactly [r_min, r_max]
    sp = torch.nn.functional.softplus(-res.thinking_residual_Lambda)
    a1 = torch.exp(-8 * sp)
    assert (a1 >= 0.9 - 1e-6).all() and (a1 <= 0.95 + 1e-6).all()
    assert (a >= a1).all()


def test_closed_gate_keeps_gradients_finite():
    """A gate that float32 rounds to a = 1 (Lambda grown by a fast lambda_lr) must not make the gradient NaN:
    it did, from sqrt(1 - a^2)'s infinite slope at 0 (measured: lambda_lr 0.1 on SmolLM2, step 10)."""
    torch.manual_seed(0)
    res = ThinkingResidual(HrpoConfig(hidden_size=8))
    with torch.no_grad():
        res.thinking_residual_Lambda[:4] = 40.0  # softplus(-40) ~ 4e-18: a == 1.0 in float32
    e, h = torch.randn(3, 8), torch.randn(3, 8)
    out, a = res.mix(e, h)
    assert (a[:, :4] == 1.0).all() and (a[:, 4:] < 1).all()
    assert torch.equal(out[:, :4], e[:, :4])  # closed: the token's embedding exactly
    out.square().sum().backward()
    for p in res.parameters():
        assert torch.isfinite(p.grad).all()
    assert res.thinking_residual_Lambda.grad[4:].abs().sum() > 0  # the open part still learns


# --------------------------------------------------------------------------- objective

def _slow_loss(bb, res, ro, rewards, G, beta, temp):
    """Per sequence, unpadded, position by position: the hybrid inputs rebuilt from the stored vectors."""
    emb = bb.get_input_embeddings()
    r = [float(x) for x in rewards]
    adv = []
    for g in range(0, len(r), G):
        grp = r[g:g + G]
        mu, sd = statistics.mean(grp), statistics.stdev(grp)
        adv += [(x - mu) / (sd + 1e-4) for x in grp]
    total = 0.0
    for b in range(ro.completion_ids.shape[0]):
        p = ro.prompt_ids[b][ro.prompt_mask[b].bool()]
        n = int(ro.completion_mask[b].sum())
        c = ro.completion_ids[b, :n]
        rows = [emb(p)]
        for j in range(n):
            e = emb(c[j:j + 1])
            if ro.mix_mask[b, j]:
                a, i = res.gate(e)
                e = a * e + torch.sqrt(1 - a * a) * (i * ro.thinking[b, j:j + 1])
            rows.append(e)
        x = torch.cat(rows)[None]
        logits = bb(inputs_embeds=x).logits[0, len(p) - 1:len(p) - 1 + n].float() / temp
        lp = torch.log_softmax(logits, -1).gather(-1, c[:, None]).squeeze(-1)
        with torch.no_grad():
            ref = torch.log_softmax(bb(input_ids=torch.cat([p, c])[None]).logits[0, len(p) - 1:len(p) - 1 + n].float() / temp,
                                    -1).gather(-1, c[:, None]).squeeze(-1)
        d = ref - lp
        per = -adv[b] * torch.exp(lp - lp.detach()) + beta * (torch.exp(d) - d - 1)
        total = total + per.mean()
    return total / ro.completion_ids.shape[0]


def test_grpo_loss_matches_slow_reference(tiny):
    bb, tok = tiny
    G = 3
    ids, mask = _prompts(tok, ["Q one", "Q one", "Q one", "A second, longer question", "A second, longer question",
                               "A second, longer question"])
    res = _residual(bb)
    torch.manual_seed(1)
    ro = hybrid_generate(bb, res, tok, ids, mask, 7, temperature=0.8)
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.0, 0.0, 1.0])
    adv, _ = group_advantages(rewards, G)
    lp, _ = completion_logps(bb, res, ro, 0.8)
    ref = reference_logps(bb, ro, 0.8)
    loss, _ = grpo_loss(lp, ro.completion_mask, adv, ref, beta=0.04)
    bb.zero_grad()
    res.zero_grad()
    loss.backward()
    g_fast = res.thinking_residual_Lambda.grad.clone()
    res.zero_grad()
    slow = _slow_loss(bb, res, ro, rewards, G, 0.04, 0.8)
    slow.backward()
    torch.testing.assert_close(loss, slow, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_fast, res.thinking_residual_Lambda.grad, atol=1e-6, rtol=1e-3)
    bb.zero_grad()


def test_advantages_and_zero_std_groups():
    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    adv, st = group_advantages(r, 3)
    assert adv[:3].abs().max() == 0  # a group with one reward value teaches nothing
    sd = statistics.stdev([0.0, 1.0, 0.0])
    torch.testing.assert_close(adv[3:], torch.tensor([(0 - 1 / 3) / (sd + 1e-4), (1 - 1 / 3) / (sd + 1e-4),
                                                      (0 - 1 / 3) / (sd + 1e-4)]))
    assert st["frac_zero_std"] == 0.5 and math.isclose(st["reward_mean"], 4 / 6, rel_tol=1e-6)


def test_matches_trl_grpo_conventions_without_mixing(tiny, tmp_path):
    """TRL's GRPOTrainer (loss_type='grpo'): same advantages, per-token log-probs and loss, mixing off.

    Differences, documented: TRL does not pass position ids, so left-padded rows get shifted positions
    (RoPE makes that a no-op up to rounding); prompts here have equal length.
    """
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from trl.trainer.utils import nanstd

    bb, tok = tiny
    G = 4
    ids, mask = _prompts(tok, ["Sam has 3 pens."] * G + ["Sam has 9 pens."] * G)
    res = _residual(bb)
    torch.manual_seed(2)
    ro = hybrid_generate(bb, res, tok, ids, mask, 6, temperature=0.7, hybrid=False)
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    adv, _ = group_advantages(rewards, G)
    mean = rewards.view(-1, G).mean(1).repeat_interleave(G)
    std = nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    torch.testing.assert_close(adv, (rewards - mean) / (std + 1e-4))

    args = trl.GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, num_generations=G,
                          per_device_train_batch_size=G * 2, temperature=0.7, beta=0.0, loss_type="grpo",
                          report_to=[], max_completion_length=6, logging_steps=1)
    trainer = trl.GRPOTrainer(model=bb, reward_funcs=lambda completions, **kw: [0.0] * len(completions), args=args,
                              train_dataset=Dataset.from_list([{"prompt": "x"}] * 8), processing_class=tok)
    trainer.beta = 0.04  # built with beta 0 (no hub download of a reference model); the KL takes our reference log-probs
    ref = reference_logps(bb, ro, 0.7)
    inputs = {"prompt_ids": ro.prompt_ids, "prompt_mask": ro.prompt_mask, "completion_ids": ro.completion_ids,
              "completion_mask": ro.completion_mask, "advantages": adv, "ref_per_token_logps": ref}
    lp, _ = completion_logps(bb, None, ro, 0.7, hybrid=False)
    ours, _ = grpo_loss(lp, ro.completion_mask, adv, ref, 0.04)
    trainer.model.eval()  # eval mode: TRL divides by no accumulation normaliser
    trl_loss = trainer._compute_loss(trainer.model, inputs)
    torch.testing.assert_close(ours, trl_loss.float(), atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- rewards

@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7\n#### 7", "7"), ("#### 1,234", "1234"), ("#### 12.50", "12.5"), ("#### 7.0", "7"),
    ("#### 3 #### 5", "5"), ("#### the answer is 42 dollars", "42"), ("#### -3", "-3"), ("no marker 7", None),
    ("####", None), ("#### $18.", "18"),
])
def test_extract_answer(text, want):
    assert extract_answer(text) == want


def test_gsm8k_reward_needs_form_and_value():
    gold = ["He has 3 + 4 = 7\n#### 7"] * 4
    assert gsm8k_reward(["#### 7", "7", "#### 8", "#### 7.00"], gold) == [1.0, 0.0, 0.0, 1.0]
    assert normalise_number("0.0") == "0" and normalise_number("abc") is None


# --------------------------------------------------------------------------- command line

@pytest.fixture(scope="module")
def hrpo_runs(tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("hrpo")
    runs = {}
    for method in ("full", "lora"):
        code, _, err = run_cli(["train", "hrpo", f"dataset.train_path={GSM / 'train.jsonl'}",
                                f"dataset.eval_path={GSM / 'test.jsonl'}", f"logging.out_dir={out}",
                                f"logging.run_name={method}", f"model.finetuning_method={method}", "training.max_steps=2",
                                "training.group_size=2", "training.batch_size=2", "training.max_completion_length=6",
                                "training.eval_num_samples=4", "training.final_eval_num_samples=4",
                                "logging.tensorboard=false", "training.log_completions_interval=1"])
        assert code == 0, err
        runs[method] = out / method
    return runs


@pytest.mark.parametrize("method", ["full", "lora"])
def test_train_hrpo_saves_and_reloads(hrpo_runs, method):
    from memcli.hrpo.io import load_hrpo

    run = hrpo_runs[method]
    info = json.loads((run / "checkpoint.json").read_text())
    assert info["kind"] == "hrpo" and info["finetuning_method"] == method
    assert (run / ("backbone" if method == "full" else "lora")).is_dir()
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for k in ("reward_mean", "reward_std", "frac_zero_std", "completion_length", "kl", "gate_a", "hidden_share"):
        assert k in rows[-1], k
    model, tok, linfo = load_hrpo(run)
    assert linfo["loaded_as"] == method
    from safetensors.torch import load_file

    saved = load_file(str(run / "thinking_residual" / "thinking_residual.safetensors"))
    for k, v in model.residual.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_chat_with_hrpo_run(hrpo_runs, cli):
    code, out, err = cli("chat", "-t", "lora", "-m", str(hrpo_runs["lora"]), "--prompt", "What is 2 + 2?", "--json",
                         "--max-new-tokens", "5")
    assert code == 0, err
    res = json.loads(out)
    assert res["hybrid"]["mixed_tokens"] >= 1 and isinstance(res["answer"], str)
    code, out, err = cli("chat", "-t", "hrpo", "-m", str(hrpo_runs["full"]), "--prompt", "Hi", "--max-new-tokens", "3")
    assert code == 0, err
    code, _, err = cli("chat", "-t", "full", "-m", str(hrpo_runs["lora"]), "--prompt", "Hi")
    assert_one_line_error(code, err, "trained 'lora'")
    # every kind with a LoRA adapter opens with -t lora; a run without one is refused in one line
    code, _, err = cli("chat", "-t", "lora", "-m", str(hrpo_runs["full"]), "--prompt", "Hi")
    assert_one_line_error(code, err, "no LoRA adapter")


def test_train_hrpo_tiny_default_offline(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("train", "hrpo", "training.max_steps=1", "training.eval_num_samples=2",
                         "training.final_eval_num_samples=2", "training.max_completion_length=4",
                         "logging.tensorboard=false", "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["optimizer steps"] == 1 and "accuracy" in res
    assert (tmp_path / "data" / "arithmetic" / "train.jsonl").is_file()


@pytest.mark.parametrize("bad,needle", [
    ('{"question": "q", "answer": "no final answer"}\n', ":1: field 'answer' has no '#### <number>'"),
    ('{"question": "q"}\n', ":1:"),
    ('{"question": "q", "answer": "#### 1"}\nnot json\n', ":2:"),
])
def test_bad_gsm8k_file(tmp_path, cli, bad, needle):
    p = tmp_path / "bad.jsonl"
    p.write_text(bad)
    code, _, err = cli("train", "hrpo", f"dataset.train_path={p}", f"logging.out_dir={tmp_path / 'o'}")
    assert_one_line_error(code, err, "bad.jsonl", needle)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kv,needle", [
    ("training.reward_fn=nomodule:fn", "training.reward_fn"), ("training.reward_fn=plain", "module:function"),
    ("training.group_size=1", "training.group_size"), ("model.thinking_source=weights", "model.thinking_source"),
])
def test_bad_hrpo_keys(tmp_path, cli, kv, needle):
    code, _, err = cli("train", "hrpo", f"dataset.train_path={GSM / 'train.jsonl'}", f"logging.out_dir={tmp_path / 'o'}", kv)
    assert_one_line_error(code, err, needle)


def test_hrpo_bench_quick(cli):
    code, out, err = cli("compare", "bench", "--suite", "hrpo", "--quick", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["path"] for r in rows][:3] == ["HF generate (plain sampling)", "memcli hybrid rollout",
                                         "seed-style: re-decode text each step"]
    assert rows[0]["ratio"] == 1.0 and all(r["median_ms"] > 0 for r in rows)



def test_lora_run_refuses_a_base_with_other_weights(hrpo_runs, tmp_path):
    import shutil

    from memcli.errors import MemcliError
    from memcli.hrpo.io import load_hrpo

    run = tmp_path / "lora"
    shutil.copytree(hrpo_runs["lora"], run)
    p = run / "checkpoint.json"
    cfg = json.loads(p.read_text())
    assert "backbone_checksum" in cfg  # a LoRA run records the base it was trained on, like every kind
    cfg["backbone_checksum"] += 1.0
    p.write_text(json.dumps(cfg))
    with pytest.raises(MemcliError, match="does not have the weights"):
        load_hrpo(run)


# --------------------------------------------------------------------------- properties

@settings(max_examples=200, deadline=None)
@given(st.text(max_size=80))
def test_extract_answer_total_and_normalised(text):
    got = extract_answer(text)
    assert got is None or (normalise_number(got) == got and float(got) == float(got))
    if "####" not in text:
        assert got is None


@settings(max_examples=100, deadline=None)
@given(st.integers(-10**7, 10**7), st.integers(0, 3), st.booleans())
def test_reward_accepts_every_spelling_of_the_number(n, zeros, commas):
    text = f"{n:,}" if commas else str(n)
    if zeros:
        text += "." + "0" * zeros
    assert gsm8k_reward([f"work ... #### {text}"], [f"#### {n}"]) == [1.0]
    assert gsm8k_reward([f"#### {n + 1}"], [f"#### {n}"]) == [0.0]


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=200))
def test_problem_reader_never_crashes(tmp_path_factory, data):
    from memcli.errors import MemcliError
    from memcli.hrpo.data import load_problems

    p = tmp_path_factory.mktemp("fuzz") / "g.jsonl"
    p.write_bytes(data)
    try:
        rows = load_problems(p)
        assert all(extract_answer(r["answer"]) is not None for r in rows)
    except MemcliError as e:
        assert "\n" not in str(e) and str(p) in str(e)


# --------------------------------------------------------------------------- the learnable thinking projection


def test_projection_is_initialised_normalised_and_grouped_as_documented(tiny, tmp_path):
    """thinking_source=projection: Linear(D, D, bias=False), normal init with std projection_init_std (0.001, the
    design's), the output L2-normalised (unit) or scaled to the embedding rows' mean norm (embedding); its own
    optimizer group at training.projection_lr. A config saved before these keys keeps 0.02 / sqrt(D) and embedding."""
    from memcli.config import load_config
    from memcli.training.hrpo import HrpoRecipe

    bb, _ = tiny
    D = bb.config.hidden_size
    torch.manual_seed(0)
    res = ThinkingResidual(HrpoConfig(hidden_size=D, thinking_source="projection", projection_init_std=0.001,
                                      projection_norm="unit"), 3.0)
    w = res.thinking_projection.weight
    assert res.thinking_projection.bias is None and tuple(w.shape) == (D, D)
    assert abs(float(w.std()) - 0.001) < 5e-5 and abs(float(w.mean())) < 2e-5  # 65,536 draws
    h = torch.randn(5, D)
    ref = h @ w.detach().T
    ref = ref / ref.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(res.project(h), ref)
    res.cfg.projection_norm = "embedding"
    torch.testing.assert_close(res.project(h), 3.0 * ref)
    legacy = ThinkingResidual(HrpoConfig(hidden_size=D, thinking_source="projection"), 1.0)
    assert legacy.cfg.projection_norm == "embedding"
    assert abs(float(legacy.thinking_projection.weight.std()) - 0.02 / math.sqrt(D)) < 0.05 * 0.02 / math.sqrt(D)
    # the optimizer group of the recipe, at the documented rate
    cfg = load_config("hrpo", overrides=[f"dataset.train_path={GSM / 'train.jsonl'}", "model.thinking_source=projection",
                                         f"logging.out_dir={tmp_path}"])
    assert cfg.model.projection_init_std == 0.001 and cfg.model.projection_norm.value == "unit"
    assert cfg.training.projection_lr == 1e-4
    recipe = HrpoRecipe(cfg)
    recipe.build_model()
    group = next(g for g in recipe.param_groups if g["name"] == "projection")
    assert group["lr"] == 1e-4 and group["params"] == [recipe.model.residual.thinking_projection.weight]
    assert recipe.model.residual.cfg.projection_norm == "unit"


def test_a_two_step_projection_run_moves_the_projection_and_logs_the_mix(tmp_path, cli):
    from memcli.config import backbone_spec, load_config
    from memcli.hrpo.io import load_hrpo
    from memcli.training.hrpo import build

    args = [f"dataset.train_path={GSM / 'train.jsonl'}", f"dataset.eval_path={GSM / 'test.jsonl'}",
            f"logging.out_dir={tmp_path}", "logging.run_name=proj", "model.thinking_source=projection",
            "training.max_steps=2", "training.group_size=2", "training.batch_size=2",
            "training.max_completion_length=8", "training.eval_num_samples=2", "training.final_eval_num_samples=2",
            "training.projection_lr=0.05", "logging.log_interval=1", "logging.tensorboard=false"]
    code, _, err = cli("train", "hrpo", *args)
    assert code == 0, err
    cfg = load_config("hrpo", overrides=args)
    start, _, _ = build(cfg, backbone_spec(cfg), cfg.model.finetuning_method.value)  # the same seed: the same init
    model, _, _ = load_hrpo(tmp_path / "proj")
    before = start.residual.thinking_projection.weight
    after = model.residual.thinking_projection.weight
    assert not torch.allclose(before, after) and torch.isfinite(after).all()
    rows = [json.loads(x) for x in (tmp_path / "proj" / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "hidden_share" in r and "gate_a" in r]
    assert len(logged) >= 2 and all(0 < r["hidden_share"] < 1 and 0 < r["gate_a"] < 1 for r in logged)


def test_greedy_decoding_of_a_projection_run_uses_the_projection(tiny):
    """Same backbone, same gates and Lambda: greedy hybrid decoding with the projection source gives other tokens than
    with the probs source (the thinking vector it mixes in is the projection's), and reproduces itself."""
    from memcli.hrpo.model import HrpoModel

    bb, tok = tiny
    ids, mask = _prompts(tok, ["Think: 1 2 3", "More words here"])
    out = {}
    for source in ("probs", "projection"):
        m = HrpoModel(bb, HrpoConfig(hidden_size=bb.config.hidden_size, thinking_source=source,
                                     projection_norm="embedding"))
        shared = _residual(bb, "probs")
        m.residual.load_state_dict({**m.residual.state_dict(), **shared.state_dict()})  # gates, Lambda, norm alike
        if source == "projection":
            torch.manual_seed(3)
            torch.nn.init.normal_(m.residual.thinking_projection.weight, std=0.05)
        out[source] = [m.generate(tok, ids, mask, 12).completion_ids for _ in range(2)]
    assert torch.equal(out["projection"][0], out["projection"][1])
    assert not torch.equal(out["projection"][0], out["probs"][0])
