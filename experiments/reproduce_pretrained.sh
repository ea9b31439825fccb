#!/usr/bin/env bash
# Every figure of README "Memory on a pretrained model (SmolLM2-135M)", in one command, on 2 CPU cores (a few hours).
#   bash experiments/reproduce_pretrained.sh [LOCOMO_JSON]
# Runs go to out/, tables to out/tables/. LoCoMo (CC BY-NC 4.0) is not shipped: pass its locomo10.json.
set -euo pipefail
LOCOMO=${1:-../shared/data/locomo/locomo10.json}
export MEMCLI_QUIET=${MEMCLI_QUIET:-1}
mkdir -p out/tables
memcli download smollm2-135m

# explicit memory: the pretrained recipe (frozen, prefix read), the same with LoRA, the additive read; tiny beside
memcli train memory model.backbone=smollm2-135m logging.run_name=real --json > out/tables/real.json
memcli train memory model.backbone=smollm2-135m model.finetuning_method=lora training.batch_size=8 \
    training.max_steps=300 logging.run_name=real-lora --json > out/tables/real-lora.json
memcli train memory model.backbone=smollm2-135m model.read=additive training.batch_size=8 training.max_steps=300 \
    logging.run_name=real-additive --json > out/tables/real-additive.json
memcli train memory logging.run_name=tiny --json > out/tables/tiny.json
memcli compare formats -m out/real --num-samples 100 --markdown out/tables/formats.md
# knowledge editing and scale: the bank grown with the other usable T-REx facts (the slice's stay outside it)
python tools/scale_curve.py --write-facts ../shared/data/trex out/real out/tables/scale_facts.jsonl
python tools/scale_curve.py out/real data/smollm2-135m out/tables/scale_facts.jsonl 1024 4096 16384 28768 \
    --out out/scale --markdown out/tables/scale.md
memcli compare editing -m out/scale/real-28768 --data data/smollm2-135m --edits 1,10,100,1000 --num-samples 100 \
    --markdown out/tables/editing.md
memcli compare editing -m out/real --data data/smollm2-135m --edits 1,10,100 --num-samples 100 \
    --markdown out/tables/editing-1024.md
memcli train memory model.backbone=smollm2-135m dataset.paraphrases=false training.epochs=12 \
    logging.run_name=real-cloze --json > out/tables/real-cloze.json
memcli compare editing -m out/real-cloze --data data/smollm2-135m --edits 1,10,100 --num-samples 100 \
    --markdown out/tables/editing-1024-cloze.md
memcli compare checkpoints out/real out/real-lora out/real-additive --data data/smollm2-135m \
    --markdown out/tables/explicit-real.md

# HIPPO: dialogs stated turns earlier, asked later; LoCoMo subset
memcli train hippo model.backbone=smollm2-135m training.max_steps=400 training.eval_interval=100 \
    training.final_eval_num_samples=200 \
    logging.run_name=hippo-real --json > out/tables/hippo-real.json
if [ -f "$LOCOMO" ]; then
  memcli compare locomo -m out/hippo-real --data "$LOCOMO" --conversations 1 --max-questions 60 --context-window 2048 \
      --markdown out/tables/locomo.md
  # turn memory: evidence recall of each retriever on the design half (1-5) and the held-out half (6-10)
  for r in hybrid lexical dense; do
    for skip in 0 5; do
      memcli compare locomo --data "$LOCOMO" --backbone tiny --recall-only --retriever $r --skip $skip \
          --conversations 5 --markdown out/tables/locomo-recall-$r-$skip.md
    done
  done
  # what SmolLM2 answers with no history, the retrieved turns, the full history and the evidence (34 min)
  memcli compare locomo --data "$LOCOMO" --backbone smollm2-135m --skip 5 --sample 30 --context-window 2048 \
      --setups none,oracle,turns,full --answers out/tables/locomo-heldout-answers.jsonl \
      --markdown out/tables/locomo-heldout.md
fi

# HRPO: hybrid (thinking residual on) vs plain GRPO from the same start and seeds
memcli train hrpo model.backbone=smollm2-135m logging.run_name=hrpo-hybrid --json > out/tables/hrpo-hybrid.json
memcli train hrpo model.backbone=smollm2-135m training.hybrid=false logging.run_name=hrpo-plain \
    --json > out/tables/hrpo-plain.json
memcli compare runs out/hrpo-hybrid out/hrpo-plain --metric reward_mean --metric kl --plot out/tables/hrpo.png \
    --markdown out/tables/hrpo.md
memcli compare checkpoints out/hrpo-hybrid out/hrpo-plain --data data/arithmetic/test.jsonl \
    --markdown out/tables/hrpo-eval.md
python experiments/hrpo_base_accuracy.py smollm2-135m data/arithmetic/test.jsonl > out/tables/hrpo-base.json
# MiniMind's comparison (tiny LM pretrained from scratch on the T-REx slice's sentences)
memcli compare pretrain --steps 300 --markdown out/tables/pretrain.md
echo "tables in out/tables/"
