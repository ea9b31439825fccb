"""Pick the implementation of each memory op: Triton on CUDA when available, the reference elsewhere.

``MEMCLI_KERNELS=reference`` forces the PyTorch path, ``triton`` forces Triton (errors if it cannot
run; on CPU tensors only under ``TRITON_INTERPRET=1``), ``auto`` (default) uses Triton only for CUDA
tensors. The CPU reference uses ``embedding_bag`` and never builds ``[T, k, L, D]``.
"""

from __future__ import annotations

import os

from memcli.kernels.reference import entry_pool_ref, product_key_select_ref, token_bag_ref


MODES = ("auto", "reference", "triton")


def _mode() -> str:
    m = os.environ.get("MEMCLI_KERNELS", "auto").lower()
    if m not in MODES:
        from memcli.errors import MemcliError

        raise MemcliError(f"MEMCLI_KERNELS={m!r}: expected one of {', '.join(MODES)}")
    return m


def _use_triton(t) -> bool:
    m = _mode()
    if m == "reference":
        return False
    if m == "triton":
        if not _triton_available():
            from memcli.errors import MemcliError

            raise MemcliError("MEMCLI_KERNELS=triton, but the Triton kernels cannot be imported here "
                              "(triton missing or memcli.kernels.triton_ops absent); use auto or reference")
        return True
    return t.is_cuda and _triton_available()


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401

        from memcli.kernels import triton_ops  # noqa: F401
        return True
    except Exception:
        return False


def product_key_select(s1, s2, k, kh=None, valid=None):
    if _use_triton(s1):
        from memcli.kernels.triton_ops import product_key_select_triton

        return product_key_select_triton(s1, s2, k, kh, valid)
    return product_key_select_ref(s1, s2, k, kh, valid)


def token_bag(token_ids, cells, weights, emb, pad_id):
    if _use_triton(emb):
        from memcli.kernels.triton_ops import token_bag_triton

        return token_bag_triton(token_ids, cells, weights, emb, pad_id)
    return token_bag_ref(token_ids, cells, weights, emb, pad_id)


def entry_pool(token_ids, cells, emb, pad_id):
    """Per-candidate pooled entries ``[T, k, D]`` (used by the content re-rank)."""
    if _use_triton(emb):
        from memcli.kernels.triton_ops import entry_pool_triton

        return entry_pool_triton(token_ids, cells, emb, pad_id)
    return entry_pool_ref(token_ids, cells, emb, pad_id)
