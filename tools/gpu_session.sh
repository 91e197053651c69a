#!/usr/bin/env bash
# The one prepared device call for a session that has a GPU (about 8 minutes on an H100 / H200, start-up not
# counted): `pytest -m gpu` (correctness of every kernel and of the attention stem's op on the device; needs pytest
# in the machine's Python), a sweep of candidate (tile, warps, heads per program) configurations of the stage-1 /
# stage-2 kernels, an Nsight Compute profile of the stage-1 forward when ncu is installed, then the stem, model and layer benchmarks with the conv baseline
# measured in the same run (incl. recompute_qkv and checkpoint_stem rows). Each step has its own time limit, writes
# its log and JSON under OUT, and a failing step does not stop the next.
#
#   bash tools/gpu_session.sh "$OUT"        # from the repository root
#
# Afterwards: copy the JSON records into benchmarks/ under the names of benchmarks/README.md, set TILES in
# sasa/backends/triton_kernels.py from OUT/sweep{1,2}/tile_sweep.json, point the BENCHMARKS.md blocks at the new
# records and run `python tools/bench_report.py`.
set -u
OUT=${1:?usage: bash tools/gpu_session.sh OUT}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >"$OUT/nvidia_smi.csv" 2>&1
(command -v ncu nsys || echo "no ncu / nsys on PATH") >"$OUT/profilers.txt" 2>&1
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee "$OUT/versions.txt"

# the GPU correctness tests (tests/test_gpu.py and the other gpu-marked tests), with a JUnit report
timeout 200 python -m pytest -q -p no:cacheprovider -m gpu --junitxml "$OUT/pytest_gpu.xml" 2>&1 \
    | tee "$OUT/pytest_gpu.log"
# candidates (TH x TW x warps x HB) from tools/kernel_resources.py (no spills, >= 16 resident warps per SM), plus
# the heads-per-program steps of the measured 8x8 / 8-warp configuration; the current TILES are the baseline row
mkdir -p "$OUT/sweep1" "$OUT/sweep2"
timeout 100 python tools/tile_sweep.py --out "$OUT/sweep1" --stages 1 \
    --configs 8x8x8x8,4x8x8x8,8x8x8x4,8x8x8x2,8x8x2x1,4x8x4x4,8x8x4x2,4x8x2x2 2>&1 | tee "$OUT/tile_sweep1.log"
timeout 70 python tools/tile_sweep.py --out "$OUT/sweep2" --stages 2 \
    --configs 8x8x2x2,8x8x4x4,4x8x4x4,4x8x2x1,8x8x8x2,8x16x4x1 2>&1 | tee "$OUT/tile_sweep2.log"
# where stage 1's forward spends its time in the memory path, if Nsight Compute is on the machine
if command -v ncu >/dev/null 2>&1; then
    timeout 45 ncu --kernel-name regex:_fwd_kernel --launch-skip 2 --launch-count 1 --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
        python tools/profile_kernel.py --stage 1 --kind fwd >"$OUT/ncu_stage1_fwd.txt" 2>&1
fi
# the model and stem rows first (they matter most), the layer rows after; each writes its own JSON
timeout 185 python -m sasa bench --device cuda --mode stem,model --profile 12 --models resnet50,sasa_resnet50_convstem,\
sasa_resnet50,sasa_resnet50@stem_backend=shifted,sasa_resnet50@checkpoint_stem=True@recompute_qkv=True,\
sasa_resnet50_convstem@recompute_qkv=True \
    --out "$OUT/bench_cuda_model.json" 2>&1 | tee "$OUT/bench_model.log"
timeout 45 python -m sasa bench --device cuda --mode layer --skip-slow --out "$OUT/bench_cuda_layer.json" 2>&1 \
    | tee "$OUT/bench_layer.log"
