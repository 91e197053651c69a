"""The model family: registry, SPEC section 3's parameter and FLOP targets, ablation arithmetic, torchvision
contract, forward/backward of every registered model."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import sasa
from sasa.models import MODEL_INFO

PAPER_MODELS = [n for n in MODEL_INFO if "paper_params_m" in MODEL_INFO[n]]
# SPEC section 3: exact recounts (two decimals, +-0.01M) or "about" figures for one-decimal rows (+-0.05M)
PARAMS_M = {
    "resnet26": (13.70, 0.01), "sasa_resnet26_convstem": (10.33, 0.01), "sasa_resnet26": (10.32, 0.05),
    "resnet38": (19.63, 0.01), "sasa_resnet38_convstem": (14.17, 0.01), "sasa_resnet38": (14.16, 0.05),
    "resnet50": (25.56, 0.01), "sasa_resnet50_convstem": (18.02, 0.01), "sasa_resnet50": (18.01, 0.05),
}
GFLOPS = {  # paper GFLOPs, tolerance (full-attention rows: the stem's details are ours)
    "resnet26": (4.7, 0.1), "sasa_resnet26_convstem": (4.5, 0.1), "sasa_resnet26": (4.7, 0.25),
    "resnet38": (6.5, 0.1), "sasa_resnet38_convstem": (5.7, 0.1), "sasa_resnet38": (6.0, 0.25),
    "resnet50": (8.2, 0.1), "sasa_resnet50_convstem": (7.0, 0.1), "sasa_resnet50": (7.2, 0.25),
}

# sasa_resnet26 layout: blocks per stage and widths of the 3x3 position; k = 7, 8 heads
BLOCKS, WIDTHS, K, HEADS = (1, 2, 4, 1), (64, 128, 256, 512), 7, 8


def params(name, **overrides):
    return sasa.count_params(sasa.create_model(name, **overrides))


def gflops(name, **overrides):
    return sasa.count_flops(sasa.create_model(name, **overrides)) / 1e9


def attention_layers_224():
    """(width, pre-pool pixels) of every attention layer of a depth-26 net at 224x224: the first block of stages
    2-4 attends at its input resolution, then pools."""
    out, res = [], 56
    for stage, (n, w) in enumerate(zip(BLOCKS, WIDTHS)):
        for b in range(n):
            out.append((w, res * res))
            if stage > 0 and b == 0:
                res //= 2
        if stage == 0:
            continue
    return out


def test_attention_layer_resolutions():
    assert attention_layers_224() == [(64, 3136), (128, 3136), (128, 784), (256, 784), (256, 196), (256, 196),
                                      (256, 196), (512, 196)]


def test_registry_names():
    names = sasa.list_models()
    for depth in (26, 38, 50):
        for name in (f"resnet{depth}", f"sasa_resnet{depth}_convstem", f"sasa_resnet{depth}"):
            assert name in names
    assert "test_sasa_resnet" in names and "test_resnet" in names
    assert sasa.list_models("sasa_resnet5*") == ["sasa_resnet50", "sasa_resnet50_convstem"]


def test_registry_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet51'; valid models: .*resnet50"):
        sasa.create_model("resnet51")
    with pytest.raises(TypeError, match=r"unknown override\(s\) \['kernal_size'\]"):
        sasa.create_model("sasa_resnet26", kernel_size=7, kernal_size=5)
    with pytest.raises(ValueError, match="attention_stages must be drawn from"):
        sasa.create_model("sasa_resnet26", attention_stages=(0, 5))
    with pytest.raises(ValueError, match="stem must be one of"):
        sasa.create_model("sasa_resnet26", stem="patchify")


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_params_match_paper(name):
    target, tol = PARAMS_M[name]
    assert abs(params(name) / 1e6 - target) <= tol + 1e-9


@pytest.mark.parametrize("name", PAPER_MODELS)
def test_flops_match_paper(name):
    target, tol = GFLOPS[name]
    assert abs(gflops(name) - target) <= tol


def test_full_attention_params_are_convstem_minus_conv_plus_stem():
    stem = 2 * 3 * 64 + 4 * 64 * 3 + 12 * 16  # q, k; four value matrices; row/col/mixture embeddings of width 16
    for depth in (26, 38, 50):
        assert params(f"sasa_resnet{depth}") == params(f"sasa_resnet{depth}_convstem") - 3 * 64 * 49 + stem


@pytest.mark.slow
def test_ablation_params_by_hand():
    """Each ablation's parameter change, recomputed from the architecture (sasa_resnet26_convstem)."""
    base = params("sasa_resnet26_convstem")
    tables = sum(n * K * (w // HEADS) for n, w in zip(BLOCKS, WIDTHS))  # shared rows+cols: k * head_dim per layer
    assert tables == 1624
    w_k = sum(n * w * w for n, w in zip(BLOCKS, WIDTHS))  # one C x C key projection per layer
    assert w_k == 561152
    assert params("sasa_resnet26_convstem", query_key=False) == base - w_k
    assert params("sasa_resnet26_convstem", positional="none") == base - tables
    assert params("sasa_resnet26_convstem", positional="absolute") == base - tables
    assert params("sasa_resnet26_convstem", kernel_size=3) == base - tables * 4 // 7
    assert params("sasa_resnet26_convstem", kernel_size=11) == base + tables * 4 // 7
    assert params("sasa_resnet26_convstem", rel_per_head=True) == base + (HEADS - 1) * tables
    # stages 1-2 back to 3x3 convs: 9 w^2 instead of 3 w^2 + k * head_dim
    back = sum(n * (9 * w * w - 3 * w * w - K * w // HEADS) for n, w in list(zip(BLOCKS, WIDTHS))[:2])
    assert params("sasa_resnet26_convstem", attention_stages=(3, 4)) == base + back
    assert params("sasa_resnet26_convstem", attention_stages=()) == params("resnet26")
    assert params("sasa_resnet26", stem_values="plain") == params("sasa_resnet26") - 3 * 64 * 3 - 12 * 16
    assert params("sasa_resnet26", stem_values="conv") == params("sasa_resnet26") - 4 * 192 - 12 * 16 + 9 * 192


def test_ablation_flops_by_hand():
    """FLOPs of the q.r-only and no-position ablations: per attention layer and pre-pool pixel, q.r-only drops
    one projection (C*C) and one window term (k*k*C); positional='none' drops the q.r term (k*k*C)."""
    base = sasa.count_flops(sasa.create_model("sasa_resnet26_convstem"))
    layers = attention_layers_224()
    qk_drop = 2 * sum((w * w + K * K * w) * px for w, px in layers)
    qr_drop = 2 * sum(K * K * w * px for w, px in layers)
    assert sasa.count_flops(sasa.create_model("sasa_resnet26_convstem", query_key=False)) == base - qk_drop
    assert sasa.count_flops(sasa.create_model("sasa_resnet26_convstem", positional="none")) == base - qr_drop
    k5 = 2 * sum(3 * (K * K - 25) * w * px for w, px in layers)
    assert sasa.count_flops(sasa.create_model("sasa_resnet26_convstem", kernel_size=5)) == base - k5


@pytest.mark.parametrize("name", sasa.list_models())
def test_forward_backward_small(name):
    torch.manual_seed(0)
    model = sasa.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters without gradient: {missing}"


def test_small_images_and_overrides():
    model = sasa.create_model("sasa_resnet26", num_classes=10, in_chans=1, stem="small", width_multiplier=0.25,
                              heads=4, kernel_size=5, positional="absolute", stem_values="plain")
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    assert model.layer1[0].conv2.kernel_size == 5 and model.layer1[0].conv2.heads == 4


def test_torchvision_contract():
    """torchvision's BackboneWithFPN takes our models as they are."""
    from torchvision.models.detection.backbone_utils import BackboneWithFPN

    model = sasa.create_model("test_sasa_resnet", num_classes=10)
    for attr in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool", "fc"):
        assert hasattr(model, attr)
    channels = [model.layer1[-1].conv3.out_channels, model.layer2[-1].conv3.out_channels]
    fpn = BackboneWithFPN(model, {"layer1": "0", "layer2": "1"}, channels, out_channels=32)
    feats = fpn(torch.randn(1, 3, 32, 32))
    assert [f.shape[1] for f in feats.values()] == [32, 32, 32]


def test_norm_layer_and_zero_init():
    from torchvision.ops import FrozenBatchNorm2d

    model = sasa.create_model("test_sasa_resnet", norm_layer=FrozenBatchNorm2d, zero_init_residual=True)
    assert isinstance(model.bn1, FrozenBatchNorm2d)
    model = sasa.create_model("test_sasa_resnet", zero_init_residual=True)
    assert torch.count_nonzero(model.layer1[0].bn3.weight) == 0


@pytest.mark.slow
def test_train_step_memory_is_small():
    """A SASA-ResNet-26 train step at 64x64 (batch 8) on CPU: peak RSS growth over the step, in a fresh process."""
    code = (
        "import resource, torch, sasa\n"
        "torch.manual_seed(0)\n"
        "m = sasa.create_model('sasa_resnet26', num_classes=10)\n"
        "x = torch.randn(8, 3, 64, 64)\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "m(x).sum().backward()\n"
        "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n"
    )
    grown_mb = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)
    assert grown_mb < 600, f"train step grew peak RSS by {grown_mb} MB"


def _train_step(model, x):
    model.train()
    model.zero_grad(set_to_none=True)
    model(x).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("stem", ["attention", "conv"])
def test_checkpoint_stem_same_gradients_and_statistics(stem):
    """``checkpoint_stem=True`` recomputes the stem part in the backward: the same gradients (float64) and BN
    running statistics updated once, as without it."""
    torch.manual_seed(0)
    plain = sasa.create_model("test_sasa_resnet", stem=stem).double()
    ckpt = sasa.create_model("test_sasa_resnet", stem=stem, checkpoint_stem=True).double()
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for _ in range(2):
        grads, grads_ckpt = _train_step(plain, x), _train_step(ckpt, x)
    for name, g in grads.items():
        torch.testing.assert_close(grads_ckpt[name], g, rtol=1e-9, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), b_ckpt in zip(plain.named_buffers(), ckpt.buffers()):
        assert torch.equal(b, b_ckpt), name
    ckpt.eval()
    torch.testing.assert_close(ckpt(x), plain.eval()(x))


def _saved_bytes(fn):
    """Bytes autograd saves for the backward while ``fn()`` runs, and its result."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def test_checkpoint_stem_keeps_only_the_image():
    """Saved for the backward by ``forward_features``: stages + stem part without the option, stages + the image
    with ``checkpoint_stem=True``."""
    x = torch.randn(2, 3, 32, 32)
    plain = sasa.create_model("test_sasa_resnet", stem="attention").train()
    ckpt = sasa.create_model("test_sasa_resnet", stem="attention", checkpoint_stem=True).train()
    stem_bytes, y = _saved_bytes(lambda: plain._stem(x))
    stage_bytes, _ = _saved_bytes(lambda: plain.layer4(plain.layer3(plain.layer2(plain.layer1(y.detach())))))
    full_resolution = y.numel() * 16 * y.element_size()  # the stem's output before its 4x4 max pool
    assert stem_bytes > 2 * full_resolution  # BN input and the pool's input, at least
    assert _saved_bytes(lambda: plain.forward_features(x))[0] == stage_bytes + stem_bytes
    assert _saved_bytes(lambda: ckpt.forward_features(x))[0] == stage_bytes + x.numel() * x.element_size()


@pytest.mark.slow
def test_model_compiles_as_one_graph():
    """``torch.compile(fullgraph=True)`` (Inductor, ~30 s on CPU) of a full-attention model with the CPU backend and
    ``checkpoint_stem``: no graph break, eager's gradients and BN statistics. (Graph breaks around the attention
    op used to send every block through recompiles with dynamic shapes, which Inductor failed to compile.)"""
    torch.manual_seed(0)
    eager = sasa.create_model("test_sasa_resnet", stem="attention", checkpoint_stem=True, backend="shifted").double()
    model = sasa.create_model("test_sasa_resnet", stem="attention", checkpoint_stem=True, backend="shifted").double()
    model.load_state_dict(eager.state_dict())
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)  # float64: compiled = eager to rounding on any thread count
    grads = _train_step(eager, x)
    _train_step(torch.compile(model, fullgraph=True), x)
    grads_compiled = {n: p.grad for n, p in model.named_parameters()}
    scale = max(g.abs().max().item() for g in grads.values())
    for name, g in grads.items():
        # atol relative to the largest gradient: without a ReLU after the attention stem, the next BatchNorms cancel
        # bn1's bias exactly, so its gradient is rounding noise in both runs
        torch.testing.assert_close(grads_compiled[name], g, rtol=1e-7, atol=1e-9 * scale,
                                   msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), b_compiled in zip(eager.named_buffers(), model.buffers()):
        torch.testing.assert_close(b_compiled, b, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.slow
def test_saved_bytes_tool(tmp_path):
    """``tools/saved_bytes.py`` (behind BENCHMARKS' memory figures): stem part and stages per model; with
    ``checkpoint_stem`` the stem part is the image alone."""
    import json
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "saved_bytes.py"
    out = tmp_path / "saved.json"
    subprocess.run([sys.executable, str(tool), "--models", "test_resnet,test_sasa_resnet@stem='attention',"
                    "test_sasa_resnet@stem='attention'@checkpoint_stem=True", "--batch", "2", "--image-size", "32",
                    "--dtype", "fp32", "--out", str(out)], check=True, capture_output=True, timeout=300)
    rows = json.loads(out.read_text())["rows"]
    assert [r["model"].split("@")[0] for r in rows] == ["test_resnet", "test_sasa_resnet", "test_sasa_resnet"]
    assert all(r["stages_mb"] > 0 for r in rows)
    assert rows[1]["stem_part_mb"] > rows[0]["stem_part_mb"]  # full-resolution BN / ReLU after the attention stem
    assert rows[2]["stem_part_mb"] * 2**20 == 2 * 3 * 32 * 32 * 4  # the fp32 image only
