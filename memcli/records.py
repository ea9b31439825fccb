"""Validated readers and atomic writers for every file format memcli reads or writes.

Readers check every row and report ``file:line: what was expected``; writers write a temporary
file beside the target, fsync it and rename it over the target, so a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from memcli.errors import MemcliError

# --------------------------------------------------------------------------- atomic writes


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_prefix(path: Path) -> str:
    """Prefix of a temporary sibling of ``path``: it names the writing process, so a later run can tell a
    leftover of a killed writer (kill -9 runs no cleanup) from a write in progress."""
    return f".{path.name}.{os.getpid()}."


# .NAME.PID.RANDOM.tmp (mkstemp / mkdtemp) and .NAME.old-PID (a directory being replaced)
_TEMP = re.compile(r"^\..+\.(\d+)\.[A-Za-z0-9_]+\.tmp$|^\..+\.old-(\d+)$")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError among them: it exists but belongs to someone else, not ours to judge
        return True
    return True


def sweep_stale_temps(root: str | os.PathLike, recursive: bool = True) -> list[Path]:
    """Remove the temporary files and directories under ``root`` whose writing process no longer runs.

    A write killed between creating its temporary sibling and renaming it leaves that sibling behind;
    readers never see it (the target is whole or absent), and the next run over ``root`` removes it here.
    Temporaries of a live process are kept; ``recursive=False`` looks at ``root``'s own entries only (a
    shared parent such as a model cache or the user's data folder). Returns what was removed."""
    root = Path(root)
    if not root.is_dir():
        return []
    gone = []
    found = root.rglob(".*") if recursive else root.glob(".*")
    for p in sorted(found, key=lambda q: len(q.parts)):
        m = _TEMP.match(p.name)
        if m is None or _alive(int(m.group(1) or m.group(2))) or any(p.is_relative_to(g) for g in gone):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        gone.append(p)
    return gone


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; finished files get normal permissions
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    atomic_write_text(path, json.dumps(obj, ensure_ascii=False, indent=indent) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> int:
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "".join(line + "\n" for line in lines))
    return len(lines)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory; on success it replaces ``path`` whole (old content kept on error)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MemcliError(f"{path}: expected an output directory, found a file (it is left as it is)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(path), suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- input checks


def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise MemcliError(f"{p}: {what} not found")
    if p.is_dir():
        raise MemcliError(f"{p}: expected a {what}, found a directory")
    return p


def require_dir(path: str | os.PathLike, what: str = "directory") -> Path:
    p = Path(path)
    if not p.exists():
        raise MemcliError(f"{p}: {what} not found")
    if not p.is_dir():
        raise MemcliError(f"{p}: expected a {what} (a directory), found a file")
    return p


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise MemcliError(f"{path}: not UTF-8 text (byte {e.start}): expected a UTF-8 JSON file") from None


# --------------------------------------------------------------------------- schemas

Validator = Callable[[Any, str], None]


def _type_name(t) -> str:
    return {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}.get(
        t, str(t)
    )


def _check_field(row: dict, key: str, typ, where: str, nonempty: bool = False) -> Any:
    if key not in row:
        raise MemcliError(f"{where}: missing field '{key}' (expected {_type_name(typ)})")
    v = row[key]
    ok = isinstance(v, typ) and not (typ in (int, float) and isinstance(v, bool))
    if typ is float and isinstance(v, int) and not isinstance(v, bool):
        ok = True
    if not ok:
        raise MemcliError(f"{where}: field '{key}' is {type(v).__name__}, expected {_type_name(typ)}")
    if typ is float and not math.isfinite(v):
        raise MemcliError(f"{where}: field '{key}' is {v}, expected a finite number")
    if nonempty and isinstance(v, (str, list)) and len(v) == 0:
        raise MemcliError(f"{where}: field '{key}' is empty")
    return v


def _require_object(row: Any, where: str) -> dict:
    if not isinstance(row, dict):
        raise MemcliError(f"{where}: expected a JSON object, found {type(row).__name__}")
    return row


def validate_knowledge_item(row: Any, where: str) -> None:
    """ExplicitLM knowledge base item: {"target": [{"sentence", "uuid", "subject", "predicate", "object"}]}."""
    row = _require_object(row, where)
    target = _check_field(row, "target", list, where, nonempty=True)
    entry = _require_object(target[0], f"{where}: target[0]")
    _check_field(entry, "sentence", str, f"{where}: target[0]", nonempty=True)
    _check_field(entry, "uuid", str, f"{where}: target[0]", nonempty=True)
    for k in ("subject", "predicate", "object"):
        if k in entry and not isinstance(entry[k], str):
            raise MemcliError(f"{where}: target[0]: field '{k}' is {type(entry[k]).__name__}, expected a string")


def validate_fact(row: Any, where: str) -> None:
    """A user's fact: {"text": "Basim was born in Cairo ."} with optional "subject", "predicate", "object", "uuid"."""
    row = _require_object(row, where)
    _check_field(row, "text", str, where, nonempty=True)
    for k in ("subject", "predicate", "object", "uuid"):
        if k in row and row[k] is not None and not isinstance(row[k], str):
            raise MemcliError(f"{where}: field '{k}' is {type(row[k]).__name__}, expected a string")
    if row.get("object") and row["object"] not in row["text"]:
        raise MemcliError(f"{where}: object {row['object']!r} does not occur in text {row['text']!r}")


def validate_omcq_item(row: Any, where: str) -> None:
    """ExplicitLM OMCQ item: {"target": [{"question", "options": "A:x,...", "correct_answer": "C:z", "uuid"}]}.

    Empty strings are allowed here (convert-omcq skips and counts them); wrong types are not.
    """
    row = _require_object(row, where)
    target = _check_field(row, "target", list, where, nonempty=True)
    entry = _require_object(target[0], f"{where}: target[0]")
    for k in ("question", "options", "correct_answer"):
        _check_field(entry, k, str, f"{where}: target[0]")
    if "uuid" in entry and not isinstance(entry["uuid"], str):
        raise MemcliError(f"{where}: target[0]: field 'uuid' is {type(entry['uuid']).__name__}, expected a string")


def validate_conversation(row: Any, where: str) -> None:
    row = _require_object(row, where)
    conv = _check_field(row, "conversations", list, where, nonempty=True)
    for j, m in enumerate(conv):
        w = f"{where}: conversations[{j}]"
        m = _require_object(m, w)
        role = _check_field(m, "role", str, w)
        if role not in ("system", "user", "assistant"):
            raise MemcliError(f"{w}: role '{role}', expected one of system, user, assistant")
        _check_field(m, "content", str, w)
    if not any(m["role"] == "assistant" for m in conv):
        raise MemcliError(f"{where}: no assistant message (expected at least one)")


def validate_labeled(row: Any, where: str) -> None:
    row = _require_object(row, where)
    _check_field(row, "query", str, where, nonempty=True)
    idx = _check_field(row, "target_indices", list, where, nonempty=True)
    sc = _check_field(row, "target_scores", list, where, nonempty=True)
    if len(idx) != len(sc):
        raise MemcliError(f"{where}: target_indices has {len(idx)} items but target_scores has {len(sc)}")
    for v in idx:
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise MemcliError(f"{where}: target_indices holds {v!r}, expected non-negative integers")
    for v in sc:
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise MemcliError(f"{where}: target_scores holds {v!r}, expected finite numbers")


def validate_dialog(row: Any, where: str) -> None:
    row = _require_object(row, where)
    hist = _check_field(row, "dialog_history", list, where, nonempty=True)
    for j, t in enumerate(hist):
        if isinstance(t, dict):
            text = t.get("content", t.get("text"))
            if not isinstance(text, str):
                raise MemcliError(f"{where}: dialog_history[{j}]: expected a string or an object with 'content'")
        elif not isinstance(t, str):
            raise MemcliError(f"{where}: dialog_history[{j}] is {type(t).__name__}, expected a string")
    _check_field(row, "memory_query", str, where, nonempty=True)
    _check_field(row, "memory_answer", str, where, nonempty=True)


def validate_text(row: Any, where: str) -> None:
    row = _require_object(row, where)
    _check_field(row, "text", str, where, nonempty=True)


def validate_gsm8k(row: Any, where: str) -> None:
    row = _require_object(row, where)
    _check_field(row, "question", str, where, nonempty=True)
    _check_field(row, "answer", str, where, nonempty=True)


def edit_format(row: dict) -> str | None:
    """``zsre`` (EasyEdit's ZsRE fields), ``counterfact`` (ROME's CounterFact), or None."""
    if "requested_rewrite" in row:
        return "counterfact"
    if "src" in row or "alt" in row:
        return "zsre"
    return None


def validate_edit(row: Any, where: str) -> None:
    """A knowledge edit in the field's standard forms: ZsRE (``subject``, ``src`` the question, ``alt`` the new answer,
    optional ``rephrase``, ``loc`` an unrelated question and ``loc_ans`` its answer) or CounterFact
    (``requested_rewrite`` with ``prompt`` holding ``{}`` for the subject, ``subject``, ``target_new.str``; optional
    ``paraphrase_prompts`` and ``neighborhood_prompts``)."""
    row = _require_object(row, where)
    fmt = edit_format(row)
    if fmt == "zsre":
        _check_field(row, "src", str, where, nonempty=True)
        if not row["src"].strip():
            raise MemcliError(f"{where}: field 'src' (the question) is empty")
        _check_field(row, "alt", str, where, nonempty=True)
        for k in ("subject", "rephrase", "loc", "loc_ans"):
            if k in row and not isinstance(row[k], str):
                raise MemcliError(f"{where}: field '{k}' is {type(row[k]).__name__}, expected a string")
        if bool(row.get("loc")) != bool(row.get("loc_ans")):
            raise MemcliError(f"{where}: 'loc' and 'loc_ans' go together (an unrelated question and its answer)")
    elif fmt == "counterfact":
        rw = _require_object(row["requested_rewrite"], f"{where}: requested_rewrite")
        prompt = _check_field(rw, "prompt", str, f"{where}: requested_rewrite", nonempty=True)
        _check_field(rw, "subject", str, f"{where}: requested_rewrite", nonempty=True)
        if "{}" not in prompt:
            raise MemcliError(f"{where}: requested_rewrite.prompt has no '{{}}' for the subject")
        new = _require_object(_check_field(rw, "target_new", dict, f"{where}: requested_rewrite"),
                              f"{where}: requested_rewrite.target_new")
        _check_field(new, "str", str, f"{where}: requested_rewrite.target_new", nonempty=True)
        for k in ("paraphrase_prompts", "neighborhood_prompts"):
            if k in row and not (isinstance(row[k], list) and all(isinstance(x, str) and x for x in row[k])):
                raise MemcliError(f"{where}: field '{k}' expected a list of non-empty strings")
    else:
        raise MemcliError(f"{where}: unknown edit record (expected ZsRE's fields src, alt, rephrase, loc, loc_ans or "
                          "CounterFact's requested_rewrite)")


@dataclass(frozen=True)
class Format:
    name: str
    validate: Validator
    description: str


KNOWLEDGE = Format("knowledge", validate_knowledge_item, "ExplicitLM knowledge base (sentence_trex_data.json)")
OMCQ = Format("omcq", validate_omcq_item, "ExplicitLM multiple-choice set (omcq_trex_data.json)")
FACTS = Format("facts", validate_fact, "facts JSONL ({\"text\": ...} per line, optional subject, predicate, object, uuid)")
CONVERSATION = Format("conversation", validate_conversation, "SFT conversations JSONL")
LABELED = Format("labeled", validate_labeled, "router labels JSONL (train_labeled.jsonl)")
DIALOG = Format("dialog", validate_dialog, "HIPPO dialogs JSONL")
GSM8K = Format("gsm8k", validate_gsm8k, "GSM8K-format JSONL")
TEXT = Format("text", validate_text, "pretraining text JSONL ({\"text\": ...} per line)")
EDITS = Format("edits", validate_edit, "knowledge edits (ZsRE or CounterFact records, JSONL or a JSON list)")


# --------------------------------------------------------------------------- readers


def _load_json(p: Path, expected: str) -> Any:
    """Parse a whole JSON file; empty files and syntax errors are reported with file and line."""
    text = _read_text(p)
    if not text.strip():
        raise MemcliError(f"{p}: empty file, expected {expected}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise MemcliError(f"{p}:{e.lineno}: invalid JSON ({e.msg}), expected {expected}") from None


def read_json_list(path: str | os.PathLike, fmt: Format) -> list:
    """A JSON file holding a list of items, each validated; errors name the file and item."""
    p = require_file(path, fmt.description)
    data = _load_json(p, f"a JSON list of {fmt.name} items")
    if not isinstance(data, list):
        raise MemcliError(f"{p}: top level is {type(data).__name__}, expected a JSON list of {fmt.name} items")
    if not data:
        raise MemcliError(f"{p}: empty list, expected at least one {fmt.name} item")
    for i, row in enumerate(data):
        fmt.validate(row, f"{p}: item {i}")
    return data


# one JSONL row larger than this is refused before it is held in memory whole (a corrupt or hostile file)
MAX_LINE_BYTES = 64 * 1024 * 1024


def iter_jsonl(path: str | os.PathLike, fmt: Format | None = None) -> Iterator[tuple[int, dict]]:
    p = require_file(path, fmt.description if fmt else "JSONL file")
    with open(p, "rb") as f:
        for lineno, raw in enumerate(iter(lambda: f.readline(MAX_LINE_BYTES + 1), b""), 1):
            if len(raw) > MAX_LINE_BYTES:
                raise MemcliError(f"{p}:{lineno}: line longer than {MAX_LINE_BYTES // 2**20} MiB, expected one JSON "
                                  "object per line")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise MemcliError(f"{p}:{lineno}: not UTF-8 text, expected a JSON object per line") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise MemcliError(f"{p}:{lineno}: invalid JSON ({e.msg}), expected a JSON object per line") from None
            if fmt is not None:
                fmt.validate(row, f"{p}:{lineno}")
            elif not isinstance(row, dict):
                raise MemcliError(f"{p}:{lineno}: expected a JSON object, found {type(row).__name__}")
            yield lineno, row


def read_jsonl(path: str | os.PathLike, fmt: Format | None = None) -> list[dict]:
    rows = [row for _, row in iter_jsonl(path, fmt)]
    if not rows:
        raise MemcliError(f"{path}: empty file, expected at least one {fmt.name if fmt else 'JSON'} row")
    return rows


def read_json_object(path: str | os.PathLike, what: str = "JSON file") -> dict:
    p = require_file(path, what)
    data = _load_json(p, f"a {what}")
    if not isinstance(data, dict):
        raise MemcliError(f"{p}: top level is {type(data).__name__}, expected a JSON object ({what})")
    return data


def read_rows(spec: str | os.PathLike, fmt: Format) -> list[dict]:
    """Training rows from a JSONL file, a Hugging Face dataset saved with ``save_to_disk``, or a hub dataset id
    (``org/name`` or ``org/name:split``, through ``datasets`` where a hub is reachable); each row validated."""
    p = Path(spec)
    if p.is_file():
        return read_jsonl(p, fmt)
    if p.is_dir():
        if not any((p / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
            raise MemcliError(f"{p}: a directory without a saved Hugging Face dataset, expected {fmt.description} "
                              "(a JSONL file) or a directory written by datasets' save_to_disk")
        import datasets

        try:
            ds = datasets.load_from_disk(str(p))
        except Exception as e:  # datasets raises several types for unreadable directories
            raise MemcliError(f"{p}: not a readable Hugging Face dataset ({type(e).__name__}: {str(e)[:100]})") from None
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise MemcliError(f"{p}: a dataset with splits {sorted(ds)}, expected a 'train' split (or save one split)")
            ds = ds["train"]
        where = str(p)
    else:
        name, _, split = str(spec).partition(":")
        if "/" not in name or p.suffix:
            raise MemcliError(f"{p}: {fmt.description} not found")
        import datasets

        try:
            ds = datasets.load_dataset(name, split=split or "train")
        except Exception as e:
            raise MemcliError(f"{spec}: not a local file and the dataset hub gave no such dataset here ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:100]})") from None
        where = str(spec)
    rows = []
    for i, row in enumerate(ds):
        fmt.validate(row, f"{where}: row {i}")
        rows.append(dict(row))
    if not rows:
        raise MemcliError(f"{where}: no rows, expected at least one {fmt.name} row")
    return rows
