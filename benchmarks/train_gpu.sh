#!/usr/bin/env bash
# Training on a lent GPU (see docs/training.md). Run here first, once:
#     python benchmarks/train_pack.py pack       # -> .cache/gpu/ (teacher + xz corpus, ~48 MB)
# then as the device command, carrying .cache/gpu and .cache/gpt2.tiktoken:
#     bash benchmarks/train_gpu.sh explore       # ablations (benchmarks/train_gpu.py)
#     bash benchmarks/train_gpu.sh model         # `make model` (the recipe) + gpt2-124M
#     bash benchmarks/train_gpu.sh gpt2          # the same recipe on gpt2 (124M) alone
# What comes back lies under $OUT: the model as fp16 shards in default/ (join them with
# `pipeline merge-model`) and the logs in logs.tar.gz (at most 8 files return).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-/tmp/out}
LIMIT=${LIMIT:-585}  # seconds this script may take in all
mkdir -p "$OUT" /tmp/logs
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
case "${1:-explore}" in
explore)
    python3 benchmarks/train_gpu.py --out "$OUT" --plan explore --deadline "${DEADLINE:-530}"
    ;;
model)
    trap 'tar czf "$OUT/logs.tar.gz" -C /tmp logs' EXIT
    python3 benchmarks/train_pack.py unpack .cache/gpu/teacher /tmp/teacher
    GPU_MAKE=(PY=python3 RUNTIME= TRAIN_DEPS= TRAIN_DEVICE=cuda TEACHER=st:/tmp/teacher
              DISTILL_TEXTS=.cache/gpu/distill_sentences.txt.xz TRAIN_DIR=/tmp/train)
    # 1. The default model, exactly as `make model` makes it (its defaults: gpt2-mini).
    make model "${GPU_MAKE[@]}" MODEL_DIR=/tmp/default ${MODEL_ARGS:-} 2>&1 \
        | tee /tmp/logs/make_model.log || echo "make model failed" | tee -a /tmp/logs/make_model.log
    echo "make model done at $SECONDS s" | tee -a /tmp/logs/make_model.log
    if [ -f /tmp/default/model.safetensors ]; then
        python3 -m pipeline.cli export-model /tmp/default "$OUT/default" --shard-mb 15
        rm -f "$OUT"/default/{train_log.jsonl,summary.json,train_config.json}
        cp /tmp/default/*.json* /tmp/logs/
    fi
    # 2. The same recipe on the full 124M gpt2 preset, with the steps that the time left allows
    #    (conservatively 12 steps/s; ~110 s go to loading, CoSENT and evaluation).
    STEPS=$(( (LIMIT - SECONDS - 110) * ${GPT2_RATE:-12} ))
    echo "gpt2: $STEPS distillation steps from $SECONDS s" | tee /tmp/logs/make_gpt2.log
    if [ "$STEPS" -gt 200 ]; then
        timeout $((LIMIT - SECONDS - 5)) make model "${GPU_MAKE[@]}" MODEL_DIR=/tmp/gpt2-124m \
            BASE=gpt2 DISTILL_LR=5e-4 DISTILL_STEPS=$STEPS 2>&1 | tee -a /tmp/logs/make_gpt2.log \
            || echo "make model BASE=gpt2 failed or timed out" | tee -a /tmp/logs/make_gpt2.log
        mkdir -p /tmp/logs/gpt2 && cp /tmp/gpt2-124m/*.json* /tmp/logs/gpt2/ 2>/dev/null || true
        cp -r /tmp/train/gpt2-distill/train_log.jsonl /tmp/logs/gpt2/distill_log.jsonl 2>/dev/null || true
    fi
    echo "all done at $SECONDS s"
    ;;
gpt2)
    # The recipe on the 124M preset with as many distillation steps as one call allows: about
    # 130 s go to the teacher's pass over the corpus, 110 s to loading, CoSENT and evaluation.
    trap 'tar czf "$OUT/logs.tar.gz" -C /tmp logs' EXIT
    python3 benchmarks/train_pack.py unpack .cache/gpu/teacher /tmp/teacher
    STEPS=$(( (LIMIT - SECONDS - 240) * ${GPT2_RATE:-16} ))
    echo "gpt2: $STEPS distillation steps from $SECONDS s" | tee /tmp/logs/make_gpt2.log
    timeout $((LIMIT - SECONDS - 5)) make model PY=python3 RUNTIME= TRAIN_DEPS= TRAIN_DEVICE=cuda \
        TEACHER=st:/tmp/teacher DISTILL_TEXTS=.cache/gpu/distill_sentences.txt.xz \
        TRAIN_DIR=/tmp/train MODEL_DIR=/tmp/gpt2-124m BASE=gpt2 DISTILL_LR=${GPT2_LR:-2e-4} \
        DISTILL_STEPS=$STEPS 2>&1 | tee -a /tmp/logs/make_gpt2.log \
        || echo "make model BASE=gpt2 failed or timed out" | tee -a /tmp/logs/make_gpt2.log
    mkdir -p /tmp/logs/gpt2 && cp /tmp/gpt2-124m/*.json* /tmp/logs/gpt2/ 2>/dev/null || true
    cp /tmp/train/gpt2-distill/train_log.jsonl /tmp/logs/gpt2/distill_log.jsonl 2>/dev/null || true
    cp /tmp/train/gpt2-cosent/train_log.jsonl /tmp/logs/gpt2/cosent_log.jsonl 2>/dev/null || true
    echo "all done at $SECONDS s"
    ;;
esac
