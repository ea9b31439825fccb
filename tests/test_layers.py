"""Imports go one way (README "Architecture"): core <- memory kinds <- training / eval / bench / runs <- chat,
views <- cli. The memory kinds never import each other, and the core has no import cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).parent.parent
CORE = 0
KINDS = 1
ABOVE_KINDS = 2
PRESENT = 3
CLI = 4


def layer(module: str) -> int:
    parts = module.split(".")
    if parts[:2] == ["memcli", "cli"] or module == "memcli.__main__":
        return CLI
    if module in ("memcli.chat", "memcli.views"):
        return PRESENT
    if parts[1:2] in (["training"], ["eval"], ["bench"]) or module == "memcli.runs" \
            or (parts[1:2] == ["kernels"] and parts[2:3] and parts[2].startswith("bench")):
        return ABOVE_KINDS
    if parts[1:2] in (["explicit"], ["hippo"], ["hrpo"]):
        return KINDS
    return CORE


def modules() -> dict[str, Path]:
    out = {}
    for p in (ROOT / "memcli").rglob("*.py"):
        rel = p.relative_to(ROOT).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = p
    for p in (ROOT / "kernels").glob("*.py"):
        out["memcli.kernels" + ("" if p.stem == "__init__" else "." + p.stem)] = p
    return out


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("memcli")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("memcli"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def _resolve(name: str, known: dict) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def test_imports_go_one_way():
    mods = modules()
    bad = []
    for name, path in mods.items():
        for imp in imports(path):
            target = _resolve(imp, mods)
            if target is None or target == "memcli" or target == name:
                continue
            if layer(target) > layer(name):
                bad.append(f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})")
            kind_a, kind_b = name.split(".")[1:2], target.split(".")[1:2]
            if layer(name) == KINDS and layer(target) == KINDS and kind_a != kind_b:
                bad.append(f"{name} imports {target}: memory kinds never import each other")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_at_module_level():
    mods = modules()
    graph = {n: {t for t in (_resolve(i, mods) for i in imports(p, top_level_only=True)) if t and t != n and t != "memcli"}
             for n, p in mods.items()}
    seen, stack, cycles = set(), [], []

    def visit(n):
        if n in stack:
            cycles.append(stack[stack.index(n):] + [n])
            return
        if n in seen:
            return
        seen.add(n)
        stack.append(n)
        for m in graph.get(n, ()):
            visit(m)
        stack.pop()

    for n in graph:
        visit(n)
    assert not cycles, cycles[:3]


def test_the_checker_sees_a_wrong_way_import():
    assert layer("memcli.backbone") < layer("memcli.explicit.model") < layer("memcli.training.loop") \
        < layer("memcli.views") < layer("memcli.cli.train")
    assert "memcli.training.loop" in imports(ROOT / "memcli" / "training" / "explicit.py")
