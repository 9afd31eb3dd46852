#!/usr/bin/env bash
# The CUDA path's check on one GPU, ready for one cold call (benchmarks/gpu_check.py says what it does):
# a preflight of about a minute (every products mode, with and without CUDA graphs, answers a small
# batch; answers alike at batch sizes 1 and 7; graphs captured), then the timed run — about 4 minutes on
# an H100 by default (Florence-2-large dimensions with random weights, fp16, 3 beams, 128 images, 8
# through the reference loop, 100 new tokens); --full for the long one. Figures go to gpu_check.json
# and the printed lines to gpu_check.log, under $OUT when set (else ./gpu-check-out), as they come.
#
# It installs nothing from the network: the package runs from this checkout, and when the machine's
# transformers is older than florence-cli needs (5.24), the wheels in .whl/ (ignored by git: carry
# them; $WHEELS names another folder) are installed first, into a folder of their own;
# docs/performance.md has the one pip download that fills .whl/. No wheels, a wheel that does not
# install, or still no transformers >= 5.24: one line, exit status 2, before anything else.
#
#   benchmarks/gpu_check.sh                 # on the GPU machine (carry .whl)
#   benchmarks/gpu_check.sh --full          # the long run: 256 images, 24 through the loop, 150 tokens
#   benchmarks/gpu_check.sh --smoke         # anywhere: the tiny model on the CPU, in seconds
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-$PWD/gpu-check-out}"
mkdir -p "$out"
log="$out/gpu_check.log"
site="${TMPDIR:-/tmp}/florence-gpu-check-site"
wheels_dir="${WHEELS:-.whl}"
needed=5.24

fail() {
    echo "gpu_check: $*" | tee -a "$log" >&2
    exit 2
}

transformers_fits() {  # prints the version found; fails unless it is at least $needed
    python3 - "$needed" <<'EOF'
import sys
from packaging.version import Version
try:
    import transformers
except Exception as exc:  # any import error: the version cannot be used
    print(f"none ({type(exc).__name__}: {exc})".splitlines()[0])
    sys.exit(1)
print(transformers.__version__)
sys.exit(Version(transformers.__version__) < Version(sys.argv[1]))
EOF
}

export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if ! found=$(transformers_fits); then
    wheels=("$wheels_dir"/*.whl)
    [ -e "${wheels[0]}" ] || fail "transformers >= $needed is needed, this machine has $found, and $wheels_dir/ holds no wheels (fill it as docs/performance.md says, and carry it)"
    rm -rf "$site"
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" \
        "${wheels[@]}" >"$out/pip.log" 2>&1; then
        fail "installing $wheels_dir/ failed: $(grep -m1 -i error "$out/pip.log" || tail -n1 "$out/pip.log") (all of pip's output: $out/pip.log)"
    fi
    found=$(transformers_fits) || fail "transformers >= $needed is still not importable after installing $wheels_dir/ (found $found)"
    echo "# installed $wheels_dir/ into $site" | tee -a "$log"
fi
python3 -c 'import torch; from florence_cli.model import FlorenceModel' 2>"$out/import.log" ||
    fail "florence-cli does not import: $(tail -n1 "$out/import.log")"
echo "# transformers $found, torch $(python3 -c 'import torch; print(torch.__version__, "CUDA", torch.version.cuda if torch.cuda.is_available() else None)')" | tee -a "$log"
python3 benchmarks/gpu_check.py --out "$out" "$@" 2>&1 | tee -a "$log"
