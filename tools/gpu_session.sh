#!/usr/bin/env bash
# The one prepared device call for a session that has a GPU (about 8 minutes on an H100 / H200, start-up not
# counted): correctness of every kernel and of the attention stem's op on the device, a heads-per-program (HB)
# sweep of the stage-1 / stage-2 kernels, then the layer, stem and model benchmarks with the conv baseline measured
# in the same run (incl. sasa_resnet50_convstem with recompute_qkv=True). Each step has its own time limit, writes
# its log and JSON under OUT, and a failing step does not stop the next.
#
#   bash tools/gpu_session.sh "$OUT"        # from the repository root
#
# Afterwards: copy the JSON records into benchmarks/, set TILES in sasa/backends/triton_kernels.py from
# OUT/tile_sweep.json, and record the figures with the device name in BENCHMARKS.md.
set -u
OUT=${1:?usage: bash tools/gpu_session.sh OUT}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia_smi.csv" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"

timeout 240 python tools/gpu_check.py --out "$OUT" --skip-timing 2>&1 | tee "$OUT/gpu_check.log"
timeout 200 python tools/tile_sweep.py --out "$OUT" --stages 1,2 --tiles 8x8,4x8 --warps 8 --heads 1,2,4,8 \
    2>&1 | tee "$OUT/tile_sweep.log"
timeout 240 python -m sasa bench --device cuda --mode layer,stem,model --skip-slow --profile 12 \
    --models resnet50,sasa_resnet50_convstem,sasa_resnet50_convstem@recompute_qkv=True,sasa_resnet50 \
    --out "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log"
