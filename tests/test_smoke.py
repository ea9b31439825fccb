"""The drift check's subset (``pytest -m smoke``; ``.ci/drift`` runs it on the newest versions pyproject.toml allows,
without the lock): every backbone kind loads and generates, every run kind trains, saves and opens, and every
command runs its smoke path. Each step is small (a few optimizer steps on the tiny default); what it asserts is
what a dependency's change breaks first: loading, generation with the KV cache, saving and reopening runs, and
each command exiting 0 with its output."""

import json
import shutil

import pytest
import torch

from conftest import FIXTURES

pytestmark = pytest.mark.smoke

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
             head_dim=16, max_position_embeddings=256, tie_word_embeddings=True)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
EXTRA = {"qwen3_moe": MOE, "qwen2_moe": dict(MOE, shared_expert_intermediate_size=32), "mistral": {"sliding_window": None}}


@pytest.mark.parametrize("model_type", ["qwen3", "qwen2", "qwen3_moe", "qwen2_moe", "llama", "mistral"])
def test_every_backbone_kind_loads_and_generates_with_the_kv_cache(model_type, tmp_path):
    """A random model of each supported family saved as an HF directory, loaded by memcli's spec, and greedy
    generation with the KV cache equal to recomputing the whole sequence for every token."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from memcli.backbone import SUPPORTED_TYPES, load_backbone, load_tokenizer

    assert model_type in SUPPORTED_TYPES
    tok = load_tokenizer("tiny")
    cfg = AutoConfig.for_model(model_type, vocab_size=len(tok), **SMALL, **EXTRA.get(model_type, {}))
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model, tok = load_backbone(str(tmp_path))
    assert model.config.model_type == model_type
    ids = torch.tensor([tok("Velmora was born in", add_special_tokens=False)["input_ids"]])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False, use_cache=True,
                         pad_token_id=tok.pad_token_id)
    seq = ids
    with torch.no_grad():
        for _ in range(5):
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out, seq)


def test_the_tiny_default_and_a_gguf_file_load(tmp_path):
    from gguf_util import write_tiny_gguf

    from memcli.backbone import load_backbone

    model, tok = load_backbone("tiny")
    assert model.config.model_type == "qwen3" and tok.chat_template
    ref = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, _ = load_backbone(str(tmp_path / "tiny.gguf"))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The data commands, then a run of every kind (two steps each): the directory they all live in."""
    from conftest import run_cli

    w = tmp_path_factory.mktemp("smoke")

    def ok(*args):
        code, out, err = run_cli([str(a) for a in args])
        assert code == 0, f"memcli {' '.join(map(str, args))}: {err}"
        return out

    ok("gen-data", "knowledge", "--out", w / "kb", "-n", 64)
    ok("convert-omcq", "-i", w / "kb" / "omcq_train.json", "-o", w / "kb" / "sft.jsonl")
    ok("build-cache", "-k", w / "kb" / "sentence_trex_data.json", "-o", w / "kb" / "cache")
    ok("build-keys", "-c", w / "kb" / "cache", "-o", w / "kb" / "keys", "--sft", w / "kb" / "sft.jsonl")
    ok("gen-data", "default", "--out", w / "data", "-n", 64)
    ok("gen-data", "dialog", "--out", w / "dialog", "--num-train", 16, "--num-val", 4)
    common = [f"dataset.data_dir={w / 'data'}", f"logging.out_dir={w / 'out'}", "training.max_steps=2",
              "training.batch_size=4", "training.eval_interval=0", "training.final_eval_num_samples=4",
              "logging.tensorboard=false"]
    ok("train", "router", *common)
    ok("train", "fusion", *common, f"dataset.pretrained_router_path={w / 'out' / 'router'}")
    ok("train", "memory", *common)
    ok("train", "memory", *common, "model.entry_key=hidden", "model.query=mean", "model.read=prefix",
       "dataset.answer_format=cloze", "model.finetuning_method=frozen", "logging.run_name=cloze")
    ok("train", "hippo", f"dataset.data_dir={w / 'dialog'}", f"logging.out_dir={w / 'out'}", "training.batch_size=4",
       "training.epochs=2", "training.stage1_epochs=1", "training.eval_num_samples=2", "logging.tensorboard=false")
    gsm = FIXTURES / "gsm8k"
    ok("train", "hrpo", f"dataset.train_path={gsm / 'train.jsonl'}", f"dataset.eval_path={gsm / 'test.jsonl'}",
       f"logging.out_dir={w / 'out'}", "training.max_steps=1", "training.group_size=2", "training.batch_size=2",
       "training.max_completion_length=6", "training.eval_num_samples=2", "training.final_eval_num_samples=2",
       "logging.tensorboard=false")
    return w


def test_every_run_kind_opens_through_the_one_loader(work):
    from memcli import kinds
    from memcli.runs import load_run

    seen = set()
    for name in ("router", "fusion", "memory", "cloze", "hippo", "hrpo"):
        run = load_run(work / "out" / name)
        seen.add(run.kind)
        assert run.model is not None and run.tok is not None
    assert seen == set(kinds.KINDS)


@pytest.mark.parametrize("args", [
    ["doctor", "--json"],
    ["download", "--list", "--json"],
    ["chat", "-m", "{out}/memory", "--prompt", "Where was Velmora born?", "--max-new-tokens", "4"],
    ["chat", "-m", "{out}/cloze", "--prompt", "Velmora was born in", "--max-new-tokens", "4"],
    ["chat", "-m", "{out}/hippo", "-t", "hippo", "--prompt", "My dog is called Pepper.", "--max-new-tokens", "4"],
    ["chat", "-m", "{out}/hrpo", "-t", "hrpo", "--prompt", "What is 2 + 3?", "--max-new-tokens", "6"],
    ["inspect-memory", "-m", "{out}/memory", "--rows", "0:3", "--json"],
    ["inspect-memory", "-m", "{out}/memory", "--query", "Where was Velmora born?", "--json"],
    ["inspect-memory", "-m", "{out}/memory", "--stats", "--json"],
    ["inspect-memory", "-m", "{out}/memory", "--eval", "{w}/data", "--eval-samples", "4", "--json"],
    ["memory", "list", "-m", "{out}/memory", "--json"],
    ["compare", "checkpoints", "{out}/memory", "{out}/fusion", "--data", "{w}/data", "--num-samples", "4", "--json"],
    ["compare", "runs", "{out}/router", "{out}/memory", "--json"],
    ["compare", "editing", "-m", "{out}/cloze", "--edits", "2", "--num-samples", "2", "--json"],
    ["compare", "formats", "-m", "{out}/cloze", "--num-samples", "2", "--json"],
    ["compare", "hippo", "-m", "{out}/hippo", "--data", "{w}/dialog/data_val.jsonl", "--turns", "2", "--repeats", "1",
     "--json"],
    ["compare", "locomo", "--data", "{locomo}", "--backbone", "tiny", "--max-questions", "2", "--setups", "none,turns",
     "--max-new-tokens", "4", "--json"],
    ["compare", "bench", "--quick", "--suite", "explicit", "--json"],
])
def test_every_command_runs_its_smoke_path(work, cli, args):
    fill = {"out": work / "out", "w": work, "locomo": FIXTURES / "locomo" / "excerpt.json"}
    code, out, err = cli(*[a.format(**fill) for a in args])
    assert code == 0, err
    if "--json" in args:
        assert json.loads(out) is not None


def test_the_bank_commands_change_a_copy_of_a_run(work, cli, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(work / "out" / "cloze", run)
    facts = tmp_path / "facts.jsonl"
    facts.write_text(json.dumps({"text": "Zed Alpha was born in Lisbon .", "subject": "Zed Alpha", "object": "Lisbon"})
                     + "\n")
    for args in (["memory", "add", "-m", run, "--from", facts], ["memory", "list", "-m", run, "--search", "Zed Alpha",
                                                                 "--json"]):
        code, out, err = cli(*args)
        assert code == 0, err
    (hit,) = json.loads(out)
    fixed = tmp_path / "fixed.jsonl"
    fixed.write_text(json.dumps({"uuid": hit["uuid"], "text": "Zed Alpha was born in Porto ."}) + "\n")
    for args in (["memory", "replace", "-m", run, "--from", fixed], ["memory", "remove", "-m", run, "--uuid", hit["uuid"]],
                 ["memory", "index", "-m", run], ["inspect-memory", "-m", run, "--edit", "0=Velmora was born in Tarsk ."]):
        code, _, err = cli(*args)
        assert code == 0, err
