#!/usr/bin/env bash
# Training on a lent GPU (docs/training.md). Here, first: `python benchmarks/train_pack.py pack`
# (.cache/gpu/p0 ... pN: both teachers and the data, in parts of 60 MB). Then consecutive
# calls of one warm machine (it goes back after 30 s idle):
#     bash benchmarks/train_gpu.sh receive        # carrying .cache/gpu/pK, once per part
#     bash benchmarks/train_gpu.sh start          # carrying the last part and .cache/gpt2.tiktoken:
#                                                 # join + check, teachers' vectors, runs start
#     bash benchmarks/train_gpu.sh wait 560       # the runs go on (setsid) between calls
#     bash benchmarks/train_gpu.sh collect        # the default model as fp16 shards + all logs
# The runs: `make model` (the recipe, gpt2-mini), the same recipe on gpt2 (124M), and
# opt-in: shorter ablations of the recipe's choices (ABLATIONS=1: relational term, ensemble vs
# mpnet alone, CoSENT with MNRL on the silver pairs) and CoSENT on teacher-labelled pairs
# (SILVER=N anchors). Choices are made on dev; test is only reported.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=true
# Several runs share the host's 16 cores: at torch's default (a thread per core each) four
# runs at once left the GPU 36% busy and each run at a quarter of its speed alone.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
# DEV=cpu with small data and steps is the dry run of the whole plan (tested here first).
DEV=${DEV:-cuda}
export PIPELINE_CACHE_DIR=${PIPELINE_CACHE_DIR:-/tmp/cache}
C=$PIPELINE_CACHE_DIR
OUT=${OUT:-/tmp/out}
D=$C/data
LOGS=/tmp/logs
mkdir -p "$OUT" $LOGS /tmp/parts
MINI_STEPS=${MINI_STEPS:-10000}  # 168 s alone on one H200 (60 steps/s, 1.56M tokens/s)
GPT2_STEPS=${GPT2_STEPS:-0}
ABLATIONS=${ABLATIONS:-0}  # 1: also the three 3000-step ablations and CoSENT + MNRL
SILVER=${SILVER:-0}  # N > 0: CoSENT on STS-B train + teacher-labelled pairs of N anchors
ABLATION_STEPS=${ABLATION_STEPS:-5000}
BATCH=${BATCH:-512}
EPOCHS=${EPOCHS:-4}  # of CoSENT
MAKE_ARGS=(PY=python3 RUNTIME= TRAIN_DEPS= TRAIN_DEVICE=$DEV DISTILL_TEXTS=$D/distill_texts.txt
           SILVER_PAIRS=$D/silver_pairs.tsv DEBIAN_TEXTS=$D/debian_packages.parquet
           TEACHER_CACHE=$C/vectors TRAIN_DIR=/tmp/train DISTILL_BATCH=$BATCH
           COSENT_EPOCHS=$EPOCHS)
TEACHER='st:all-mpnet-base-v2*0.7+st:all-MiniLM-L6-v2*0.3'

ablation() {  # name, then `pipeline train` options that differ from the recipe's distillation
    local name=$1; shift
    python3 -m pipeline.cli train --out /tmp/train/$name --init gpt2-mini \
        --attention bidirectional --pooling mean --n-positions 256 --max-tokens 256 \
        --distill-data $D/distill_texts.txt --distill-data $D/debian_packages.parquet \
        --teacher-cache $C/vectors --dev data_sets/dev.tsv --steps $ABLATION_STEPS \
        --batch-size $BATCH --lr 1e-3 --warmup 0.02 --eval-every 1000 --save-every 5000 \
        --log-every 100 --device $DEV --no-progress "$@" > $LOGS/$name.log 2>&1
}

plan() {
    echo "plan starts $(date -u +%T)"
    for t in st:all-mpnet-base-v2 st:all-MiniLM-L6-v2; do
        python3 benchmarks/train_gpu_teachers.py --teacher $t --cache $C/vectors --device $DEV \
            --distill-data $D/distill_texts.txt --distill-data $D/debian_packages.parquet \
            > $LOGS/teacher-${t#st:}.log 2>&1 &
    done
    wait
    echo "teachers done $(date -u +%T)"
    make model "${MAKE_ARGS[@]}" MODEL_DIR=/tmp/default DISTILL_STEPS=$MINI_STEPS \
        > $LOGS/make_model.log 2>&1 &
    local mini=$!
    [ "$GPT2_STEPS" -gt 0 ] && make model "${MAKE_ARGS[@]}" MODEL_DIR=/tmp/gpt2-124m BASE=gpt2 \
        TEACHER_DIM=768 DISTILL_LR=2e-4 DISTILL_STEPS=$GPT2_STEPS > $LOGS/make_gpt2.log 2>&1 &
    if [ "$ABLATIONS" = 1 ]; then ablations; fi
    wait $mini
    echo "make model done $(date -u +%T)"
    if [ "$ABLATIONS" = 1 ]; then mnrl; fi
    if [ "$SILVER" -gt 0 ]; then silver; fi
    wait
    echo "all done $(date -u +%T)"
}

ablations() {
    ablation abl-ens-rel --teacher "$TEACHER" --teacher-dim 384 --relational-weight 1 &
    local a1=$!
    ablation abl-ens-norel --teacher "$TEACHER" --teacher-dim 384 &
    local a2=$!
    ablation abl-mpnet-rel --teacher st:all-mpnet-base-v2 --teacher-dim 384 --relational-weight 1 &
    local a3=$!
    wait $a1 $a2 $a3
    echo "ablations done $(date -u +%T)"
}

mnrl() {
    # The recipe's second stage again, with MNRL on the silver pairs beside CoSENT.
    python3 -m pipeline.cli train --out /tmp/train/cosent-mnrl --init /tmp/train/gpt2-mini-distill \
        --pairs data_sets/train.tsv --mnrl-pairs $D/silver_pairs.tsv --mnrl-weight 0.5 \
        --dev data_sets/dev.tsv --epochs $EPOCHS --pair-batch-size 32 --lr 1e-4 --warmup 0.1 \
        --eval-every 45 --save-every 1000 --log-every 45 --device $DEV --no-progress \
        > $LOGS/cosent-mnrl.log 2>&1
    python3 -m pipeline.cli evaluate --model /tmp/train/cosent-mnrl --data data_sets/test.tsv \
        --device $DEV --save $LOGS/cosent-mnrl-test.json >> $LOGS/cosent-mnrl.log 2>&1
    echo "mnrl done $(date -u +%T)"
}

silver() {
    # CoSENT from the recipe's distilled model on STS-B train plus teacher-labelled pairs.
    python3 benchmarks/train_gpu_silver.py --teacher "$TEACHER" --cache $C/vectors \
        --distill-data $D/distill_texts.txt --distill-data $D/debian_packages.parquet \
        --anchors $SILVER --device $DEV --out $D/silver_scored.tsv > $LOGS/silver.log 2>&1
    python3 -m pipeline.cli train --out /tmp/train/cosent-silver \
        --init /tmp/train/gpt2-mini-distill --pairs $D/silver_scored.tsv \
        --dev data_sets/dev.tsv --epochs 1 --pair-batch-size 32 --lr 1e-4 --warmup 0.1 \
        --eval-every 200 --save-every 2000 --log-every 100 --device $DEV --no-progress \
        >> $LOGS/silver.log 2>&1
    python3 -m pipeline.cli evaluate --model /tmp/train/cosent-silver --data data_sets/test.tsv \
        --paragraphs data_sets/paragraphs_wiki.tsv --paragraphs data_sets/paragraphs_bible.tsv \
        --device $DEV --save $LOGS/cosent-silver-test.json >> $LOGS/silver.log 2>&1
    echo "silver done $(date -u +%T)"
}

status() {
    tail -n 3 $LOGS/*.log 2>/dev/null | cut -c1-300
    for f in /tmp/train/*/train_log.jsonl; do
        [ -f "$f" ] && echo "$f: $(grep dev_spearman "$f" | tail -n 2 | tr '\n' ' ' | cut -c1-400)"
    done
    nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader
}

case "${1:-}" in
receive)
    cp -f .cache/gpu/p*/* /tmp/parts/ && ls -l /tmp/parts
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    ;;
start)
    cp -f .cache/gpu/p*/* /tmp/parts/
    python3 benchmarks/train_pack.py unpack /tmp/parts $C || exit 1
    rm -f /tmp/parts/bundle.tar*
    setsid nohup bash benchmarks/train_gpu.sh plan > $LOGS/plan.log 2>&1 < /dev/null &
    sleep "${2:-60}"; status
    ;;
plan) plan ;;
wait)
    end=$((SECONDS + ${2:-300}))
    while [ $SECONDS -lt $end ] && ! grep -q "all done" $LOGS/plan.log; do sleep 10; done
    status
    ;;
collect)
    status
    if [ -f /tmp/default/model.safetensors ]; then
        python3 -m pipeline.cli export-model /tmp/default "$OUT/default" --shard-mb 15
        rm -f "$OUT"/default/{train_log.jsonl,summary.json,train_config.json,distill_log.jsonl}
    fi
    mkdir -p $LOGS/runs
    for run in /tmp/train/*/; do
        name=$(basename "$run"); mkdir -p $LOGS/runs/$name
        cp "$run"/*.json* $LOGS/runs/$name/ 2>/dev/null
    done
    for m in default gpt2-124m; do
        mkdir -p $LOGS/$m; cp /tmp/$m/*.json* $LOGS/$m/ 2>/dev/null
    done
    tar czf "$OUT/logs.tar.gz" -C /tmp logs
    ls -l "$OUT" "$OUT/default" 2>/dev/null
    ;;
*) echo "usage: $0 receive|start [S]|wait S|collect"; exit 2 ;;
esac
