"""Memory hot paths: each op as a plain PyTorch reference with a Triton kernel beside it (triton_ops.py).

Installed as ``memcli.kernels`` (never as a top-level ``kernels`` package: that name belongs to a
PyPI distribution transformers probes for). ``MEMCLI_KERNELS=reference|triton|auto`` forces a path.
"""

from memcli.kernels.dispatch import entry_pool, product_key_select, token_bag  # noqa: F401
