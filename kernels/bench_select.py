"""Benchmark of one kernel (see ``memcli.kernels.bench``): ``python -m memcli.kernels.bench_select [--quick] [--json]``."""

from memcli.kernels.bench import main

if __name__ == "__main__":
    main("select")
