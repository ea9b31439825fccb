"""The install as a user makes it: nothing in the checkout's root hides an installed package, the environment
is the lock's, and a built wheel works on its own."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).parent.parent
LOCK = ROOT / "constraints-cpu.txt"


def run_from_root(code: str, *flags: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -c code`` with the checkout's root as the working directory (first on sys.path, as for
    ``python -m pytest`` or a notebook opened there)."""
    return subprocess.run([sys.executable, *flags, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, **(env or {})), timeout=300)


def test_no_top_level_name_of_the_root_is_a_package_but_memcli_and_the_handing_kernels():
    """Whatever Python finds in the root first must be the project itself or hand the name over: a folder with an
    ``__init__.py`` or a ``.py`` file there shadows any installed distribution of that name."""
    importable = sorted(p.stem for p in ROOT.iterdir() if not p.name.startswith(".") and
                        ((p.is_dir() and (p / "__init__.py").is_file()) or (p.is_file() and p.suffix == ".py")))
    assert importable == ["kernels", "memcli"]
    for name in ("tests", "examples", "scripts", "docs"):
        assert not (ROOT / name / "__init__.py").exists(), name


def test_kernels_from_the_root_is_the_installed_distribution():
    try:
        dist = importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("no 'kernels' distribution installed (transformers < 5.25 does not require it)")
    r = run_from_root("import kernels; print(kernels.__file__)")
    assert r.returncode == 0, r.stderr
    where = Path(r.stdout.strip()).resolve()
    assert where != (ROOT / "kernels" / "__init__.py").resolve()
    assert where.parent == Path(dist.locate_file("kernels")).resolve()


def test_the_checkout_hands_kernels_to_whichever_distribution_comes_next(tmp_path):
    """Independent of what is installed: a stand-in distribution later on sys.path is the one imported (with its
    own submodules), and with none the name is absent, as it would be without the checkout."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("from .part import MARK\n")
    (fake / "part.py").write_text("MARK = 'stand-in'\n")
    r = run_from_root(f"import sys; sys.path.insert(1, {str(tmp_path / 'site')!r})\n"
                      "import kernels, kernels.part; print(kernels.MARK, kernels.part.__file__)")
    assert r.returncode == 0, r.stderr
    mark, part = r.stdout.split()
    assert mark == "stand-in" and Path(part).resolve() == (fake / "part.py").resolve()
    # -S: no site-packages, so no installed distribution: absent, with the reason in one line, and importable later
    r = run_from_root("import importlib, sys\n"
                      "try:\n    import kernels\nexcept ModuleNotFoundError as e:\n    print('absent:', e)\n"
                      "print('kernels' in sys.modules)", "-S")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["absent: No module named 'kernels' (this checkout's kernels/ folder is "
                                     "memcli.kernels)", "False"]


def test_transformers_model_code_imports_from_the_root():
    r = run_from_root("import transformers.models.qwen3.modeling_qwen3, transformers.models.llama.modeling_llama\n"
                      "import memcli.kernels; print(memcli.kernels.token_bag.__module__)")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "memcli.kernels.dispatch"


def _requirement_tree(extras: tuple[str, ...]) -> set[str]:
    """Distributions memcli (with ``extras``) needs, directly and through its dependencies, as installed here."""
    from packaging.requirements import Requirement

    seen, todo = set(), [("memcli", set(extras))]
    while todo:
        name, wanted = todo.pop()
        try:
            dist = importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an optional marker's package not installed here
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            key = canonicalize_name(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, set(req.extras)))
    return seen


@pytest.mark.lock
def test_the_environment_is_the_lock():
    """Every distribution that memcli[dev,faiss-cpu] pulls in is pinned in the lock and installed at its version (the
    README's commands install with ``-c constraints-cpu.txt``; the drift check deliberately does not, and skips this)."""
    from memcli.doctor import lock_drift, read_lock

    pins = read_lock(LOCK)
    unpinned = []
    for name in sorted(_requirement_tree(("dev", "faiss-cpu"))):
        try:
            importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        if name not in pins:
            unpinned.append(name)
    assert not unpinned, f"installed but not in {LOCK.name}: {unpinned} (bash .ci/lock)"
    assert lock_drift(LOCK) == [], f"not the lock's versions (pip install -c {LOCK.name} -e '.[dev]')"


@pytest.mark.slow
def test_a_built_wheel_imports_memcli_kernels_and_passes_a_kernel_test(tmp_path):
    """``pip wheel .`` installed on its own (no checkout on sys.path): memcli.kernels comes from the wheel, and a kernel
    test of the suite passes against it."""
    import shutil

    src = tmp_path / "checkout"  # setuptools builds in the source tree: a copy keeps build/ out of the checkout
    local = {".git", ".venv", "out", "data", "build", "runs", "memcli.egg-info"}  # the checkout's own, not the package's
    shutil.copytree(ROOT, src, ignore=lambda d, names: [n for n in names if n == "__pycache__" or
                                                        (Path(d) == ROOT and n in local)])
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                        str(wheels), str(src)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (whl,) = wheels.glob("memcli-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-compile", "--target", str(site),
                    str(whl)], check=True, capture_output=True, timeout=600)
    work = tmp_path / "work"  # neither the checkout nor its tests folder on sys.path: the conftest and test are copies
    work.mkdir()
    for f in ("conftest.py", "test_kernels.py"):
        (work / f).write_text((ROOT / "tests" / f).read_text())
    (work / "pytest.ini").write_text("[pytest]\n")
    env = dict(os.environ, PYTHONPATH=str(site), TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", "import memcli.kernels as k, memcli; print(memcli.__file__, k.__file__)"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert all(Path(p).resolve().is_relative_to(site.resolve()) for p in r.stdout.split())
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
                        "test_kernels.py::test_token_bag_frozen_embedding_and_entry_pool"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "1 passed" in r.stdout


def test_doctor_reports_versions_kernels_the_lock_and_damaged_backbones(cli, tmp_path, monkeypatch, capsys):
    import json

    from test_backbone import _fake_cache

    monkeypatch.setenv("MEMCLI_HOME", str(tmp_path / "home"))
    monkeypatch.chdir(ROOT)
    code, out, _ = cli("doctor", "--json")
    assert code == 0
    r = json.loads(out)
    for name in ("torch", "transformers", "peft", "accelerate", "deepspeed", "triton", "faiss", "sentence-transformers"):
        assert name in r["packages"]
    assert r["packages"]["transformers"] == importlib.metadata.version("transformers")
    assert Path(r["memcli.kernels"]).resolve() == (ROOT / "kernels").resolve()  # the editable install's folder
    assert Path(r["kernels (import from here)"]).name == "__init__.py"
    assert Path(r["kernels (import from here)"]).resolve() != (ROOT / "kernels" / "__init__.py").resolve()
    assert r["cached backbones"] == "none"

    work = tmp_path / "work"  # a directory whose lock pins transformers to another version, and a damaged backbone
    work.mkdir()
    (work / "constraints-cpu.txt").write_text("transformers==0.0.1\n    # via memcli\nnot-installed-anywhere==1.0\n")
    w = _fake_cache(tmp_path / "home") / "model.safetensors"
    with open(w, "r+b") as f:
        f.truncate(w.stat().st_size // 2)
    capsys.readouterr()  # what saving the stand-in printed is not the command's output
    monkeypatch.chdir(work)
    code, out, _ = cli("doctor", "--json")
    r = json.loads(out)
    assert r["lock"] == (f"constraints-cpu.txt: 1 installed versions differ: transformers "
                         f"{importlib.metadata.version('transformers')} (lock 0.0.1)")
    (m,) = r["cached backbones"]
    assert m["name"] == "smollm2-135m" and m["status"].startswith("damaged: model.safetensors is")
    code, out, _ = cli("doctor")  # the tables render
    assert code == 0 and "damaged" in out and "sentence-transformers" in out
