"""Tensors in safetensors plus a JSON config, written atomically. Legacy ``.pt`` only via weights_only."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path
from typing import Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from memcli.errors import MemcliError
from memcli.records import atomic_write_bytes, require_file


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: dict | None = None) -> None:
    """Write tensors to a safetensors file atomically (temp file + fsync + rename)."""
    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    atomic_write_bytes(path, st_save(flat, metadata=meta))


def load_tensors(path: str | os.PathLike, check_finite: bool = True) -> dict[str, torch.Tensor]:
    """Read safetensors, or a legacy ``.pt``/``.bin`` state dict with ``torch.load(weights_only=True)``."""
    p = require_file(path, "tensor file")
    if p.suffix in (".pt", ".pth", ".bin"):
        tensors = _load_legacy(p)
    else:
        try:
            tensors = st_load(p.read_bytes())
        except (SafetensorError, Exception) as e:  # safetensors raises several error types
            raise MemcliError(f"{p}: not a valid safetensors file ({str(e).splitlines()[0][:120]})") from None
    if check_finite:
        for k, v in tensors.items():
            if v.is_floating_point() and not torch.isfinite(v).all():
                raise MemcliError(f"{p}: tensor '{k}' holds NaN or inf values, expected finite numbers")
    return tensors


def _load_legacy(p: Path) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else "unsafe content"
        raise MemcliError(f"{p}: refused to load: not a plain weights file ({first})") from None
    except Exception as e:
        raise MemcliError(f"{p}: could not read legacy checkpoint ({type(e).__name__})") from None
    if isinstance(obj, torch.Tensor):
        return {"weight": obj}
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise MemcliError(f"{p}: expected a mapping of names to tensors (a state dict)")
    return dict(obj)


def check_shape(path, name: str, t: torch.Tensor, shape: tuple, dtype_kind: str | None = None) -> None:
    """Raise a one-line error when tensor ``name`` in ``path`` is not of ``shape`` (None = any size)."""
    ok = t.dim() == len(shape) and all(s is None or s == a for s, a in zip(shape, t.shape))
    if not ok:
        want = "[" + ", ".join("*" if s is None else str(s) for s in shape) + "]"
        raise MemcliError(f"{path}: tensor '{name}' has shape {list(t.shape)}, expected {want}")
    if dtype_kind == "int" and (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool):
        raise MemcliError(f"{path}: tensor '{name}' has dtype {t.dtype}, expected an integer dtype")
    if dtype_kind == "float" and not t.is_floating_point():
        raise MemcliError(f"{path}: tensor '{name}' has dtype {t.dtype}, expected a floating dtype")


def is_perfect_square(n: int) -> bool:
    return n > 0 and math.isqrt(n) ** 2 == n
