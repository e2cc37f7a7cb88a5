#!/bin/bash
# One device call for issue 19's FP8 path: GPU tests, quality, profile, and the bench in
# bf16 and fp8 one after the other on the same machine. Results under $OUT.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch, triton; print(torch.__version__, triton.__version__)"
python3 -m pytest -q -s tests/test_fp8.py tests/test_gpu.py 2>&1 | tail -25
python3 benchmarks/model_profile.py --tokens 2000000 --precision fp8 2>&1 | tail -30
python3 benchmarks/precision_quality.py --device cuda --out $OUT/quality.json 2>&1 | grep -v Warn
for p in bf16 fp8; do
  python3 benchmarks/embed_bench.py --docs 500000 --baseline-docs 100000 --precision $p \
    --out $OUT/bench_$p.json 2>&1 | tail -2
done
