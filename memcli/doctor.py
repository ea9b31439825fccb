"""``memcli doctor``: what memcli runs with here, the first thing to paste into a bug report.

Versions of the libraries memcli's results depend on, where ``memcli.kernels`` and the PyPI distribution
``kernels`` (which transformers >= 5.25 imports on every model load) resolve from, whether the environment is
the lock's (when run in a checkout, which holds ``constraints-cpu.txt``), and whether the cached backbones are
whole. Nothing is imported that the answer does not need: versions come from the installed metadata.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import re
import subprocess
import sys
from pathlib import Path

from packaging.utils import canonicalize_name

# what a result depends on; a name with alternatives is the first distribution installed (faiss: CPU or GPU build)
PACKAGES = {
    "torch": ("torch",),
    "transformers": ("transformers",),
    "peft": ("peft",),
    "accelerate": ("accelerate",),
    "deepspeed": ("deepspeed",),
    "triton": ("triton",),
    "faiss": ("faiss-cpu", "faiss-gpu", "faiss"),
    "sentence-transformers": ("sentence-transformers",),
    "tokenizers": ("tokenizers",),
    "safetensors": ("safetensors",),
    "huggingface-hub": ("huggingface-hub",),
    "kernels": ("kernels",),
}
LOCK = "constraints-cpu.txt"


def version_of(names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(distribution, version) of the first of ``names`` that is installed, else (None, None)."""
    for n in names:
        try:
            return n, importlib.metadata.version(n)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def read_lock(path: Path) -> dict[str, str]:
    """``name -> version`` of every ``name==version`` line of a pip-compile lock."""
    pins = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line)
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    return pins


def lock_drift(path: Path) -> list[dict]:
    """Installed distributions whose version is not the lock's (a local label such as +cpu is not a difference)."""
    out = []
    for name, want in sorted(read_lock(path).items()):
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue  # an extra not installed here (dev tools on a user's install)
        if have.split("+")[0] != want.split("+")[0]:
            out.append({"package": name, "installed": have, "lock": want})
    return out


def kernels_from(cwd: Path) -> str:
    """What ``import kernels`` gives a Python started in ``cwd`` (a notebook or ``python -m pytest`` there): the
    distribution's file, or why it fails. Asked in a child process: this one's sys.path is not the user's."""
    code = "import kernels, sys; sys.stdout.write(str(kernels.__file__))"
    try:
        r = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"not checked ({type(e).__name__})"
    if r.returncode == 0:
        return r.stdout.strip()
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return "fails: " + (lines[-1] if lines else f"exit code {r.returncode}")


def report(cwd: str | Path | None = None) -> dict:
    """Everything ``memcli doctor`` prints, as one dict (``--json``)."""
    from memcli import __version__, download

    cwd = Path(cwd or Path.cwd())
    packages = {}
    for label, names in PACKAGES.items():
        dist, ver = version_of(names)
        packages[label] = "not installed" if ver is None else ver if dist == names[0] else f"{ver} ({dist})"
    import torch

    spec = importlib.util.find_spec("memcli.kernels")
    out = {
        "memcli": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
        "packages": packages,
        "cuda": torch.version.cuda if torch.cuda.is_available() else "not available",
        "memcli.kernels": str(Path(spec.origin).parent) if spec and spec.origin else "not found",
        "kernels (import from here)": kernels_from(cwd),
    }
    lock = cwd / LOCK
    if lock.is_file():
        drift = lock_drift(lock)
        out["lock"] = (f"{LOCK}: every installed pin matches" if not drift else
                       f"{LOCK}: {len(drift)} installed versions differ: " +
                       ", ".join(f"{d['package']} {d['installed']} (lock {d['lock']})" for d in drift))
    out["cached backbones"] = [{"name": m["name"], "status": m["status"], "path": m["path"]}
                               for m in download.list_cached()] or "none"
    return out
