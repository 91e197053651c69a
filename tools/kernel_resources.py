#!/usr/bin/env python
"""Registers, spills, shared memory and load widths of the Triton kernels per launch configuration, offline (no GPU).

Compiles ``sasa/backends/triton_kernels.py``'s three kernels ahead of time for an NVIDIA architecture (default
sm_90a: H100 / H200) with the argument types of a bf16 training launch at a ResNet-50 stage (fused QKV views, shared
relative tables, K=7, zeros padding), runs the ``ptxas`` that ships with Triton on the PTX, and prints its
per-thread register count, spill stores / loads, the kernel's shared memory, and the global loads in the SASS by
width (``nvdisasm``): 16-byte loads are what the channels-last layout is for; 2-byte ones mean the compiler could
not vectorise (a mask that varies along the channels did that to every load until the ``EVEN_D`` specialisation).
Spills or >128 registers at 8 warps (occupancy) rule a configuration out before it costs GPU time in
``tools/tile_sweep.py``.

It also estimates the work: ``instr/unit``, the thread-instructions issued per unit of work (one pixel, one head,
one window offset), from the SASS: every instruction counts ``KS ** depth`` times, depth being how many loops (a
backward branch in the SASS; every loop of these kernels runs ``KS`` times) enclose it, times the threads of a
program, divided by the program's pixels x heads x ``KS**2``. A static model (no caches, no latency, no
occupancy): it did not rank the stage-1 configurations the H200 sweep measured (BENCHMARKS.md), so it only
narrows the candidates; the timing is ``tools/tile_sweep.py``'s.

Usage::

    python tools/kernel_resources.py --stages 1,2 --heads 1,2,4,8 --tiles 8x8,4x8 --warps 4,8 [--out FILE]

Uses Triton's compiler internals (``triton.compile`` on an ``ASTSource``, ``GPUTarget``), checked with Triton 3.8;
other versions may need the signature format adjusted.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # compile, never interpret
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STAGES = {1: (64, 64), 2: (32, 128), 3: (16, 256), 4: (8, 512)}  # (map side, channels); 8 heads
SIZES = ("B", "HEADS", "H", "W", "D", "HALF", "TILES_W", "N_TILES")


def _signature(fn, hw: int, C: int, constexprs: dict) -> tuple[dict, dict, dict]:
    """Argument types, constexprs (incl. unit strides, which Triton specialises) and 16-divisibility hints."""
    d = C // 8
    fused = {"b": hw * hw * 3 * C, "h": hw * 3 * C, "w": 3 * C, "n": d, "d": 1}  # q, k, v: views of (.., 3, 8, d)
    plain = {"b": hw * hw * C, "h": hw * C, "w": C, "n": d, "d": 1}  # out, dout, dq, dk, dv
    sig, consts, attrs = {}, dict(constexprs), {}
    for idx, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("LSE", "DELTA", "DREL", "RR", "RC"):  # the relative tables are fp32 parameters
            sig[name], attrs[(idx,)] = "*fp32", [["tt.divisibility", 16]]
        elif name == "scale":
            sig[name] = "fp32"
        elif name in SIZES:
            sig[name] = "i32"
        elif name[0].isupper():
            sig[name], attrs[(idx,)] = "*bf16", [["tt.divisibility", 16]]
        else:
            tensor, axis = re.fullmatch(r"s(\w+)_(\w)", name).groups()
            value = (fused if tensor in ("q", "k", "v") else plain)[axis]
            if value == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if value % 16 == 0:
                    attrs[(idx,)] = [["tt.divisibility", 16]]
    return sig, consts, attrs


def _build(fn, sig: dict, consts: dict, attrs: dict, warps: int, arch: int):
    """``(compiled, ptxas log, SASS)`` of one kernel specialisation."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    compiled = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps})
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    nvdisasm = os.path.join(os.path.dirname(ptxas), "nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        path, cubin = os.path.join(tmp, "kernel.ptx"), os.path.join(tmp, "kernel.cubin")
        with open(path, "w") as f:
            f.write(compiled.asm["ptx"])
        log = subprocess.run([ptxas, f"-arch=sm_{arch}a", "-v", path, "-o", cubin], capture_output=True,
                             text=True, check=True).stderr
        sass = subprocess.run([nvdisasm, "-c", cubin], capture_output=True, text=True, check=True).stdout
    return compiled, log, sass


def _registers(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return {"registers": int(regs.group(1)), "spill_store_bytes": int(spills.group(1)),
            "spill_load_bytes": int(spills.group(2))}


def stem_resources(kind: str, warps: int, arch: int) -> dict:
    """The attention stem's kernels (``triton_stem_kernels.py``) at the paper's stem: 3 input channels, 4x4 blocks,
    4 heads of 16 channels, 4 value mixtures; fp32 image, bf16 output / upstream gradient (TF32 dots, as under bf16
    autocast). ``instructions_per_unit`` is per pixel here (its loop runs 4 times: heads)."""
    import torch

    from sasa.backends.triton_backend import kernels_for

    tk = kernels_for(torch.device("cuda"), "triton_stem_kernels")
    fn = {"stem_fwd": tk._stem_fwd_kernel, "stem_bwd": tk._stem_bwd_kernel}[kind]
    blocks = tk.FWD_BLOCKS if kind == "stem_fwd" else tk.BWD_BLOCKS
    consts = dict(S=4, LP=16, C=3, HEADS=4, M=4, D=16, BD=16, HAS_PM=True, NB=blocks, KP=tk.KP, PREC="tf32")
    sig, attrs = {}, {}
    for idx, name in enumerate(inspect.signature(fn.fn).parameters):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("NBLK", "HB", "WB") or not name[0].isupper():
            sig[name] = "i32"
        else:
            sig[name], attrs[(idx,)] = ("*bf16" if name in ("OUT", "DO") else "*fp32"), [["tt.divisibility", 16]]
    compiled, log, sass = _build(fn, sig, consts, attrs, warps, arch)
    per_thread = dynamic_instructions(sass, 4)
    return {"kind": kind, "num_warps": warps, **_registers(log), "shared_bytes": compiled.metadata.shared,
            "instructions_per_thread": per_thread,
            "instructions_per_unit": round(per_thread * warps * 32 / (consts["NB"] * 16), 1)}


def resources(tk, kind: str, stage: int, tile: tuple[int, int], warps: int, hb: int, arch: int) -> dict:
    hw, C = STAGES[stage]
    fn = {"fwd": tk._fwd_kernel, "bwd_q": tk._bwd_q_kernel, "bwd_kv": tk._bwd_kv_kernel}[kind]
    consts = dict(KS=7, HAS_K=True, HAS_ROWS=True, HAS_COLS=True, TH=tile[0], TW=tile[1], BD=C // 8,
                  EVEN_D=tk.even_channels(C // 8, C // 8), HB=hb, INT64=False, VEC=8)
    if kind != "bwd_kv":
        consts["MASK"] = False
    if kind == "bwd_q":
        consts.update(KP=8, ROW_GRAD=True, COL_GRAD=True)
    sig, consts, attrs = _signature(fn, hw, C, consts)
    compiled, log, sass = _build(fn, sig, consts, attrs, warps, arch)
    per_thread = dynamic_instructions(sass, 7)
    widths = re.findall(r"\bLDG\.E(\.128|\.64|\.U16|\.S16|\.U8|\.S8)?\b", sass)
    loads = {bits: sum(1 for w in widths if {"": 32, ".128": 128, ".64": 64}.get(w, 16 if "16" in w else 8) == bits)
             for bits in (128, 64, 32, 16, 8)}
    return {"kind": kind, "stage": stage, "tile": list(tile), "num_warps": warps, "heads_per_program": hb,
            **_registers(log), "shared_bytes": compiled.metadata.shared,
            "global_loads_by_bits": loads, "instructions_per_thread": per_thread,
            "instructions_per_unit": round(per_thread * warps * 32 / (tile[0] * tile[1] * hb * 49), 1)}


def dynamic_instructions(sass: str, trips: int) -> int:
    """Instructions one thread issues: each SASS instruction counted ``trips ** (loops around it)``."""
    instr, labels, branches = 0, {}, []
    for line in sass.splitlines():
        label = re.match(r"\s*(\.L_x_\d+):", line)
        if label:
            labels[label.group(1)] = instr
            continue
        op = re.match(r"\s*/\*[0-9a-f]+\*/\s+(.*?);", line)
        if op:
            target = re.search(r"BRA\s+`?\(?(\.L_x_\d+)", op.group(1))
            if target:
                branches.append((instr, target.group(1)))
            instr += 1
    loops = [(labels[t], at) for at, t in branches if t in labels and labels[t] < at]  # backward branches
    return sum(trips ** sum(1 for lo, hi in loops if lo <= k <= hi) for k in range(instr))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--stages", default="1,2")
    parser.add_argument("--kinds", default="fwd,bwd_q,bwd_kv", help="also stem_fwd, stem_bwd (the attention "
                        "stem's kernels; once per warp count, whatever the stages / tiles / heads)")
    parser.add_argument("--tiles", default="8x8", help="THxTW,...")
    parser.add_argument("--warps", default="4,8")
    parser.add_argument("--heads", default="1,2,4,8", help="heads per program (HB)")
    parser.add_argument("--arch", type=int, default=90, help="compute capability as an integer (90 = H100 / H200)")
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, ROOT)
    import torch

    from sasa.backends.triton_backend import kernels_for

    tk = kernels_for(torch.device("cuda"))  # the compiled (not interpreted) module; nothing is launched
    rows = []
    print(f"{'kind':7s} {'stage':>5s} {'tile':>5s} {'warps':>5s} {'HB':>3s} {'regs':>5s} {'spill st/ld B':>14s} "
          f"{'smem B':>7s} {'instr/unit':>10s}  global loads by width (bits: count)")
    for kind in [k for k in args.kinds.split(",") if k.startswith("stem_")]:
        for warps in map(int, args.warps.split(",")):
            r = stem_resources(kind, warps, args.arch)
            print(f"{kind:7s} {'-':>5s} {'-':>5s} {warps:5d} {'-':>3s} {r['registers']:5d} "
                  f"{r['spill_store_bytes']:>6d}/{r['spill_load_bytes']:<7d} {r['shared_bytes']:7d} "
                  f"{r['instructions_per_unit']:10.0f}  (per pixel)", flush=True)
            rows.append(r)
    for stage in map(int, args.stages.split(",")):
        for kind in [k for k in args.kinds.split(",") if not k.startswith("stem_")]:
            for tile in (tuple(map(int, t.split("x"))) for t in args.tiles.split(",")):
                for warps in map(int, args.warps.split(",")):
                    for hb in map(int, args.heads.split(",")):
                        try:
                            r = resources(tk, kind, stage, tile, warps, hb, args.arch)
                        except Exception as e:  # noqa: BLE001  (one failing configuration is a row)
                            r = {"kind": kind, "stage": stage, "tile": list(tile), "num_warps": warps,
                                 "heads_per_program": hb, "error": f"{type(e).__name__}: {e}"[:300]}
                            print(f"{kind:7s} {stage:5d} {tile[0]}x{tile[1]:<3d} {warps:5d} {hb:3d} {r['error']}")
                        else:
                            print(f"{kind:7s} {stage:5d} {tile[0]}x{tile[1]:<3d} {warps:5d} {hb:3d} "
                                  f"{r['registers']:5d} {r['spill_store_bytes']:>6d}/{r['spill_load_bytes']:<7d} "
                                  f"{r['shared_bytes']:7d} {r['instructions_per_unit']:10.0f}  "
                                  + " ".join(f"{b}:{n}" for b, n in r["global_loads_by_bits"].items() if n),
                                  flush=True)
                        rows.append(r)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
