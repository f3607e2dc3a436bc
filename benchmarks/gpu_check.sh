#!/usr/bin/env bash
# The GPU check for one H100, at most 6 minutes (every step has a time limit): the CUDA tests,
# the decoding benchmark in bf16 at batch 256 and 1024 plus beam 5 at batch 128, the end-to-end
# figures, and the training-step benchmark. (benchmarks/gpu_experiments.sh measures the options
# that are not defaults yet.) Writes JSON and a log to $OUT (or a temp dir). Needs torch and
# transformers; prefixcap runs from src/ without being installed (see gpu_common.sh).
source "$(dirname "$0")/gpu_common.sh" gpu_check

section "tests that exercise CUDA code paths (pytest -m cuda)"
step 100 "$python" -m pytest -m cuda -q -p no:cacheprovider $(grep -l "mark.cuda" tests/test_*.py)

section "greedy, batch 256, bf16"
step 50 "$python" benchmarks/bench_generate.py --workdir "$models" --device cuda --dtype bfloat16 --batch-size 256 \
    --modes greedy --e2e-images 0 --json "$out/bench_greedy_b256.json"

section "greedy batch 1024 + beam 5 batch 128, bf16, with kernel profiles; end to end from pixels and JPEG files"
step 110 "$python" benchmarks/bench_generate.py --workdir "$models" --device cuda --dtype bfloat16 --batch-size 1024 \
    --beam-batch-size 128 --profile --json "$out/bench_b1024.json"

section "training step: ClipCap-style vs prefixcap, batch 1024"
step 75 "$python" benchmarks/bench_train.py --workdir "$models" --device cuda --steps 20 --warmup 5 --batch-size 1024 \
    --json "$out/bench_train_b1024.json"

echo "results in $out"
exit $status
