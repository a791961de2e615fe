#!/usr/bin/env bash
# GPU readiness check of the streamed pass, in one command on a lent GPU machine (~2-4 min).
# The machine's python3 has torch, numpy, scipy, safetensors; zarr and its codecs travel
# as wheels in .whl/ (ignored by git; fetch them here first, see
# /work/.library/device/README.md, "nvidia-h200"):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl \
#     zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 zarrs==0.2.3
# then, through the device tool: run(command="bash scripts/gpu_check.sh", carry=[".whl"]).
# Writes the JSON report to $OUT/gpu_check.json (when $OUT is set) and to stdout.
set -euo pipefail
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out=${OUT:-/tmp}
python3 scripts/gpu_check.py | tee "$out/gpu_check.json"
# the kernel tests, on the CPU of that machine (16 cores): same code path as CI
python3 -m pytest -q -p no:cacheprovider tests/test_method_kernels.py tests/test_backends_staging.py \
    2>&1 | tail -3 || true
