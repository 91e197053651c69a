"""``DetectConfig``: the ``sasa detect-train`` / ``detect-eval`` settings, the shared ``RunConfig`` fields plus the
detector's and the COCO data's. The defaults are the paper's recipe (SPEC section 4): SGD momentum 0.9 (not
Nesterov), ``lr`` 0.12 at ``lr_base_batch`` 64 scaled linearly, 1 warm-up epoch then cosine, weight decay 1e-4
(ours), 150 epochs, 640 crops with multiscale jitter and flips. Old spellings fail naming the new one (``RENAMED``).
"""

from dataclasses import dataclass, field
from typing import ClassVar

from ..engine.config import ConfigError, RunConfig, _f

# SPEC section 4 (COCO val): name -> backbone, FPN + heads, paper GFLOPs, params (M), mAP, AP50, AP75
DETECTORS: dict[str, dict] = {
    "retinanet_resnet50": {"backbone": "resnet50", "heads": "conv", "paper": (182, 33.4, 36.5, 54.3, 39.0)},
    "retinanet_sasa_resnet50_convstem": {"backbone": "sasa_resnet50_convstem", "heads": "conv",
                                         "paper": (173, 25.9, 36.8, 54.6, 39.3)},
    "retinanet_sasa_resnet50": {"backbone": "sasa_resnet50", "heads": "conv", "paper": (173, 25.9, 36.2, 54.0, 38.7)},
    "retinanet_sasa_resnet50_convstem_attnheads": {"backbone": "sasa_resnet50_convstem", "heads": "attention",
                                                   "paper": (111, 22.0, 36.6, 54.3, 39.1)},
    "retinanet_sasa_resnet50_attnheads": {"backbone": "sasa_resnet50", "heads": "attention",
                                          "paper": (110, 22.0, 36.6, 54.5, 39.2)},
}


@dataclass
class DetectConfig(RunConfig):
    """Everything a ``sasa detect-train`` run needs; ``detector`` (one of the paper's rows) sets backbone and heads."""

    resumable: ClassVar[tuple[str, ...]] = RunConfig.resumable + ("max_steps", "data_dir", "eval_batch_size",
                                                                  "eval_max_images")
    # model
    detector: str | None = _f(None, "one of the paper's five rows (sets backbone + heads)", choices=tuple(DETECTORS))
    backbone: str = _f("resnet50", "registered model name (sasa info --list)")
    backbone_args: dict = field(default_factory=dict, metadata={
        "help": "create_model overrides of the backbone, e.g. attention_stages=(3, 4)", "choices": None, "flag": True})
    heads: str = _f("conv", "FPN + class/box heads", choices=("conv", "attention"))
    num_classes: int | None = _f(None, "classes (default: the dataset's number of categories)", bound=">= 1")
    weights_backbone: str | None = _f(None, "ImageNet weights of `sasa train` (.safetensors or .pt with 'model')")
    trainable_backbone_layers: int | None = _f(None, "backbone stages trained (0-5; default: 3 with weights, else 5)")
    frozen_bn: bool | None = _f(None, "FrozenBatchNorm in the backbone (default: with weights_backbone)")
    fpn_channels: int = _f(256, "FPN and head width", bound=">= 1")
    attention_kernel_size: int = _f(7, "window of the attention FPN/heads")
    attention_heads: int = _f(8, "heads of the attention FPN/heads")
    predictor_kernel_size: int = _f(3, "kernel of the final class/box convs")
    anchor_sizes: list | None = _f(None, "anchor sizes of P3..P7 (default: torchvision's 32..512)")
    anchor_scales: int = _f(3, "anchor scales per level (with anchor_sizes)", bound=">= 1")
    aspect_ratios: list = _f((0.5, 1.0, 2.0), "anchor aspect ratios (with anchor_sizes)")
    score_thresh: float = _f(0.05, "minimum score of a kept detection")
    detections_per_img: int = _f(100, "detections kept per image", bound=">= 1")
    # data
    data_dir: str | None = _f(None, "COCO-format root: image folders + annotation JSON files")
    train_images: str = _f("train2017", "training image folder under data_dir")
    train_ann: str = _f("annotations/instances_train2017.json", "training annotations under data_dir")
    val_images: str = _f("val2017", "evaluation image folder under data_dir")
    val_ann: str = _f("annotations/instances_val2017.json", "evaluation annotations under data_dir")
    skip_empty: bool = _f(True, "training drops images without boxes (evaluation keeps every image)")
    image_size: int = _f(640, "training crop and evaluation size (longer side)", bound=">= 1")
    scale_range: list = _f((0.8, 1.2), "multiscale jitter range")
    hflip: float = _f(0.5, "horizontal flip probability", bound="in [0, 1]")
    max_steps: int | None = _f(None, "stop after N optimizer steps (smoke runs)", bound=">= 1")
    eval_batch_size: int = _f(8, "evaluation images per rank and batch", bound=">= 1")
    eval_max_images: int | None = _f(None, "evaluate the first N images only", bound=">= 1")
    # the shared fields, with the paper's recipe as defaults
    epochs: int = _f(150, "training epochs", bound=">= 1")
    batch_size: int = _f(64, "global batch size (split evenly across ranks)", bound=">= 1")
    optimizer: str = _f("sgd", "optimizer", choices=("sgd", "adamw"))
    lr: float = _f(0.12, "peak learning rate at batch size lr_base_batch", bound="> 0")
    lr_base_batch: int | None = _f(64, "lr scales linearly: lr * batch_size / lr_base_batch", bound=">= 1")
    nesterov: bool = _f(False, "Nesterov momentum for SGD")
    weight_decay: float = _f(1e-4, "weight decay (not on norms, biases, relative/stem embeddings)", bound=">= 0")
    warmup_epochs: float = _f(1.0, "linear warm-up epochs, then cosine decay", bound=">= 0")
    workers: int = _f(4, "DataLoader worker processes per rank", bound=">= 0")
    threads: int | None = _f(None, "torch CPU threads per process (null: torch's choice)", bound=">= 1")
    output: str | None = _f(None, "run directory (default: runs/detect/<detector>)")
    checkpoint_every: int = _f(1000, "also checkpoint every N optimizer steps (0: at epoch ends only)", bound=">= 0")
    log_every: int = _f(20, "write a metrics.jsonl step record every N steps", bound=">= 1")
    eval_every: int = _f(10, "evaluate every N epochs (and after the last; 0: after the last only)", bound=">= 0")

    def __post_init__(self) -> None:
        for key in ("aspect_ratios", "scale_range"):
            setattr(self, key, list(getattr(self, key)))

    def validate(self) -> "DetectConfig":
        super().validate()
        if self.detector is not None:
            self.backbone, self.heads = DETECTORS[self.detector]["backbone"], DETECTORS[self.detector]["heads"]
        if len(self.scale_range) != 2 or not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ConfigError(f"config key 'scale_range' must be [low, high] with 0 < low <= high, got "
                              f"{self.scale_range}")
        return self


def run_name(cfg: DetectConfig) -> str:
    return cfg.detector or f"retinanet_{cfg.backbone}_{cfg.heads}heads"
