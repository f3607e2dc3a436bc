# Sourced by gpu_check.sh and gpu_experiments.sh: `source gpu_common.sh LOG_NAME`. Runs from the
# repository root with prefixcap importable from src/, logs everything to $out/LOG_NAME.log, sets
# $models (the benchmarks' --workdir), and defines `section TITLE` and `step SECONDS COMMAND...`
# (a time limit; a failure is remembered in $status and the script goes on). PYTHON picks the
# interpreter.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
out="${OUT:-$(mktemp -d)}"
mkdir -p "$out"
# The full-size random model is built once and shared by every benchmark here and in the other
# script (outside $OUT, which comes back from the machine).
models="${BENCH_WORKDIR:-${TMPDIR:-/tmp}/prefixcap-bench}"
exec > >(tee "$out/$1.log") 2>&1
status=0
python=${PYTHON:-python3}

section() { printf '\n========== %s ==========\n' "$*"; }
step() {
    local limit=$1
    shift
    timeout --kill-after=10 "$limit" "$@" || { echo "!!! failed or timed out (exit $?): $*"; status=1; }
}

section "machine"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
"$python" -c 'import torch, transformers; print("torch", torch.__version__, "| transformers", transformers.__version__, "| cuda", torch.version.cuda)'
