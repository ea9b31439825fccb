import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MEMCLI_QUIET", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest-xdist: share the cores between workers instead of oversubscribing
    _threads = str(max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)  # subprocesses (distributed ranks, the CLI) inherit it
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

FIXTURES = Path(__file__).parent / "fixtures"

# Longest files first (measured on 2 cores, one thread per worker): the two learning checks alone take 14 and
# 10 minutes, so starting them last would leave one worker idle for most of that time.
_LONGEST_FIRST = ("test_learning_explicit.py", "test_learning_hippo.py", "test_backbone.py", "test_resume.py",
                  "test_recipes.py", "test_cli_explicit.py", "test_faults.py", "test_hippo.py", "test_learning_hrpo.py",
                  "test_distributed.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(rank)))  # stable: a file's own order is kept


def run_cli(args, capsys=None):
    """Run the memcli entry point in-process; return (exit code, stdout, stderr)."""
    from memcli.cli import main

    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    out, err = capsys.readouterr() if capsys is not None else ("", "")
    return code, out, err


@pytest.fixture
def cli(capsys):
    return lambda *args: run_cli(args, capsys)


@pytest.fixture(scope="session")
def default_data(tmp_path_factory):
    """The synthetic default pipeline, built once per test session (about 5 s)."""
    from memcli.data.pipeline import default_data as build

    d = tmp_path_factory.mktemp("default")
    build(d, seed=0, num_facts=1024)
    return d


def assert_one_line_error(code, err, *needles):
    assert code == 2, f"exit code {code}, stderr: {err}"
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one line, got: {err!r}"
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], f"{n!r} not in {lines[0]!r}"
