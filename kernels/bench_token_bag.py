"""Benchmark of one kernel (see ``memcli.kernels.bench``): ``python -m memcli.kernels.bench_token_bag [--quick] [--json]``."""

from memcli.kernels.bench import main

if __name__ == "__main__":
    main("token_bag")
