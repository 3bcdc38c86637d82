#!/usr/bin/env bash
# One GPU report in one go: ours against diffusers on the same weights, on the SD 1.5 and SD 2.1
# architectures (random weights, bf16), then a profile of one CFG U-Net step of each.
#
#     tools/gpu_report.sh [OUT]                  # OUT: results folder (default runs/gpu_report)
#     WHEELS=.wheels tools/gpu_report.sh OUT     # install missing packages (diffusers, webdataset) from wheels first
#     CONFIG15=configs/sd_tiny.yaml CONFIG21=configs/sd_tiny.yaml RES=32 TRAIN="64:4" STEPS=2 REPEATS=2 \
#         tools/gpu_report.sh runs/rehearsal     # a rehearsal on the CPU with the tiny model
#
# Each step runs under its own time limit (`timeout`), writes its JSON after every measured row and
# its log as it goes, so a step that runs out of time or memory loses only itself. The steps, in
# order of what matters most, and their limits (about 7 minutes in all on an H100/H200 class GPU):
#   1 unet+vae eager, SD 1.5, vs diffusers                  60 s
#   2 unet+vae with every speed switch and torch.compile    150 s  (diffusers compiled alike)
#   3 generate (50 DDIM steps + CFG + decode) eager         60 s
#   4 train 256 px x64 and 512 px x16, eager                 75 s
#   5 unet SD 2.1 eager                                      40 s
#   6 profile of one CFG U-Net step, ours and diffusers     30 s
# SUMMARY.txt gathers every table at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_report}
mkdir -p "$OUT"
CONFIG15=${CONFIG15:-sd15}
CONFIG21=${CONFIG21:-sd21}
RES=${RES:-512}
TRAIN=${TRAIN:-256,512:64,16}
STEPS=${STEPS:-50}
REPEATS=${REPEATS:-20}
DEVICE=${DEVICE:-auto}
SCALE=${SCALE:-1}   # multiplies every time limit (a slower GPU, or the CPU rehearsal)

export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -n "${WHEELS:-}" ] && ! python3 -c "import diffusers, webdataset" 2>/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/ldm-site "$WHEELS"/*.whl \
        && export PYTHONPATH="$PYTHONPATH:/tmp/ldm-site"
fi
{
    date -u
    python3 -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda); print(torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')"
    python3 -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1
    nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv 2>/dev/null
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

train_res=${TRAIN%%:*}
train_batch=${TRAIN##*:}
common=(--device "$DEVICE" --resolution "$RES" --repeats "$REPEATS" --warmup 3 --vs-diffusers)

step() {  # step NAME LIMIT_S ARGS...: one ldm-bench run, its table and JSON under OUT
    local name=$1 limit=$2
    shift 2
    limit=$(python3 -c "print(int($limit * $SCALE))")
    echo "== $name (limit ${limit} s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" python3 -m ldm.cli.bench "$@" --json "$OUT/$name.json" \
        > "$OUT/$name.txt" 2> "$OUT/$name.log"
    local rc=$?
    echo "rc $rc after $((SECONDS - start)) s" >> "$OUT/$name.txt"
    if { [ $rc -eq 124 ] || [ $rc -eq 137 ]; } && [ -f "$OUT/$name.json" ]; then  # the rows measured in time
        echo "timed out after $limit s; the rows measured before:" >> "$OUT/$name.txt"
        python3 -c "import json, sys; from ldm.bench import BenchResult, Row, format_table
d = json.load(open(sys.argv[1])); d['rows'] = [Row(**r) for r in d['rows']]
print(format_table(BenchResult(**d)))" "$OUT/$name.json" >> "$OUT/$name.txt" 2>&1
    fi
    tail -n 25 "$OUT/$name.txt"
}

step 1_eager_sd15 60 --config "$CONFIG15" --workloads unet,vae "${common[@]}"
step 2_fast_sd15 150 --config "$CONFIG15" --workloads unet,vae "${common[@]}" \
    --channels-last --fuse-qkv --fused-norm-act --compile default
step 3_generate_sd15 60 --config "$CONFIG15" --workloads generate --steps "$STEPS" "${common[@]}" --repeats 5
step 4_train_sd15 75 --config "$CONFIG15" --workloads train --train-resolution "$train_res" \
    --train-batch "$train_batch" "${common[@]}" --repeats 10
step 5_eager_sd21 40 --config "$CONFIG21" --workloads unet "${common[@]}"
step 6_profile_sd15 30 --config "$CONFIG15" --workloads unet "${common[@]}" --repeats 3 --profile

for f in "$OUT"/[0-9]_*.txt; do echo "### $(basename "$f" .txt)"; cat "$f"; done > "$OUT/SUMMARY.txt"
echo "wrote $OUT/SUMMARY.txt"
