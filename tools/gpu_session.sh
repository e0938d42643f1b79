#!/usr/bin/env bash
# The GPU run, on a lent GPU machine with no network:
#
#   bash tools/gpu_session.sh              # "all": what fits one command of GPU_BUDGET seconds (default 540),
#                                          # most important first; give the device call a timeout of 590 s
#   bash tools/gpu_session.sh tests        # or one step per command, for a longer lease: the CUDA tests
#   bash tools/gpu_session.sh llama3-8b    #   and the read-ahead benchmark, or tools/bench_gpu.py for one
#                                          #   model shape (qwen3-14b, gemma3-12b), T = 32 and 128
#
# A lent machine comes with about 15 minutes of device time in all, its start included, so "all" is
# planned for one call of 9 minutes:
#   1. the tests with a CUDA parametrization (31; `pytest -k cuda`), at most 150 s;
#   2. tools/bench_read_ahead.py --device cuda, at most 90 s;
#   3. Llama 3 8B's shape at T = 32 and 128: operators, autograd, spectra (cost model: 0.8 and
#      3.1 PFLOP for the operators, 15 and 62 s at 50 TFLOP/s), leaving 200 s for
#   4. Gemma 3 12B's and Qwen 3 14B's shapes at T = 32 (1.1 and 1.9 PFLOP, 26 and 30 GB of bf16 to write).
# tools/bench_gpu.py skips, and records as skipped, each step its cost model says will not finish in
# the time left; everything measured is saved as it comes, so a cut-off run still returns it.
#
# That machine has torch with CUDA, safetensors, tokenizers, sentencepiece, tqdm and pytest, but not
# llama.cpp's `gguf` reader, and its transformers (5.17) is older than the tests' oracle needs (5.23:
# before it, tokenizers converted from GGUF left out the BOS token). Fetch both wheels here first,
# into a folder git ignores, and carry that folder (`.whl`, about 14 MB) with the command:
#
#   echo /.whl/ >> .git/info/exclude
#   python -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl gguf==0.19.0 transformers==5.23.0
#
# Everything written goes to $OUT (what comes back from that machine), or to tools/results here.
set -uo pipefail
step=${1:-all}
case "$step" in
    all | tests | llama3-8b | qwen3-14b | gemma3-12b) ;;
    *) echo "usage: bash tools/gpu_session.sh [all|tests|llama3-8b|qwen3-14b|gemma3-12b]" >&2; exit 2 ;;
esac
export PYTHONUNBUFFERED=1
OUT=${OUT:-tools/results}
mkdir -p "$OUT"
export PYTHONPATH="$PWD"  # minielm from this checkout, also in the tests' child processes
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
if ! gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv); then
    echo "no GPU here (nvidia-smi failed): this script is for a lent GPU machine" >&2
    exit 1
fi
echo "$gpu" | tee "$OUT/gpu.txt"
budget=${GPU_BUDGET:-540}
left() { echo $((budget - SECONDS)); }  # seconds left of the budget (SECONDS: since this script started)

tests() {  # $1: pytest's selection, $2: seconds at most
    timeout "$2" python3 -m pytest -q -rs --durations=20 tests $1 2>&1 | tee "$OUT/pytest_cuda.log"
    timeout 90 python3 tools/bench_read_ahead.py --device cuda 2>&1 | tee "$OUT/bench_read_ahead_cuda.txt"
}

case "$step" in
    tests) tests "" 600 ;;
    all)
        tests "-k cuda" 150
        python3 tools/bench_gpu.py --models llama3-8b --tokens 32 128 --deadline $(($(left) - 200)) --out "$OUT" \
            2>&1 | tee "$OUT/bench_gpu_llama3-8b.log"
        python3 tools/bench_gpu.py --models gemma3-12b qwen3-14b --tokens 32 --deadline "$(left)" --out "$OUT" \
            2>&1 | tee "$OUT/bench_gpu_gemma3-12b_qwen3-14b.log"
        ;;
    *) python3 tools/bench_gpu.py --models "$step" --tokens 32 128 --out "$OUT" 2>&1 | tee "$OUT/bench_gpu_$step.log" ;;
esac
