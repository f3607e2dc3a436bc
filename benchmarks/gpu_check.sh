#!/usr/bin/env bash
# The GPU check for one H100, at most 6 minutes (every step has a time limit): the CUDA tests,
# the decoding benchmark in bf16 at batch 256 and 1024 plus beam 5 at batch 128, the end-to-end
# figures, image preprocessing threads, and the training-step benchmark (eager and compiled).
# Writes JSON and a log to $OUT (or a temp dir). Needs torch and
# transformers; prefixcap runs from src/ without being installed. PYTHON picks the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
exec > >(tee "$out/gpu_check.log") 2>&1
status=0
python=${PYTHON:-python3}

section() { printf '\n========== %s ==========\n' "$*"; }
step() {  # step SECONDS COMMAND...: run with a time limit; remember any failure and go on
    local limit=$1
    shift
    timeout --kill-after=10 "$limit" "$@" || { echo "!!! failed or timed out (exit $?): $*"; status=1; }
}

section "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.version.cuda)'

section "tests that exercise CUDA code paths (pytest -m cuda)"
step 100 "$python" -m pytest -m cuda -q -p no:cacheprovider $(grep -l "mark.cuda" tests/test_*.py)

section "greedy, batch 256, bf16"
step 50 "$python" benchmarks/bench_generate.py --device cuda --dtype bfloat16 --batch-size 256 \
    --modes greedy --e2e-images 0 --json "$out/bench_greedy_b256.json"

section "greedy batch 1024 + beam 5 batch 128, bf16, with kernel profiles; end to end from pixels and JPEG files"
step 110 "$python" benchmarks/bench_generate.py --device cuda --dtype bfloat16 --batch-size 1024 \
    --beam-batch-size 128 --profile --json "$out/bench_b1024.json"

section "JPEG decoding + preprocessing threads: HF processor vs prefixcap's uint8 path"
step 40 "$python" benchmarks/bench_preprocess.py --threads 1,8,16 --images 800 --json "$out/bench_preprocess.json"

section "training step: ClipCap-style vs prefixcap at batch 1024, eager then torch.compile"
step 75 "$python" benchmarks/bench_train.py --device cuda --steps 20 --warmup 5 --batch-size 1024 \
    --json "$out/bench_train_b1024.json"
step 120 "$python" benchmarks/bench_train.py --device cuda --steps 20 --warmup 5 --batch-size 1024 --compile \
    --json "$out/bench_train_b1024_compiled.json"

echo "results in $out"
exit $status
