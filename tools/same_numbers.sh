#!/usr/bin/env bash
# Short runs of every train recipe path on the tiny backbone, with this checkout and with git revision REV,
# then a comparison of their logged metrics and end-of-run evaluations (wall-clock fields aside).
# A refactor that should not change what is computed must print "same" for every path.
#   usage: bash tools/same_numbers.sh REV [WORKDIR]        (about 15 minutes on 2 CPU cores, one thread each)
set -euo pipefail
rev=${1:?usage: same_numbers.sh REV [WORKDIR]}
root=$(cd "$(dirname "$0")/.." && pwd)
work=${2:-$(mktemp -d)}
git -C "$root" worktree add -f "$work/code-$rev" "$rev" >/dev/null
runs() {  # CODE OUT
  mkdir -p "$2" && cd "$2"
  export PYTHONPATH=$1 OMP_NUM_THREADS=1 MEMCLI_QUIET=1
  local M="python -m memcli" C="training.max_steps=6 training.eval_interval=3 training.eval_num_samples=16
    training.final_eval_num_samples=32 logging.tensorboard=false training.batch_size=8"
  $M train router $C logging.run_name=router --json > router.json
  $M train fusion $C logging.run_name=fusion dataset.pretrained_router_path=out/router --json > fusion.json
  $M train memory $C logging.run_name=memory --json > memory.json
  $M train memory $C logging.run_name=memlora model.finetuning_method=lora --json > memlora.json
  $M gen-data default --out dtext --num-facts 256 > /dev/null
  $M train memory $C logging.run_name=text dataset.data_dir=dtext dataset.text_path=dtext/text_train.jsonl \
    training.ema_update_freq=2 --json > text.json
  $M train hippo $C logging.run_name=hippo training.stage1_epochs=0.002 --json > hippo.json
  $M train hrpo training.max_steps=3 training.batch_size=2 logging.tensorboard=false logging.run_name=hrpo --json > hrpo.json
}
(runs "$work/code-$rev" "$work/before") 2> "$work/before.log"
(runs "$root" "$work/after") 2> "$work/after.log"
python3 - "$work" <<'PY'
import json, sys
w = sys.argv[1]
clock = {"tokens_per_s", "peak_rss_mb", "elapsed s", "s / step", "peak RSS MB", "run"}
def rows(d, r):
    return [{k: v for k, v in json.loads(l).items() if k not in clock} for l in open(f"{w}/{d}/out/{r}/metrics.jsonl")]
def summary(d, r):
    return {k: v for k, v in json.load(open(f"{w}/{d}/{r}.json")).items() if k not in clock}
bad = 0
for r in ("router", "fusion", "memory", "memlora", "text", "hippo", "hrpo"):
    same = rows("before", r) == rows("after", r) and summary("before", r) == summary("after", r)
    bad += not same
    print(f"{r:8s} {'same' if same else 'DIFFERENT'}")
sys.exit(1 if bad else 0)
PY
