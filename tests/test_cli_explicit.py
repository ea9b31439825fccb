"""CLI paths of the explicit memory: a short training run, inspect-memory on its checkpoint, bench harness."""

import json

import pytest
import torch

from conftest import assert_one_line_error


@pytest.fixture(scope="module")
def short_run(default_data, tmp_path_factory):
    from conftest import run_cli

    out = tmp_path_factory.mktemp("runs")
    code, _, _ = run_cli(["train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={out}",
                          "training.max_steps=4", "training.batch_size=8", "training.eval_num_samples=10",
                          "model.memory_layers=[1,3]", "logging.tensorboard=false"])
    assert code == 0
    return out


def test_train_memory_writes_checkpoint_and_metrics(short_run):
    run = short_run / "memory"
    assert (run / "checkpoint.json").is_file() and (run / "config.yaml").is_file()
    info = json.loads((run / "checkpoint.json").read_text())
    assert info["kind"] == "explicit-memory" and info["step"] == 4 and info["finetuning_method"] == "full"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4]
    assert (run / "states" / "latest.json").is_file()
    assert (run / "backbone" / "config.json").is_file()  # tiny trained in full: weights saved
    assert info["s_per_step"] > 0 and info["peak_rss_mb"] > 0


def test_inspect_memory_on_trained_checkpoint(cli, short_run):
    code, out, err = cli("inspect-memory", "--out-dir", short_run, "--rows", "0:3", "--json")
    assert code == 0, err
    rows = json.loads(out)
    assert [r["row"] for r in rows] == [0, 1, 2] and all(r["text"].endswith(".") for r in rows)
    code, out, _ = cli("inspect-memory", "--out-dir", short_run, "--stats", "--json")
    s = json.loads(out)
    assert s["entries"] == 1024 and 0 < s["coverage"] <= 1 and s["total_weight"] > 0  # training recorded usage
    code, out, _ = cli("inspect-memory", "--out-dir", short_run, "--query", "Where was Velmora born?", "--json",
                       "--top", "2")
    q = json.loads(out)
    assert {r["layer"] for r in q} == {1, 3} and all(len(r["entries"]) == 2 for r in q)
    code, out, _ = cli("inspect-memory", "--out-dir", short_run, "--search", "born in", "--json")
    assert code == 0 and all("born in" in r["text"] for r in json.loads(out))


def test_inspect_memory_edit_persists(cli, short_run, tmp_path):
    import shutil

    ck = tmp_path / "ck"
    shutil.copytree(short_run / "memory", ck)
    code, out, err = cli("inspect-memory", "-c", ck, "--edit", "7=Velmora was born in Tarsk .", "--json")
    assert code == 0, err
    r = json.loads(out)
    assert r["after"] == "Velmora was born in Tarsk ." and r["before"] != r["after"]
    code, out, _ = cli("inspect-memory", "-c", ck, "--rows", "7:8", "--json")
    assert json.loads(out)[0]["text"] == "Velmora was born in Tarsk ."


@pytest.mark.parametrize("args,needle", [
    (["inspect-memory", "-c", "{missing}"], "not found"),
    (["inspect-memory", "-c", "{tmp}"], "checkpoint.json"),
    (["inspect-memory", "--out-dir", "{tmp}"], "no explicit-memory run found"),
    (["train", "memory", "training.learnin_rate=1"], "did you mean 'training.learning_rate'"),
    (["train", "memory", "training.batch_size=big"], "training.batch_size"),
    (["train", "fusion", "dataset.data_dir={data}", "logging.out_dir={tmp}"], "pretrained_router_path"),
])
def test_bad_input(cli, tmp_path, default_data, args, needle):
    paths = {"missing": tmp_path / "nope", "tmp": tmp_path, "data": default_data}
    assert_one_line_error(*cli(*[a.format(**paths) for a in args])[::2], needle)


def test_print_config(cli):
    code, out, _ = cli("train", "memory", "training.epochs=7", "--print-config")
    assert code == 0 and "epochs: 7" in out and "qwen3_model_path: null" in out


def test_router_then_fusion_chain_strictly(cli, default_data, tmp_path):
    common = [f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}", "training.max_steps=2",
              "training.batch_size=8", "training.eval_num_samples=5", "training.final_eval_num_samples=5",
              "logging.tensorboard=false"]
    assert cli("train", "router", *common)[0] == 0
    assert (tmp_path / "router" / "router" / "router.safetensors").is_file()
    code, _, err = cli("train", "fusion", *common, f"dataset.pretrained_router_path={tmp_path / 'router'}")
    assert code == 0, err
    # the fusion stage kept the router's gate exactly (frozen, loaded strictly)
    from memcli.checkpoint import load_tensors

    r = load_tensors(tmp_path / "router" / "router" / "router.safetensors")
    f = load_tensors(tmp_path / "fusion" / "memory" / "memory.safetensors")
    import torch

    assert torch.equal(r["1.query.weight"], f["gates.1.query.weight"])
    # a router for other memory layers does not load
    code, _, err = cli("train", "fusion", *common, "model.memory_layers=[0]",
                       f"dataset.pretrained_router_path={tmp_path / 'router'}")
    assert_one_line_error(code, err, "memory layers")
    # the whole chain: router -> fusion -> memory, the fusion stage's weights loaded strictly as the start of memory's
    code, _, err = cli("train", "memory", *common, "training.max_steps=1", "training.learning_rate=1e-12",
                       f"dataset.pretrained_router_path={tmp_path / 'router'}",
                       f"dataset.pretrained_fusion_path={tmp_path / 'fusion'}")
    assert code == 0, err
    m = load_tensors(tmp_path / "memory" / "memory" / "memory.safetensors")
    fz = {k: v for k, v in f.items() if k.startswith("fusions.")}
    assert fz and all(torch.allclose(v, m[k], atol=1e-6) for k, v in fz.items())  # one tiny step away from fusion's
    code, _, err = cli("train", "memory", *common, f"dataset.pretrained_fusion_path={tmp_path / 'router'}")
    assert_one_line_error(code, err, "'router' run", "train fusion")


def test_bench_harness_quick(cli):
    code, out, err = cli("compare", "bench", "--quick", "--json")
    assert code == 0, err
    rows = json.loads(out)
    names = {r["bench"] for r in rows}
    assert {"product-key top-k", "memory read", "EMA update"} <= names
    pk = [r for r in rows if r["bench"] == "product-key top-k"]
    assert "identical to exact: True" in pk[0]["note"]
    gen = [r for r in rows if r["bench"].startswith("generate")]
    assert "same tokens: True" in gen[0]["note"]


def test_frozen_backbone_from_local_hf_directory(cli, default_data, tmp_path):
    """A real HF directory as model.qwen3_model_path: backbone frozen, only memory trains."""
    import torch

    from memcli.backbone import load_backbone

    model, tok = load_backbone("tiny")
    hf = tmp_path / "qwen3-local"
    model.save_pretrained(hf)
    tok.save_pretrained(hf)
    code, _, err = cli("train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                       f"model.qwen3_model_path={hf}", "model.memory_layers=[1]", "training.max_steps=2", "training.batch_size=4",
                       "training.eval_num_samples=4", "logging.tensorboard=false")
    assert code == 0, err
    info = json.loads((tmp_path / "memory" / "checkpoint.json").read_text())
    assert info["finetuning_method"] == "frozen"
    assert not (tmp_path / "memory" / "backbone").exists()  # memory saved apart, like an adapter
    from memcli.explicit.io import load_memory

    mem, _, _, _ = load_memory(tmp_path / "memory")
    base, _ = load_backbone(str(hf))
    for (n, p), (_, q) in zip(mem.backbone.named_parameters(), base.named_parameters()):
        assert torch.equal(p, q), n


def test_chat_prompt_and_piped_stdin(short_run, monkeypatch, capsys):
    import io

    from conftest import run_cli

    code, out, err = run_cli(["chat", "--out-dir", short_run, "--prompt", "Where was Velmora born?", "--json",
                              "--max-new-tokens", "5"], capsys)
    assert code == 0, err
    r = json.loads(out)
    assert r["prompt"] == "Where was Velmora born?" and isinstance(r["answer"], str)
    assert len(r["memory"]) == 5 and abs(sum(m["share"] for m in r["memory"])) <= 1.0 + 1e-6
    # piped: two turns, the memory view, reset, unknown command; exits 0 at end of input
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello\n/memory\nWhere was Velmora born?\n/reset\n/bogus\n"))
    code, out, err = run_cli(["chat", "--out-dir", short_run, "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    assert "memory read for the last answer" in out and "history cleared" in out and "unknown command /bogus" in out
    # the seed's loop ends on the bare words too: nothing after 'exit' / 'quit' is read
    for word in ("exit", "quit"):
        monkeypatch.setattr("sys.stdin", io.StringIO(f"Hello\n{word}\n/bogus\n"))
        code, out, err = run_cli(["chat", "--out-dir", short_run, "--max-new-tokens", "2"], capsys)
        assert code == 0, err
        assert "unknown command /bogus" not in out


def test_chat_history_and_greedy_determinism(short_run):
    from memcli.chat import GenOptions, open_session

    s1, _ = open_session(short_run / "memory", "memory", GenOptions(max_new_tokens=6))
    s2, _ = open_session(short_run / "memory", "memory", GenOptions(max_new_tokens=6))
    a = s1.reply("What does Velmora work as?")
    assert a == s2.reply("What does Velmora work as?")
    s1.reply("And where?")
    assert [m["role"] for m in s1.history] == ["user", "assistant", "user", "assistant"]
    s1.reset()
    assert s1.history == []


@pytest.mark.parametrize("args,needle", [
    (["chat", "--model-type", "lora", "--out-dir", "{run}", "--prompt", "hi"], "no LoRA adapter"),
    (["chat", "--model-type", "hippo", "--out-dir", "{run}", "--prompt", "hi"], "memcli train hippo"),
    (["chat", "--out-dir", "{run}", "--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["chat", "--model-path", "{run}/nope", "--prompt", "hi"], "not found"),
    (["chat", "--out-dir", "{run}", "--prompt", "hi", "--encoder", "{run}"], "--encoder keep a dialog memory"),
])
def test_chat_bad_input(cli, short_run, args, needle):
    assert_one_line_error(*cli(*[a.format(run=short_run) for a in args])[::2], needle)


def test_lora_run_saves_adapter_and_chats(cli, default_data, tmp_path):
    from memcli.checkpoint import load_tensors
    from memcli.explicit.io import load_memory

    code, _, err = cli("train", "memory", f"dataset.data_dir={default_data}", f"logging.out_dir={tmp_path}",
                       "model.finetuning_method=lora", "training.max_steps=3", "training.batch_size=8",
                       "training.eval_interval=0", "training.final_eval_num_samples=4", "logging.tensorboard=false")
    assert code == 0, err
    ck = tmp_path / "memory"
    assert not (ck / "backbone").exists()  # base weights are not duplicated, only the adapter
    adapter = load_tensors(ck / "lora" / "adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: it trained
    mem, tok, _, info = load_memory(ck)
    assert info["finetuning_method"] == "lora" and "backbone_checksum" in info
    ids = tok("Where was Velmora born?", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        with_adapter = mem(input_ids=ids).logits
        with mem.backbone.disable_adapter():
            without = mem(input_ids=ids).logits
    assert not torch.allclose(with_adapter, without)  # the adapter is applied on reload
    code, out, err = cli("chat", "--model-path", ck, "--model-type", "lora", "--prompt", "Where was Velmora born?",
                         "--max-new-tokens", "8", "--json")
    assert code == 0, err
    r = json.loads(out)  # three steps in, the answer may be empty; the memory read must be there
    assert isinstance(r["answer"], str) and r["memory"] and all(e["text"] for e in r["memory"])
    code, _, err = cli("chat", "--model-path", ck, "--model-type", "full", "--prompt", "hi")
    assert_one_line_error(code, err, "lora")
    # a checkpoint whose base cannot be rebuilt exactly is refused, not silently mixed with other weights
    info_path = ck / "checkpoint.json"
    bad = json.loads(info_path.read_text())
    bad["backbone_checksum"] += 1.0
    info_path.write_text(json.dumps(bad))
    code, _, err = cli("inspect-memory", "-c", ck, "--stats")
    assert_one_line_error(code, err, "checksum")


def test_stages_chain_on_trex_slice(cli, tmp_path):
    """Real data: the T-REx slice through the whole pipeline, then router -> fusion and router -> memory."""
    from conftest import FIXTURES
    from memcli.checkpoint import load_tensors

    data = tmp_path / "trex"
    code, out, err = cli("gen-data", "default", "--trex", FIXTURES / "trex", "-n", "100", "-l", "24", "--out", data,
                         "--json")
    assert code == 0, err
    res = json.loads(out)
    assert res["gen-data"]["source"] == "trex" and res["build-cache"]["knowledge_length"] == 24
    common = [f"dataset.data_dir={data}", f"logging.out_dir={tmp_path}", "training.max_steps=3",
              "training.batch_size=8", "training.eval_interval=0", "training.final_eval_num_samples=8",
              "logging.tensorboard=false"]
    code, out, err = cli("train", "router", *common, "--json")
    assert code == 0, err
    assert any(k.startswith("recall@") for k in json.loads(out))  # recall on the held-out labels is reported
    router = load_tensors(tmp_path / "router" / "router" / "router.safetensors")
    for stage in ("fusion", "memory"):
        code, out, err = cli("train", stage, *common, f"dataset.pretrained_router_path={tmp_path / 'router'}", "--json")
        assert code == 0, err
        s = json.loads(out)
        assert {"heldout_memory_on", "heldout_memory_off", "edit_success"} <= set(s)
        mem = load_tensors(tmp_path / stage / "memory" / "memory.safetensors")
        if stage == "fusion":  # gate frozen: exactly the router's
            assert all(torch.equal(v, mem[f"gates.{k}"]) for k, v in router.items())
    info = json.loads((tmp_path / "memory" / "checkpoint.json").read_text())
    assert info["stage"] == "memory" and info["step"] == 3


def test_inspect_eval_reproduces_end_of_training_numbers(cli, short_run, default_data):
    code, out, err = cli("inspect-memory", "--out-dir", short_run, "--eval", default_data, "--json")
    assert code == 0, err
    got = json.loads(out)
    recorded = json.loads((short_run / "memory" / "checkpoint.json").read_text())["eval"]
    assert {"heldout_memory_on", "heldout_memory_off", "edit_success", "heldout_in_context", "cloze_edit_success"} <= set(got)
    shared = set(recorded) & set(got)
    assert len(shared) >= 10
    for k in shared:  # same run, same data: the numbers printed at the end of training
        assert got[k] == pytest.approx(recorded[k], abs=1e-9), k
    code, _, err = cli("inspect-memory", "--out-dir", short_run, "--eval", default_data / "nope")
    assert_one_line_error(code, err, "omcq_val.json")
