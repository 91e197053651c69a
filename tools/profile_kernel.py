"""Launch one Triton kernel of the ``triton`` backend at a ResNet-50 stage shape, for a kernel profiler (GPU only).

Warms the kernel up (compilation, autotuning-free launches), synchronises, then launches it ``--launches`` more times,
so a profiler can skip the warm-up and capture one steady-state launch, e.g. Nsight Compute::

    ncu --kernel-name regex:_fwd_kernel --launch-skip 2 --launch-count 1 \\
        --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \\
        python tools/profile_kernel.py --stage 1 --kind fwd

bf16, batch 64, 8 heads, K=7, q / k / v as views of one fused projection (as the layer passes them), the current
``TILES`` unless ``--config THxTWxWARPSxHB`` forces one. It answers what offline counts cannot (BENCHMARKS.md):
where a kernel's time goes in the memory path (L1 / L2 sectors per request, hit rates, stall reasons, occupancy).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

STAGES = {1: (64, 64), 2: (32, 128), 3: (16, 256), 4: (8, 512)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stage", type=int, default=1, choices=sorted(STAGES))
    parser.add_argument("--kind", default="fwd", choices=("fwd", "bwd"))
    parser.add_argument("--config", help="THxTWxWARPSxHB for every kernel (default: the current TILES)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--launches", type=int, default=1, help="launches after the two warm-up ones")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device")
    from sasa.backends.triton_backend import kernels_for

    tk = kernels_for(torch.device("cuda"))
    if args.config:
        config = tuple(map(int, args.config.split("x")))
        tk.tile_config = lambda H, W, bd, kind, heads=1: config
    hw, C = STAGES[args.stage]
    heads, d = 8, C // 8
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(args.batch, hw, hw, 3, heads, d, device="cuda", generator=g).bfloat16()
    q, k, v = qkv.unbind(3)
    rows = torch.randn(7, d // 2, device="cuda", generator=g) * 0.1
    cols = torch.randn(7, d // 2, device="cuda", generator=g) * 0.1
    out, lse = tk.forward(q, k, v, rows, cols, 7, False, 1.0)
    dout = torch.randn_like(out)

    def launch():
        if args.kind == "fwd":
            tk.forward(q, k, v, rows, cols, 7, False, 1.0)
        else:
            tk.backward(dout, q, k, v, out, lse, rows, cols, 7, False, 1.0)

    for _ in range(2 + args.launches):
        launch()
    torch.cuda.synchronize()
    print(f"stage {args.stage} {args.kind}: {2 + args.launches} launches of", args.config or "the current TILES")
    return 0


if __name__ == "__main__":
    sys.exit(main())
