"""MkDocs hook: the command and configuration references, generated at every build from memcli itself.

``reference/commands.md`` walks the Typer app (each command's help text, usage and options, as ``--help`` prints
them); ``reference/configuration.md`` reads the recipe schemas of memcli/config.py (every key, its default for the
tiny and for a pretrained backbone, the comment beside it). Both are written into the docs directory before the
files are collected (they are not kept in git), so the site cannot drift from the code.

    python docs/hooks/reference.py            # write both pages without building the site
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
OUT = ROOT / "docs" / "reference"


# --------------------------------------------------------------------------- commands


def _plain(text: str) -> str:
    """Rich markup as Markdown: [bold]x[/bold] -> **x**, [cyan]x[/cyan] -> `x`, other tags dropped."""
    text = re.sub(r"\[bold\](.*?)\[/bold\]", r"**\1**", text)
    text = re.sub(r"\[cyan\](.*?)\[/cyan\]", r"`\1`", text)
    return re.sub(r"\[/?[a-z ]+\]", "", text)


def _help_markdown(help_text: str) -> str:
    """A command's help: prose paragraphs as they are, indented example lines as a shell block."""
    out, block = [], []
    for para in (help_text or "").strip().split("\n\n"):
        lines = para.split("\n")
        if all(ln.startswith("  ") for ln in lines if ln.strip()):
            block += [ln.strip() for ln in lines if ln.strip()]
            continue
        if block:
            out.append("```bash\n" + "\n".join(block) + "\n```")
            block = []
        out.append(_plain(" ".join(ln.strip() for ln in lines)))
    if block:
        out.append("```bash\n" + "\n".join(block) + "\n```")
    return "\n\n".join(out)


def _click():
    """typer >= 0.22 vendors its own click; older ones use the click package."""
    try:
        from typer import _click
    except ImportError:  # pragma: no cover
        import click as _click
    return _click


def _option_rows(cmd) -> list[str]:
    rows = []
    for p in cmd.params:
        if getattr(p, "param_type_name", "") == "argument":
            name = f"`{p.name.upper()}`" + (" (repeatable)" if p.nargs == -1 else "")
            rows.append(f"| {name} | argument | {_plain(getattr(p, 'help', '') or '')} |")
            continue
        if p.hidden or "--help" in p.opts:
            continue
        names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        default = "" if p.default in (None, False, (), []) or callable(p.default) else f"`{p.default}`"
        rows.append(f"| {names} | {default} | {_plain(p.help or '').replace('|', '/')} |")
    return rows


def _walk(cmd, path: list[str]):
    yield path, cmd
    if hasattr(cmd, "list_commands"):
        for name in cmd.list_commands(None):
            yield from _walk(cmd.get_command(None, name), [*path, name])


def commands_page() -> str:
    import typer

    from memcli.cli import app

    root = typer.main.get_command(app)
    parts = ["# Command reference\n",
             "Generated from the Typer app at every build of these pages: the same text as `memcli COMMAND --help`. "
             "Every command exits 2 with one line naming the file, line or key on bad input.\n"]
    for path, cmd in _walk(root, ["memcli"]):
        if len(path) == 1:
            continue
        name = " ".join(path)
        parts.append(f"## `{name}`\n")
        parts.append(_help_markdown(cmd.help or "") + "\n")
        usage = " ".join(cmd.collect_usage_pieces(_click().Context(cmd, info_name=path[-1])))
        parts.append(f"```text\n{name} {usage}\n```\n")
        rows = _option_rows(cmd)
        if rows:
            parts.append("| option | default | help |\n|---|---|---|\n" + "\n".join(rows) + "\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- configuration


def _comment(name: str, cls, src: list[str]) -> str:
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


def _value(v) -> str:
    v = getattr(v, "value", v)
    return "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)


def configuration_page() -> str:
    from memcli.config import (RECIPES, BackboneFields, DistributedFields, LoggingSection, LoopFields, LoraFields,
                               load_config)
    from memcli.training.retriever import RetrieverRecipe

    src = (ROOT / "memcli" / "config.py").read_text().splitlines()
    shared = {"model": (BackboneFields, LoraFields), "training": (LoopFields, DistributedFields),
              "logging": (LoggingSection,)}
    shared_keys = {f"{sec}.{f.name}" for sec, classes in shared.items() for c in classes for f in fields(c)}

    def defaults(recipe: str) -> dict:
        tiny = load_config(recipe)
        real = load_config(recipe, overrides=["model.backbone=smollm2-135m"])
        out = {}
        for sec in ("model", "dataset", "training", "logging"):
            s_t, s_r = getattr(tiny, sec), getattr(real, sec)
            for f in fields(s_t):
                a, b = _value(getattr(s_t, f.name)), _value(getattr(s_r, f.name))
                out[f"{sec}.{f.name}"] = (a if a == b else f"{a} / {b}", _comment(f.name, type(s_t), src))
        return out

    every = {r: defaults(r) for r in RECIPES}
    same = {k for k in shared_keys if len({every[r][k][0] for r in RECIPES if k in every[r]}) == 1}
    lines = ["# Configuration reference\n",
             "Generated from the recipe schemas of `memcli/config.py` at every build of these pages. A run is "
             "configured by `--config FILE.yaml` and `key=value` overrides (OmegaConf); an unknown key is refused in "
             "one line with the nearest valid one; `--print-config` prints every key a recipe reads, resolved. "
             "`a / b`: the default for the tiny backbone / for a pretrained one.\n",
             "## Keys shared by the recipes\n",
             "Defined once; hrpo has no `zero_stage` / `dist_timeout_s`, router and fusion have no LoRA or "
             "`finetuning_method` keys. *per recipe*: see the recipe's table.\n",
             "| key | default | meaning |\n|---|---|---|"]
    for k in sorted(shared_keys, key=lambda k: (["model", "training", "logging"].index(k.split(".")[0]), k)):
        first = next(r for r in RECIPES if k in every[r])
        d, c = every[first][k]
        lines.append(f"| `{k}` | {d if k in same else '*per recipe*'} | {c} |")
    for r in RECIPES:
        lines.append(f"\n## `memcli train {r}`\n\nExample: `examples/train_{r}.yaml`.\n\n"
                     "| key | default | meaning |\n|---|---|---|")
        lines += [f"| `{k}` | {d} | {c} |" for k, (d, c) in every[r].items() if k not in shared_keys or k not in same]
    lines.append("\n## `memcli train retriever`\n\nExample: `examples/train_retriever.yaml`. Not a memory kind: it "
                 "writes a sentence-transformers directory for the turn memory (`--encoder DIR`).\n\n"
                 "| key | default | meaning |\n|---|---|---|")
    rsrc = (ROOT / "memcli" / "training" / "retriever.py").read_text().splitlines()
    cfg = load_config(RetrieverRecipe, overrides=["dataset.path=x"])
    for sec in ("dataset", "model", "training", "logging"):
        s = getattr(cfg, sec)
        for f in fields(s):
            d = "null" if f.name == "path" else _value(getattr(s, f.name))
            lines.append(f"| `{sec}.{f.name}` | {d} | {_comment(f.name, type(s), rsrc)} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- the hook


def write() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "commands.md").write_text(commands_page(), encoding="utf-8")
    (OUT / "configuration.md").write_text(configuration_page(), encoding="utf-8")


def on_pre_build(config, **kwargs) -> None:  # mkdocs' hook name
    write()


if __name__ == "__main__":
    write()


# Material's offline plugin loads an iframe-worker shim from unpkg.com so that search runs from file://. A page
# must fetch nothing at view time, so the tag goes: search works wherever the site is served (mkdocs serve,
# python -m http.server, any static host), and from file:// every page and link still does.
_REMOTE_SHIM = re.compile(r"\s*<script src=\"https://unpkg\.com/iframe-worker/shim\"></script>")


def on_post_build(config, **kwargs) -> None:  # mkdocs' hook name; after every page, 404.html included
    for page in Path(config["site_dir"]).rglob("*.html"):
        html = page.read_text(encoding="utf-8")
        if _REMOTE_SHIM.search(html):
            page.write_text(_REMOTE_SHIM.sub("", html), encoding="utf-8")
