"""``SelfAttention2d`` and ``AttentionStem``: shapes, stride, options, parameters, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import sasa
from sasa import AttentionStem, SelfAttention2d
from sasa.backends import stem as stem_attention


def test_layer_is_conv_like():
    layer = SelfAttention2d(16, 32, kernel_size=7, heads=8)
    x = torch.randn(2, 16, 9, 11)
    y = layer(x)
    assert y.shape == (2, 32, 9, 11)
    y.sum().backward()
    assert layer.qkv.weight.grad is not None and layer.rel_rows.grad is not None and layer.rel_cols.grad is not None
    assert "16, 32, kernel_size=7" in repr(layer)


def test_stride_is_attention_then_avgpool():
    torch.manual_seed(0)
    strided = SelfAttention2d(8, 16, kernel_size=5, stride=2, heads=4)
    plain = SelfAttention2d(8, 16, kernel_size=5, stride=1, heads=4)
    plain.load_state_dict(strided.state_dict())
    x = torch.randn(2, 8, 10, 7)
    y = strided(x)
    assert y.shape == (2, 16, 5, 4)  # ceil(7 / 2) = 4, like a strided 3x3 conv
    torch.testing.assert_close(y, F.avg_pool2d(plain(x), 2, 2, ceil_mode=True))
    torch.testing.assert_close(y[..., :3], F.avg_pool2d(plain(x), 2, 2))
    assert "stride=2" in repr(strided)


@pytest.mark.parametrize("backend", sasa.available_backends("cpu"))
def test_layer_matches_across_backends(backend):
    torch.manual_seed(1)
    layer = SelfAttention2d(8, 16, kernel_size=7, heads=2, padding="mask", rel_per_head=True)
    x = torch.randn(2, 8, 5, 6, requires_grad=True)
    ref = layer(x)
    grad_ref = torch.autograd.grad(ref.sum(), [x, *layer.parameters()])
    layer.backend = backend
    out = layer(x)
    grad = torch.autograd.grad(out.sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    for a, b in zip(grad, grad_ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def test_channels_last_input():
    layer = SelfAttention2d(8, 16, kernel_size=3, heads=2)
    x = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x))


def test_parameter_counts_by_option():
    cin, cout, k, heads = 16, 32, 7, 8
    d = cout // heads
    count = sasa.count_params
    assert count(SelfAttention2d(cin, cout, k, heads=heads)) == 3 * cin * cout + k * d  # shared tables: 2 x k x d/2
    assert count(SelfAttention2d(cin, cout, k, heads=heads, rel_per_head=True)) == 3 * cin * cout + heads * k * d
    assert count(SelfAttention2d(cin, cout, k, heads=heads, query_key=False)) == 2 * cin * cout + k * d
    assert count(SelfAttention2d(cin, cout, k, heads=heads, positional="none")) == 3 * cin * cout
    assert count(SelfAttention2d(cin, cout, k, heads=heads, positional="absolute")) == 3 * cin * cout


def test_positional_variants_run_and_differ():
    torch.manual_seed(0)
    x = torch.randn(1, 8, 6, 6)
    absolute = SelfAttention2d(8, 8, 3, heads=2, positional="absolute")
    none = SelfAttention2d(8, 8, 3, heads=2, positional="none")
    none.load_state_dict(absolute.state_dict())
    assert not torch.allclose(absolute(x), none(x))  # the encoding changes the projections' input
    qr_only = SelfAttention2d(8, 8, 3, heads=2, query_key=False)
    assert qr_only(x).shape == (1, 8, 6, 6)
    assert "query_key=False" in repr(qr_only)


def test_attention_weights_are_a_distribution():
    layer = SelfAttention2d(4, 8, kernel_size=7, heads=2, padding="mask")
    w = layer.attention_weights(torch.randn(2, 4, 3, 5))
    assert w.shape == (2, 3, 5, 2, 7, 7)
    torch.testing.assert_close(w.sum((-1, -2)), torch.ones(2, 3, 5, 2))
    assert w[0, 0, 0, 0, 0, 0] == 0  # masked: top-left corner's up-left neighbour is outside


def test_reset_parameters_initialisation():
    layer = SelfAttention2d(64, 256, kernel_size=7, heads=8, rel_per_head=True)
    std = layer.rel_rows.std().item()
    assert abs(std - (1 / 32) ** 0.5) < 0.05  # N(0, 1/head_dim), head_dim 32
    before = layer.qkv.weight.clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.qkv.weight)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(in_channels=8, out_channels=12, heads=8), ValueError, r"out_channels \(12\) must be divisible by heads"),
        (dict(in_channels=8, out_channels=24, heads=8), ValueError, "head_dim must be even|out_channels / heads"),
        (dict(in_channels=8, out_channels=16, kernel_size=4), ValueError, "kernel_size must be odd"),
        (dict(in_channels=8, out_channels=16, kernel_size=-1), ValueError, "kernel_size must be odd"),
        (dict(in_channels=0, out_channels=16), ValueError, "in_channels must be a positive int"),
        (dict(in_channels=8, out_channels=16, padding="same"), ValueError, "padding must be one of"),
        (dict(in_channels=8, out_channels=16, positional="rope"), ValueError, "positional must be one of"),
        (dict(in_channels=8, out_channels=16, positional="none", query_key=False), ValueError, "query_key=False"),
    ],
)
def test_layer_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SelfAttention2d(**kwargs)


def test_layer_bad_input_shape():
    layer = SelfAttention2d(8, 16, 3, heads=2)
    with pytest.raises(ValueError, match="expects 8 input channels, got 4"):
        layer(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        layer(torch.randn(8, 5, 5))


# ------------------------------------------------------------------------------------------------ stem
@pytest.mark.parametrize("values", ["spatial", "plain", "conv"])
def test_stem_variants(values):
    stem = AttentionStem(3, 64, values=values)
    x = torch.randn(2, 3, 16, 12)
    y = stem(x)
    assert y.shape == (2, 64, 16, 12)
    y.sum().backward()
    assert all(p.grad is not None for p in stem.parameters())


def test_stem_attends_only_inside_blocks():
    """Changing one 4x4 block leaves every other block's output untouched."""
    torch.manual_seed(0)
    stem = AttentionStem(3, 16, heads=4)
    x = torch.randn(1, 3, 8, 8)
    x2 = x.clone()
    x2[:, :, :4, :4] += 1.0
    y, y2 = stem(x), stem(x2)
    assert not torch.allclose(y[..., :4, :4], y2[..., :4, :4])
    torch.testing.assert_close(y[..., 4:, :], y2[..., 4:, :])
    torch.testing.assert_close(y[..., :4, 4:], y2[..., :4, 4:])


def test_stem_spatial_values_by_hand():
    """v_ab = (sum_m p(a,b,m) W_V^m) x_ab, checked at one position of one block; one head, so the output at a
    pixel is a convex combination of its block's values."""
    torch.manual_seed(0)
    stem = AttentionStem(3, 8, heads=1)
    x = torch.randn(1, 3, 4, 4)
    p = stem.mixture_weights()  # (16, m)
    torch.testing.assert_close(p.sum(-1), torch.ones(16))
    w = torch.einsum("m,moc->oc", p[5], stem.value_weight)  # position (1, 1)
    v_11 = w @ x[0, :, 1, 1]
    q, k = stem.query(x[0].flatten(1).t()), stem.key(x[0].flatten(1).t())  # (16, 8)
    values = torch.stack([torch.einsum("m,moc->oc", p[i], stem.value_weight) @ x[0, :, i // 4, i % 4]
                          for i in range(16)])
    attn = torch.softmax(q @ k.t(), -1)
    torch.testing.assert_close(stem(x)[0, :, 1, 1], attn[5] @ values)
    torch.testing.assert_close(values[5], v_11)


def test_stem_params_and_bad_input():
    stem = AttentionStem(3, 64)
    # q, k: 3*64 each; W_V^m: 4*64*3; embeddings: (4 + 4 + 4) * 16
    assert sasa.count_params(stem) == 2 * 192 + 4 * 192 + 12 * 16
    with pytest.raises(ValueError, match="divisible by block_size"):
        stem(torch.randn(1, 3, 10, 8))
    with pytest.raises(ValueError, match="values must be one of"):
        AttentionStem(3, 64, values="linear")
    with pytest.raises(ValueError, match="divisible by heads"):
        AttentionStem(3, 30, heads=4)



@pytest.mark.parametrize("values, heads, block, size", [
    ("spatial", 4, 4, (8, 12)), ("spatial", 1, 4, (4, 4)), ("spatial", 2, 2, (6, 10)), ("plain", 4, 4, (12, 8)),
    ("plain", 2, 2, (2, 6))])
@pytest.mark.parametrize("chunk_blocks", [512, 1, 12, 15], ids=["one-chunk", "rows", "ragged-rows", "images"])
def test_stem_fast_path_matches_reference(values, heads, block, size, chunk_blocks, monkeypatch):
    """The reassociated, recomputing op equals the textbook q / k / v formulation: output and every gradient
    (input and all parameters), float64, NCHW and channels-last inputs and upstream gradients; on CPU also when it
    runs in chunks of block rows (some of uneven size) or of whole images."""
    monkeypatch.setattr(stem_attention, "CHUNK_BLOCKS", chunk_blocks)
    torch.manual_seed(0)
    stem = AttentionStem(3, 8, heads=heads, block_size=block, values=values, mixtures=3).double()
    with torch.no_grad():  # non-trivial attention: larger logits than the default init gives
        stem.query.weight.mul_(3.0)
    params = list(stem.parameters())
    for fmt in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 3, *size, dtype=torch.float64).contiguous(memory_format=fmt).requires_grad_()
        out, expected = stem(x), stem.reference_forward(x)
        torch.testing.assert_close(out, expected)
        g = torch.randn_like(out).contiguous(memory_format=fmt)
        for got, want in zip(torch.autograd.grad(out, [x, *params], g),
                             torch.autograd.grad(expected, [x, *params], g)):
            torch.testing.assert_close(got, want)


def test_stem_gradcheck():
    torch.manual_seed(0)
    stem = AttentionStem(3, 8, heads=2, block_size=2, mixtures=2).double()
    x = torch.randn(1, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, *p: stem(x), (x, *stem.parameters()))


def test_stem_keeps_only_its_input_for_backward():
    """Memory contract: what autograd keeps for the stem's backward is the image in blocks (in_channels values per
    pixel) and small matrices, not the out_channels-wide q / k / v or the heads x 16 probabilities."""
    stem = AttentionStem(3, 64)
    x = torch.randn(2, 3, 64, 64)
    saved = {}

    def pack(t):
        saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stem(x.requires_grad_())
    per_pixel = sum(saved.values()) / 4 / (2 * 64 * 64)  # fp32 values per input pixel
    assert per_pixel <= 3.5  # the blocked input (3), and small matrices (~1.5k values in all)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stem.reference_forward(x)
    assert sum(saved.values()) / 4 / (2 * 64 * 64) > 3 * 64  # the textbook path keeps q, k, v at least


def test_stem_autocast_bf16():
    torch.manual_seed(0)
    stem = AttentionStem(3, 16, heads=4)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = stem(x)
        expected = stem.reference_forward(x).float()
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert x.grad.dtype == torch.float32 and all(p.grad.dtype == torch.float32 for p in stem.parameters())


def test_stem_block_attention_matches_explicit():
    """The reference stem's CPU path (SDPA) equals the explicit softmax(q k^T) v that CUDA runs."""
    from sasa.layers.stem import _block_attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 20, 16, 8, generator=g) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) * 0.5, dim=-1) @ v
    torch.testing.assert_close(_block_attention(q, k, v, 0.5), expected)


@pytest.mark.parametrize("backend", sasa.available_backends("cpu"))
def test_inplace_relu_after_layer(backend):
    """An in-place ReLU right after a stride-1 layer (as converted models may have) works like after a conv."""
    torch.manual_seed(0)
    layer = SelfAttention2d(8, 8, 3, heads=2, backend=backend)
    x = torch.randn(1, 8, 5, 5, requires_grad=True)
    torch.relu_(layer(x)).sum().backward()
    expected = torch.autograd.grad(torch.relu(layer(x)).sum(), x)[0]
    torch.testing.assert_close(x.grad, expected)


# ------------------------------------------------------------------------------------------ recompute_qkv
def _grads(layer, x, g):
    out = layer(x)
    return [out, *torch.autograd.grad(out, [x, *[p for p in layer.parameters() if p.requires_grad]], g)]


@pytest.mark.parametrize("backend", sasa.available_backends("cpu"))
@pytest.mark.parametrize("options", [{}, {"stride": 2}, {"positional": "absolute"}, {"query_key": False},
                                     {"rel_per_head": True, "padding": "mask"}], ids=lambda o: ",".join(o) or "plain")
@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_recompute_qkv_same_gradients(backend, options, fmt):
    torch.manual_seed(0)
    layer = SelfAttention2d(8, 8, 3, heads=2, backend=backend, **options)
    x = torch.randn(2, 8, 5, 7).contiguous(memory_format=fmt).requires_grad_()
    g = torch.randn_like(layer(x))
    expected = _grads(layer, x, g)
    layer.recompute_qkv = True
    assert "recompute_qkv=True" in repr(layer)
    for got, want in zip(_grads(layer, x, g), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(torch._C, "_storage_Use_Count"), reason="needs torch._C._storage_Use_Count")
def test_recompute_qkv_drops_the_projection():
    """After the forward only the test itself references the projection's output (the graph holds recipes)."""
    for recompute, expect_free in ((False, False), (True, True)):
        layer = SelfAttention2d(8, 8, 3, heads=2, backend="shifted", recompute_qkv=recompute)
        seen = []
        layer.qkv.register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.untyped_storage()))
        out = layer(torch.randn(1, 8, 6, 6, requires_grad=True))
        assert (torch._C._storage_Use_Count(seen[0]._cdata) == 1) == expect_free
        out.sum().backward()


def test_recompute_qkv_input_changed_in_place_raises():
    layer = SelfAttention2d(8, 8, 3, heads=2, backend="shifted", recompute_qkv=True)
    x = torch.randn(1, 8, 6, 6, requires_grad=True)
    h = x * 1.0
    out = layer(h)
    h.add_(1.0)
    with pytest.raises(RuntimeError, match="modified in place"):
        out.sum().backward()


def test_recompute_qkv_under_autocast_and_in_models():
    torch.manual_seed(0)
    layer = SelfAttention2d(8, 8, 3, heads=2, backend="shifted")
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    g = torch.randn_like(out)
    expected = torch.autograd.grad(out, [x, layer.qkv.weight], g)
    layer.recompute_qkv = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    for got, want in zip(torch.autograd.grad(out, [x, layer.qkv.weight], g), expected):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    model = sasa.create_model("test_sasa_resnet", recompute_qkv=True)
    layers = [m for m in model.modules() if isinstance(m, SelfAttention2d)]
    assert layers and all(m.recompute_qkv for m in layers)
