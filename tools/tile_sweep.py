"""Tile-shape sweep of the Triton kernels at the ResNet-50 stage shapes (GPU only).

Times forward and backward kernels (bf16, batch 64, 8 heads, K=7, fused QKV views) for explicit
(TH, TW, num_warps, heads per program) choices, so ``TILES`` in ``sasa/backends/triton_kernels.py`` can be set from
measurements. Writes ``DIR/tile_sweep.json``. Usage::

    python tools/tile_sweep.py --out DIR [--stages 1,2]                    # tiles x warps, one head per program
    python tools/tile_sweep.py --out DIR --stages 1,2 --heads 1,2,4,8 --tiles 4x8,8x8 --warps 4,8
    python tools/tile_sweep.py --out DIR --stages 1 --configs 8x8x2x1,8x8x4x2         # TH x TW x warps x HB

Each new configuration compiles three kernels (seconds each): keep the grid small on a rented GPU.
``tools/kernel_resources.py`` prints registers and spills per configuration without a GPU. ``--smoke`` runs the
same loop on CPU in Triton's interpreter at a tiny size (plumbing only; the times mean nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch

STAGES = {1: (64, 64), 2: (32, 128), 3: (16, 256), 4: (8, 512)}
TILES = {1: [(8, 8), (8, 16), (16, 16), (4, 32), (8, 32)], 2: [(4, 8), (8, 8), (8, 16), (16, 16)],
         3: [(4, 4), (4, 8), (8, 8), (8, 16)], 4: [(2, 8), (4, 8), (8, 8)]}


def _once(fn, rep=None) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def time_kernels(tk, q, k, v, rows, cols, dout) -> dict:
    """Median ms of the forward, the query-side backward kernel, and the whole backward."""
    if q.is_cuda:
        from triton.testing import do_bench
    else:
        do_bench = _once
    out, lse = tk.forward(q, k, v, rows, cols, 7, False, 1.0)
    return {
        "fwd_ms": do_bench(lambda: tk.forward(q, k, v, rows, cols, 7, False, 1.0), rep=40),
        "bwd_q_ms": do_bench(lambda: tk.backward(dout, q, k, v, out, lse, rows, cols, 7, False, 1.0, need_kv=False),
                             rep=40),
        "bwd_ms": do_bench(lambda: tk.backward(dout, q, k, v, out, lse, rows, cols, 7, False, 1.0), rep=40),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", default="1,2,3,4")
    parser.add_argument("--warps", default="2,4,8")
    parser.add_argument("--heads", default="1", help="heads per program (HB) to try, powers of two dividing 8")
    parser.add_argument("--tiles", help="tiles THxTW,... for every stage (default: a list per stage)")
    parser.add_argument("--configs", help="explicit THxTWxWARPSxHB,... (replaces --tiles / --warps / --heads)")
    parser.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, batch 1 of 8x8 maps")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported
    from sasa.backends.triton_backend import kernels_for

    tiles = [tuple(map(int, t.split("x"))) for t in args.tiles.split(",")] if args.tiles else None
    dev = torch.device("cpu" if args.smoke else "cuda")
    batch = 1 if args.smoke else 64
    tk = kernels_for(dev)
    original = tk.tile_config
    results = []
    t0 = time.time()
    for stage in map(int, args.stages.split(",")):
        hw, C = STAGES[stage]
        hw = 8 if args.smoke else hw
        heads, d = 8, C // 8
        g = torch.Generator(device=dev).manual_seed(0)
        qkv = torch.randn(batch, hw, hw, 3, heads, d, device=dev, generator=g).bfloat16()
        q, k, v = qkv.unbind(3)
        rows = (torch.randn(7, d // 2, device=dev, generator=g) * 0.1).bfloat16()
        cols = (torch.randn(7, d // 2, device=dev, generator=g) * 0.1).bfloat16()
        dout = torch.randn(batch, hw, hw, heads, d, device=dev, generator=g).bfloat16()
        if args.configs:
            grid = [None] + [tuple(map(int, c.split("x"))) for c in args.configs.split(",")]
        else:
            grid = [None] + [(th, tw, nw, hb) for th, tw in tiles or TILES[stage]
                             for nw in map(int, args.warps.split(",")) for hb in map(int, args.heads.split(","))]
        for config in grid:  # None: the current TILES entries (per kernel), the baseline of the sweep
            tk.tile_config = original if config is None else (lambda H, W, bd, kind, heads=1, c=config: c)
            rec = {"stage": stage, "tile": "current" if config is None else list(config[:2]),
                   "num_warps": None if config is None else config[2],
                   "heads_per_program": None if config is None else config[3]}
            if config is None:
                rec["current"] = {kind: list(original(hw, hw, d, kind, heads)) for kind in ("fwd", "bwd_q", "bwd_kv")}
            try:
                rec.update(time_kernels(tk, q, k, v, rows, cols, dout))
            except Exception as e:  # noqa: BLE001 - one bad config must not lose the rest
                rec["error"] = f"{type(e).__name__}: {e}"[:200]
            results.append(rec)
            print(json.dumps(rec), f"t={time.time() - t0:.0f}s", flush=True)
            _write(args.out, results)  # after every row: a time limit must not lose the rows already measured
        tk.tile_config = original
        for key in ("fwd_ms", "bwd_q_ms", "bwd_ms"):
            ok = [r for r in results if r["stage"] == stage and key in r]
            if ok:
                best = min(ok, key=lambda r: r[key])
                print(f"stage {stage} best {key}: {best['tile']} warps {best['num_warps']} "
                      f"HB {best['heads_per_program']} = {best[key]:.3f} ms")
    _write(args.out, results)


def _write(out: str, results: list) -> None:
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tile_sweep.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
