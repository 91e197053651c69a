"""Interop: convert_to_attention on torchvision / timm models, attention_maps, `sasa show-attention`, timm registry."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import sasa
from sasa.backends.reference import _windows
from sasa.cli import main
from sasa.viz.maps import attention_layers

ROOT = Path(__file__).resolve().parents[1]


def spatial_convs(model: nn.Module, min_channels: int = 16) -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and max(m.kernel_size) > 1
            and m.groups == 1 and m.in_channels >= min_channels}


def converted_params(convs, kernel_size: int = 7, heads: int = 8) -> int:
    """Parameter change by SPEC arithmetic: each conv (Cin*Cout*k*k [+ bias]) -> 3*Cin*Cout + k*Cout/heads."""
    delta = 0
    for conv in convs.values():
        old = conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
        delta += 3 * conv.in_channels * conv.out_channels + kernel_size * conv.out_channels // heads - old
    return delta


def train_step(model: nn.Module, size: int = 32) -> torch.Tensor:
    model.train()
    out = model(torch.randn(2, 3, size, size))
    out.square().mean().backward()
    return out


# ---------------------------------------------------------------- converter


@pytest.mark.slow
def test_convert_torchvision_resnet50_is_the_papers_convstem_model():
    model = torchvision.models.resnet50()
    convs = spatial_convs(model)
    before = sasa.count_params(model)
    assert sasa.convert_to_attention(model) == len(convs) == 16
    assert sasa.count_params(model) - before == converted_params(convs)
    assert sasa.count_params(model) == sasa.count_params(sasa.create_model("sasa_resnet50_convstem"))
    assert round(sasa.count_params(model) / 1e6, 2) == 18.02
    assert isinstance(model.conv1, nn.Conv2d)  # the 3-channel stem stays a convolution (min_channels=16)
    assert isinstance(model.layer2[0].conv2, sasa.SelfAttention2d) and model.layer2[0].conv2.stride == 2
    out = train_step(model)
    assert out.shape == (2, 1000) and torch.isfinite(out).all()
    assert model.layer1[0].conv2.rel_rows.grad is not None


def test_convert_torchvision_resnet18_parameter_arithmetic():
    model = torchvision.models.resnet18()
    convs = spatial_convs(model)
    assert len(convs) == 16 and "layer2.0.conv1" in convs  # basic blocks: both 3x3 convs, in != out at stage starts
    before = sasa.count_params(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no bias to drop, nothing rejected: no warning
        assert sasa.convert_to_attention(model, kernel_size=5, heads=4) == 16
    assert sasa.count_params(model) - before == converted_params(convs, kernel_size=5, heads=4)
    layer = model.layer2[0].conv1
    assert (layer.in_channels, layer.out_channels, layer.kernel_size, layer.heads, layer.stride) == (64, 128, 5, 4, 2)
    assert train_step(model).shape == (2, 1000)
    assert all(p.grad is not None for p in model.parameters())


def test_convert_stage_filters_min_channels_and_idempotence():
    model = torchvision.models.resnet18()
    assert sasa.convert_to_attention(model, stages=("layer4",)) == 4
    assert isinstance(model.layer3[1].conv2, nn.Conv2d) and isinstance(model.layer4[1].conv2, sasa.SelfAttention2d)
    assert sasa.convert_to_attention(model, stages=[3]) == 4  # int n == "layer{n}"
    assert sasa.convert_to_attention(model, stages=lambda name, conv: name.startswith("layer2.1")) == 2
    assert sasa.convert_to_attention(model, stages="layer4") == 0  # already attention: nothing to replace
    assert sasa.convert_to_attention(model, min_channels=1) == 7  # layer1 (4), layer2.0 (2) and the RGB stem
    assert isinstance(model.conv1, sasa.SelfAttention2d) and model.conv1.stride == 2
    assert sasa.convert_to_attention(model, min_channels=1) == 0
    with pytest.raises(TypeError, match="stages"):
        sasa.convert_to_attention(model, stages=[3.0])
    with pytest.raises(ValueError, match="min_channels"):
        sasa.convert_to_attention(model, min_channels=0)
    with pytest.raises(TypeError, match="nn.Module"):
        sasa.convert_to_attention("resnet18")


def test_convert_incompatible_convs_raise_or_are_kept_and_bias_is_dropped():
    model = nn.Sequential(
        nn.Conv2d(16, 32, 3, padding=1, bias=True),  # ok; its bias is dropped with a warning
        nn.Conv2d(32, 12, 3, padding=1),  # 12 channels are not divisible by 8 heads
        nn.Conv2d(16, 16, 3, padding=0),  # "valid" padding shrinks the map
        nn.Conv2d(16, 16, (1, 3), padding=(0, 1)),  # non-square kernel
        nn.Conv2d(16, 16, 3, padding=1, groups=16),  # depthwise: not a candidate at all
        nn.Conv2d(16, 32, 3, stride=2, padding=2, dilation=2, bias=False),  # dilated "same": ok, window is dense
    )
    with pytest.raises(ValueError, match=r"3 convolution\(s\).*: 1 \(out_channels=12 is not divisible by heads=8\); "
                                         r"2 \(padding \(0, 0\) changes the output size.*; 3 \(non-square kernel"):
        sasa.convert_to_attention(model)
    assert isinstance(model[0], nn.Conv2d)  # strict failure changes nothing
    with pytest.warns(UserWarning) as record:
        assert sasa.convert_to_attention(model, strict=False) == 2
    messages = " ".join(str(w.message) for w in record)
    assert "kept as convolutions" in messages and "dropped the bias of 1 convolution(s): 0" in messages
    assert [type(m).__name__ for m in model] == ["SelfAttention2d", "Conv2d", "Conv2d", "Conv2d", "Conv2d",
                                                 "SelfAttention2d"]
    assert model[5](torch.randn(1, 16, 9, 9)).shape == nn.Conv2d(16, 32, 3, 2, 1)(torch.randn(1, 16, 9, 9)).shape


# ---------------------------------------------------------------- attention maps


def test_attention_maps_shapes_rows_and_consistency_with_the_forward():
    torch.manual_seed(0)
    model = sasa.create_model("test_sasa_resnet", num_classes=5)  # attention stem, k=3, 4 heads
    x = torch.randn(2, 3, 32, 32)
    maps = sasa.attention_maps(model, x)
    layers = attention_layers(model)
    assert list(maps) == list(layers) and model.training  # every layer, in order; the train flag is restored
    for name, w in maps.items():
        assert w.shape[0] == 2 and w.shape[3:] == (layers[name].heads, 3, 3)
        torch.testing.assert_close(w.sum((-2, -1)), torch.ones(w.shape[:4]))

    # the weights are the ones the forward uses: sum_ab w_ab v_ab reproduces a stride-1 layer's output
    name = next(n for n, m in layers.items() if m.stride == 1)
    layer, seen = layers[name], {}
    handle = layer.register_forward_hook(lambda m, args, out: seen.update(x=args[0], out=out))
    model.eval()
    with torch.no_grad():
        model(x)
        _, _, v = layer.project(seen["x"])
    handle.remove()
    out = torch.einsum("bijhxy,bijhdxy->bijhd", maps[name], _windows(v, 3)).flatten(3).permute(0, 3, 1, 2)
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-4)


def test_attention_maps_layer_choice_and_mask_padding():
    model = sasa.create_model("test_sasa_resnet", padding="mask")
    names = list(attention_layers(model))
    x = torch.randn(1, 3, 32, 32)
    maps = sasa.attention_maps(model, x, layers=[-1, names[0]])
    assert list(maps) == [names[-1], names[0]]
    w = maps[names[0]][0]  # (H, W, heads, k, k); the top-left query's window pokes out of the map
    assert torch.all(w[0, 0, :, 0, :] == 0) and torch.all(w[0, 0, :, :, 0] == 0)
    torch.testing.assert_close(w.sum((-2, -1)), torch.ones(w.shape[:3]))
    with pytest.raises(ValueError, match="out of range"):
        sasa.attention_maps(model, x, layers=len(names))
    with pytest.raises(ValueError, match="not a SelfAttention2d"):
        sasa.attention_maps(model, x, layers="fc")
    with pytest.raises(ValueError, match="no SelfAttention2d"):
        sasa.attention_maps(sasa.create_model("test_resnet"), x)


def test_attention_maps_on_a_converted_torchvision_model():
    model = torchvision.models.resnet18()
    sasa.convert_to_attention(model, kernel_size=3, heads=4, stages=(3, 4))
    maps = sasa.attention_maps(model, torch.randn(1, 3, 64, 64), layers="layer3.0.conv1")
    assert maps["layer3.0.conv1"].shape == (1, 8, 8, 4, 3, 3)  # pre-pool: the stride-2 layer attends at 8x8


# ---------------------------------------------------------------- sasa show-attention


def _image(path: Path, mode: str, size=(40, 30)) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    shape = (size[1], size[0]) + ((3,) if mode == "RGB" else ())
    Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
    return path


def test_show_attention_cli_random_init(tmp_path, capsys):
    image, out = _image(tmp_path / "in.png", "RGB"), tmp_path / "maps" / "att.png"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the random init is a notice for the user, not a Python warning
        rc = main(["show-attention", "--model", "test_sasa_resnet", "--image", str(image), "--image-size", "32",
                   "--pixel", "3,4", "--pixel", "20,31", "--layer", "layer2.0.conv2", "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0 and "layer2.0.conv2" in captured.out
    assert captured.err == ("sasa show-attention: no --weights given: test_sasa_resnet is randomly initialised, so the "
                            "maps show untrained attention\n")
    from PIL import Image

    with Image.open(out) as png:
        assert png.format == "PNG" and png.width > 400 and png.height > 200  # two rows of panels


@pytest.mark.slow
def test_show_attention_cli_reads_run_config_and_weights(tmp_path, capsys):
    from sasa.io.checkpoint import save_checkpoint, save_safetensors

    args = {"in_chans": 1, "stem": "small", "kernel_size": 5}
    model = sasa.create_model("test_sasa_resnet", num_classes=7, **args)
    run = tmp_path / "run"
    save_safetensors(run / "model.safetensors", model.state_dict(), meta={"model": "test_sasa_resnet"})
    (run / "config.yaml").write_text("model: test_sasa_resnet\nmodel_args: {in_chans: 1, stem: small, kernel_size: 5}"
                                     "\ndata: {image_size: 28}\n")
    image = _image(tmp_path / "gray.png", "L")
    assert main(["show-attention", "--weights", str(run / "model.safetensors"), "--image", str(image),
                 "--list-layers"]) == 0
    listing = capsys.readouterr().out
    assert "layer1.0.conv2" in listing and "input 28x28, k=5" in listing
    assert main(["show-attention", "--weights", str(run / "model.safetensors"), "--image", str(image), "--layer", "-1",
                 "--out", str(tmp_path / "a.png")]) == 0
    assert "query pixels [(14, 14)] of a 28x28 image" in capsys.readouterr().out and (tmp_path / "a.png").is_file()

    # a torch checkpoint with a 'model' entry outside a run dir: the overrides come from --model-args
    save_checkpoint(tmp_path / "ckpt.pt", {"model": model.state_dict(), "epoch": 3})
    cmd = ["show-attention", "--model", "test_sasa_resnet", "--weights", str(tmp_path / "ckpt.pt"), "--image",
           str(image), "--image-size", "28", "--out", str(tmp_path / "b.png")]
    assert main(cmd + ["--model-args", "in_chans=1,stem=small,kernel_size=5"]) == 0
    assert main(cmd) == 2  # without the overrides the weights do not fit
    err = capsys.readouterr().err
    assert "does not fit" in err and "--model-args" in err
    assert main(cmd + ["--model-args", "in_chans=1,stem=small,kernel_size=5", "--pixel", "28,0"]) == 2
    assert "outside the 28x28 image" in capsys.readouterr().err


def test_model_args_parser():
    from sasa.cli import _model_args

    assert _model_args("in_chans=1,stem=small,attention_stages=(3, 4),width_multiplier=0.5") == {
        "in_chans": 1, "stem": "small", "attention_stages": (3, 4), "width_multiplier": 0.5}
    with pytest.raises(Exception, match="KEY=VALUE"):
        _model_args("in_chans")


# ---------------------------------------------------------------- timm


def test_timm_registry_create_and_pretrained_cfg():
    timm = pytest.importorskip("timm")
    from sasa.timm_compat import TIMM_MODELS

    assert sorted(timm.list_models("sasa_*")) == sorted(TIMM_MODELS)
    assert type(timm.create_model("resnet26")).__module__.startswith("timm.")  # timm's own names untouched
    model = timm.create_model("sasa_resnet50", num_classes=10)
    assert isinstance(model, sasa.models.ResNet) and model.num_classes == 10
    assert sasa.count_params(model) == sasa.count_params(sasa.create_model("sasa_resnet50", num_classes=10))
    cfg = timm.data.resolve_data_config({}, model=model)
    assert cfg["input_size"] == (3, 224, 224) and cfg["mean"] == (0.485, 0.456, 0.406)
    assert round(sasa.count_params(timm.create_model("sasa_resnet50_convstem")) / 1e6, 2) == 18.02


@pytest.mark.parametrize("name, reductions", [("sasa_resnet26_convstem", [2, 4, 8, 16, 32]),
                                              ("sasa_resnet26", [1, 4, 8, 16, 32])])
def test_timm_features_only(name, reductions):
    timm = pytest.importorskip("timm")
    tiny = {"width_multiplier": 0.25, "heads": 4, "kernel_size": 3}
    features = timm.create_model(name, features_only=True, **tiny)
    assert features.feature_info.reduction() == reductions
    outs = features(torch.randn(2, 3, 64, 64))
    assert [tuple(o.shape[1:]) for o in outs] == [(c, 64 // r, 64 // r) for c, r in
                                                  zip(features.feature_info.channels(), reductions)]
    last = timm.create_model(name, features_only=True, out_indices=(3, 4), **tiny)(torch.randn(1, 3, 64, 64))
    assert [o.shape[-1] for o in last] == [4, 2]


def test_timm_training_script_path():
    """The calls timm's train.py makes: create_model with its kwargs, data config, optimizer, EMA, one step."""
    timm = pytest.importorskip("timm")
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.utils import ModelEmaV3

    kwargs = {"pretrained": False, "in_chans": 3, "num_classes": 10, "drop_rate": 0.0, "drop_path_rate": None,
              "drop_block_rate": None, "global_pool": None, "bn_momentum": 0.05, "bn_eps": None, "scriptable": False,
              "checkpoint_path": "", "width_multiplier": 0.25, "heads": 4, "kernel_size": 3}
    model = timm.create_model("sasa_resnet26_convstem", **kwargs)
    assert model.bn1.momentum == 0.05
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1, weight_decay=2e-5, momentum=0.9)
    ema = ModelEmaV3(model, decay=0.9)
    before = model.layer1[0].conv2.qkv.weight.detach().clone()
    loss = LabelSmoothingCrossEntropy(0.1)(model(torch.randn(4, 3, 64, 64)), torch.randint(0, 10, (4,)))
    loss.backward()
    optimizer.step()
    ema.update(model)
    assert torch.isfinite(loss) and not torch.equal(before, model.layer1[0].conv2.qkv.weight)
    with pytest.raises(ValueError, match="drop_path_rate=0.1"):
        timm.create_model("sasa_resnet26", drop_path_rate=0.1)


def test_convert_timm_resnet():
    timm = pytest.importorskip("timm")
    model = timm.create_model("resnet26", num_classes=10)
    convs = spatial_convs(model)
    before = sasa.count_params(model)
    assert sasa.convert_to_attention(model) == len(convs) == 8
    assert sasa.count_params(model) - before == converted_params(convs)
    assert train_step(model).shape == (2, 10)


@pytest.mark.slow
def test_import_sasa_defers_timm_and_the_train_launcher_registers(tmp_path):
    pytest.importorskip("timm")
    script = tmp_path / "train.py"
    script.write_text(textwrap.dedent("""
        import sys
        assert "timm" not in sys.modules, "import sasa must not import timm"
        import timm
        model = timm.create_model(sys.argv[1], num_classes=3, width_multiplier=0.25, heads=4, kernel_size=3)
        print(type(model).__name__, model.num_classes, sorted(timm.list_models("sasa_*"))[0])
    """))
    proc = subprocess.run([sys.executable, "-m", "sasa.timm_train", str(script), "sasa_resnet26_convstem"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["ResNet", "3", "sasa_resnet26"]
