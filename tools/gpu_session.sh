#!/usr/bin/env bash
# One step of the GPU run, on a lent GPU machine with no network (each step inside a 10-minute command):
#
#   bash tools/gpu_session.sh tests        # the test suite, CUDA cases included, then the read-ahead benchmark
#   bash tools/gpu_session.sh llama3-8b    # tools/bench_gpu.py for one model shape (or qwen3-14b, gemma3-12b)
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
case "${1:-}" in
    tests | llama3-8b | qwen3-14b | gemma3-12b) ;;
    *) echo "usage: bash tools/gpu_session.sh tests|llama3-8b|qwen3-14b|gemma3-12b" >&2; exit 2 ;;
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
if [ "$1" = tests ]; then
    python3 -m pytest -q -rs --durations=20 tests 2>&1 | tee "$OUT/pytest_cuda.log"
    python3 tools/bench_read_ahead.py --device cuda 2>&1 | tee "$OUT/bench_read_ahead_cuda.txt"
else
    python3 tools/bench_gpu.py --models "$1" --tokens 32 128 --out "$OUT" 2>&1 | tee "$OUT/bench_gpu_$1.log"
fi
