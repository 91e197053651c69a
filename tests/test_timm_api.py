"""timm's model API on the sasa ResNets (heads, pooling, intermediates, pruning, gradient checkpointing, parameter
groups), scripting and FX tracing with outputs equal to eager, the standard-operator path of the layers against the
reference backend, and timm loading a ``sasa train`` run's weights."""

from __future__ import annotations

import copy

import pytest
import torch

import sasa
from sasa.engine.optim import param_groups
from sasa.layers.attention import SelfAttention2d
from sasa.layers.stem import AttentionStem


def _tiny(**kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return sasa.create_model("test_sasa_resnet", backend="shifted", stem_backend="shifted", **kwargs).double()


def _x(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


def _stem_and_stages(model, x):
    """(stem activation, layer1..4 outputs) computed by hand from the model's attributes."""
    act = model.relu(model.bn1(model.conv1(x)))
    outs, y = [act], model.maxpool(act)
    for i in range(1, 5):
        y = getattr(model, f"layer{i}")(y)
        outs.append(y)
    return outs


def test_num_classes_zero_is_an_identity_head():
    model = _tiny(num_classes=0).eval()
    x = _x()
    feats = model.forward_features(x)
    with torch.no_grad():
        out = model(x)
    assert isinstance(model.fc, torch.nn.Identity) and model.head_hidden_size == model.num_features == 512
    torch.testing.assert_close(out, feats.mean((2, 3)), rtol=0, atol=1e-12)
    torch.testing.assert_close(model.forward_head(feats, pre_logits=True), out, rtol=0, atol=0)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", "catavgmax", ""])
def test_global_pool_is_honoured(pool):
    model = _tiny(num_classes=0, global_pool=pool).eval()
    x = _x()
    feats = model.forward_features(x)
    avg, mx = feats.mean((2, 3)), feats.amax((2, 3))
    expected = {"avg": avg, "max": mx, "avgmax": (avg + mx) / 2, "catavgmax": torch.cat((avg, mx), 1), "": feats}[pool]
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-12)
    assert model.head_hidden_size == (1024 if pool == "catavgmax" else 512)
    with pytest.raises(ValueError, match="global_pool must be one of"):
        _tiny(global_pool="token")


def test_reset_classifier_keeps_pool_device_dtype_and_mode():
    model = _tiny(num_classes=10, global_pool="max").train()
    x = _x()
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    model.reset_classifier(7)
    assert model.get_classifier() is model.fc and model.get_classifier(name_only=True) == "fc"
    assert model.fc.out_features == 7 and model.fc.weight.dtype == torch.float64 and model.fc.training
    torch.testing.assert_close(model.forward_head(model.forward_features(x), pre_logits=True), pre)
    model.reset_classifier(0, "catavgmax")
    assert model.eval()(x).shape == (2, 1024) and model.num_classes == 0
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 512, 1, 1)


def test_grad_checkpointing_same_gradients_and_statistics_less_saved():
    """Per-stage checkpointing: equal gradients (float64) and BN running statistics updated once; the autograd graph
    keeps fewer tensors."""
    plain, ckpt = _tiny(num_classes=5), _tiny(num_classes=5)
    ckpt.load_state_dict(plain.state_dict())
    ckpt.set_grad_checkpointing()
    x = _x(3)
    saved = []
    for model in (plain, ckpt):
        count = [0]

        def pack(t, count=count):
            count[0] += t.numel()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = model.train()(x).square().mean()
        loss.backward()
        saved.append(count[0])
    assert saved[1] < saved[0] / 2
    for (name, p), q in zip(plain.named_parameters(), ckpt.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    for (name, b), c in zip(plain.named_buffers(), ckpt.buffers()):
        torch.testing.assert_close(c, b, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")


def test_forward_intermediates_are_the_stem_and_stage_outputs():
    model = _tiny().eval()
    x = _x()
    with torch.no_grad():
        expected = _stem_and_stages(model, x)
        final, taps = model.forward_intermediates(x)
        assert len(taps) == 5
        for got, ref in zip(taps, expected):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        only = model.forward_intermediates(x, indices=[0, -1], intermediates_only=True)
        torch.testing.assert_close(only[0], expected[0], rtol=0, atol=0)
        torch.testing.assert_close(only[1], expected[4], rtol=0, atol=0)
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [256, 512]
        early, taps = model.forward_intermediates(x, indices=[1], stop_early=True)
        torch.testing.assert_close(early, expected[1], rtol=0, atol=0)
    with pytest.raises(ValueError, match="indices"):
        model.forward_intermediates(x, indices=[5])


def test_prune_intermediate_layers_keeps_the_taps():
    model = _tiny().eval()
    x = _x()
    with torch.no_grad():
        expected = _stem_and_stages(model, x)
        pruned = copy.deepcopy(model)
        assert pruned.prune_intermediate_layers([1, 2]) == [1, 2]
        assert len(pruned.layer3) == 0 and len(pruned.layer4) == 0 and isinstance(pruned.fc, torch.nn.Identity)
        assert pruned.num_features == pruned.head_hidden_size == 128
        taps = pruned.forward_intermediates(x, indices=[1, 2], intermediates_only=True)
        for got, ref in zip(taps, expected[1:3]):
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
        torch.testing.assert_close(pruned(x), expected[2], rtol=0, atol=0)


def test_no_weight_decay_lists_tables_and_stem_embeddings_and_the_optimizer_uses_it():
    model = _tiny()
    names = model.no_weight_decay()
    assert names == {n for n, _ in model.named_parameters() if n.split(".")[-1] in
                     ("rel_rows", "rel_cols", "emb_row", "emb_col", "emb_mix")}
    assert "layer1.0.conv2.rel_rows" in names and "conv1.emb_mix" in names

    class Listed(torch.nn.Module):  # a 2-D weight that only the model's own list excludes
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.table = torch.nn.Parameter(torch.zeros(3, 4))

        def no_weight_decay(self):
            return {"table"}

    module = Listed()
    decay, no_decay = param_groups(module, 1e-4)
    assert [p is module.proj.weight for p in decay["params"]] == [True]
    assert {id(p) for p in no_decay["params"]} == {id(module.table), id(module.proj.bias)}


def test_group_matcher_splits_stem_and_blocks():
    group_parameters = pytest.importorskip("timm.models._manipulate").group_parameters
    model = _tiny()
    fine = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    coarse = group_parameters(model, model.group_matcher(coarse=True), reverse=True)
    assert len(set(coarse.values())) == 5 + 1 and len(set(fine.values())) >= len(set(coarse.values()))
    assert fine["conv1.emb_row"] == fine["bn1.weight"] != fine["layer1.0.conv2.rel_rows"]


@pytest.mark.parametrize("train", [False, True])
def test_torchscript_equals_eager(train):
    model = _tiny(num_classes=7).train(train)
    twin = copy.deepcopy(model)
    scripted = torch.jit.script(twin)
    x = _x()
    torch.testing.assert_close(scripted(x), model(x), rtol=1e-10, atol=1e-12)
    for (name, b), c in zip(model.named_buffers(), twin.buffers()):  # train mode: the same BN updates
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    with pytest.raises(torch.jit.Error, match=r"expects a \(B, C, H, W\)"):
        scripted(x[0])
    with pytest.raises(ValueError, match=r"got shape \(3, 32, 32\)"):
        model(x[0])


def _fx(model):
    """timm's FX path: the attention layers and the stem stay leaf modules."""
    pytest.importorskip("timm")
    from timm.models import get_notrace_functions, get_notrace_modules
    from torchvision.models.feature_extraction import NodePathTracer

    sasa.timm_compat.register()
    tracer = NodePathTracer(leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions())
    return torch.fx.GraphModule(model, tracer.trace(model))


@pytest.mark.parametrize("train", [False, True])
def test_fx_trace_equals_eager_forward_and_backward(train):
    model = _tiny(num_classes=7).train(train)
    twin = copy.deepcopy(model)
    graph = _fx(twin)
    assert {SelfAttention2d, AttentionStem} <= {type(m) for m in graph.modules()}
    x = _x()
    out, ref = graph(x), model(x)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=lambda m, n=name: f"{n}: {m}")
    scripted = torch.jit.script(_fx(copy.deepcopy(model).eval()))
    torch.testing.assert_close(scripted(x), model.eval()(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(AssertionError, match=r"expects a \(B, C, H, W\)"):
        graph(x[0])


LAYER_CASES = [
    dict(),
    dict(padding="mask"),
    dict(query_key=False),
    dict(rel_per_head=True, stride=2),
    dict(positional="absolute"),
    dict(positional="none", kernel_size=7),  # window larger than the 5x6 map
    dict(padding="mask", kernel_size=9, scale=0.5),
]


@pytest.mark.parametrize("kwargs", LAYER_CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) or "default"
                                                     for c in LAYER_CASES])
def test_portable_layer_matches_reference_forward_and_backward(kwargs):
    """The standard-operator path (scripting / export) against the reference backend, float64, with gradients."""
    torch.manual_seed(0)
    kwargs = {"kernel_size": 5, **kwargs}
    layer = SelfAttention2d(8, 8, heads=2, backend="reference", **kwargs).double()
    x = torch.randn(2, 8, 5, 6, dtype=torch.float64, requires_grad=True)
    ref = layer(x)
    grads_ref = torch.autograd.grad(ref.square().sum(), [x, *layer.parameters()])
    out = layer.forward_portable(x)
    grads = torch.autograd.grad(out.square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    for g, r in zip(grads, grads_ref):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(torch.jit.script(layer)(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("values", ["spatial", "plain", "conv"])
def test_portable_stem_matches_reference(values):
    torch.manual_seed(0)
    stem = AttentionStem(3, 16, values=values).double()
    x = torch.randn(2, 3, 8, 12, dtype=torch.float64)
    ref = stem.reference_forward(x)
    torch.testing.assert_close(stem.forward_portable(x), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.jit.script(stem)(x), ref, rtol=1e-12, atol=1e-12)


def test_timm_create_model_api():
    timm = pytest.importorskip("timm")
    sasa.timm_compat.register()
    kw = dict(width_multiplier=0.25, heads=4, kernel_size=3, backend="shifted", stem_backend="shifted")
    model = timm.create_model("sasa_resnet26", num_classes=0, global_pool="", **kw).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.forward_features(x), rtol=0, atol=0)
    assert model.pretrained_cfg["first_conv"] == ("conv1.query", "conv1.key")
    getter = timm.create_model("sasa_resnet26", features_only=True, feature_cls="getter", out_indices=(1, 3),
                               **kw).eval()
    full = timm.create_model("sasa_resnet26", **kw).eval()
    full.load_state_dict(getter.model.state_dict(), strict=False)
    with torch.no_grad():
        feats = getter(x)
        ref = full.forward_intermediates(x, indices=[1, 3], intermediates_only=True)
    assert [f.shape[1] for f in feats] == getter.feature_info.channels() == [64, 256]
    for f, r in zip(feats, ref):
        torch.testing.assert_close(f, r, rtol=0, atol=0)


def test_timm_loads_a_sasa_train_run(tmp_path):
    """``timm.create_model(..., pretrained=True, pretrained_cfg_overlay=dict(file=run/model.safetensors))``: the run's
    model arguments, channels and classes; every tensor equal; another num_classes drops only the classifier."""
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    from sasa.io.checkpoint import save_safetensors

    sasa.timm_compat.register()
    args = {"width_multiplier": 0.25, "heads": 4, "kernel_size": 3, "padding": "mask"}
    torch.manual_seed(0)
    trained = sasa.create_model("sasa_resnet26_convstem", num_classes=10, in_chans=1, **args).eval()
    meta = {"model": "sasa_resnet26_convstem", "model_args": args, "num_classes": 10, "in_chans": 1,
            "image_size": 32, "dataset": "fashion-mnist"}
    file = tmp_path / "model.safetensors"
    save_safetensors(file, trained.state_dict(), meta)
    loaded = timm.create_model("sasa_resnet26_convstem", pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(file)), num_classes=10).eval()
    own = trained.state_dict()
    assert loaded.state_dict().keys() == own.keys()
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, own[name]), name
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad(), sasa.backends.force("shifted"):  # eager, no compile
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
    other = timm.create_model("sasa_resnet26_convstem", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)),
                              num_classes=3)
    assert other.fc.out_features == 3 and torch.equal(other.layer4[0].conv2.rel_rows, trained.layer4[0].conv2.rel_rows)
    with pytest.raises(ValueError, match="holds weights of 'sasa_resnet26_convstem'"):
        timm.create_model("sasa_resnet26", pretrained=True, pretrained_cfg_overlay=dict(file=str(file)))
