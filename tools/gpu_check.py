#!/usr/bin/env python
"""GPU check of the ``triton`` backend: correctness against ``reference`` and op-level timing, in one short run.

1. Correctness (fp32): forward and every gradient (q, k, v or the fused QKV tensor, rel_rows, rel_cols) of
   ``backend="triton"`` against ``backend="reference"`` on CUDA; head_dim 8/12/16/32/64/128, K 3/5/7/11, both
   paddings, maps smaller than the window, shared / per-head / missing tables, k=None, strided fused-QKV views.
   bf16: triton and ``shifted`` in bf16 against the fp32 reference on the same (bf16-rounded) inputs; triton
   passes when its error is within 2x shifted's or under 2e-2 (normalised by the reference's max magnitude).
   Determinism: two backward passes compared bit for bit.
2. Timing at the ResNet-50 stage shapes (batch 64, 256x256 input: 64x64/C64, 32x32/C128, 16x16/C256, 8x8/C512;
   8 heads, K=7, bf16, fused QKV views, fp32 shared tables, fixed upstream gradient): triton forward, forward +
   backward and backward kernels alone, against ``shifted`` and a 3x3 convolution (C -> C, channels_last, bf16),
   median of CUDA-event timings, in the same run.
3. ``torch.compile(fullgraph=True)`` (inductor) through the custom op, forward + backward.
4. The attention stem's fast op (``AttentionStem.forward``) against its textbook form (``reference_forward``) on
   CUDA: fp32 forward and every gradient; bf16 autocast against the fp32 textbook; ``torch.compile(fullgraph=True)``.

Every case catches its own exceptions, so one failure does not lose the rest; results go to ``OUT/gpu_check.json``
after each section.

Usage, from the repository root::

    python tools/gpu_check.py --out $OUT               # ~1-2 min on an H100 / H200, Triton compile included
    python tools/gpu_check.py --smoke --out /tmp/gc    # CPU plumbing check: Triton interpreter, tiny shapes
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (name, B, H, W, heads, d, K, padding, tables, has_k, per_head, fused, scale)
FP32_CASES = [
    ("d8_k7_zeros_fused", 2, 17, 13, 8, 8, 7, "zeros", "both", True, False, True, 1.0),
    ("d8_k7_mask_perhead_fused", 2, 17, 13, 8, 8, 7, "mask", "both", True, True, True, 1.0),
    ("d8_k3_mask_3x3", 2, 3, 3, 2, 8, 3, "mask", "both", True, False, False, 1.0),
    ("d16_k3_zeros", 2, 20, 20, 4, 16, 3, "zeros", "both", True, False, False, 1.0),
    ("d16_k7_mask_qr_only_perhead", 2, 11, 14, 4, 16, 7, "mask", "both", False, True, False, 1.0),
    ("d32_k7_zeros_no_tables", 2, 16, 16, 4, 32, 7, "zeros", None, True, False, True, 1.0),
    ("d32_k11_mask_fused", 2, 13, 9, 2, 32, 11, "mask", "both", True, False, True, 1.0),
    ("d64_k7_zeros_8x8_fused", 2, 8, 8, 8, 64, 7, "zeros", "both", True, False, True, 1.0),
    ("d64_k11_mask_5x6_perhead", 2, 5, 6, 2, 64, 11, "mask", "both", True, True, False, 1.0),
    ("d64_k7_zeros_3x3", 2, 3, 3, 2, 64, 7, "zeros", "both", True, False, True, 0.125),
    ("d12_k5_zeros_rows_only", 2, 9, 10, 3, 12, 5, "zeros", "rows", True, False, False, 1.0),
    ("d128_k3_mask_cols_only", 1, 7, 9, 2, 128, 3, "mask", "cols", True, True, True, 1.0),
]
BF16_CASES = [
    ("bf16_d8_k7_zeros_fused", 2, 32, 32, 8, 8, 7, "zeros", "both", True, False, True, 1.0),
    ("bf16_d32_k11_mask", 2, 16, 16, 8, 32, 11, "mask", "both", True, True, True, 1.0),
    ("bf16_d64_k7_zeros_8x8", 4, 8, 8, 8, 64, 7, "zeros", "both", True, False, True, 1.0),
    ("bf16_d16_k7_mask_qr_only", 2, 16, 16, 8, 16, 7, "mask", "both", False, False, True, 1.0),
]
STAGES = [("stage1", 64, 64), ("stage2", 32, 128), ("stage3", 16, 256), ("stage4", 8, 512)]  # (name, map, C)

SMOKE_FP32 = [
    ("smoke_d8_k3_zeros_fused", 1, 5, 6, 2, 8, 3, "zeros", "both", True, True, True, 1.0),
    ("smoke_d8_k7_mask_3x3", 1, 3, 3, 1, 8, 7, "mask", "rows", False, False, False, 0.5),
]
SMOKE_BF16 = [("smoke_bf16_d8_k3", 1, 4, 5, 2, 8, 3, "zeros", "both", True, False, True, 1.0)]
SMOKE_STAGES = [("smoke_stage", 4, 16)]


def log(msg: str = "") -> None:
    print(msg, flush=True)


class Check:
    """Holds the device, results and the JSON path; each section appends to ``results`` and saves."""

    def __init__(self, args):
        import torch

        self.args = args
        self.torch = torch
        self.device = torch.device("cpu" if args.smoke else "cuda")
        self.results = {"meta": {}, "correctness": [], "timing": [], "compile": []}
        os.makedirs(args.out, exist_ok=True)
        self.path = os.path.join(args.out, "gpu_check.json")

    def save(self):
        with open(self.path, "w") as f:
            json.dump(self.results, f, indent=1, default=str)

    # ------------------------------------------------------------------------------------------------ inputs

    def inputs(self, spec, dtype, seed=0, requires_grad=True):
        """q, k, v (fused: views of one (B, H, W, 3, heads, d) tensor), rel tables (fp32), the leaves to grad."""
        torch = self.torch
        _, B, H, W, heads, d, K, _, tables, has_k, per_head, fused, _ = spec
        g = torch.Generator().manual_seed(seed)
        base = torch.randn(B, H, W, 3, heads, d, generator=g) * 0.5  # moderate logits, like post-BN projections
        shape = (heads, K, d // 2) if per_head else (K, d // 2)
        rows = torch.randn(shape, generator=g) * 0.5 if tables in ("both", "rows") else None
        cols = torch.randn(shape, generator=g) * 0.5 if tables in ("both", "cols") else None
        return self.materialize(base, rows, cols, dtype, fused, has_k, requires_grad)

    def materialize(self, base, rows, cols, dtype, fused, has_k, requires_grad=True):
        dev = self.device
        if fused:
            qkv = base.to(dev, dtype).requires_grad_(requires_grad)
            q, k, v = qkv.unbind(3)
            leaves = [qkv]
        else:
            q, k, v = (t.contiguous().to(dev, dtype).requires_grad_(requires_grad) for t in base.unbind(3))
            leaves = [q, k, v] if has_k else [q, v]
        tabs = [t.to(dev).requires_grad_(requires_grad) if t is not None else None for t in (rows, cols)]
        leaves += [t for t in tabs if t is not None]
        return q, (k if has_k else None), v, tabs[0], tabs[1], leaves

    @staticmethod
    def leaf_names(spec):
        _, *_, tables, has_k, _, fused, _ = spec
        names = ["qkv"] if fused else (["q", "k", "v"] if has_k else ["q", "v"])
        return names + [n for n, t in (("rel_rows", "rows"), ("rel_cols", "cols")) if tables in ("both", t)]

    def run_op(self, backend, spec, q, k, v, rows, cols, leaves, dout_seed=1):
        import sasa

        torch = self.torch
        K, padding, scale = spec[6], spec[7], spec[12]
        out = sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=K, padding=padding, scale=scale,
                                      backend=backend)
        gen = torch.Generator().manual_seed(dout_seed)
        g = torch.randn(out.shape, generator=gen).to(torch.bfloat16)  # bf16-exact: same dout in every dtype
        g = g.to(out.device, out.dtype)
        grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
        return out, grads

    @staticmethod
    def norm_err(a, b) -> float:
        """max |a - b| / max |b| (b the reference); 0 when both are all zeros."""
        if a is None or b is None:
            return 0.0 if (a is None and b is None) else float("inf")
        a, b = a.float(), b.float()
        scale = b.abs().max().item()
        diff = (a - b).abs().max().item()
        return diff / scale if scale > 0 else diff

    # ------------------------------------------------------------------------------------------------ sections

    def correctness(self):
        fp32 = SMOKE_FP32 if self.args.smoke else FP32_CASES
        bf16 = SMOKE_BF16 if self.args.smoke else BF16_CASES
        log("\n== correctness (normalised max error = max|x - ref| / max|ref|) ==")
        log(f"{'case':34s} {'result':6s} {'out':>9s}  grads")
        for spec in fp32:
            self.case(spec, self.fp32_case)
        for spec in bf16:
            self.case(spec, self.bf16_case)
        self.case(("determinism_bf16", 2, 16, 16, 8, 16, 7, "zeros", "both", True, True, True, 1.0),
                  self.determinism_case)
        self.save()

    def case(self, spec, fn):
        t0 = time.time()
        try:
            rec = fn(spec)
        except Exception as e:  # noqa: BLE001  (keep going: one failure must not lose the rest)
            rec = {"case": spec[0], "passed": False, "error": f"{type(e).__name__}: {e}",
                   "traceback": traceback.format_exc()[-3000:]}
            log(traceback.format_exc()[-1500:])
        rec["seconds"] = round(time.time() - t0, 2)
        rec["spec"] = list(spec)
        self.results["correctness"].append(rec)
        status = "PASS" if rec["passed"] else ("ERROR" if "error" in rec else "FAIL")
        errs = rec.get("errors", {})
        grads = " ".join(f"{k}={v:.1e}" for k, v in errs.items() if k != "out")
        extra = rec.get("note", "") or rec.get("error", "")
        out_err = f"{errs['out']:9.1e}" if "out" in errs else f"{'-':>9s}"
        log(f"{spec[0]:34s} {status:6s} {out_err}  {grads}  {extra}"[:300])

    def fp32_case(self, spec):
        torch = self.torch
        q, k, v, rows, cols, leaves = self.inputs(spec, torch.float32)
        out, grads = self.run_op("triton", spec, q, k, v, rows, cols, leaves)
        ref, ref_grads = self.run_op("reference", spec, q, k, v, rows, cols, leaves)
        errors = {"out": self.norm_err(out, ref)}
        for name, g, r in zip(self.leaf_names(spec), grads, ref_grads):
            errors["d" + name] = self.norm_err(g, r)
        finite = bool(torch.isfinite(out).all()) and all(g is None or bool(torch.isfinite(g).all()) for g in grads)
        tol = 1e-4
        return {"case": spec[0], "dtype": "float32", "errors": errors, "tolerance": tol,
                "passed": finite and all(e <= tol for e in errors.values())}

    def bf16_case(self, spec):
        torch = self.torch
        q, k, v, rows, cols, leaves = self.inputs(spec, torch.bfloat16)
        out, grads = self.run_op("triton", spec, q, k, v, rows, cols, leaves)
        s_out, s_grads = self.run_op("shifted", spec, q, k, v, rows, cols, leaves)
        # fp32 reference on the same bf16-rounded inputs
        base = (leaves[0] if spec[11] else torch.stack([q, k if k is not None else q, v], 3)).detach().float().cpu()
        q32, k32, v32, r32, c32, leaves32 = self.materialize(
            base, rows.detach().cpu() if rows is not None else None, cols.detach().cpu() if cols is not None else None,
            torch.float32, spec[11], spec[9])
        ref, ref_grads = self.run_op("reference", spec, q32, k32, v32, r32, c32, leaves32)
        errors, shifted_errors, ok = {}, {}, True
        for name, a, s, r in zip(["out"] + ["d" + n for n in self.leaf_names(spec)], [out, *grads],
                                 [s_out, *s_grads], [ref, *ref_grads]):
            errors[name] = self.norm_err(a, r)
            shifted_errors[name] = self.norm_err(s, r)
            ok &= errors[name] <= max(2 * shifted_errors[name], 2e-2)
        note = "shifted: " + " ".join(f"{k}={v:.1e}" for k, v in shifted_errors.items())
        return {"case": spec[0], "dtype": "bfloat16", "errors": errors, "shifted_errors": shifted_errors,
                "passed": bool(ok), "note": note}

    def determinism_case(self, spec):
        torch = self.torch
        q, k, v, rows, cols, leaves = self.inputs(spec, torch.bfloat16)
        runs = [self.run_op("triton", spec, q, k, v, rows, cols, leaves)[1] for _ in range(2)]
        same = all(torch.equal(a, b) for a, b in zip(*runs))
        return {"case": spec[0], "passed": bool(same), "errors": {}, "note": "bitwise equal" if same else "DIFFER"}

    # ------------------------------------------------------------------------------------------------ timing

    def timer(self, fn, reps, warmup=None):
        """Median / min / max milliseconds of ``fn()`` (CUDA events per rep; wall clock on CPU)."""
        torch = self.torch
        for _ in range(warmup if warmup is not None else (0 if self.args.smoke else 3)):
            fn()
        times = []
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            for _ in range(reps):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
        else:
            for _ in range(reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times), "reps": reps}

    def peak_mb(self, fn):
        torch = self.torch
        if self.device.type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return round((torch.cuda.max_memory_allocated() - before) / 2**20, 1)

    def stage_inputs(self, hw, C, B, K=7, heads=8):
        torch = self.torch
        dev, d = self.device, C // heads
        qkv = (torch.randn(B, hw, hw, 3, heads, d, device=dev) * 0.5).to(torch.bfloat16).requires_grad_()
        rows = (torch.randn(K, d // 2, device=dev) * 0.5).requires_grad_()
        cols = (torch.randn(K, d // 2, device=dev) * 0.5).requires_grad_()
        g = torch.randn(B, hw, hw, heads, d, device=dev).to(torch.bfloat16)
        return qkv, rows, cols, g

    def timing(self):
        torch = self.torch
        stages = SMOKE_STAGES if self.args.smoke else STAGES
        B = 1 if self.args.smoke else self.args.batch
        reps = 1 if self.args.smoke else self.args.reps
        K = 7
        log(f"\n== timing: batch {B}, 8 heads, K={K}, bf16, median ms of {reps} (CUDA events) ==")
        cols_hdr = ["conv_fwd", "conv_fb", "shifted_fwd", "shifted_fb", "triton_fwd", "triton_bwd_kern",
                    "triton_fb"]
        log(f"{'stage':8s} {'map':>5s} {'C':>4s} " + " ".join(f"{c:>15s}" for c in cols_hdr)
            + "  fb/conv  fb/shifted  peakMB(tri/shf)")
        for name, hw, C in stages:
            rec = {"stage": name, "map": hw, "C": C, "batch": B, "heads": 8, "K": K}
            try:
                self.time_stage(rec, hw, C, B, K, reps)
                med = {c: rec[c]["median_ms"] for c in cols_hdr}
                log(f"{name:8s} {hw:5d} {C:4d} " + " ".join(f"{med[c]:15.3f}" for c in cols_hdr)
                    + f"  {rec['ratio_triton_fb_to_conv_fb']:7.2f}  {rec['ratio_triton_fb_to_shifted_fb']:10.3f}"
                    + f"  {rec['peak_mb_triton_fb']}/{rec['peak_mb_shifted_fb']}")
            except Exception as e:  # noqa: BLE001  (record and go on to the next stage)
                rec["error"] = f"{type(e).__name__}: {e}"
                rec["traceback"] = traceback.format_exc()[-3000:]
                log(f"{name:8s} ERROR {rec['error']}")
                log(traceback.format_exc()[-1500:])
            self.results["timing"].append(rec)
            self.save()
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def time_stage(self, rec, hw, C, B, K, reps):
        """Fill ``rec`` with the timings of one stage shape."""
        import sasa

        torch = self.torch
        qkv, rows, cols, g = self.stage_inputs(hw, C, B, K)
        q, k, v = qkv.unbind(3)
        leaves = [qkv, rows, cols]

        def attn(backend):
            return sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=K, backend=backend)

        def fwd(backend):
            def f():
                with torch.no_grad():
                    attn(backend)
            return f

        def fb(backend):
            return lambda: torch.autograd.grad(attn(backend), leaves, g)

        conv = torch.nn.Conv2d(C, C, 3, padding=1, bias=False).to(self.device, torch.bfloat16)
        conv = conv.to(memory_format=torch.channels_last)
        x = torch.randn(B, C, hw, hw, device=self.device).to(torch.bfloat16)
        x = x.contiguous(memory_format=torch.channels_last).requires_grad_()
        gy = torch.randn_like(x)

        def conv_fwd():
            with torch.no_grad():
                conv(x)

        def conv_fb():
            torch.autograd.grad(conv(x), [x, conv.weight], gy)

        # the backward kernels alone (no autograd, no unbind-gradient stacking)
        out, lse = torch.ops.sasa.local_attention_fwd(q, k, v, rows, cols, K, False, 1.0)

        def bwd_kernels():
            torch.ops.sasa.local_attention_bwd(g, q, k, v, out, lse, rows, cols, K, False, 1.0, True, True, True)

        slow_reps = max(1, reps // 2)
        rec["conv_fwd"] = self.timer(conv_fwd, reps)
        rec["conv_fb"] = self.timer(conv_fb, reps)
        rec["shifted_fwd"] = self.timer(fwd("shifted"), slow_reps)
        rec["shifted_fb"] = self.timer(fb("shifted"), slow_reps)
        rec["triton_fwd"] = self.timer(fwd("triton"), reps)
        rec["triton_bwd_kern"] = self.timer(bwd_kernels, reps)
        rec["triton_fb"] = self.timer(fb("triton"), reps)
        rec["peak_mb_triton_fb"] = self.peak_mb(fb("triton"))
        rec["peak_mb_shifted_fb"] = self.peak_mb(fb("shifted"))
        ms = {c: rec[c]["median_ms"] for c in ("conv_fwd", "conv_fb", "shifted_fb", "triton_fwd", "triton_fb")}
        rec["ratio_triton_fb_to_conv_fb"] = ms["triton_fb"] / ms["conv_fb"]
        rec["ratio_triton_fb_to_shifted_fb"] = ms["triton_fb"] / ms["shifted_fb"]
        rec["ratio_triton_fwd_to_conv_fwd"] = ms["triton_fwd"] / ms["conv_fwd"]

    def stem_check(self):
        """AttentionStem: its PyTorch op and its Triton kernels vs the textbook form on the device (fp32, bf16
        autocast), and compiled."""
        from sasa import AttentionStem

        torch = self.torch
        dev = self.device
        log("\n== attention stem: fast op vs reference_forward ==")
        for name, dtype, compiled, kind in (
                ("stem_torch_fp32", None, False, "shifted"), ("stem_triton_fp32", None, False, "triton"),
                ("stem_torch_bf16_autocast", torch.bfloat16, False, "shifted"),
                ("stem_triton_bf16_autocast", torch.bfloat16, False, "triton"),
                ("stem_fp32_compiled", None, True, None)):
            t0 = time.time()
            rec = {"case": name}
            try:
                torch.manual_seed(0)
                stem = AttentionStem(3, 64, backend=kind).to(dev)
                x = torch.randn(4, 3, 32, 48, device=dev, requires_grad=True)
                params = [x, *stem.parameters()]
                backend = "aot_eager" if self.args.smoke else "inductor"
                fast = torch.compile(stem, backend=backend, fullgraph=True) if compiled else stem
                with torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                    out = fast(x)
                ref = stem.reference_forward(x)
                g = torch.randn_like(ref)
                grads = torch.autograd.grad(out.float(), params, g)
                ref_grads = torch.autograd.grad(ref, params, g)
                errs = {"out": self.norm_err(out, ref)}
                errs.update({f"g{i}": self.norm_err(a, b) for i, (a, b) in enumerate(zip(grads, ref_grads))})
                tol = 3e-2 if dtype is not None else 1e-4
                rec.update(errors=errs, tolerance=tol, passed=all(e <= tol for e in errs.values()))
            except Exception as e:  # noqa: BLE001
                rec.update(passed=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
            rec["seconds"] = round(time.time() - t0, 1)
            self.results["compile" if compiled else "correctness"].append(rec)
            log(f"{name:34s} {'PASS' if rec['passed'] else 'FAIL'}  {rec.get('errors', rec.get('error', ''))}"[:300])
        self.save()

    def compile_check(self):
        """torch.compile(fullgraph=True) through the custom ops; inductor on CUDA, aot_eager in smoke mode."""
        import sasa

        torch = self.torch
        backend = "aot_eager" if self.args.smoke else "inductor"
        t0 = time.time()
        rec = {"backend": backend}
        try:
            spec = ("compile", 2, 8, 8, 2, 16, 7, "zeros", "both", True, False, True, 1.0)
            q, k, v, rows, cols, leaves = self.inputs(spec, torch.bfloat16)

            def f(q, k, v, rows, cols):
                out = sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=7, backend="triton")
                return out.float().square().sum()

            loss = torch.compile(f, backend=backend, fullgraph=True)(q, k, v, rows, cols)
            grads = torch.autograd.grad(loss, leaves)
            ref_loss = f(q, k, v, rows, cols)
            ref_grads = torch.autograd.grad(ref_loss, leaves)
            errs = [self.norm_err(loss, ref_loss)] + [self.norm_err(a, b) for a, b in zip(grads, ref_grads)]
            rec.update(errors=errs, passed=all(e <= 1e-2 for e in errs))
        except Exception as e:  # noqa: BLE001
            rec.update(passed=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        rec["seconds"] = round(time.time() - t0, 1)
        self.results["compile"].append(rec)
        log(f"\n== torch.compile({backend}, fullgraph=True): {'PASS' if rec['passed'] else 'FAIL'} "
            f"{rec.get('errors', rec.get('error', ''))} ({rec['seconds']} s)")
        self.save()


def meta(check) -> dict:
    torch = check.torch
    import triton

    from sasa.backends.triton_backend import kernels_for

    tk = kernels_for(check.device)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                timeout=10, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):  # no git, or not a checkout
        commit = None
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "argv": sys.argv,
        "commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if check.device.type == "cuda" else "cpu (Triton interpreter)",
        "capability": torch.cuda.get_device_capability() if check.device.type == "cuda" else None,
        "tiles": {str(bd): cfg for bd, cfg in tk.TILES.items()},
    }
    return info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="folder for gpu_check.json")
    parser.add_argument("--smoke", action="store_true", help="CPU + Triton interpreter, tiny shapes (plumbing)")
    parser.add_argument("--skip-correctness", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-stem", action="store_true")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=10)
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is loaded
    sys.path.insert(0, ROOT)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        log("no CUDA device: run with --smoke for the CPU plumbing check")
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    check = Check(args)
    t0 = time.time()
    check.results["meta"] = meta(check)
    m = check.results["meta"]
    log(f"device: {m['device']} (capability {m['capability']}); torch {m['torch']}, triton {m['triton']}, "
        f"cuda {m['cuda']}, python {m['python']}; commit {m['commit']}")
    log(f"tiles (TH, TW, warps) per head_dim: {m['tiles']}  (sweep: tools/tile_sweep.py)")
    check.save()
    if not args.skip_correctness:
        check.correctness()
    if not args.skip_timing:
        check.timing()
    if not args.skip_compile:
        check.compile_check()
    if not args.skip_stem:
        check.stem_check()
    check.results["meta"]["total_seconds"] = round(time.time() - t0, 1)
    check.save()
    n_fail = sum(not r.get("passed", False) for r in check.results["correctness"] + check.results["compile"])
    n_err = sum("error" in r for r in check.results["timing"])
    log(f"\ndone in {time.time() - t0:.0f} s: {n_fail} correctness/compile failures, {n_err} timing errors; "
        f"results in {check.path}")
    return 1 if n_fail or n_err else 0


if __name__ == "__main__":
    sys.exit(main())
