"""Print the README's configuration tables from memcli/config.py (keys, defaults per backbone, the comment beside each).

    python scripts/config_tables.py            # print them
    python scripts/config_tables.py --write    # replace them in README.md (up to "## Architecture")
"""

import contextlib
import io
import re
import sys
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from memcli.config import (RECIPES, BackboneFields, DistributedFields, LoggingSection, LoopFields,  # noqa: E402
                           LoraFields, load_config)
from memcli.training.retriever import RetrieverRecipe  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SRC = (ROOT / "memcli" / "config.py").read_text().splitlines()
RETRIEVER_SRC = (ROOT / "memcli" / "training" / "retriever.py").read_text().splitlines()


def comment(name: str, cls, src=SRC) -> str:
    """The trailing comment of the field's line in the class that defines it."""
    for klass in cls.__mro__:
        start = next((i for i, ln in enumerate(src) if ln.startswith(f"class {klass.__name__}")), None)
        if start is None:
            continue
        for ln in src[start + 1:]:
            if ln.startswith("class ") or ln.startswith("def "):
                break
            m = re.match(rf"\s+{name}: [^=]+= .*?#\s*(.*)$", ln)
            if m:
                return m.group(1).replace("|", "\\|")
            if re.match(rf"\s+{name}: ", ln):
                return ""
    return ""


def value(v) -> str:
    v = getattr(v, "value", v)
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


SHARED = {"model": (BackboneFields, LoraFields), "training": (LoopFields, DistributedFields),
          "logging": (LoggingSection,)}
SHARED_KEYS = {f"{sec}.{f.name}" for sec, classes in SHARED.items() for c in classes for f in fields(c)}


def defaults(recipe: str) -> dict:
    """key -> default shown in the tables ('tiny / pretrained' where the backbone decides)."""
    tiny = load_config(recipe)
    real = load_config(recipe, overrides=["model.backbone=smollm2-135m"])
    out = {}
    for sec in ("model", "dataset", "training", "logging"):
        s_t, s_r = getattr(tiny, sec), getattr(real, sec)
        for f in fields(s_t):
            a, b = value(getattr(s_t, f.name)), value(getattr(s_r, f.name))
            out[f"{sec}.{f.name}"] = (a if a == b else f"{a} / {b}", comment(f.name, type(s_t)))
    return out


ALL = {r: defaults(r) for r in RECIPES}
# a shared key's default is stated once when every recipe that has it agrees; else in each recipe's table
SAME = {k for k in SHARED_KEYS if len({ALL[r][k][0] for r in RECIPES if k in ALL[r]}) == 1}

def tables() -> None:
    print("Keys shared by the recipes (defined once in memcli/config.py; hrpo has no `zero_stage` / `dist_timeout_s`, "
          "router and fusion have no LoRA or `finetuning_method` keys). `a / b`: the default for tiny / for a "
          "pretrained backbone; *per recipe*: see the recipe's table.\n")
    print("| key | default | meaning |\n|---|---|---|")
    for k in sorted(SHARED_KEYS, key=lambda k: (["model", "training", "logging"].index(k.split(".")[0]), k)):
        first = next(r for r in RECIPES if k in ALL[r])
        d, c = ALL[first][k]
        print(f"| `{k}` | {d if k in SAME else '*per recipe*'} | {c} |")
    for r in RECIPES:
        print(f"\n`memcli train {r}` (example: `examples/train_{r}.yaml`):\n\n| key | default | meaning |\n|---|---|---|")
        for k, (d, c) in ALL[r].items():
            if k not in SHARED_KEYS or k not in SAME:
                print(f"| `{k}` | {d} | {c} |")
    print("\n`memcli train retriever` (example: `examples/train_retriever.yaml`; not a memory kind: it writes a "
          "sentence-transformers directory for the turn memory, `--encoder DIR`):\n\n| key | default | meaning |\n"
          "|---|---|---|")
    cfg = load_config(RetrieverRecipe, overrides=["dataset.path=x"])
    for sec in ("dataset", "model", "training", "logging"):
        s = getattr(cfg, sec)
        for f in fields(s):
            d = "null" if f.name == "path" else value(getattr(s, f.name))
            print(f"| `{sec}.{f.name}` | {d} | {comment(f.name, type(s), RETRIEVER_SRC)} |")


if "--write" in sys.argv:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        tables()
    readme = Path(__file__).resolve().parent.parent / "README.md"
    text = readme.read_text()
    a, b = text.index("Keys shared by the recipes"), text.index("## Architecture")
    readme.write_text(text[:a] + buf.getvalue().rstrip() + "\n\n" + text[b:])
else:
    tables()
