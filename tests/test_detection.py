"""Detection: RetinaNet builders (five paper rows, tiny twins), attention FPN/heads, torchvision equivalence, backbone
weights, COCO-format data with bad inputs, COCOeval, drawing, the training engine (learning, resume, stop), CLI."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from _procs import run_group
from _shapes_coco import write_shapes_coco
from torch import nn
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops.misc import FrozenBatchNorm2d

import sasa
from sasa.detection import DETECTORS, create_detector, detector_flops
from sasa.detection.coco_eval import coco_evaluate, format_table, to_coco_records
from sasa.detection.config import DetectConfig
from sasa.detection.data import CocoDetection, collate, train_transforms
from sasa.detection.draw import draw_detections
from sasa.detection.retinanet import _DenseForward
from sasa.engine import config as C
from sasa.io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint, save_safetensors
from sasa.layers import SelfAttention2d

# The five rows of SPEC section 4 at 80 classes, BatchNorm affine weights counted as parameters (FrozenBN, which
# torchvision uses with pretrained weights, turns 53,120 of them into buffers for ResNet-50). Pinned exactly.
PARAMS = {
    "retinanet_resnet50": 33_839_924,                          # paper 33.4 (+1.3%)
    "retinanet_sasa_resnet50_convstem": 26_298_396,            # paper 25.9 (+1.5%)
    "retinanet_sasa_resnet50": 26_290_332,                     # paper 25.9 (+1.5%)
    "retinanet_sasa_resnet50_convstem_attnheads": 21_317_756,  # paper 22.0 (-3.1%)
    "retinanet_sasa_resnet50_attnheads": 21_309_692,           # paper 22.0 (-3.1%)
}
# Tiny twins of the five rows: (backbone, overrides, heads)
TINY = {
    "conv/baseline": ("test_resnet", {}, "conv"),
    "conv/convstem-attention": ("test_resnet", {"attention_stages": (1, 2, 3, 4)}, "conv"),
    "conv/full-attention": ("test_sasa_resnet", {}, "conv"),
    "attention/convstem-attention": ("test_resnet", {"attention_stages": (1, 2, 3, 4)}, "attention"),
    "attention/full-attention": ("test_sasa_resnet", {}, "attention"),
}


def anchors() -> AnchorGenerator:
    return AnchorGenerator(((24,), (48,), (96,), (192,), (384,)), ((1.0,),) * 5)


def tiny(key: str, num_classes: int = 3, **kwargs) -> RetinaNet:
    backbone, overrides, heads = TINY[key]
    kwargs = {"fpn_channels": 32, "attention_heads": 4, "anchor_generator": anchors(), "min_size": 96,
              "max_size": 96, **kwargs}
    return create_detector(backbone, heads, num_classes, backbone_overrides=overrides, **kwargs)


def targets(n: int) -> list[dict]:
    return [{"boxes": torch.tensor([[10.0, 12.0, 50.0, 44.0], [40.0, 30.0, 70.0, 75.0]]),
             "labels": torch.tensor([0, 2])} for _ in range(n)]


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A synthetic COCO-format dataset: train (64 images) and val (32 images), 96 px, 1-2 shapes each."""
    root = tmp_path_factory.mktemp("shapes")
    kw = {"image_size": 96, "max_objects": 2, "min_box": 20, "max_box": 40}
    write_shapes_coco(root / "train", 64, seed=0, ann_name="../train.json", **kw)
    write_shapes_coco(root / "val", 32, seed=1, ann_name="../val.json", **kw)
    return root


def shapes_config(root: Path, out: Path, **overrides) -> DetectConfig:
    base = {"backbone": "test_resnet", "heads": "conv", "data_dir": str(root), "train_images": "train/images",
            "train_ann": "train.json", "val_images": "val/images", "val_ann": "val.json", "image_size": 96,
            "scale_range": [0.9, 1.1], "fpn_channels": 64, "attention_heads": 4,
            "anchor_sizes": [24, 48, 96, 192, 384], "anchor_scales": 1, "aspect_ratios": [1.0], "batch_size": 8,
            "lr": 0.02, "lr_base_batch": 8, "warmup_epochs": 2, "grad_clip": 5.0, "workers": 0, "log_every": 8,
            "checkpoint_every": 0, "eval_every": 0, "output": str(out), "quiet": True, "device": "cpu", "threads": None}
    return C.resolve(None, {**base, **overrides}, schema=DetectConfig)


# ------------------------------------------------------------------------------------------------ builders


@pytest.mark.parametrize("key", list(TINY))
def test_tiny_rows_train_and_eval(key):
    torch.manual_seed(0)
    model = tiny(key)
    assert isinstance(model, RetinaNet)
    model.train()
    losses = model([torch.rand(3, 96, 96), torch.rand(3, 80, 96)], targets(2))
    assert set(losses) == {"classification", "bbox_regression"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"
    model.eval()
    with torch.no_grad():
        out = model([torch.rand(3, 75, 93), torch.rand(3, 96, 64)])  # odd sizes: odd maps at every level
    assert len(out) == 2
    for det in out:
        assert set(det) == {"boxes", "scores", "labels"}
        assert det["boxes"].shape[1:] == (4,) and det["scores"].shape == det["labels"].shape


def test_attention_heads_replace_every_spatial_conv():
    model = tiny("attention/full-attention")
    fpn, head = model.backbone.fpn, model.head
    for name, m in list(fpn.named_modules()) + list(head.named_modules()):
        if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1):
            assert name.endswith(("cls_logits", "bbox_reg")), f"spatial conv left at {name}"
    assert all(isinstance(b, SelfAttention2d) for b in fpn.layer_blocks)
    assert isinstance(fpn.extra_blocks.p6, SelfAttention2d) and fpn.extra_blocks.p6.stride == 2
    assert isinstance(fpn.extra_blocks.p7, SelfAttention2d) and fpn.extra_blocks.p7.stride == 2
    for tower in (head.classification_head.conv, head.regression_head.conv):
        attn = [m for m in tower if isinstance(m, SelfAttention2d)]
        assert len(attn) == 4 and all(a.kernel_size == 7 and a.heads == 4 for a in attn)
        assert isinstance(tower[-2], nn.Conv2d) and tower[-2].kernel_size == (1, 1)  # mixes the heads
        assert all(abs(a.value_weight.std().item() - 0.01) < 0.004 for a in attn)  # N(0, 0.01) values
    # P6/P7 take the conv's ceil(n / 2) sizes on odd maps, so anchors stay aligned
    conv = tiny("conv/baseline")
    for h, w in ((96, 96), (160, 224), (224, 96)):
        x = torch.rand(1, 3, h, w)
        with torch.no_grad():
            a = [t.shape for t in model.backbone(x).values()]
            b = [t.shape for t in conv.backbone(x).values()]
        assert a == b


@pytest.mark.slow
def test_attention_detector_loss_falls():
    torch.manual_seed(0)
    model = tiny("attention/full-attention", min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    tgts = [{"boxes": torch.tensor([[8.0, 10.0, 40.0, 36.0]]), "labels": torch.tensor([1])} for _ in range(2)]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    history = []
    for _ in range(10):
        losses = model(images, tgts)
        loss = sum(losses.values())
        history.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert history[-1] < 0.9 * history[0], history


def test_resnet_order_for_intermediate_layer_getter():
    """BackboneWithFPN runs the ResNet's children in registration order: it must match forward_features."""
    for key in ("conv/baseline", "conv/full-attention"):
        model = tiny(key).eval()
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                nn.init.uniform_(bn.weight, -1, 1)
        body = model.backbone.body
        x = torch.rand(1, 3, 64, 64)
        with torch.no_grad():
            c5 = body(x)[str(len(body.return_layers) - 1)]
            ref = sasa.create_model(TINY[key][0], **TINY[key][1])
            ref.load_state_dict({**ref.state_dict(), **body.state_dict()})
            assert torch.allclose(ref.eval().forward_features(x), c5, atol=1e-5)


@pytest.mark.slow
def test_same_as_torchvision_retinanet_resnet50_fpn():
    import torchvision

    tv = torchvision.models.detection.retinanet_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    ours = create_detector("resnet50", "conv", 91)
    a, b = tv.state_dict(), ours.state_dict()
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    ours.load_state_dict(a)
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        ya, yb = _DenseForward(tv.eval())(x), _DenseForward(ours.eval())(x)
    assert all(torch.allclose(ya[k], yb[k], atol=1e-4) for k in ya)


@pytest.mark.slow
def test_paper_rows_params_and_flops():
    rows = {}
    for name, cfg in DETECTORS.items():
        model = create_detector(cfg["backbone"], cfg["heads"], 80)
        rows[name] = sasa.count_params(model)
        paper = cfg["paper"][1] * 1e6
        print(f"{name:<44} {rows[name] / 1e6:6.2f}M  paper {paper / 1e6:.1f}M  ({rows[name] / paper - 1:+.1%})")
        assert abs(rows[name] / paper - 1) < 0.035
    assert rows == PARAMS
    frozen = create_detector("resnet50", "conv", 80, frozen_bn=True)
    assert sasa.count_params(frozen) == PARAMS["retinanet_resnet50"] - 53_120
    # FLOPs: hooks on conv/linear + attention_macs; attention heads are much cheaper than conv heads
    flops = {k: detector_flops(tiny(k), 96) for k in TINY}
    assert flops["attention/full-attention"] < flops["conv/full-attention"]
    body_only = sasa.count_flops(tiny("conv/baseline").backbone.body, (1, 3, 96, 96))
    assert 0 < body_only < flops["conv/baseline"]


def test_create_detector_errors():
    with pytest.raises(ValueError, match="backbone must be a registered model.*'nope'"):
        create_detector("nope")
    with pytest.raises(ValueError, match="heads must be one of .*'transformer'"):
        create_detector("test_resnet", "transformer")
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        create_detector("test_resnet", "conv", 0)
    with pytest.raises(ValueError, match="trainable_backbone_layers must be in"):
        create_detector("test_resnet", trainable_backbone_layers=7, weights_backbone="x")


# ------------------------------------------------------------------------------------------------ backbone weights


def test_backbone_weights_frozen_bn_and_trainable_layers(tmp_path):
    src = sasa.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        for p in src.parameters():
            p.normal_()
    save_safetensors(tmp_path / "w.safetensors", src.state_dict(), {"model": "test_resnet"})
    save_checkpoint(tmp_path / "w.pt", {"model": {f"module.{k}": v for k, v in src.state_dict().items()},
                                        "meta": {"model": "test_resnet"}})
    for path in (tmp_path / "w.safetensors", tmp_path / "w.pt"):
        model = create_detector("test_resnet", "conv", 3, weights_backbone=path)
        body = model.backbone.body
        assert torch.equal(body.layer3[0].conv2.weight, src.layer3[0].conv2.weight)
        assert isinstance(body.bn1, FrozenBatchNorm2d)
        assert torch.equal(body.bn1.running_mean, src.bn1.running_mean)
        trainable = {n.split(".")[0] for n, p in body.named_parameters() if p.requires_grad}
        assert trainable == {"layer2", "layer3", "layer4"}  # torchvision's default with weights: 3
    model = create_detector("test_resnet", "conv", 3, weights_backbone=tmp_path / "w.pt",
                            trainable_backbone_layers=5, frozen_bn=False)
    assert all(p.requires_grad for p in model.backbone.body.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scratch = create_detector("test_resnet", "conv", 3)
    assert all(p.requires_grad for p in scratch.parameters())
    with pytest.raises(CheckpointError, match="trained for model 'test_resnet', but backbone='test_sasa_resnet'"):
        create_detector("test_sasa_resnet", "conv", 3, weights_backbone=tmp_path / "w.safetensors")
    save_safetensors(tmp_path / "anon.safetensors", src.state_dict())  # no meta: the keys tell
    with pytest.raises(CheckpointError, match="does not fit this model: missing keys .*conv2.qkv.weight"):
        create_detector("test_resnet", "conv", 3, weights_backbone=tmp_path / "anon.safetensors",
                        backbone_overrides={"attention_stages": (1, 2, 3, 4)})
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        create_detector("test_resnet", "conv", 3, weights_backbone=tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------------ data


def write_bad_coco(root: Path) -> Path:
    """Four listed images (one missing on disk): every kind of bad annotation."""
    from PIL import Image

    (root / "img").mkdir(parents=True)
    for i in (1, 2, 3):
        Image.new("RGB", (80, 60), (120, 120, 120)).save(root / "img" / f"{i}.png")
    anns = [
        {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 20, 20]},                   # good
        {"id": 2, "image_id": 1, "category_id": 5, "bbox": [70, 50, 30, 30]},                   # clipped to 10x10
        {"id": 3, "image_id": 1, "category_id": 9, "bbox": [200, 200, 10, 10]},                 # outside
        {"id": 4, "image_id": 1, "category_id": 9, "bbox": [5, 5, 0, 12]},                      # zero area
        {"id": 5, "image_id": 1, "category_id": 42, "bbox": [5, 5, 10, 10]},                    # unknown category
        {"id": 6, "image_id": 2, "category_id": 9, "bbox": [1, 2, "x", None]},                  # malformed
        {"id": 7, "image_id": 2, "category_id": 9, "bbox": [1, 2, 5, float("nan")]},            # non-finite
        {"id": 8, "image_id": 4, "category_id": 5, "bbox": [1, 1, 5, 5]},                       # image missing
        {"id": 9, "image_id": 1, "category_id": 9, "bbox": [30, 30, 20, 20], "iscrowd": 1},     # crowd
    ]
    images = [{"id": i, "file_name": f"{i}.png", "width": 80, "height": 60} for i in (1, 2, 3, 4)]
    cats = [{"id": 5, "name": "five"}, {"id": 9, "name": "nine"}]
    path = root / "ann.json"
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))  # NaN is valid here
    return path


def test_bad_inputs_are_repaired_and_reported(tmp_path):
    ann = write_bad_coco(tmp_path)
    with pytest.warns(UserWarning) as record:
        ds = CocoDetection(tmp_path / "img", ann)
    msg = str(record[0].message)
    for text in ("1 images listed but missing", "1 annotations with a category id not in", "2 annotations with a",
                 "malformed", "1 zero-area", "1 boxes entirely outside", "1 boxes reaching outside",
                 "2 images without usable annotations"):
        assert text in msg, msg
    assert ds.cat_ids == [5, 9] and ds.cat_names == ["five", "nine"] and len(ds) == 3
    image, target = ds[0]
    assert image.shape == (3, 60, 80) and image.dtype == torch.float32
    assert torch.equal(target["boxes"], torch.tensor([[10.0, 10, 30, 30], [70, 50, 80, 60]]))
    assert target["labels"].tolist() == [0, 0]
    _, empty = ds[1]
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,)
    assert sorted(a["id"] for a in ds.coco.dataset["annotations"]) == [1, 2, 8, 9]  # ground truth for COCOeval
    # a training step on these samples, including the background-only image, runs
    train = CocoDetection(tmp_path / "img", ann, transforms=train_transforms(64, (0.8, 1.2)), warn=False)
    images, tgts = collate([train[i] for i in range(len(train))])
    model = tiny("conv/baseline", num_classes=2, min_size=64, max_size=64)
    losses = model(images, tgts)
    assert all(torch.isfinite(v) for v in losses.values())
    # COCOeval on the cleaned ground truth
    dets = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
            for t in (ds[i][1] for i in range(len(ds)))]
    metrics = coco_evaluate(ds.coco, to_coco_records(dets, ds.ids, ds.cat_ids), ds.ids)
    assert 0 < metrics["map50"] < 100  # the clipped box misses its (unclipped, official-style) ground truth


def test_dataset_errors(tmp_path):
    ann = write_bad_coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file .*nope.json"):
        CocoDetection(tmp_path / "img", tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="image folder .*nofolder"):
        CocoDetection(tmp_path / "nofolder", ann)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        CocoDetection(tmp_path / "img", tmp_path / "bad.json")
    (tmp_path / "nocat.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(ValueError, match="has no 'categories'"):
        CocoDetection(tmp_path / "img", tmp_path / "nocat.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no usable images: 4 listed .* 4 missing"):
        CocoDetection(tmp_path / "empty", ann, warn=False)


def test_train_transforms_keep_boxes_on_objects(shapes):
    ds = CocoDetection(shapes / "train" / "images", shapes / "train.json",
                       transforms=train_transforms(96, (0.8, 1.2)))
    torch.manual_seed(0)
    checked = 0
    for i in range(8):
        image, target = ds[i]
        assert image.shape == (3, 96, 96)
        for box in target["boxes"]:
            x1, y1, x2, y2 = box.round().int().tolist()
            patch = image[:, y1:y2, x1:x2]
            assert patch.numel() and (patch.amax(0) - patch.amin(0)).max() > 0.2  # a coloured shape is inside
            checked += 1
    assert checked >= 8  # the loop checked boxes (crops may drop some, not all)


# ------------------------------------------------------------------------------------------------ eval + draw


def test_coco_eval_perfect_empty_and_table(shapes):
    ds = CocoDetection(shapes / "val" / "images", shapes / "val.json")
    dets = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]}
            for t in (ds[i][1] for i in range(len(ds)))]
    records = to_coco_records(dets, ds.ids, ds.cat_ids)
    assert {r["category_id"] for r in records} <= {1, 3, 7}
    metrics = coco_evaluate(ds.coco, records, ds.ids)
    assert metrics["map"] == pytest.approx(100.0) and metrics["map75"] == pytest.approx(100.0)
    assert coco_evaluate(ds.coco, [], ds.ids)["map"] == 0.0
    table = format_table(metrics, paper=(36.5, 54.3, 39.0))
    assert "mAP" in table and "AP50" in table and "paper" in table
    with pytest.raises(ValueError, match="got 1 detections for 2 image ids"):
        to_coco_records(dets[:1], [1, 2], ds.cat_ids)


def test_draw_detections():
    image = torch.zeros(3, 64, 64)
    det = {"boxes": torch.tensor([[5.0, 5, 40, 40], [10, 10, 20, 20]]), "scores": torch.tensor([0.9, 0.1]),
           "labels": torch.tensor([0, 1])}
    out = draw_detections(image, det, ["disc", "cross"], gt_boxes=torch.tensor([[30.0, 30, 60, 60]]))
    assert out.dtype == torch.uint8 and out.shape == (3, 64, 64)
    assert out[:, 5, 20].sum() > 0 and out[:, 30, 45].sum() > 0  # detection edge, ground-truth edge
    assert out[:, 15, 10].sum() == 0  # the 0.1-score box is below the threshold
    with pytest.raises(ValueError, match=r"image must be \(3, H, W\)"):
        draw_detections(torch.zeros(64, 64), det, ["a", "b"])


# ------------------------------------------------------------------------------------------------ engine + CLI


@pytest.mark.slow
def test_training_on_shapes_learns_and_cli_evaluates(shapes, tmp_path, capsys):
    """320 CPU steps of a tiny conv RetinaNet: the loss falls and COCOeval gives a sensible mAP; then
    ``sasa detect-eval`` rebuilds the model from last.pt, evaluates and draws."""
    import time

    from sasa.cli import main
    from sasa.detection.engine import train

    torch.manual_seed(0)
    cfg = shapes_config(shapes, tmp_path / "run", epochs=40, max_steps=320)
    t0 = time.perf_counter()
    assert train(cfg) == 0
    seconds = time.perf_counter() - t0
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    steps = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in steps if r["kind"] == "step"]
    metrics = summary["metrics"]
    print(f"320 steps in {seconds:.0f} s; loss {losses[0]:.3f} -> {losses[-1]:.3f}; val mAP {metrics['map']:.1f} "
          f"AP50 {metrics['map50']:.1f}")
    assert summary["status"] == "max_steps" and summary["step"] == 320
    assert sum(losses[-3:]) / 3 < 0.6 * losses[0]
    assert metrics["map"] > 10 and metrics["map50"] > 25
    for name in ("last.pt", "last.prev.pt", "metrics.png", "summary.json", "config.yaml", "env.json"):
        assert (run / name).is_file(), name

    out = tmp_path / "eval"
    assert main(["detect-eval", str(run / "last.pt"), "--output", str(out), "--draw", "3", "--quiet",
                 "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    assert "mAP" in printed
    result = json.loads((out / "coco_eval.json").read_text())
    assert result["metrics"]["map"] == pytest.approx(metrics["map"], abs=0.01)
    assert len(list((out / "drawings").glob("*.png"))) == 3
    assert isinstance(json.loads((out / "detections.json").read_text()), list)

    # the same evaluation sharded over two torchrun processes gathers to the same numbers
    out2 = tmp_path / "eval2"
    proc = torchrun("detect-eval", str(run / "last.pt"), "--output", str(out2), "--quiet", "--workers", "0",
                    "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ddp = json.loads((out2 / "coco_eval.json").read_text())["metrics"]
    assert ddp["map"] == pytest.approx(metrics["map"], abs=1e-6) and ddp["map50"] == pytest.approx(metrics["map50"])


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 -m sasa ARGS`` (a free port; the group is killed on timeout)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sasa", *args]
    return run_group(cmd, timeout=timeout)


@pytest.mark.slow
def test_torchrun_training(shapes, tmp_path):
    """``torchrun --nproc_per_node=2 -m sasa detect-train`` (gloo on CPU): a global batch split over 2 ranks."""
    cfg = shapes_config(shapes, tmp_path / "run", max_steps=4, epochs=1, warmup_epochs=1, eval_max_images=4,
                        log_every=2)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({k: v for k, v in C.to_dict(cfg).items()
                                                     if k not in ("output", "resume")}))
    proc = torchrun("detect-train", "--config", str(tmp_path / "c.yaml"), "--output", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "global batch 8 = 2 x 4" in proc.stdout
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == [2, 4]
    assert load_checkpoint(tmp_path / "run" / "last.pt")["progress"]["global_step"] == 4


def test_bf16_autocast_keeps_anchors_and_losses_float32():
    from sasa.detection.task import enable_bf16_

    model = tiny("attention/full-attention", min_size=64, max_size=64)
    enable_bf16_(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model([torch.rand(3, 64, 64)], targets(1))
        model.eval()
        with torch.no_grad():
            out = model([torch.rand(3, 64, 64)])
    assert all(v.dtype == torch.float32 and torch.isfinite(v) for v in losses.values())
    assert out[0]["boxes"].dtype == torch.float32


@pytest.mark.slow
def test_stop_resume_and_checkpoint_checks(shapes, tmp_path, monkeypatch, capsys):
    """A signal mid-epoch saves last.pt (exit 143); --resume continues at the same step through the shared path;
    a run whose config names another detector is refused, naming the difference."""
    import shutil

    from sasa.cli import main
    from sasa.detection import engine
    from sasa.engine.signals import GracefulStop

    class StopAtThirdPoll(GracefulStop):
        polls = 0

        @property
        def requested(self) -> bool:
            StopAtThirdPoll.polls += 1
            return StopAtThirdPoll.polls >= 3

    run = tmp_path / "run"
    cfg = shapes_config(shapes, run, image_size=64, fpn_channels=16, batch_size=4, lr_base_batch=4,
                        epochs=2, eval_every=0, eval_max_images=4, log_every=1)
    monkeypatch.setattr(engine, "GracefulStop", StopAtThirdPoll)
    assert engine.train(cfg) == 128 + signal.SIGTERM
    assert f"sasa detect-train --resume {run}" in capsys.readouterr().out
    progress = load_checkpoint(run / "last.pt")["progress"]
    assert (progress["epoch"], progress["batches_done"], progress["global_step"]) == (0, 3, 3)
    monkeypatch.setattr(engine, "GracefulStop", GracefulStop)
    assert main(["detect-train", "--resume", str(run), "--max-steps", "20"]) == 0
    assert "resuming" in capsys.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "max_steps" and summary["step"] == 20  # 16 steps per epoch: resumed mid-epoch
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "step"] == list(range(1, 21))
    assert main(["detect-train", "--resume", str(run), "--lr", "1.0"]) == 2
    assert "'lr' cannot change on --resume" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(run, other)
    (other / "config.yaml").write_text((other / "config.yaml").read_text().replace("heads: conv", "heads: attention"))
    with pytest.raises(CheckpointError, match="written for heads='conv', this run has heads='attention'"):
        engine.train(engine.config_for_resume(other, {}))


def _snapshot(run: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir())}


@pytest.mark.slow
def test_finished_run_resume_changes_nothing_and_unreadable_checkpoint_names_the_usable_ones(shapes, tmp_path,
                                                                                               capsys):
    """The shared run-directory path: a finished detection run is left alone (exit 0); a corrupt last.pt fails
    naming last.prev.pt and best.pt with the detection commands; last.prev.pt resumes to more epochs."""
    from sasa.cli import main
    from sasa.detection.engine import train

    run = tmp_path / "run"
    cfg = shapes_config(shapes, run, image_size=64, fpn_channels=16, batch_size=8, lr_base_batch=8, epochs=1,
                        warmup_epochs=0, checkpoint_every=4, eval_max_images=4, log_every=4)
    assert train(cfg) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 1
    before = _snapshot(run)
    assert main(["detect-train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is complete: 1 epochs, mAP" in out and f"sasa detect-train --resume {run} --epochs N" in out
    assert _snapshot(run) == before  # not a byte, not a timestamp
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])  # a checkpoint copied half-way
    assert main(["detect-train", "--resume", str(run), "--epochs", "2"]) == 2
    err = capsys.readouterr().err
    assert "last.pt' is unreadable" in err and f"sasa detect-train --resume {run / 'last.prev.pt'}" in err
    assert f"sasa detect-eval {run / 'best.pt'}" in err
    assert main(["detect-train", "--resume", str(run / "last.prev.pt"), "--epochs", "2"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["epochs"], summary["step"], summary["status"]) == (2, 16, "done")


def test_config_and_cli_errors(tmp_path, capsys):
    from sasa.cli import main

    configs = Path(__file__).resolve().parent.parent / "configs"
    for name in DETECTORS:
        cfg = C.resolve(configs / f"coco_{name}.yaml", schema=DetectConfig)
        assert (cfg.backbone, cfg.heads) == (DETECTORS[name]["backbone"], DETECTORS[name]["heads"])
        assert (cfg.batch_size, cfg.lr, cfg.lr_base_batch, cfg.epochs, cfg.image_size) == (64, 0.12, 64, 150, 640)
    (tmp_path / "bad.yaml").write_text("epochz: 3\n")
    with pytest.raises(C.ConfigError, match="unknown config key 'epochz'.*did you mean 'epochs'"):
        C.resolve(tmp_path / "bad.yaml", schema=DetectConfig)
    with pytest.raises(C.ConfigError, match="'detector' .*must be one of"):
        C.resolve(None, {"detector": "retinanet_vgg"}, schema=DetectConfig)
    # the detection engine's old spellings name the new ones
    (tmp_path / "old.yaml").write_text("lr_batch: 64\n")
    with pytest.raises(C.ConfigError, match="'lr_batch' in .*old.yaml was renamed to lr_base_batch"):
        C.resolve(tmp_path / "old.yaml", schema=DetectConfig)
    for key, value, new in (("backbone_overrides", {}, "backbone_args"), ("progress", False, "quiet"),
                            ("amp", "none", "'off'")):
        with pytest.raises(C.ConfigError, match=f"renamed to {new}"):
            C.resolve(None, {key: value}, schema=DetectConfig)
    assert main(["detect-train", "--backbone", "test_resnet", "--output", str(tmp_path / "r")]) == 2
    assert "data_dir is not set" in capsys.readouterr().err
    assert main(["detect-train", "--resume", "auto"]) == 2
    assert "--resume RUN_DIR" in capsys.readouterr().err
    assert main(["detect-eval", str(tmp_path / "none.pt")]) == 2
    assert "none.pt" in capsys.readouterr().err


@pytest.mark.slow
def test_info_detection_table():
    from sasa.detection import detector_table

    table = detector_table(flops=False)
    assert table.count("\n") == 8 and "33.84" in table and "21.31" in table and "22.0" in table
