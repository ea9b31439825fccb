"""Memory hot paths: each op as a plain PyTorch reference with a Triton kernel beside it (triton_ops.py).

Installed as ``memcli.kernels``. ``MEMCLI_KERNELS=reference|triton|auto`` forces a path.

The folder is also found as a top-level ``kernels`` package whenever Python runs from a checkout's root
(``python -m pytest``, ``python -m memcli``, a notebook): the working directory comes first on ``sys.path``.
That name belongs to a PyPI distribution which transformers >= 5.25 requires and imports on every model
load, so imported under it, this file hands the name over to the installed distribution (or reports it
absent) instead of hiding it.
"""

import sys

if __name__ == "kernels":
    import importlib.machinery
    import importlib.util
    import os

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _elsewhere = [p for p in sys.path if os.path.abspath(p or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _elsewhere)
    if _spec is None or _spec.loader is None:  # no distribution installed (or only a namespace folder)
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels' (this checkout's kernels/ folder is memcli.kernels)",
                                  name="kernels")
    _module = importlib.util.module_from_spec(_spec)
    sys.modules["kernels"] = _module  # the import statement returns what sys.modules holds once this file ends
    try:
        _spec.loader.exec_module(_module)
    except BaseException:
        sys.modules.pop("kernels", None)
        raise
else:
    from memcli.kernels.dispatch import entry_pool, product_key_select, token_bag  # noqa: F401
