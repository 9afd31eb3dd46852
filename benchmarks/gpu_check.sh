#!/usr/bin/env bash
# Issue 17's check of the CUDA path on one GPU, in under 8 minutes on an H200: Florence-2-large
# dimensions with random weights (nothing downloaded), fp16, <OD> and <MORE_DETAILED_CAPTION>, 3 beams,
# 256 images, the reference loop on 24 of them (benchmarks/gpu_check.py says what it prints).
#
# It installs nothing from the network: the package runs from this checkout, and the wheels in .whl/
# (ignored by git; fetch them once where PyPI is reachable, for the GPU machine's Python 3.12):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl transformers==5.24.0 pycocotools==2.0.11
# transformers 5.24 is the version florence-cli is tested with (5.17's beam-search helpers take other
# arguments, and every answer would fail); pycocotools serves `florence eval` (the check needs none).
# Wheels that do not fit this machine's Python are skipped, with a line.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine (carry .whl)
#   benchmarks/gpu_check.sh --smoke         # anywhere: the tiny model on the CPU, to see it run
set -euo pipefail
cd "$(dirname "$0")/.."
site="${TMPDIR:-/tmp}/florence-gpu-check-site"
for wheel in .whl/*.whl; do
    [ -e "$wheel" ] || continue
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
        "$wheel" 2>/dev/null || echo "# skipped $wheel: not for this Python"
done
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers; print(f"# torch {torch.__version__}, transformers \
{transformers.__version__}, CUDA {torch.version.cuda if torch.cuda.is_available() else None}")'
exec python3 benchmarks/gpu_check.py "$@"
