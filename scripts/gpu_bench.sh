#!/usr/bin/env bash
# The GPU rows of docs/benchmarks.md, unattended, in under 9 minutes on one H100:
#     bash scripts/gpu_bench.sh OUT_DIR
# Random weights of published shapes are built on the device, so nothing is downloaded; only
# torch (with CUDA and triton) is needed besides the package itself, run from the source tree.
set -uo pipefail
out=${1:-${OUT:-bench-results}}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH=src
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/unmask-inductor}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
} > "$out/environment.txt" 2>&1
bench() {  # NAME LIMIT_SECONDS ARGS...
    local name=$1 limit=$2
    shift 2
    echo "== $name: unmask bench $*" | tee -a "$out/log.txt"
    timeout "$limit" python -m unmask bench --device cuda --json "$out/$name.json" "$@" 2>&1 | tee -a "$out/log.txt"
}
# The issue's setting: LLaDA-8B shapes, bf16, batch 1, prompt 128, 256 new tokens, block 32.
bench llada-8b-b1 240 --shapes llada-8b --batch 1 --prompt-len 128 --gen 256 --block 32 --tpf 1,8 --thresholds none --repeats 2
# Batched throughput of the fast diffusion path at 8 tokens per step.
bench llada-8b-b16 90 --shapes llada-8b --only fast --batch 16 --prompt-len 128 --gen 256 --block 32 --tpf 8 --thresholds none --repeats 1
bench llada-8b-b64 90 --shapes llada-8b --only fast --batch 64 --prompt-len 128 --gen 256 --block 32 --tpf 8 --thresholds none --repeats 1
# The default coder's size, everything.
bench coder-nano-b1 90 --shapes coder-nano --batch 1 --prompt-len 128 --gen 256 --block 32 --tpf 1,4,8 --thresholds none --repeats 3
echo "done: $(ls "$out")" | tee -a "$out/log.txt"
