"""A corpus of malformed inputs run against every command.

Each case must end with exit code 2 and exactly one stderr line that names the file, line or key and
what was expected, with no traceback; and no file that existed before the command (inputs, earlier
outputs, runs) may change, appear or vanish. Static corpus files live in tests/corpus/; tensors and
runs that need a real checkpoint are derived at test time from one tiny workspace.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import assert_one_line_error, run_cli
from memcli.checkpoint import load_tensors, save_tensors

CORPUS = Path(__file__).parent / "corpus"
GSM = Path(__file__).parent / "fixtures" / "gsm8k"
TINY_TRAIN = ["training.eval_num_samples=4", "training.final_eval_num_samples=4", "logging.tensorboard=false"]


@pytest.fixture(scope="module")
def ws(default_data, tmp_path_factory):
    """Default data, one dialog set and a tiny run of each kind (explicit memory, HIPPO, HRPO)."""
    from memcli.data.pipeline import gen_dialog

    root = tmp_path_factory.mktemp("ws")
    data = root / "data"
    shutil.copytree(default_data, data)
    gen_dialog(root / "dialog", seed=0, num_train=16, num_val=4, turns=3, min_distance=1)
    runs = root / "runs"
    for argv in (
        ["train", "memory", f"dataset.data_dir={data}", "training.max_steps=2", "training.batch_size=4"],
        ["train", "hippo", f"dataset.data_dir={root / 'dialog'}", "training.max_steps=2", "training.batch_size=4",
         "training.stage1_epochs=0"],
        ["train", "hrpo", f"dataset.train_path={GSM / 'train.jsonl'}", f"dataset.eval_path={GSM / 'test.jsonl'}",
         "training.max_steps=1", "training.group_size=2", "training.batch_size=2",
         "training.max_completion_length=4"],
    ):
        code, _, err = run_cli([*argv, f"logging.out_dir={runs}", *TINY_TRAIN])
        assert code == 0, err
    return SimpleNamespace(root=root, data=data, dialog=root / "dialog", runs=runs, memory=runs / "memory",
                           hippo=runs / "hippo", hrpo=runs / "hrpo")


def _digest(*roots: Path) -> dict[str, str]:
    out = {}
    for r in roots:
        for p in sorted(r.rglob("*")):
            if p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


# ------------------------------------------------------------------ helpers that derive broken inputs


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    return dst


def _retensor(path: Path, fn) -> None:
    t = load_tensors(path, check_finite=False)
    save_tensors(path, fn(t))


def _data_with(w, tmp: Path, fn) -> Path:
    d = _copy(w.data, tmp / "data")
    fn(d)
    return d


def _memory_run_with(w, tmp: Path, fn) -> Path:
    r = _copy(w.memory, tmp / "run")
    fn(r)
    return r


def _nan(key):
    def f(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")
        return t
    return f


def _edit_json(path: Path, **changes) -> None:
    obj = json.loads(path.read_text())
    obj.update(changes)
    path.write_text(json.dumps(obj))


def _huge_line(tmp: Path) -> Path:
    from memcli.records import MAX_LINE_BYTES

    p = tmp / "huge.jsonl"
    with open(p, "wb") as f:
        f.write(b'{"question": "' + b"x" * (MAX_LINE_BYTES + 10) + b'", "answer": "#### 1"}\n')
    return p


# ------------------------------------------------------------------ the corpus: (id, argv builder, needles)
# argv builders take (workspace, tmp_path) and may write derived broken inputs into tmp_path first.

CASES = [
    # --- convert-omcq: JSON files
    ("omcq-broken-json", lambda w, t: ["convert-omcq", "-i", CORPUS / "omcq_broken.json", "-o", t / "o.jsonl"],
     ["omcq_broken.json:4:", "invalid JSON"]),
    ("omcq-wrong-type", lambda w, t: ["convert-omcq", "-i", CORPUS / "omcq_wrong_type.json", "-o", t / "o.jsonl"],
     ["omcq_wrong_type.json: item 1: target[0]: field 'question' is int, expected a string"]),
    ("omcq-missing-field", lambda w, t: ["convert-omcq", "-i", CORPUS / "omcq_missing_field.json", "-o", t / "o.jsonl"],
     ["item 0: target[0]: missing field 'correct_answer'"]),
    ("omcq-empty", lambda w, t: ["convert-omcq", "-i", CORPUS / "empty.json", "-o", t / "o.jsonl"],
     ["empty.json: empty file"]),
    ("omcq-latin1", lambda w, t: ["convert-omcq", "-i", CORPUS / "omcq_latin1.json", "-o", t / "o.jsonl"],
     ["omcq_latin1.json: not UTF-8"]),
    ("omcq-not-list", lambda w, t: ["convert-omcq", "-i", CORPUS / "object.json", "-o", t / "o.jsonl"],
     ["object.json: top level is dict, expected a JSON list"]),
    ("omcq-input-dir", lambda w, t: ["convert-omcq", "-i", CORPUS, "-o", t / "o.jsonl"], ["found a directory"]),
    ("omcq-input-missing", lambda w, t: ["convert-omcq", "-i", t / "nope.json", "-o", t / "o.jsonl"],
     ["nope.json", "not found"]),
    ("omcq-output-dir", lambda w, t: ["convert-omcq", "-i", w.data / "omcq_train.json", "-o", w.data],
     ["directory"]),
    # --- build-cache
    ("cache-missing-sentence", lambda w, t: ["build-cache", "-k", CORPUS / "knowledge_missing_sentence.json",
                                             "-o", t / "c"], ["item 2: target[0]: missing field 'sentence'"]),
    ("cache-wrong-encoding", lambda w, t: ["build-cache", "-k", CORPUS / "omcq_latin1.json", "-o", t / "c"],
     ["not UTF-8"]),
    ("cache-non-square", lambda w, t: ["build-cache", "-k", w.data / "sentence_trex_data.json", "-o", t / "c",
                                       "--knowledge-num", "1000"], ["1000", "perfect square"]),
    ("cache-tokenizer-missing", lambda w, t: ["build-cache", "-k", w.data / "sentence_trex_data.json", "-o", t / "c",
                                              "--tokenizer", t / "no_tok"], ["no_tok"]),
    ("cache-out-is-file", lambda w, t: ["build-cache", "-k", w.data / "sentence_trex_data.json",
                                        "-o", w.data / "sft_train.jsonl"], ["sft_train.jsonl", "expected an output directory"]),
    # --- build-keys
    ("keys-bank-float", lambda w, t: ["build-keys", "-c", _data_with(w, t, lambda d: _retensor(
        d / "cache" / "memory_bank.safetensors", lambda x: {"token_ids": x["token_ids"].float()})) / "cache",
        "-o", t / "k"], ["memory_bank.safetensors", "token_ids", "integer"]),
    ("keys-bank-1d", lambda w, t: ["build-keys", "-c", _data_with(w, t, lambda d: _retensor(
        d / "cache" / "memory_bank.safetensors", lambda x: {"token_ids": x["token_ids"].flatten()})) / "cache",
        "-o", t / "k"], ["memory_bank.safetensors", "token_ids", "shape"]),
    ("keys-meta-mismatch", lambda w, t: ["build-keys", "-c", _data_with(w, t, lambda d: _edit_json(
        d / "cache" / "meta.json", knowledge_num=4096)) / "cache", "-o", t / "k"], ["4096", "1024"]),
    ("keys-no-meta", lambda w, t: ["build-keys", "-c", _data_with(w, t, lambda d: (d / "cache" / "meta.json").unlink())
                                   / "cache", "-o", t / "k"], ["meta.json", "not found"]),
    ("keys-sft-broken", lambda w, t: ["build-keys", "-c", w.data / "cache", "-o", t / "k",
                                      "--sft", CORPUS / "sft_broken.jsonl"], ["sft_broken.jsonl:3:", "invalid JSON"]),
    ("keys-sft-bad-role", lambda w, t: ["build-keys", "-c", w.data / "cache", "-o", t / "k",
                                        "--sft", CORPUS / "sft_bad_role.jsonl"],
     ["sft_bad_role.jsonl:2: conversations[0]: role 'bot'"]),
    # --- gen-data
    ("gen-trex-missing", lambda w, t: ["gen-data", "knowledge", "--trex", t / "no_trex", "--out", t / "g"],
     ["no_trex", "not found"]),
    ("gen-trex-broken", lambda w, t: ["gen-data", "knowledge", "--trex", CORPUS / "trex_broken", "--out", t / "g"],
     ["P19.jsonl:2:", "invalid JSON"]),
    ("gen-dialog-bad-turns", lambda w, t: ["gen-data", "dialog", "--out", t / "g", "--turns", "4",
                                           "--min-distance", "9"], ["--min-distance"]),
    # --- train: config keys and files
    ("train-mistyped-key", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}", "training.learnig_rate=1"],
     ["unknown key 'training.learnig_rate'", "training.learning_rate"]),
    ("train-wrong-type", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}", "training.batch_size=eight"],
     ["training.batch_size", "'eight'"]),
    ("train-not-key-value", lambda w, t: ["train", "hippo", "training.batch_size"], ["expected key=value"]),
    ("train-yaml-broken", lambda w, t: ["train", "memory", "--config", CORPUS / "broken.yaml"], ["broken.yaml"]),
    ("train-yaml-unknown-key", lambda w, t: ["train", "memory", "--config", CORPUS / "unknown_key.yaml"],
     ["unknown_key.yaml", "training.bach_size"]),
    ("train-yaml-not-mapping", lambda w, t: ["train", "memory", "--config", CORPUS / "list.yaml"],
     ["list.yaml", "mapping"]),
    ("train-data-dir-missing", lambda w, t: ["train", "memory", f"dataset.data_dir={t / 'nodata'}",
                                             f"logging.out_dir={t / 'o'}"], ["dataset.data_dir", "nodata", "gen-data default"]),
    ("train-data-dir-is-file", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data / 'sft_train.jsonl'}",
                                             f"logging.out_dir={t / 'o'}"], ["dataset.data_dir", "sft_train.jsonl", "found a file"]),
    ("train-keys-nan", lambda w, t: ["train", "memory", f"dataset.data_dir={_data_with(w, t, lambda d: _retensor(d / 'keys' / 'keys.safetensors', _nan('keys')))}",
                                     f"logging.out_dir={t / 'o'}"], ["keys.safetensors", "'keys'", "NaN"]),
    ("train-keys-shape", lambda w, t: ["train", "memory", f"dataset.data_dir={_data_with(w, t, lambda d: _retensor(d / 'keys' / 'keys.safetensors', lambda x: dict(x, keys=x['keys'][:, :16])))}",
                                       f"logging.out_dir={t / 'o'}"], ["keys", "16 x 16 cells", "1024 entries"]),
    ("train-keys-bank-mismatch", lambda w, t: ["train", "memory", f"dataset.data_dir={_data_with(w, t, lambda d: _edit_json(d / 'keys' / 'meta.json', index_id='another-cache'))}",
                                               f"logging.out_dir={t / 'o'}"], ["keys", "another row order", "build-keys"]),
    ("train-bank-tokenizer-mismatch", lambda w, t: ["train", "memory", f"dataset.data_dir={_data_with(w, t, lambda d: _edit_json(d / 'cache' / 'meta.json', tokenizer_fingerprint='0123456789abcdef'))}",
                                                    f"logging.out_dir={t / 'o'}"], ["meta.json", "0123456789abcdef", "build-cache --tokenizer"]),
    ("train-bank-ids-out-of-vocab", lambda w, t: ["train", "memory", f"dataset.data_dir={_data_with(w, t, lambda d: _retensor(d / 'cache' / 'memory_bank.safetensors', lambda x: {'token_ids': x['token_ids'] + 100000}))}",
                                                  f"logging.out_dir={t / 'o'}"], ["memory_bank.safetensors", "outside [0, 8192)"]),
    ("train-non-square", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}", "model.knowledge_num=1000",
                                       f"logging.out_dir={t / 'o'}"], ["model.knowledge_num", "1000", "perfect square"]),
    ("train-knowledge-num-mismatch", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}", "model.knowledge_num=4096",
                                                   f"logging.out_dir={t / 'o'}"], ["model.knowledge_num", "4096", "1024"]),
    ("train-labels-out-of-range", lambda w, t: ["train", "router", f"dataset.data_dir={w.data}",
                                                f"dataset.sft_dataset_path={CORPUS / 'sft_two.jsonl'}",
                                                f"dataset.labeled_path={CORPUS / 'labeled_out_of_range.jsonl'}",
                                                f"logging.out_dir={t / 'o'}"],
     ["labeled_out_of_range.jsonl:2:", "target index 5000 outside the bank [0, 1024)"]),
    ("train-sft-wrong-type", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}",
                                           f"dataset.sft_dataset_path={CORPUS / 'sft_wrong_type.jsonl'}",
                                           f"logging.out_dir={t / 'o'}"],
     ["sft_wrong_type.jsonl:1: conversations[1]: field 'content' is list, expected a string"]),
    ("train-router-of-other-kind", lambda w, t: ["train", "fusion", f"dataset.data_dir={w.data}",
                                                 f"dataset.pretrained_router_path={w.hippo}",
                                                 f"logging.out_dir={t / 'o'}"], ["hippo"]),
    ("train-run-name-escapes", lambda w, t: ["train", "hippo", f"dataset.data_dir={w.dialog}", f"logging.out_dir={t / 'o'}",
                                             "logging.run_name=../../escaped"], ["logging.run_name", "../../escaped"]),
    ("train-unwritable-out-dir", lambda w, t: ["train", "hippo", f"dataset.data_dir={w.dialog}",
                                               "training.batch_size=4", f"logging.out_dir={w.data / 'sft_train.jsonl' / 'out'}"],
     ["sft_train.jsonl", "is a file"]),
    ("train-resume-missing", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}",
                                           f"training.resume={t / 'nostate'}", f"logging.out_dir={t / 'o'}"],
     ["training.resume", "nostate"]),
    ("train-resume-truncated-state", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}", "training.resume=auto",
                                                   "training.max_steps=2", "training.batch_size=4", *TINY_TRAIN,
                                                   f"logging.out_dir={_truncated_state(w, t)}"],
     ["trainable.safetensors", "not a valid safetensors file"]),
    ("train-resume-pointer-escapes", lambda w, t: ["train", "memory", f"dataset.data_dir={w.data}", "training.resume=auto",
                                                   f"logging.out_dir={_escaping_pointer(w, t)}"],
     ["latest.json", "step-"]),
    ("hippo-dialog-missing-field", lambda w, t: ["train", "hippo", f"dataset.data_dir={CORPUS / 'dialog_missing'}",
                                                 f"logging.out_dir={t / 'o'}"],
     ["data_train.jsonl:2: missing field 'memory_answer'"]),
    ("hippo-dialog-bad-turn", lambda w, t: ["train", "hippo", f"dataset.data_dir={CORPUS / 'dialog_bad_turn'}",
                                            f"logging.out_dir={t / 'o'}"],
     ["data_train.jsonl:1: dialog_history[1] is int, expected a string"]),
    ("hrpo-huge-line", lambda w, t: ["train", "hrpo", f"dataset.train_path={_huge_line(t)}", f"logging.out_dir={t / 'o'}"],
     ["huge.jsonl:1:", "longer than"]),
    ("hrpo-gsm8k-no-answer", lambda w, t: ["train", "hrpo", f"dataset.train_path={CORPUS / 'gsm8k_no_marker.jsonl'}",
                                           f"logging.out_dir={t / 'o'}"], ["gsm8k_no_marker.jsonl:1:", "####"]),
    ("hrpo-nan-json", lambda w, t: ["train", "hrpo", f"dataset.train_path={CORPUS / 'gsm8k_nan.jsonl'}",
                                    f"logging.out_dir={t / 'o'}"], ["gsm8k_nan.jsonl:1: field 'answer' is float"]),
    # --- chat
    ("chat-missing", lambda w, t: ["chat", "-m", t / "norun", "-p", "hi"], ["norun", "not found"]),
    ("chat-run-is-file", lambda w, t: ["chat", "-m", w.data / "sft_train.jsonl", "-p", "hi"], ["sft_train.jsonl"]),
    ("chat-other-kind", lambda w, t: ["chat", "-m", w.hippo, "-t", "memory", "-p", "hi"], ["hippo", "memory"]),
    ("chat-hrpo-as-hippo", lambda w, t: ["chat", "-m", w.hrpo, "-t", "hippo", "-p", "hi"], ["hrpo", "hippo"]),
    ("chat-broken-checkpoint-json", lambda w, t: ["chat", "-m", _memory_run_with(w, t, lambda r: (
        r / "checkpoint.json").write_text('{"kind": "explicit-memory",')), "-p", "hi"],
     ["checkpoint.json:1:", "invalid JSON"]),
    ("chat-truncated-weights", lambda w, t: ["chat", "-m", _memory_run_with(w, t, lambda r: _truncate(
        r / "memory" / "memory.safetensors")), "-p", "hi"], ["memory.safetensors", "not a valid safetensors file"]),
    ("chat-nan-weights", lambda w, t: ["chat", "-m", _memory_run_with(w, t, lambda r: _retensor(
        r / "memory" / "memory.safetensors", _nan_first_float)), "-p", "hi"], ["memory.safetensors", "NaN"]),
    ("chat-wrong-shape", lambda w, t: ["chat", "-m", _memory_run_with(w, t, lambda r: _retensor(
        r / "memory" / "memory.safetensors", _shrink_first_matrix)), "-p", "hi"], ["memory.safetensors", "shape"]),
    ("chat-hippo-nan", lambda w, t: ["chat", "-t", "hippo", "-m", _hippo_run_with(w, t), "-p", "hi"],
     ["NaN"]),
    ("chat-bad-temperature", lambda w, t: ["chat", "-m", w.memory, "-p", "hi", "--temperature", "-1"],
     ["--temperature"]),
    # --- inspect-memory
    ("inspect-other-kind", lambda w, t: ["inspect-memory", "-c", w.hrpo], ["hrpo"]),
    ("inspect-bad-rows", lambda w, t: ["inspect-memory", "-c", w.memory, "--rows", "9:2"], ["--rows", "9:2"]),
    ("inspect-rows-text", lambda w, t: ["inspect-memory", "-c", w.memory, "--rows", "a:b"], ["--rows", "a:b"]),
    ("inspect-edit-out-of-range", lambda w, t: ["inspect-memory", "-c", w.memory, "--edit", "99999=new text"],
     ["99999", "1024"]),
    ("inspect-bank-float", lambda w, t: ["inspect-memory", "-c", _memory_run_with(w, t, lambda r: _retensor(
        r / "bank" / "memory_bank.safetensors", lambda x: {"token_ids": x["token_ids"].double()})),
        "--rows", "0:2"], ["memory_bank.safetensors", "integer"]),
    ("inspect-eval-missing", lambda w, t: ["inspect-memory", "-c", w.memory, "--eval", t / "nodata"], ["nodata"]),
    # --- compare
    ("compare-runs-broken-metrics", lambda w, t: ["compare", "runs", _memory_run_with(w, t, lambda r: (
        r / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss"\n')),
        w.memory], ["metrics.jsonl:2:"]),
    ("compare-mixed-kinds", lambda w, t: ["compare", "checkpoints", w.hippo, w.hrpo, "--data", w.dialog / "data_val.jsonl"],
     ["hippo", "hrpo"]),
    ("compare-checkpoints-bad-data", lambda w, t: ["compare", "checkpoints", w.hippo, w.hippo,
                                                   "--data", CORPUS / "dialog_missing" / "data_train.jsonl"],
     ["data_train.jsonl:2: missing field 'memory_answer'"]),
    ("compare-locomo-wrong-structure", lambda w, t: ["compare", "locomo", "-m", w.hippo, "--data", CORPUS / "object.json"],
     ["object.json", "expected"]),
    ("compare-bench-suite", lambda w, t: ["compare", "bench", "--suite", "everything"], ["--suite", "everything"]),
]


def _truncate(p: Path) -> None:
    b = p.read_bytes()
    p.write_bytes(b[: len(b) // 2])


def _nan_first_float(t: dict) -> dict:
    k = next(k for k, v in t.items() if v.is_floating_point())
    return _nan(k)(t)


def _shrink_first_matrix(t: dict) -> dict:
    k = next(k for k, v in t.items() if v.dim() == 2 and v.shape[0] > 1)
    return dict(t, **{k: t[k][:-1]})


def _hippo_run_with(w, t: Path) -> Path:
    r = _copy(w.hippo, t / "hrun")
    f = next((r / "hippo_model").glob("*.safetensors"))
    _retensor(f, _nan_first_float)
    return r


def _truncated_state(w, t: Path) -> Path:
    out = t / "o"
    _copy(w.memory, out / "memory")
    st = next((out / "memory" / "states").glob("step-*"))
    _truncate(st / "trainable.safetensors")
    return out


def _escaping_pointer(w, t: Path) -> Path:
    out = t / "o"
    _copy(w.memory, out / "memory")
    (out / "memory" / "states" / "latest.json").write_text(json.dumps({"state": "../../../../etc", "step": 2}))
    return out


@pytest.mark.parametrize("name,argv,needles", CASES, ids=[c[0] for c in CASES])
def test_malformed_input(ws, tmp_path, capsys, name, argv, needles):
    args = argv(ws, tmp_path)
    (tmp_path / "o.jsonl").write_text("an earlier output the failed command must not touch\n")
    before = _digest(ws.root, tmp_path)
    capsys.readouterr()
    if args[0] == "train" and not any(str(a).startswith("training.max_steps=") for a in args):
        args = [*args, "training.max_steps=1"]  # a check that fails to fire must not turn into minutes of training
    code, _, err = run_cli(args, capsys)
    assert_one_line_error(code, err, *needles)
    assert _digest(ws.root, tmp_path) == before, "a failed command changed, added or removed files"


# ------------------------------------------------------------------ security


def test_remote_code_in_a_model_dir_is_not_run_without_the_flag(ws, tmp_path, capsys):
    """A model directory whose config asks for its own Python code: memcli refuses it unless
    model.trust_remote_code=true, and the code never runs (it would leave a file behind)."""
    from memcli.backbone import TINY_DIR

    evil = tmp_path / "evil_model"
    shutil.copytree(TINY_DIR, evil)
    sentinel = tmp_path / "code_ran"
    (evil / "config.json").write_text(json.dumps({
        "model_type": "evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (evil / "evil.py").write_text(f"import pathlib\npathlib.Path({str(sentinel)!r}).write_text('ran')\n"
                                  "from transformers import PretrainedConfig\n"
                                  "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    code, _, err = run_cli(["train", "hippo", f"dataset.data_dir={ws.dialog}", f"model.backbone={evil}",
                            f"logging.out_dir={tmp_path / 'o'}", "training.batch_size=4", "training.max_steps=1"], capsys)
    assert_one_line_error(code, err, "evil_model/config.json", "model.trust_remote_code=true")
    assert not sentinel.exists(), "remote code ran without model.trust_remote_code=true"


SECRET = [r"(?i)(api[_-]?key|secret|token|password)\s*[:=]\s*['\"][A-Za-z0-9_\-]{16,}['\"]",
          r"\b(sk-[A-Za-z0-9]{20,}|hf_[A-Za-z0-9]{30,}|AKIA[0-9A-Z]{16})\b"]


def test_no_secrets_or_absolute_home_paths_in_tracked_files():
    import re
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        files = subprocess.run(["git", "ls-files"], cwd=root, capture_output=True, text=True, check=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    hits = []
    for f in files:
        p = root / f
        if not p.is_file() or p.suffix in (".safetensors", ".png") or p.stat().st_size > 2_000_000:
            continue
        text = p.read_text(errors="ignore")
        for pat in SECRET:
            hits += [f"{f}: {m.group(0)[:40]}" for m in re.finditer(pat, text)]
        hits += [f"{f}: {m.group(0)}" for m in re.finditer(r"/(home|Users)/[a-z][\w.-]+/", text)]
    assert not hits, hits
