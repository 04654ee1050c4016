#!/usr/bin/env bash
# Adapt SmolLM2-135M into the block-diffusion coder on one GPU, unattended, each call inside the
# device tool's limits (9 minutes a command, 64 MiB of working tree a call, 16 MiB a returned file).
#
# The 98 MB base GGUF is larger than one call may carry (the whole working tree travels, 64 MiB at
# most, and the shipped default's delta alone is 47 MiB), so: move the delta out of the checkout
# for these calls (`mv src/unmask/assets/default/delta.safetensors /tmp/`, back afterwards), and
# carry the base in parts, one per call, made back to back (a machine is given back 30 s after a
# call; files outside $OUT stay while it is held):
#     here:   bash scripts/gpu_adapt.sh split          # -> .gpu/base.part-aa, -ab, -ac, -ad (30 MiB, gitignored)
#     calls 1-3: carry [".gpu/base.part-aX", ".gpu/base.sha256", ".whl"]   command: bash scripts/gpu_adapt.sh stage
#     call 4: carry [".gpu/base.part-ad", ".gpu/base.sha256", ".whl"]      command: bash scripts/gpu_adapt.sh train $OUT
#     later calls (optional, while the machine is held):                  command: bash scripts/gpu_adapt.sh train $OUT
# `.whl` holds the gguf wheel (pure Python; `pip download --no-deps gguf==0.19.0 -d .whl`).
# `train` reassembles and checks the base (SHA-256), builds the tokenizer and the token shards from
# that machine's own Python (standard library and site-packages), trains configs/smollm2-coder-gpu.toml
# until DEADLINE_S (default 420 s; a later call resumes from the last checkpoint), then writes the
# model as its exact rank-80 delta over the base (scripts/make_delta.py) into $OUT in 15 MiB pieces:
# `cat smollm2-coder.tar.part-* | tar x` gives the directory to ship, beside metrics.jsonl and the log.
set -uo pipefail
cd "$(dirname "$0")/.."
stage=runs/gpu
base="$stage/SmolLM2-135M-Instruct.Q4_1.gguf"
sha=${BASE_SHA256:-}
python=${PYTHON:-python3}
case ${1:-} in
    split)
        src=$($python -c "from unmask.hub import packaged_path; print(packaged_path('smollm2-135m'))") || exit 1
        mkdir -p .gpu && split -b 30M "$src" .gpu/base.part- && sha256sum "$src" | cut -d' ' -f1 > .gpu/base.sha256
        grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
        ls -l .gpu; exit 0 ;;
    stage)
        mkdir -p "$stage" && cp .gpu/base.part-* .gpu/base.sha256 "$stage"/ && ls -l "$stage"; exit 0 ;;
    train) out=${2:?usage: gpu_adapt.sh train OUT_DIR} ;;
    *) echo "usage: gpu_adapt.sh split | stage | train OUT_DIR" >&2; exit 2 ;;
esac
mkdir -p "$out" "$stage"
out=$(cd "$out" && pwd)
log="$out/adapt.log"
deadline=${DEADLINE_S:-420}
if ls .whl/*.whl >/dev/null 2>&1; then
    $python -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    $python -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'python', sys.version.split()[0])"
} > "$out/environment.txt" 2>&1
if [ ! -f "$base" ]; then
    cp .gpu/base.part-* .gpu/base.sha256 "$stage"/ 2>/dev/null
    cat "$stage"/base.part-* > "$base" || exit 1
fi
[ -z "$sha" ] && [ -f "$stage/base.sha256" ] && sha=$(cat "$stage/base.sha256")
if [ -n "$sha" ] && [ "$(sha256sum "$base" | cut -d' ' -f1)" != "$sha" ]; then
    echo "== $base is not the base (SHA-256 differs): are both parts there?" | tee -a "$log"; rm -f "$base"; exit 1
fi
if [ ! -f runs/tokenizer-smollm2/tokenizer.json ]; then
    $python - "$base" <<'PY' 2>&1 | tee -a "$log"
import json, sys
from unmask.models.gguf import load_gguf
_, tok = load_gguf(sys.argv[1])
tok.save("runs/tokenizer-smollm2")
path = "runs/tokenizer-smollm2/tokenizer_config.json"
config = json.load(open(path)); config["mask_token"] = "<empty_output>"; json.dump(config, open(path, "w"))
PY
fi
if [ ! -f runs/data/smollm2/manifest.json ]; then
    $python -m unmask data build --tokenizer runs/tokenizer-smollm2 --out runs/data/smollm2 2>&1 | tee -a "$log" || exit 1
fi
left=$((deadline - SECONDS))
if [ "$left" -gt 30 ]; then
    echo "== training for at most ${left}s" | tee -a "$log"
    timeout --signal=INT --kill-after=20 "$left" $python -m unmask train configs/smollm2-coder-gpu.toml 2>&1 | tee -a "$log"
fi
run=runs/smollm2-coder-gpu
cp "$run/metrics.jsonl" "$out/metrics.jsonl" 2>/dev/null
latest=$(cat "$run/checkpoints/latest" 2>/dev/null)
model="$run/final"
[ -d "$model" ] || model="$run/checkpoints/$latest"
if [ -n "$latest" ] || [ -d "$run/final" ]; then
    rm -rf "$stage/smollm2-coder"
    $python scripts/make_delta.py "$model" --base "$base" --name smollm2-135m --tokenizer runs/tokenizer-smollm2 \
        --rank 80 --out "$stage/smollm2-coder" 2>&1 | tee -a "$log"
    tar -C "$stage" -cf - smollm2-coder | split -b 15M - "$out/smollm2-coder.tar.part-"
fi
echo "== $(ls "$out" | tr '\n' ' ')" | tee -a "$log"
