"""The ``triton`` backend against the ``reference`` oracle: forward and every gradient, borders on purpose.

On CPU the kernels run in Triton's interpreter. ``TRITON_INTERPRET=1`` is set per test (``monkeypatch``), never
for the whole process: on a CUDA machine a process-wide setting would push every other test's CUDA launches into
the interpreter. The backend picks interpreted or compiled kernels by the tensors' device, loading each kernel
module lazily, so the order in which test modules import ``sasa`` does not matter (checked below).

Shapes are tiny on purpose (the interpreter runs one Python step per tile and offset); ``TILE_OVERRIDE`` forces
small tiles so borders between tiles are exercised on 3x3 .. 7x9 maps. GPU tests are marked ``gpu``.
"""

import importlib.util
import subprocess
import sys

import pytest
import torch

import sasa
from sasa.backends import all_backends

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed")

CUDA = torch.cuda.is_available()
gpu = pytest.mark.gpu


@pytest.fixture
def interpret(monkeypatch):
    """Run the triton backend on CPU tensors through Triton's interpreter for the duration of one test. The kernels'
    self-check is off: these tests are themselves checks against the reference (it has its own, test_selfcheck)."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("SASA_KERNEL_CHECK", "off")
    from sasa.backends import triton_backend

    return triton_backend


def _tile(monkeypatch, triton_backend, tile):
    kernels = triton_backend.kernels_for(torch.device("cpu"))
    monkeypatch.setattr(kernels, "TILE_OVERRIDE", tile)


def _inputs(B, H, W, heads, d, K, *, tables="both", has_k=True, per_head=False, fused=False, device="cpu",
            dtype=torch.float32, seed=0):
    """q, k, v (fused: strided views of one (B, H, W, 3, heads, d) tensor) and the relative tables."""
    g = torch.Generator().manual_seed(seed)
    if fused:
        qkv = torch.randn(B, H, W, 3, heads, d, generator=g).to(device, dtype).requires_grad_()
        q, k, v = qkv.unbind(3)  # (B, H, W, heads, d) views, strides (.., 3*heads*d, d, 1)
        leaves = [qkv]
    else:
        q, k, v = (torch.randn(B, H, W, heads, d, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
        leaves = [q, k, v]
    shape = (heads, K, d // 2) if per_head else (K, d // 2)
    rows = torch.randn(shape, generator=g).to(device).requires_grad_() if tables in ("both", "rows") else None
    cols = torch.randn(shape, generator=g).to(device).requires_grad_() if tables in ("both", "cols") else None
    leaves += [t for t in (rows, cols) if t is not None]
    return q, (k if has_k else None), v, rows, cols, leaves


def _run(backend, q, k, v, rows, cols, leaves, K, padding, scale, dout_seed=1):
    out = sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=K, padding=padding, scale=scale, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(dout_seed)).to(out.device, out.dtype)
    grads = torch.autograd.grad(out, leaves, g, allow_unused=True)
    return out, grads


# (B, H, W, heads, d, K, padding, tables, has_k, per_head, fused, tile, scale)
CASES = {
    "basic": (2, 5, 6, 2, 8, 3, "zeros", "both", True, False, False, None, 1.0),
    "mask_tiles": (1, 5, 6, 2, 8, 3, "mask", "both", True, True, False, (2, 4), 1.0),
    "k7_on_3x3": (1, 3, 3, 1, 8, 7, "zeros", "both", True, False, False, None, 1.0),
    "k7_on_3x3_mask": (1, 3, 3, 2, 8, 7, "mask", "both", True, True, False, None, 1.0),
    "k7_on_4x5_mask": (1, 4, 5, 2, 8, 7, "mask", "both", True, False, False, None, 0.5),
    "k7_on_4x5_tiles": (1, 4, 5, 1, 8, 7, "zeros", "both", True, True, False, (2, 4), 1.0),
    "fused_d12_tiles": (1, 7, 9, 2, 12, 5, "zeros", "both", True, False, True, (4, 8), 1.0),
    "fused_mask_k9": (1, 7, 6, 1, 8, 9, "mask", "cols", True, True, True, (4, 8), 1.0),
    "qr_only": (1, 6, 5, 2, 8, 5, "zeros", "both", False, False, False, (4, 4), 1.0),
    "qr_only_mask_rows": (1, 6, 5, 1, 12, 3, "mask", "rows", False, True, True, None, 1.0),
    "no_tables": (1, 5, 4, 2, 16, 5, "zeros", None, True, False, False, (2, 4), 0.25),
    "no_tables_mask_odd_d": (1, 5, 7, 1, 5, 3, "mask", None, True, False, False, None, 1.0),
}


# cases with several heads, run again with HB heads per program (the kernels' head axis; HB=1 above)
HB_CASES = {
    "hb4_basic": (1, 5, 6, 4, 8, 3, "zeros", "both", True, False, False, None, 1.0),
    "hb2_mask_tiles_perhead": (1, 5, 6, 4, 8, 3, "mask", "both", True, True, False, (2, 4), 1.0),
    "hb4_fused_d12_k5_tiles": (1, 7, 9, 4, 12, 5, "zeros", "both", True, True, True, (4, 8), 1.0),
    "hb2_qr_only_mask_cols": (1, 6, 5, 2, 8, 5, "mask", "cols", False, True, True, (4, 4), 1.0),
    "hb4_k7_on_3x3_no_tables": (1, 3, 3, 4, 16, 7, "zeros", None, True, False, False, None, 0.5),
    "hb2_of_6_heads_rows": (1, 4, 5, 6, 8, 3, "zeros", "rows", True, True, True, None, 1.0),  # 6 heads: HB 4 -> 2
}


@pytest.mark.parametrize("case", list(CASES) + list(HB_CASES), ids=list(CASES) + list(HB_CASES))
def test_matches_reference_fp32(case, interpret, monkeypatch):
    B, H, W, heads, d, K, padding, tables, has_k, per_head, fused, tile, scale = {**CASES, **HB_CASES}[case]
    _tile(monkeypatch, interpret, tile)
    if case in HB_CASES:
        kernels = interpret.kernels_for(torch.device("cpu"))
        monkeypatch.setattr(kernels, "HEADS_OVERRIDE", int(case[2]))
    q, k, v, rows, cols, leaves = _inputs(B, H, W, heads, d, K, tables=tables, has_k=has_k, per_head=per_head,
                                          fused=fused)
    out, grads = _run("triton", q, k, v, rows, cols, leaves, K, padding, scale)
    ref_out, ref_grads = _run("reference", q, k, v, rows, cols, leaves, K, padding, scale)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    names = (["qkv"] if fused else ["q", "k", "v"]) + [n for n, t in (("rel_rows", rows), ("rel_cols", cols)) if t
                                                       is not None]
    for name, g, ref in zip(names, grads, ref_grads):
        if ref is None:  # k=None: k's leaf is unused by both backends
            assert g is None or not g.abs().any(), name
            continue
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


# (rtol, atol) of bf16 / fp16 inputs against the reference computed in fp32 from the same (rounded) values, atol
# relative to the reference's largest value (``_close``): the kernels compute in fp32, so what is left is the rounding
# of the stored results (8 / 11 significant bits; the backward reads the rounded output) and, in the stem's dots,
# TF32 inputs. The same rule and figures as sasa.backends.selfcheck.TOLERANCES.
HALF_TOLERANCES = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (4e-3, 4e-3)}


def _close(got, want, dtype, msg=None):
    rtol, atol = HALF_TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), want, rtol=rtol, atol=atol * want.abs().max().item(), msg=msg)
HALF_CASES = {  # (B, H, W, heads, d, K, padding, per_head, fused, tile, heads per program, table dtype)
    "d8_zeros_fp32_tables": (1, 5, 6, 2, 8, 3, "zeros", False, False, None, None, torch.float32),
    "d16_mask_tiles_hb2_fused": (1, 5, 6, 2, 16, 3, "mask", True, True, (4, 4), 2, None),
}


def _half_inputs(case, dtype, seed=0):
    """The case's q, k, v (fused: views of one tensor) in ``dtype``, tables in the case's dtype (None: ``dtype``),
    and the float32 leaves holding the same values, for the reference."""
    B, H, W, heads, d, K, _padding, per_head, fused, _tile, _hb, table_dtype = HALF_CASES[case]
    g = torch.Generator().manual_seed(seed)
    leaves = [torch.randn(B, H, W, 3, heads, d, generator=g).to(dtype)] if fused else [
        torch.randn(B, H, W, heads, d, generator=g).to(dtype) for _ in range(3)]
    shape = (heads, K, d // 2) if per_head else (K, d // 2)
    leaves += [torch.randn(shape, generator=g).to(table_dtype or dtype) for _ in range(2)]
    leaves = [t.requires_grad_() for t in leaves]
    ref_leaves = [t.detach().float().requires_grad_() for t in leaves]
    return leaves, ref_leaves, fused


def _attention(leaves, fused, K, padding, backend):
    q, k, v = leaves[0].unbind(3) if fused else leaves[:3]
    return sasa.local_attention_2d(q, k, v, *leaves[-2:], kernel_size=K, padding=padding, scale=0.5, backend=backend)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("case", list(HALF_CASES))
def test_matches_reference_half(case, dtype, interpret, monkeypatch):
    """bf16 / fp16 q, k, v (and tables) through the interpreted kernels: output and every gradient against the
    reference in fp32, within ``HALF_TOLERANCES``."""
    _B, _H, _W, _heads, _d, K, padding, _per_head, _fused, tile, hb, _td = HALF_CASES[case]
    _tile(monkeypatch, interpret, tile)
    monkeypatch.setattr(interpret.kernels_for(torch.device("cpu")), "HEADS_OVERRIDE", hb)
    leaves, ref_leaves, fused = _half_inputs(case, dtype)
    out = _attention(leaves, fused, K, padding, "triton")
    assert out.dtype == dtype
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    grads = torch.autograd.grad(out, leaves, dout)
    ref = _attention(ref_leaves, fused, K, padding, "reference")
    ref_grads = torch.autograd.grad(ref, ref_leaves, dout.float())
    _close(out, ref, dtype)
    names = (["qkv"] if fused else ["q", "k", "v"]) + ["rel_rows", "rel_cols"]
    for name, got, want, leaf in zip(names, grads, ref_grads, leaves):
        assert got.dtype == leaf.dtype, name
        _close(got, want, dtype, msg=lambda m, n=name: f"grad {n}: {m}")


def test_heads_per_program_choice(interpret):
    kernels = interpret.kernels_for(torch.device("cpu"))
    assert [kernels.heads_per_program(heads, 8) for heads in (1, 2, 3, 4, 6, 8, 12, 16)] == [1, 2, 1, 4, 2, 8, 4, 8]
    assert kernels.tile_config(64, 64, 8, "fwd", heads=8)[3] == 1  # TILES: one head per program until measured
    assert kernels.tile_config(2, 2, 8, "fwd", heads=8) == (2, 2, 1, 1)  # small maps: tile and warps shrink


def test_launch_config_follows_overrides(interpret, monkeypatch):
    """``launch_config`` is memoised per layout, but follows ``TILE_OVERRIDE`` / ``HEADS_OVERRIDE`` and a replaced
    ``tile_config`` (the tuning tools swap it), and a layout's vector width."""
    kernels = interpret.kernels_for(torch.device("cpu"))
    q = torch.zeros(1, 16, 16, 4, 8)
    assert kernels.launch_config(q, q, q)["fwd"] == (8, 8, 8, 1)
    monkeypatch.setattr(kernels, "TILE_OVERRIDE", (4, 4))
    monkeypatch.setattr(kernels, "HEADS_OVERRIDE", 2)
    assert kernels.launch_config(q, q, q)["fwd"][::3] == (4, 2)
    monkeypatch.setattr(kernels, "tile_config", lambda H, W, bd, kind, heads=1: (2, 2, 1, 1))
    assert kernels.launch_config(q, q, q)["bwd_kv"] == (2, 2, 1, 1)
    assert kernels.launch_config(q, q, q)["vec"] == 4  # fp32, head_dim 8: 16 bytes
    qkv = torch.zeros(1, 16, 16, 3, 4, 5)[..., :3].unbind(3)  # pixel stride 60, head stride 5: scalar loads
    assert kernels.launch_config(*qkv)["vec"] == 1


def test_partial_requires_grad_and_determinism(interpret):
    """Only some inputs need gradients (the kernels skip the rest); two backward passes agree bit for bit."""
    q, k, v, rows, cols, _ = _inputs(1, 5, 5, 2, 8, 3, per_head=True)
    q, k = q.detach(), k.detach()
    cols = cols.detach()
    runs = [_run("triton", q, k, v, rows, cols, [v, rows], 3, "zeros", 1.0)[1] for _ in range(2)]
    ref = _run("reference", q, k, v, rows, cols, [v, rows], 3, "zeros", 1.0)[1]
    for a, b, r in zip(runs[0], runs[1], ref):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.slow
def test_layer_recompute_qkv(interpret, stride):
    """``SelfAttention2d(recompute_qkv=True)``: the kernels' saved q / k / v are rebuilt from the recomputed
    projection in the backward; gradients are identical."""
    torch.manual_seed(0)
    layer = sasa.SelfAttention2d(8, 8, 3, stride=stride, heads=2, backend="triton")
    x = torch.randn(1, 8, 5, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    out = layer(x)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, [x, *layer.parameters()], g)
    layer.recompute_qkv = True
    for got, want in zip(torch.autograd.grad(layer(x), [x, *layer.parameters()], g), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow
def test_expanded_upstream_gradient(interpret):
    """``out.sum()`` hands the backward an all-stride-0 gradient; the kernels must not assume unit strides."""
    q, k, v, rows, cols, leaves = _inputs(1, 4, 3, 1, 8, 3, fused=True)
    grads = torch.autograd.grad(sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=3, backend="triton").sum(),
                                leaves)
    ref = torch.autograd.grad(sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=3, backend="reference").sum(),
                              leaves)
    for g, r in zip(grads, ref):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_empty_batch(interpret):
    q, k, v, rows, cols, leaves = _inputs(0, 4, 4, 1, 8, 3)
    out, grads = _run("triton", q, k, v, rows, cols, leaves, 3, "zeros", 1.0)
    assert out.shape == q.shape
    assert all(g is None or not g.abs().any() for g in grads)


@pytest.mark.slow
def test_custom_op_opcheck(interpret):
    """Schema, fake (meta) kernel, autograd registration and AOT tracing of the custom ops, checked by torch."""
    q, k, v, rows, cols, _ = _inputs(1, 3, 4, 1, 8, 3)
    op = torch.ops.sasa.local_attention_fwd.default
    torch.library.opcheck(op, (q, k, v, rows, cols, 3, False, 1.0))
    torch.library.opcheck(op, (q, None, v, None, cols, 3, True, 0.5))


def _assert_compiled_matches(compiled, eager, args, leaves):
    """The compiled function's loss and gradients equal the eager ones."""
    loss = compiled(*args)
    grads = torch.autograd.grad(loss, leaves)
    ref_loss = eager(*args)
    ref_grads = torch.autograd.grad(ref_loss, leaves)
    torch.testing.assert_close(loss, ref_loss)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


@pytest.mark.slow
def test_compiles_without_graph_break(interpret):
    """``fullgraph=True`` fails on any graph break; aot_eager traces forward and backward through the custom ops."""
    q, k, v, rows, cols, leaves = _inputs(1, 3, 4, 1, 8, 3, fused=True)

    def f(q, k, v, rows, cols):
        return sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=3, backend="triton").square().sum()

    _assert_compiled_matches(torch.compile(f, backend="aot_eager", fullgraph=True), f, (q, k, v, rows, cols), leaves)


def test_can_run_reasons(monkeypatch):
    triton_backend = all_backends()["triton"]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.zeros(1, 2, 2, 1, 8)
    assert "CUDA" in triton_backend.can_run(x, kernel_size=3)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_backend.can_run(x, kernel_size=3) is None
    assert "float64" in triton_backend.can_run(x.double(), kernel_size=3)
    assert "head_dim" in triton_backend.can_run(torch.zeros(1, 2, 2, 1, 256), kernel_size=3)
    assert "kernel_size" in triton_backend.can_run(x, kernel_size=13)
    probe = torch.empty(1, 1, 1, 1, 2, device="meta")
    assert triton_backend.can_run(probe, device=torch.device("cuda")) is None
    assert triton_backend.can_run(probe, device="mps") is not None


def test_never_default_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "triton" not in sasa.available_backends("cpu")
    assert all_backends()["triton"].priority == {"cuda": 20}
    if importlib.util.find_spec("triton") is not None:
        assert sasa.available_backends("cuda")[0] == "triton"


@pytest.mark.slow
def test_kernels_load_lazily():
    """Importing sasa and listing backends must not decorate any Triton kernel (TRITON_INTERPRET is read then)."""
    code = (
        "import sys, sasa; sasa.available_backends('cpu'); sasa.available_backends('cuda'); "
        "assert 'sasa.backends.triton_backend' in sys.modules; "
        "assert not [m for m in sys.modules if m.startswith('sasa.backends.triton_kernels')], sys.modules.keys()"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def _resources(tmp_path, *args):
    import json
    import os
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "resources.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    subprocess.run([sys.executable, str(root / "tools" / "kernel_resources.py"), *args, "--out", str(out)],
                   check=True, timeout=300, env=env, capture_output=True)
    return json.loads(out.read_text())


@pytest.mark.slow
def test_kernels_compile_for_hopper(tmp_path):
    """The interpreter cannot catch what only the compiler rejects: compile every kernel for sm_90a (H100 / H200)
    offline, one and two heads per program, and check that ptxas reports registers and no spills."""
    rows = _resources(tmp_path, "--stages", "1", "--heads", "1,2", "--warps", "8")
    assert len(rows) == 6 and all("error" not in r for r in rows), rows
    assert all(0 < r["registers"] <= 255 and r["spill_store_bytes"] == 0 for r in rows), rows


@pytest.mark.slow
def test_kernels_load_16_byte_vectors(tmp_path):
    """At head_dim 16 (ResNet-50 stage 2, bf16) the K / V / Q tiles and the placed relative-table rows must load
    as 16-byte vectors; a mask varying along the channels once turned every one of them into 2-byte loads, which
    only the SASS shows."""
    rows = _resources(tmp_path, "--stages", "2", "--heads", "1", "--warps", "2", "--kinds", "fwd,bwd_kv")
    assert len(rows) == 2, rows  # one forward and one K/V-backward kernel: an empty list must not pass
    for r in rows:
        loads = r["global_loads_by_bits"]
        assert loads["128"] >= 4 and loads["16"] == 0, r


# ------------------------------------------------------------------------------------ attention stem kernels


@pytest.mark.parametrize("values, in_ch, heads, block, shape", [
    ("spatial", 3, 4, 4, (2, 8, 12)),   # the paper's stem layout, 12 blocks: two programs, the second partial
    ("plain", 3, 2, 2, (1, 6, 10)),
    ("spatial", 1, 2, 3, (1, 6, 9)),   # 9-pixel blocks padded to 16, one input channel
    ("spatial", 3, 2, 4, (2, 16, 20)),  # 40 blocks, 5 programs
])
def test_stem_kernels_match_reference(interpret, monkeypatch, values, in_ch, heads, block, shape):
    """The stem's Triton kernels (interpreted) against the textbook form, output and every gradient, NCHW and
    channels-last input and upstream gradient."""
    from sasa.layers.stem import AttentionStem

    monkeypatch.setenv("SASA_STEM_BACKEND", "triton")
    torch.manual_seed(0)
    stem = AttentionStem(in_ch, 8, heads=heads, block_size=block, values=values, mixtures=3)
    with torch.no_grad():
        stem.query.weight.mul_(3.0)  # non-trivial attention
    params = list(stem.parameters())
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(shape[0], in_ch, *shape[1:]).contiguous(memory_format=fmt).requires_grad_()
        out, expected = stem(x), stem.reference_forward(x)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        g = torch.randn_like(out).contiguous(memory_format=fmt)
        for got, want in zip(torch.autograd.grad(out, [x, *params], g),
                             torch.autograd.grad(expected, [x, *params], g)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("values", ["spatial", "plain"])
def test_stem_kernels_match_reference_half(interpret, dtype, values):
    """The stem's kernels on bf16 / fp16 image and parameters (TF32 dots, results in ``dtype``): output and every
    gradient against the reference in fp32 from the same values, within ``HALF_TOLERANCES``; NCHW and NHWC."""
    from sasa.functional import stem_attention

    gen = torch.Generator().manual_seed(0)
    block, heads, C, M, D = 4, 2, 3, 3, 8
    pm = torch.randn(block * block, M, generator=gen) if values == "spatial" else None
    params = [torch.randn(C, heads * C, generator=gen) * 2, pm, torch.randn(heads, (M if pm is not None else 1) * C,
                                                                              D, generator=gen)]
    x = torch.randn(1, C, 8, 12, generator=gen)  # 6 blocks
    for fmt in (torch.contiguous_format, torch.channels_last):
        leaves = [t.to(dtype).contiguous(memory_format=fmt) if t is x else t.to(dtype) for t in (x, *params)
                  if t is not None]
        leaves = [t.requires_grad_() for t in leaves]
        ref_leaves = [t.detach().float().requires_grad_() for t in leaves]

        def run(ts, backend):
            xs, g, *rest = ts
            return stem_attention(xs, g, rest[0] if pm is not None else None, rest[-1], block=block, backend=backend)

        out = run(leaves, "triton")
        assert out.dtype == dtype
        dout = torch.randn(out.shape, generator=gen).to(dtype)
        ref = run(ref_leaves, "reference")
        _close(out, ref, dtype)
        expected = torch.autograd.grad(ref, ref_leaves, dout.float())
        for got, want in zip(torch.autograd.grad(out, leaves, dout), expected):
            assert got.dtype == dtype
            _close(got, want, dtype)


def test_stem_kernels_deterministic_and_autocast(interpret, monkeypatch):
    """Bitwise-equal gradients on a second run (per-program partials, fixed-order sums); under bf16 autocast the
    output is bf16 and the gradients keep their parameters' dtype."""
    from sasa.layers.stem import AttentionStem

    monkeypatch.setenv("SASA_STEM_BACKEND", "triton")
    torch.manual_seed(0)
    stem = AttentionStem(3, 8, heads=2)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    runs = [torch.autograd.grad(stem(x).square().sum(), [x, *stem.parameters()]) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stem(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), stem.reference_forward(x), atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in stem.parameters())


def test_stem_backend_choice(monkeypatch):
    """The stem's Triton kernels are the registry's ``triton`` of the ``stem`` op: chosen on CUDA, named on CPU (the
    interpreter), refused with the reason on shapes they do not take."""
    from sasa import backends
    from sasa.functional import stem_attention

    x = torch.zeros(1, 3, 4, 4)
    g, wv = torch.zeros(3, 3), torch.zeros(1, 3, 2)
    with backends.record() as used:
        monkeypatch.delenv("SASA_STEM_BACKEND", raising=False)
        stem_attention(x, g, None, wv, block=2)  # CPU: the PyTorch form
        monkeypatch.setenv("SASA_STEM_BACKEND", "triton")
        stem_attention(x, g, None, wv, block=2)
    assert used == {("stem", "shifted"), ("stem", "triton")}
    with pytest.raises(ValueError, match="16 pixels"):  # named on a shape the kernels do not take
        stem_attention(torch.zeros(1, 3, 10, 10), g, None, wv, block=5)
    with pytest.raises(ValueError, match="mixtures"):
        stem_attention(torch.zeros(1, 6, 4, 4), torch.zeros(6, 6), torch.zeros(4, 4), torch.zeros(1, 24, 2), block=2)
    monkeypatch.delenv("SASA_STEM_BACKEND")
    assert backends.choose("stem", torch.zeros(1, 3, 10, 10, device="meta"), block=5).name == "shifted"
    assert sasa.available_backends("cuda", op="stem")[0] == "triton"


@pytest.mark.slow
def test_stem_kernels_compile_for_hopper(tmp_path):
    """The stem's kernels compile for sm_90a offline; registers reported, spills small."""
    rows = _resources(tmp_path, "--kinds", "stem_fwd,stem_bwd", "--warps", "4")
    assert len(rows) == 2 and all(0 < r["registers"] <= 255 and r["spill_store_bytes"] <= 256 for r in rows), rows


# ---------------------------------------------------------------------------------------------- GPU only


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("padding", ["zeros", "mask"])
@pytest.mark.parametrize("d,K,H,W", [(8, 7, 13, 10), (16, 3, 9, 9), (64, 11, 6, 7)])
def test_cuda_matches_reference(d, K, H, W, padding):
    q, k, v, rows, cols, leaves = _inputs(2, H, W, 2, d, K, per_head=d == 16, fused=True, device="cuda")
    out, grads = _run("triton", q, k, v, rows, cols, leaves, K, padding, 1.0)
    ref_out, ref_grads = _run("reference", q, k, v, rows, cols, leaves, K, padding, 1.0)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_cuda_torch_compile_no_graph_break():
    q, k, v, rows, cols, leaves = _inputs(2, 8, 8, 2, 16, 7, fused=True, device="cuda", dtype=torch.bfloat16)

    def f(q, k, v, rows, cols):
        return sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=7, backend="triton").float().square().sum()

    _assert_compiled_matches(torch.compile(f, fullgraph=True), f, (q, k, v, rows, cols), leaves)
