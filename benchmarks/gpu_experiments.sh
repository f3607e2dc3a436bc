#!/usr/bin/env bash
# Options that are not defaults yet, measured on a GPU in at most 6 minutes (run after
# gpu_check.sh, on the same machine): attention kernels at the engine's shapes, torch.compile for
# decoding (compile_blocks) and for the training step, and image-preprocessing threads with and
# without --jpeg-draft. Each benchmark measures a baseline in the same run: compare its ratio (c/b
# for decoding, (b)/(a) for training) with the eager one from gpu_check.sh. Writes JSON and a log
# to $OUT (or a temp dir). Needs torch and transformers; prefixcap runs from src/ without being
# installed (see gpu_common.sh).
source "$(dirname "$0")/gpu_common.sh" gpu_experiments

section "attention kernels at the engine's shapes (1024 rows, bf16)"
step 40 "$python" benchmarks/bench_attention.py --device cuda --json "$out/bench_attention.json"
step 20 "$python" benchmarks/bench_attention.py --device cuda --rows 640 --json "$out/bench_attention_beam.json"

section "decoding with compile_blocks=True: greedy batch 1024, beam 5 batch 128, bf16"
step 120 "$python" benchmarks/bench_generate.py --workdir "$models" --device cuda --dtype bfloat16 --batch-size 1024 \
    --beam-batch-size 128 --skip-reference --e2e-images 0 --compile --json "$out/bench_b1024_compiled.json"

section "training step with torch.compile, batch 1024"
step 120 "$python" benchmarks/bench_train.py --workdir "$models" --device cuda --steps 20 --warmup 5 --batch-size 1024 --compile \
    --json "$out/bench_train_b1024_compiled.json"

section "JPEG decoding + preprocessing threads: HF processor vs prefixcap, 640x480 and 1920x1080"
step 30 "$python" benchmarks/bench_preprocess.py --threads 1,8,16 --images 800 --json "$out/bench_preprocess_640.json"
step 30 "$python" benchmarks/bench_preprocess.py --threads 1,8,16 --images 300 --size 1920x1080 \
    --json "$out/bench_preprocess_1080.json"

echo "results in $out"
exit $status
