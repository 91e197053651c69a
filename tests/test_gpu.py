"""On a CUDA device: the ``triton`` backend and the attention stem's kernels against the ``reference`` oracle.

``pytest -m gpu`` runs these (and the other ``gpu``-marked tests); without CUDA they are skipped. What they check,
on the device and with the compiled (not interpreted) kernels:

- fp32: forward and every gradient (q, k, v or the fused QKV tensor, ``rel_rows``, ``rel_cols``) of
  ``backend="triton"`` against ``backend="reference"``, max |error| / max |reference| <= 1e-4; head_dim
  8 / 12 / 16 / 32 / 64 / 128, k 3 / 5 / 7 / 11, both paddings, maps smaller than the window, shared, per-head,
  single or missing tables, q.r-only logits (no k), strided fused-QKV views, a non-default scale;
- bf16: triton and ``shifted`` in bf16 against the fp32 reference on the same bf16-rounded inputs; triton's error
  is at most 2x shifted's or under 2e-2;
- the backward is bitwise repeatable;
- ``torch.compile(fullgraph=True)`` (Inductor) through the custom op;
- ``AttentionStem``'s ``shifted`` and ``triton`` ops against its textbook ``reference_forward`` (fp32, bf16
  autocast) and compiled;
- a SASA-ResNet training step under bf16 autocast and channels_last gives finite loss and gradients.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import sasa

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed"),
]

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


@pytest.fixture(autouse=True)
def _exact_fp32(monkeypatch):
    """The fp32 reference must be fp32: no TF32 in its matmuls. A kernel configuration that fails its first-use
    self-check raises (``SASA_KERNEL_CHECK=error``) instead of quietly running ``shifted`` under test."""
    monkeypatch.setenv("SASA_KERNEL_CHECK", "error")
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def _materialize(base, rows, cols, dtype, fused, has_k):
    """q, k, v (fused: views of one (B, H, W, 3, heads, d) tensor) on the device, the tables, the leaves to grad."""
    if fused:
        qkv = base.cuda().to(dtype).requires_grad_()
        q, k, v = qkv.unbind(3)
        leaves = [qkv]
    else:
        q, k, v = (t.contiguous().cuda().to(dtype).requires_grad_() for t in base.unbind(3))
        leaves = [q, k, v] if has_k else [q, v]
    tables = [t.cuda().requires_grad_() if t is not None else None for t in (rows, cols)]
    leaves += [t for t in tables if t is not None]
    return q, (k if has_k else None), v, tables[0], tables[1], leaves


def _inputs(spec, dtype, seed=0):
    _, B, H, W, heads, d, K, _, tables, has_k, per_head, fused, _ = spec
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(B, H, W, 3, heads, d, generator=g) * 0.5  # moderate logits, like post-BN projections
    shape = (heads, K, d // 2) if per_head else (K, d // 2)
    rows = torch.randn(shape, generator=g) * 0.5 if tables in ("both", "rows") else None
    cols = torch.randn(shape, generator=g) * 0.5 if tables in ("both", "cols") else None
    return _materialize(base, rows, cols, dtype, fused, has_k)


def _run(backend, spec, q, k, v, rows, cols, leaves):
    K, padding, scale = spec[6], spec[7], spec[12]
    out = sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=K, padding=padding, scale=scale, backend=backend)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)  # the same in any dtype
    grads = torch.autograd.grad(out, leaves, g.to(out.device, out.dtype))
    return [out, *grads]


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """max |a - ref| / max |ref| (the absolute error when ref is all zeros)."""
    a, ref = a.float(), ref.float()
    scale = ref.abs().max().item()
    diff = (a - ref).abs().max().item()
    return diff / scale if scale > 0 else diff


@pytest.mark.parametrize("spec", FP32_CASES, ids=[c[0] for c in FP32_CASES])
def test_triton_fp32_matches_reference(spec):
    q, k, v, rows, cols, leaves = _inputs(spec, torch.float32)
    got = _run("triton", spec, q, k, v, rows, cols, leaves)
    ref = _run("reference", spec, q, k, v, rows, cols, leaves)
    assert all(bool(torch.isfinite(t).all()) for t in got)
    errors = [_err(a, r) for a, r in zip(got, ref)]
    assert max(errors) <= 1e-4, errors  # [out, then the gradient of each leaf]


@pytest.mark.parametrize("spec", BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_triton_bf16_within_shifted_error(spec):
    q, k, v, rows, cols, leaves = _inputs(spec, torch.bfloat16)
    got = _run("triton", spec, q, k, v, rows, cols, leaves)
    shifted = _run("shifted", spec, q, k, v, rows, cols, leaves)
    fused, has_k = spec[11], spec[9]
    base = (leaves[0] if fused else torch.stack([q, k if has_k else q, v], 3)).detach().float().cpu()
    ref_inputs = _materialize(base, None if rows is None else rows.detach().cpu(),
                              None if cols is None else cols.detach().cpu(), torch.float32, fused, has_k)
    ref = _run("reference", spec, *ref_inputs)
    for i, (a, s, r) in enumerate(zip(got, shifted, ref)):
        assert _err(a, r) <= max(2 * _err(s, r), 2e-2), (i, _err(a, r), _err(s, r))


def test_triton_backward_is_bitwise_repeatable():
    spec = ("determinism_bf16", 2, 16, 16, 8, 16, 7, "zeros", "both", True, True, True, 1.0)
    q, k, v, rows, cols, leaves = _inputs(spec, torch.bfloat16)
    first, second = (_run("triton", spec, q, k, v, rows, cols, leaves)[1:] for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_triton_under_torch_compile_fullgraph():
    spec = ("compile", 2, 8, 8, 2, 16, 7, "zeros", "both", True, False, True, 1.0)
    q, k, v, rows, cols, leaves = _inputs(spec, torch.bfloat16)

    def loss(q, k, v, rows, cols):
        return sasa.local_attention_2d(q, k, v, rows, cols, kernel_size=7, backend="triton").float().square().sum()

    compiled = torch.compile(loss, backend="inductor", fullgraph=True)(q, k, v, rows, cols)
    eager = loss(q, k, v, rows, cols)
    got, ref = torch.autograd.grad(compiled, leaves), torch.autograd.grad(eager, leaves)
    assert _err(compiled, eager) <= 1e-2
    assert all(_err(a, b) <= 1e-2 for a, b in zip(got, ref))


@pytest.mark.parametrize("backend,autocast,compiled", [
    ("shifted", False, False), ("triton", False, False), ("shifted", True, False), ("triton", True, False),
    (None, False, True)], ids=["shifted_fp32", "triton_fp32", "shifted_bf16_autocast", "triton_bf16_autocast",
                               "default_fp32_compiled"])
def test_attention_stem_matches_textbook(backend, autocast, compiled):
    torch.manual_seed(0)
    stem = sasa.AttentionStem(3, 64, backend=backend).cuda()
    x = torch.randn(4, 3, 32, 48, device="cuda", requires_grad=True)
    params = [x, *stem.parameters()]
    fast = torch.compile(stem, backend="inductor", fullgraph=True) if compiled else stem
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
        out = fast(x)
    ref = stem.reference_forward(x)
    g = torch.randn_like(ref)
    got, want = torch.autograd.grad(out.float(), params, g), torch.autograd.grad(ref, params, g)
    tol = 3e-2 if autocast else 1e-4
    errors = [_err(out, ref)] + [_err(a, b) for a, b in zip(got, want)]
    assert max(errors) <= tol, errors


@pytest.mark.parametrize("name", ["sasa_resnet26_convstem", "sasa_resnet26"])
def test_model_training_step_bf16_channels_last(name):
    torch.manual_seed(0)
    model = sasa.create_model(name, num_classes=10).cuda().to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 64, 64, device="cuda").contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (4,), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters()
               if p.requires_grad)
