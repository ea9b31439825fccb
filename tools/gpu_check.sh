#!/usr/bin/env bash
# The checks that need a CUDA machine, in one pass (about 5 minutes on one H200), logs under $OUT:
#   1. tests/test_kernels.py with the compiled Triton kernels on the GPU (not the CPU interpreter);
#   2. python -m memcli.kernels.bench at the seed's shapes (Triton vs reference vs seed-style);
#   3. the README's main job (memcli train memory, tiny default), short hippo / hrpo runs and a chat with each.
# Assumes memcli is importable (pip install -e . --no-deps on an image that has torch and triton).
#   bash tools/gpu_check.sh                # all three
#   bash tools/gpu_check.sh tests runs     # a subset: tests, bench, runs
set -uo pipefail
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 MEMCLI_QUIET=1
work=$(mktemp -d)

parts=${*:-tests bench runs}
want() { [[ " $parts " == *" $1 "* ]]; }
step() { echo "== $1 ($(date +%T))"; }

step env
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$OUT/env.txt"

if want tests; then
step "kernel tests on the GPU"
MEMCLI_KERNEL_TEST_DEVICE=cuda python3 -m pytest tests/test_kernels.py -o addopts="" -q -p no:cacheprovider \
    2>&1 | tail -25 | tee "$OUT/kernel_tests.txt"

fi
if want bench; then
step "kernel bench"
python3 -m memcli.kernels.bench 2>&1 | tee "$OUT/kernel_bench.txt"
fi
if want runs; then
step "main job: memcli train memory (tiny default)"
t0=$SECONDS
( cd "$work" && memcli train memory 2>&1 | tail -30 ) | tee "$OUT/train_memory.txt"
echo "wall: $((SECONDS - t0)) s" | tee -a "$OUT/train_memory.txt"

step "hippo and hrpo, tiny, a few steps"
( cd "$work" && memcli train hippo training.max_steps=60 training.eval_interval=30 2>&1 | tail -12
  memcli train hrpo training.max_steps=4 2>&1 | tail -12 ) | tee "$OUT/train_other.txt"
step "chat with each run"
( cd "$work" && memcli chat -m out/memory -p "Where was Qir born?" --json
  printf 'My pet is called Kozor.\nWhat is my pet called?\n' | memcli chat -t hippo -m out/hippo
  memcli chat -t hrpo -m out/hrpo -p "Sam has 3 pens and buys 4 more. How many pens?" --json ) 2>&1 | tail -20 \
    | tee "$OUT/chat.txt"
fi
step done
