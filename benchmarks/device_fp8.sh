#!/bin/bash
# One device call for issue 19's FP8 path: GPU tests, per-kernel profile in bf16 and fp8,
# quality (cosine to fp32, STS-B test), and the bench with --precision PRECISIONS (default
# "bf16 fp8"), one after the other on the same machine. Results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 -m pytest -q -s tests/test_fp8.py tests/test_gpu.py 2>&1 | grep -v "^\s*$" | tail -12
for p in bf16 fp8; do
  echo "== profile $p"
  python3 benchmarks/model_profile.py --tokens 2000000 --precision $p 2>&1 | grep -v "after '" | tail -20
done
python3 benchmarks/precision_quality.py --device cuda --out $OUT/quality.json 2>&1 | grep -v Warn
for p in ${PRECISIONS:-bf16 fp8}; do
  python3 benchmarks/embed_bench.py --docs 500000 --baseline-docs 100000 --precision $p \
    --out $OUT/bench_$p.json 2>&1 | tail -1
done
