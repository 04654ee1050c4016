#!/usr/bin/env bash
# Train coder-nano (configs/coder-nano.toml) or its AR twin (configs/coder-nano-ar.toml) on one GPU,
# unattended, each call inside a 9-minute limit:
#     bash scripts/gpu_train_coder.sh OUT_DIR diffusion      # then: ... OUT_DIR ar
# The first call on a machine builds the 12,288-token tokenizer and the token shards from that
# machine's own Python installation (standard library and site-packages). Training stops at a
# deadline and resumes from its last checkpoint when the same command runs again on the same
# machine; when a run is finished, its model directory comes back in OUT_DIR as
# MODEL.tar.part-* (`cat MODEL.tar.part-* | tar x` gives the directory MODEL), beside metrics.jsonl and the log.
# Only torch, tokenizers, safetensors, numpy, rich and jinja2 are needed, run from the source tree.
set -uo pipefail
out=${1:?usage: gpu_train_coder.sh OUT_DIR diffusion|ar}
kind=${2:-diffusion}
deadline=${DEADLINE_S:-500}  # seconds after which training is stopped, to resume on the next call
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
python=${PYTHON:-python}
log="$out/train-$kind.log"
case $kind in
    diffusion) config=configs/coder-nano.toml; run=runs/coder-nano ;;
    ar) config=configs/coder-nano-ar.toml; run=runs/coder-nano-ar ;;
    *) echo "kind must be diffusion or ar, not $kind" >&2; exit 2 ;;
esac
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
} > "$out/environment.txt" 2>&1
if [ ! -f runs/tokenizer-coder-12k/tokenizer.json ]; then
    stdlib=$($python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
    $python -m unmask tokenizer train --vocab-size 12288 --out runs/tokenizer-coder-12k "$stdlib" 2>&1 | tee -a "$log" || exit 1
fi
if [ ! -f runs/data/coder-12k/manifest.json ]; then
    $python -m unmask data build --tokenizer runs/tokenizer-coder-12k --out runs/data/coder-12k 2>&1 | tee -a "$log" || exit 1
fi
left=$((deadline - SECONDS))
if [ "$left" -lt 30 ]; then
    echo "== no time left before the deadline; run the same command again to train" | tee -a "$log"
    exit 0
fi
echo "== training $config for at most ${left}s" | tee -a "$log"
timeout --signal=INT --kill-after=20 "$left" $python -m unmask train "$config" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
cp "$run/metrics.jsonl" "$out/metrics-$kind.jsonl" 2>/dev/null
if [ "$status" -ne 0 ]; then
    echo "== stopped (exit $status) before the end; run the same command again to resume" | tee -a "$log"
    exit 0
fi
name=$(basename "$run")
tar -C "$run" --transform "s,^final,$name," -cf - final | split -b 15M - "$out/$name.tar.part-"
echo "== done: $(ls "$out")" | tee -a "$log"
