"""COCO-format detection data: an images folder + an instances JSON -> ``(image, target)`` for RetinaNet.

``CocoDetection`` reads the JSON with pycocotools, images with PIL; targets are ``{"boxes": (N, 4) float xyxy
pixels, "labels": (N,) int64, "image_id": int}``, COCO's sparse category ids mapped to contiguous labels
(``cat_ids[label]`` maps back). Bad inputs are repaired or skipped, counted (``report``) and warned about once:
unknown categories, malformed, non-finite or empty boxes are dropped, boxes are clipped to the image, crowd regions
stay out of training targets, images missing on disk are skipped, images without annotations stay as background
(``skip_empty=True`` drops them); a missing or invalid JSON or images folder raises naming the path.

Training transforms (``transforms.v2``) are the paper's: flip, ``ScaleJitter`` U(0.8, 1.2) (TPU RetinaNet's range; the
paper gives none), an ``image_size`` crop padded to size, ``SanitizeBoundingBoxes``; evaluation lets the model
resize.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

PROBLEMS = {
    "missing_files": "images listed but missing on disk (skipped)",
    "unknown_category": "annotations with a category id not in 'categories' (dropped)",
    "malformed": "annotations with a malformed or non-finite bbox (dropped)",
    "zero_area": "zero-area boxes (dropped)",
    "outside": "boxes entirely outside the image (dropped)",
    "clipped": "boxes reaching outside the image (clipped)",
    "empty_images": "images without usable annotations",
}


def _load_coco(ann_file: Path):
    from pycocotools.coco import COCO

    if not ann_file.is_file():
        raise FileNotFoundError(f"annotation file {str(ann_file)!r} does not exist")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"annotation file {str(ann_file)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise ValueError(  # noqa: TRY004  (a bad file is a bad value, like the JSON error above)
            f"annotation file {str(ann_file)!r} is not COCO format: expected a dict with an 'images' list")
    if not data.get("categories"):
        raise ValueError(f"annotation file {str(ann_file)!r} has no 'categories': the class list is needed")
    anns = data.setdefault("annotations", [])
    for i, ann in enumerate(anns):  # fields COCOeval reads, for hand-made files that leave them out
        ann.setdefault("id", i + 1)
        ann.setdefault("iscrowd", 0)
        if "area" not in ann and _xyxy(ann.get("bbox")) is not None:
            ann["area"] = float(ann["bbox"][2]) * float(ann["bbox"][3])
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        coco.createIndex()
    return coco


def _xyxy(bbox) -> tuple[float, float, float, float] | None:
    if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
        return None
    try:
        x, y, w, h = (float(v) for v in bbox)
    except (TypeError, ValueError):
        return None
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    return x, y, x + w, y + h


class CocoDetection(Dataset):
    """Detection samples of the instances JSON ``ann_file`` with images under ``root`` (``file_name`` is relative to
    it). ``transforms``: a ``transforms.v2`` callable on ``(image, target)`` (``None``: float images in [0, 1]);
    ``skip_empty`` drops images without usable annotations (training; COCOeval wants them all); ``warn`` reports
    repaired and skipped inputs as one warning."""

    def __init__(self, root: str | os.PathLike, ann_file: str | os.PathLike, *, transforms=None,
                 skip_empty: bool = False, warn: bool = True) -> None:
        self.root, self.ann_file = Path(root), Path(ann_file)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {str(self.root)!r} does not exist")
        self.coco = _load_coco(self.ann_file)
        cats = self.coco.dataset["categories"]
        ids = [c.get("id") for c in cats]
        if len(set(ids)) != len(ids) or not all(isinstance(i, int) for i in ids):
            raise ValueError(f"annotation file {str(self.ann_file)!r}: category ids must be unique ints, got {ids}")
        self.cat_ids = sorted(ids)
        names = {c["id"]: str(c.get("name", c["id"])) for c in cats}
        self.cat_names = [names[i] for i in self.cat_ids]
        self.cat_to_label = {cid: i for i, cid in enumerate(self.cat_ids)}
        self.transforms = transforms if transforms is not None else eval_transforms()
        self.report: Counter = Counter()
        self.ids: list[int] = []
        self.boxes: dict[int, list[tuple[tuple[float, float, float, float], int]]] = {}
        self._invalid: set[int] = set()
        for img_id in sorted(self.coco.imgs):
            info = self.coco.imgs[img_id]
            if not (self.root / str(info.get("file_name", ""))).is_file():
                self.report["missing_files"] += 1
                continue
            items = self._clean(info, self.coco.imgToAnns.get(img_id, []))
            if not items:
                self.report["empty_images"] += 1
                if skip_empty:
                    continue
            self.ids.append(img_id)
            self.boxes[img_id] = items
        if self._invalid:  # COCOeval must not count annotations no detector could match
            data = self.coco.dataset
            data["annotations"] = [a for a in data["annotations"] if a["id"] not in self._invalid]
            with contextlib.redirect_stdout(io.StringIO()):
                self.coco.createIndex()
        if warn and any(self.report[k] for k in PROBLEMS):
            lines = [f"{n} {PROBLEMS[k]}" for k, n in self.report.items() if n]
            warnings.warn(f"{self.ann_file}: " + "; ".join(lines), stacklevel=2)
        if not self.ids:
            raise ValueError(f"no usable images: {len(self.coco.imgs)} listed in {str(self.ann_file)!r}, "
                             f"{self.report['missing_files']} missing under {str(self.root)!r}"
                             + (", the rest without annotations (skip_empty=True)" if skip_empty else ""))

    def _clean(self, info: dict, anns: list[dict]) -> list[tuple[tuple[float, float, float, float], int]]:
        """Valid (xyxy box, label) training pairs of one image, clipped to the JSON's width/height when present.
        Invalid annotations are also marked for removal from COCOeval's ground truth; valid ones stay there
        unclipped, as in the official evaluation."""
        width, height = info.get("width"), info.get("height")
        sized = isinstance(width, (int, float)) and isinstance(height, (int, float))
        out = []
        for ann in anns:
            problem, box = None, _xyxy(ann.get("bbox"))
            if ann.get("category_id") not in self.cat_to_label:
                problem = "unknown_category"
            elif box is None:
                problem = "malformed"
            elif box[2] <= box[0] or box[3] <= box[1]:
                problem = "zero_area"
            elif sized:
                x1, y1, x2, y2 = box
                clip = (max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height)))
                if clip[2] <= clip[0] or clip[3] <= clip[1]:
                    problem = "outside"
                else:
                    if max(clip[0] - x1, clip[1] - y1, x2 - clip[2], y2 - clip[3]) > 1.0:  # ignore rounding
                        self.report["clipped"] += 1
                    box = clip
            if problem:
                self.report[problem] += 1
                self._invalid.add(ann["id"])
            elif not ann.get("iscrowd", 0):  # crowd regions: for COCOeval only
                out.append((box, self.cat_to_label[ann["category_id"]]))
        return out

    @property
    def num_classes(self) -> int:
        return len(self.cat_ids)

    def __len__(self) -> int:
        return len(self.ids)

    def load_image(self, index: int) -> torch.Tensor:
        """The uint8 RGB image ``(3, H, W)`` of sample ``index``."""
        info = self.coco.imgs[self.ids[index]]
        path = self.root / info["file_name"]
        try:
            with Image.open(path) as image:
                return pil_to_tensor(image.convert("RGB"))
        except OSError as err:  # PIL's UnidentifiedImageError is an OSError
            raise OSError(f"cannot read image {str(path)!r} (image id {info['id']}): {err}") from err

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict]:
        img_id = self.ids[index]
        image = self.load_image(index)
        h, w = image.shape[-2:]
        items = self.boxes[img_id]
        boxes = torch.tensor([b for b, _ in items], dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor([lab for _, lab in items], dtype=torch.int64)
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)  # the JSON's width/height may disagree with the file
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(h, w)),
            "labels": labels[keep],
            "image_id": img_id,
        }
        image, target = self.transforms(tv_tensors.Image(image), target)
        target["boxes"] = target["boxes"].as_subclass(torch.Tensor).reshape(-1, 4)
        return image.as_subclass(torch.Tensor), target


def train_transforms(image_size: int = 640, scale_range: tuple[float, float] = (0.8, 1.2), hflip: float = 0.5):
    """Flip, multiscale jitter, ``image_size`` crop (padded), box sanitising, float in [0, 1]."""
    return v2.Compose([
        v2.RandomHorizontalFlip(hflip),
        v2.ScaleJitter((image_size, image_size), scale_range=tuple(scale_range)),
        v2.RandomCrop(image_size, pad_if_needed=True),
        v2.SanitizeBoundingBoxes(min_size=1.0),
        v2.ToDtype(torch.float32, scale=True),
    ])


def eval_transforms():
    """Float image in [0, 1], no geometry (the model's transform resizes)."""
    return v2.ToDtype(torch.float32, scale=True)


def collate(batch: list[tuple[torch.Tensor, dict]]) -> tuple[list[torch.Tensor], list[dict]]:
    """Lists of images and targets (RetinaNet takes images of different sizes)."""
    images, targets = zip(*batch)
    return list(images), list(targets)
