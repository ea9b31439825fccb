"""Where a retrieved entry is written into the prompt (memcli/retrieval/placement.py): token ids checked against the
conversation the chat template renders with the entry typed there, for a template without a default system message
(the tiny one) and one with (SmolLM2's form); a cloze is read as a prefix; the run records its placement and an
older run opens with the prefix read it was measured with."""

import copy
import json

import pytest
import torch

# SmolLM2-Instruct's template in form: a default system message when none is given
SMOL_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
                 "<|im_end|>\n' }}{% endif %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
DEFAULT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ENTRY = "Velmora was born in Tarsk ."
QUESTION = "Where was Velmora born?"


@pytest.fixture(scope="module")
def toks():
    from memcli.backbone import load_tokenizer

    tiny = load_tokenizer("tiny")
    smol = copy.deepcopy(tiny)
    smol.chat_template = SMOL_TEMPLATE
    return {"tiny": tiny, "smol": smol}


def _chat(tok, msgs):
    return list(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False))


@pytest.mark.parametrize("name", ["tiny", "smol"])
def test_each_placement_is_the_conversation_with_the_entry_typed_there(toks, name):
    from memcli.retrieval.placement import encode, place

    tok = toks[name]
    q = _chat(tok, [{"role": "user", "content": QUESTION}])
    e = encode(tok, ENTRY)
    sep = encode(tok, "\n")
    system = f"{DEFAULT}.\n\n{ENTRY}" if name == "smol" else ENTRY
    want = {
        "user_before": _chat(tok, [{"role": "user", "content": f"{ENTRY}\n{QUESTION}"}]),
        "user_after": _chat(tok, [{"role": "user", "content": f"{QUESTION}\n{ENTRY}"}]),
        "system": _chat(tok, [{"role": "system", "content": system}, {"role": "user", "content": QUESTION}]),
        "prefix": e + sep + q,
    }
    for placement, ids in want.items():
        got = place(tok, q, [e], placement, sep)
        assert got == ids, placement
        # what follows the entry is the prompt's own end: logits taken from the right end stay aligned
        tail = q[q.index(encode(tok, QUESTION)[0]):] if placement != "user_after" else q[-3:]
        assert got[-len(tail):] == tail
    # the question itself is found again in the prompt (what the lexical and sentence scorers read)
    from memcli.retrieval.placement import question_text

    assert question_text(tok, q) == QUESTION
    assert question_text(tok, want["user_before"]) == f"{ENTRY}\n{QUESTION}"


def test_a_cloze_is_read_as_a_prefix_whatever_the_placement(toks):
    from memcli.retrieval.placement import PLACEMENTS, encode, place, question_text

    tok = toks["smol"]
    cloze, e, sep = encode(tok, "Velmora was born in"), encode(tok, ENTRY), encode(tok, "\n")
    for placement in PLACEMENTS:
        assert place(tok, cloze, [e], placement, sep) == e + sep + cloze
    assert place(tok, cloze, [], "user_after", sep) == cloze  # abstained: nothing placed
    assert question_text(tok, cloze) == "Velmora was born in"


def test_two_entries_are_read_in_order_and_a_multi_turn_chat_gets_them_in_its_last_turn(toks):
    from memcli.retrieval.placement import encode, place

    tok = toks["tiny"]
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": QUESTION}]
    other = "Tarsk is in Vel ."
    got = place(tok, _chat(tok, msgs), [encode(tok, ENTRY), encode(tok, other)], "user_before", [])
    assert got == _chat(tok, msgs[:2] + [{"role": "user", "content": f"{ENTRY}\n{other}\n{QUESTION}"}])


def test_the_prefix_read_through_the_model_and_the_placements(toks, default_data):
    """MemoryAugmentedLM.prefixed writes the chosen rows where the run's placement says, per row of a left-padded batch,
    and skips an abstained row (-1)."""
    from memcli.backbone import left_pad
    from memcli.explicit.io import build_model
    from memcli.retrieval.placement import place

    mem, tok, bank = build_model("tiny", default_data / "cache", default_data / "keys", read="prefix", query="mean",
                                 entry_key="hidden", memory_layers=[1], placement="user_before")
    qs = [_chat(tok, [{"role": "user", "content": QUESTION}]), _chat(tok, [{"role": "user", "content": "Who?"}])]
    ids, att = left_pad(qs, mem.cfg.pad_id)
    rows = torch.tensor([[3], [-1]])
    got, got_att = mem.prefixed(ids, att, rows)
    entry = [t for t in bank.token_ids[3].tolist() if t != mem.cfg.pad_id]
    want = [place(tok, qs[0], [entry], "user_before", mem.cfg.prefix_separator), qs[1]]
    for b in range(2):
        assert got[b][got_att[b].bool()].tolist() == want[b]
    assert bank.decode(tok, [3])[0] in tok.decode(want[0])


def test_a_run_records_its_placement_and_an_older_run_keeps_the_prefix_read(tmp_path, default_data, cli):
    from memcli.explicit.io import load_memory

    code, _, err = cli("train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                       "model.entry_key=hidden", "model.query=mean", "model.read=prefix", "dataset.answer_format=cloze",
                       "model.finetuning_method=frozen", "training.max_steps=1", "training.eval_interval=0",
                       "training.final_eval_num_samples=4", "logging.tensorboard=false", "model.placement=system")
    assert code == 0, err
    run = tmp_path / "memory"
    cfg_file = run / "memory" / "memory_config.json"
    assert json.loads(cfg_file.read_text())["placement"] == "system"
    mem, tok, _, _ = load_memory(run)
    assert mem.cfg.placement == "system" and mem.tok is tok
    old = json.loads(cfg_file.read_text())
    del old["placement"]  # as release 3 wrote it
    cfg_file.write_text(json.dumps(old))
    mem, _, _, _ = load_memory(run)
    assert mem.cfg.placement == "prefix"
    old["placement"] = "sideways"
    cfg_file.write_text(json.dumps(old))
    code, _, err = cli("chat", "-m", run, "--prompt", QUESTION)
    from conftest import assert_one_line_error

    assert_one_line_error(code, err, "memory_config.json: placement 'sideways'", "prefix, system, user_before, user_after")
