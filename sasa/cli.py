"""The ``sasa`` command line: the only file that parses arguments.

Each sub-command is one ``_add_<name>(subparsers)`` function that declares its flags and sets ``func`` to a
handler; handlers import their engine lazily so ``sasa --help`` stays fast.

``main`` first sets up the process: toolchain messages that tell a user nothing are dropped (``QUIET_LOGS``), and
Inductor's compiled kernels go to a cache directory that outlives the process and its temporary directory
(``inductor_cache_dir``), so that a later command (``sasa train --resume``, another ``sasa bench``) loads them
instead of compiling them again.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

# logger -> starts of its messages to drop. torch.compile loads torch's C++-extension helper, which on a CUDA build
# of torch without a GPU (a CPU machine) says so at WARNING level, though the CPU backends never need CUDA.
QUIET_LOGS = {"torch.utils.cpp_extension": ("No CUDA runtime is found",)}


class _DropMessages(logging.Filter):
    def __init__(self, starts: tuple[str, ...]) -> None:
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.starts)


_FILTERS = {name: _DropMessages(starts) for name, starts in QUIET_LOGS.items()}


def inductor_cache_dir() -> str:
    """Where Inductor keeps compiled kernels: ``TORCHINDUCTOR_CACHE_DIR`` if the user set it, else
    ``$XDG_CACHE_HOME/sasa/inductor`` (``~/.cache/sasa/inductor``). torch's own default lies in the temporary
    directory, which a reboot, a tmp cleaner or a per-job ``TMPDIR`` (batch schedulers) empties or changes between
    a run and its resume."""
    chosen = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # torch writes its default into the environment once it has looked the directory up (importing torch._dynamo
    # does): that value is not the user's choice
    torch_dirs = sys.modules.get("torch._inductor.runtime.cache_dir_utils")
    if chosen and not (torch_dirs and os.path.abspath(chosen) == os.path.abspath(torch_dirs.default_cache_dir())):
        return chosen
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "sasa" / "inductor")


def _setup_process() -> None:
    for name, log_filter in _FILTERS.items():
        logging.getLogger(name).addFilter(log_filter)  # a filter already there is not added twice
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()  # torch reads it at each compile; children inherit it


def _add_info(sub) -> None:
    p = sub.add_parser("info", help="parameters and GFLOPs of models, optionally beside the paper's table")
    p.add_argument("names", nargs="*", help="model names (default: all paper models)")
    p.add_argument("--paper", action="store_true", help="print SPEC section 3's table beside our counts")
    p.add_argument("--num-classes", type=int, help="classes (default: 1000; 80 with --detection)")
    p.add_argument("--image-size", type=int, help="square input side (default: 224; 640 with --detection)")
    p.add_argument("--list", action="store_true", help="list registered model names and exit")
    p.add_argument("--detection", action="store_true",
                   help="SPEC section 4's five RetinaNet rows (params, GFLOPs) beside the paper's")
    p.set_defaults(func=_run_info)


def _run_info(args) -> int:
    from .info import model_table
    from .models import list_models

    if args.list:
        print("\n".join(list_models()))
        return 0
    if args.detection:
        from .detection.retinanet import detector_table

        print(detector_table(image_size=args.image_size or 640, num_classes=args.num_classes or 80))
        return 0
    print(model_table(args.names or None, paper=args.paper, num_classes=args.num_classes or 1000,
                      image_size=args.image_size or 224))
    return 0


def _model_args(text: str) -> dict:
    """``"in_chans=1,stem=small,attention_stages=(3, 4)"`` -> dict, the syntax of ``sasa train --model-args``."""
    from .models.args import parse_model_args

    try:
        return parse_model_args([text])
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _pixel(text: str) -> tuple[int, int]:
    try:
        y, x = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected y,x (two integers), got {text!r}") from None
    return y, x


def _add_show_attention(sub) -> None:
    p = sub.add_parser("show-attention", help="draw the k x k attention weights of every head of one layer",
                       description="Write a PNG: the input image and, for each query pixel, the attention window of "
                                   "every head of one SelfAttention2d layer (and their mean) at its position on the "
                                   "image, with a colour bar.")
    p.add_argument("--model", help="registered model name (default: from the weights' metadata or run config.yaml)")
    p.add_argument("--weights", help="safetensors file or checkpoint .pt (a 'model' entry); random init if omitted")
    p.add_argument("--image", required=True, help="any PIL-readable image (grayscale or RGB)")
    p.add_argument("--layer", help="module name (layer3.0.conv2) or index into the attention layers (-1 = last); "
                                   "default: the deepest layer whose input map is at least 2k-1 wide")
    p.add_argument("--pixel", type=_pixel, action="append", help="query pixel y,x in the resized image; repeatable "
                                                                 "(default: the centre)")
    p.add_argument("--image-size", type=int, help="square input size (default: run config, else the registry's)")
    p.add_argument("--model-args", type=_model_args, default={}, help="model overrides, e.g. "
                                                                     "in_chans=1,stem=small,width_multiplier=0.5")
    p.add_argument("--out", default="attention.png", help="output PNG (default: attention.png)")
    p.add_argument("--list-layers", action="store_true", help="list the attention layers and their map sizes")
    p.add_argument("--seed", type=int, default=0, help="seed of the random init (without --weights)")
    p.set_defaults(func=_run_show_attention)


def _run_show_attention(args) -> int:
    from .viz.show import show_attention

    layer = int(args.layer) if args.layer is not None and args.layer.lstrip("-").isdigit() else args.layer
    print(show_attention(args.model, args.image, args.out, weights=args.weights, model_args=args.model_args,
                         layer=layer, pixels=args.pixel, image_size=args.image_size, list_layers=args.list_layers,
                         seed=args.seed))
    return 0


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="layer and model speed / memory: SASA against the convolution it replaces",
                       description="Layer mode: each ResNet stage's 3x3 conv against the SelfAttention2d layer, once "
                                   "per backend. Stem mode: ResNet's conv stem against the attention stem. Model "
                                   "mode: training-step and inference images/s and peak memory of "
                                   "the conv ResNet and its SASA variants. Defaults per device: GPU batch 64, 256x256, "
                                   "bf16 autocast, channels_last, ResNet-50 models; CPU batch 2 (layers) / 8 (models), "
                                   "128x128, fp32, ResNet-26 models. Table on stdout, JSON with --out.")
    p.add_argument("--mode", default="all", help="all (default) or a comma-separated subset of layer, op, stem, "
                                                 "model (op: the bare attention op, no projections; stem: conv vs "
                                                 "attention stem at the model batch and image size)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu or cuda")
    p.add_argument("--small", action="store_true", help="tiny shapes and models, a few repeats: seconds on CPU")
    p.add_argument("--out", help="write the full record (settings, environment, every statistic) as JSON")
    g = p.add_argument_group("layer mode")
    g.add_argument("--batch", type=int, help="layer batch (default: 64 on GPU, 2 on CPU)")
    g.add_argument("--image-size", type=int, help="image size the stage shapes stand for; also the model image size")
    g.add_argument("--shapes", help="explicit layer shapes HxWxC,... (e.g. 32x32x128,16x16x256)")
    g.add_argument("--kernel-size", type=int, help="attention window (default 7)")
    g.add_argument("--heads", type=int, help="attention heads (default 8)")
    g.add_argument("--backends", help="comma-separated attention backends (default: all available on the device)")
    g.add_argument("--skip-slow", action="store_true", help="leave out the unfold reference backend")
    g.add_argument("--slow-guard-gb", type=float, help="skip the unfold reference where it would need more GPU memory "
                                                       "than this (default 40 on GPU)")
    g = p.add_argument_group("model mode")
    g.add_argument("--models", help="comma-separated model names (default: resnet50,sasa_resnet50_convstem,"
                                    "sasa_resnet50 on GPU; the resnet26 family on CPU); NAME@KEY=VALUE adds "
                                    "constructor arguments, e.g. sasa_resnet50_convstem@recompute_qkv=True")
    g.add_argument("--model-batch", type=int, help="training / inference batch (default: 64 on GPU, 8 on CPU)")
    g.add_argument("--backend", help="force one attention backend in the models (default: automatic choice)")
    g.add_argument("--compile", action="store_true", help="wrap each model with torch.compile (first step compiles)")
    g.add_argument("--profile", type=int, nargs="?", const=15, metavar="N",
                   help="also print the top N operators of one training step per model (torch.profiler; default 15)")
    g = p.add_argument_group("measurement")
    g.add_argument("--dtype", choices=["bf16", "fp16", "fp32"],
                   help="autocast dtype (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", default=None,
                   help="channels_last memory format (default on GPU)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--warmup", type=int, help="layer warm-up calls")
    g.add_argument("--repeats", type=int, help="layer timed calls")
    g.add_argument("--model-warmup", type=int, help="model warm-up steps (after the first, untimed step)")
    g.add_argument("--model-repeats", type=int, help="model timed steps")
    g.add_argument("--threads", type=int, help="torch.set_num_threads (CPU)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from .bench import main

    return main(args)


def _add_run(sub, name: str, *, task: str, help: str, description: str, config_help: str) -> None:
    """``sasa train`` / ``sasa detect-train``: ``--config``, ``--resume`` and one flag per config key of the task."""
    from .engine.flags import add_flags
    from .engine.rundir import PREVIOUS

    p = sub.add_parser(name, help=help, description=description + " Values: built-in defaults < --config FILE < "
                       "flags. Under `torchrun --nproc_per_node=N` the same command trains with DDP (--batch-size is "
                       "global). SIGINT/SIGTERM save last.pt and exit; --resume RUN_DIR continues.")
    p.add_argument("--config", help=config_help)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint (or from "
                   f"a checkpoint file in it, e.g. RUN_DIR/{PREVIOUS}); a finished run is left as it is")
    add_flags(p, _task(task)[0])
    p.set_defaults(func=_run, task=task)


def _task(task: str):
    """``(config class, config_for_resume, train)`` of a training task."""
    if task == "detect":
        from .detection.config import DetectConfig
        from .detection.engine import config_for_resume, train

        return DetectConfig, config_for_resume, train
    from .engine.config import TrainConfig
    from .engine.train import config_for_resume, train

    return TrainConfig, config_for_resume, train


def _run(args) -> int:
    from .engine.config import ConfigError, resolve
    from .engine.flags import overrides_from_args

    schema, config_for_resume, train = _task(args.task)
    if args.resume == "auto":
        raise ConfigError("--resume auto was removed: pass the run directory, --resume RUN_DIR")
    overrides = overrides_from_args(args, schema)
    if args.resume:
        return train(config_for_resume(args.resume, overrides))
    return train(resolve(args.config, overrides, schema=schema))


def _add_train(sub) -> None:
    _add_run(sub, "train", task="classify", help="train a classifier (default: the Fashion-MNIST demo); works under "
             "torchrun", description="Train a model. With no arguments: the Fashion-MNIST demo of "
             "configs/default.yaml.", config_help="YAML file of config keys (e.g. configs/imagenet_sasa_resnet50.yaml)")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1 / top-5 / loss of a checkpoint, safetensors file or run directory",
                       description="Evaluate weights on a dataset split; prints a table and writes JSON. Dataset "
                                   "settings default to those of the run the weights come from.")
    p.add_argument("weights", help="a run directory, a .safetensors file or a .pt checkpoint")
    p.add_argument("--dataset", choices=["fashion-mnist", "imagefolder", "cifar10", "cifar100", "synthetic"])
    p.add_argument("--data-dir")
    p.add_argument("--split", choices=["test", "holdout"], default="test",
                   help="test: the official test/val split; holdout: the run's hold-out split")
    p.add_argument("--holdout-fraction", type=float, help="hold-out fraction (default: the run's)")
    p.add_argument("--model", help="expected model name (a mismatch with the weights is an error)")
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--output", help="JSON file (default: beside the weights)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_eval)


def _run_eval(args) -> int:
    from .engine.evaluate import evaluate_weights, format_eval

    result = evaluate_weights(args.weights, dataset=args.dataset, data_dir=args.data_dir, split=args.split,
                              batch_size=args.batch_size, model=args.model, ema=args.ema, device=args.device,
                              workers=args.workers, holdout_fraction=args.holdout_fraction, output=args.output,
                              quiet=args.quiet)
    print(format_eval(result))
    return 0


def _add_detect_train(sub) -> None:
    _add_run(sub, "detect-train", task="detect", help="train RetinaNet (SASA backbones, conv/attention heads) on "
             "COCO-format data; works under torchrun", description="Train a RetinaNet; the built-in defaults are the "
             "paper's recipe.", config_help="YAML recipe (configs/coco_retinanet_*.yaml); flags override it")


def _add_detect_eval(sub) -> None:
    from .engine.config import AMP

    p = sub.add_parser("detect-eval", help="COCO mAP of a detect-train checkpoint; --draw N writes PNG drawings",
                       description="Evaluate a detect-train checkpoint with pycocotools' COCOeval (mAP, AP50, AP75, "
                                   "APs/m/l), print a table and write OUTPUT/coco_eval.json and detections.json. The "
                                   "detector is rebuilt from the checkpoint's own config.")
    p.add_argument("checkpoint", help="last.pt (or best.pt) of a detect-train run")
    p.add_argument("--config", help="YAML recipe (configs/coco_retinanet_*.yaml); the checkpoint's config overrides it")
    p.add_argument("--data-dir", help="COCO-format root: image folders + annotation JSON files")
    p.add_argument("--output", help="folder for coco_eval.json, detections.json and drawings (default: "
                                    "CHECKPOINT_DIR/eval)")
    p.add_argument("--device", choices=["cpu", "cuda"])
    p.add_argument("--amp", choices=AMP, help="bf16 autocast: auto = on for CUDA, off for CPU")
    p.add_argument("--workers", type=int, help="data-loading processes per rank")
    p.add_argument("--image-size", type=int, help="evaluation size (paper: 640)")
    p.add_argument("--quiet", action="store_true", default=None, help="no progress bars")
    p.add_argument("--val-images", help="image folder under --data-dir (default: the config's, val2017)")
    p.add_argument("--val-ann", help="annotation JSON under --data-dir")
    p.add_argument("--batch-size", dest="eval_batch_size", type=int, help="images per rank and batch")
    p.add_argument("--max-images", dest="eval_max_images", type=int, help="evaluate the first N images only")
    p.add_argument("--draw", type=int, default=0, metavar="N", help="draw detections on the first N images")
    p.set_defaults(func=_run_detect_eval)


def _run_detect_eval(args) -> int:
    from .detection.engine import evaluate_checkpoint
    from .engine.distributed import cleanup

    keys = ("data_dir", "output", "device", "amp", "workers", "image_size", "quiet", "val_images", "val_ann",
            "eval_batch_size", "eval_max_images")
    overrides = {k: getattr(args, k) for k in keys if getattr(args, k) is not None}
    try:
        evaluate_checkpoint(args.checkpoint, config_file=args.config, overrides=overrides, draw=args.draw)
    finally:
        cleanup()
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="a run's weights or a model as ONNX, TorchScript or an ExportedProgram, checked",
                       description="Export a model for deployment and check the written file against eager PyTorch "
                                   "on a random batch (ONNX: run by onnxruntime on CPU); exit status 1 when they "
                                   "differ by more than --atol.")
    p.add_argument("source", metavar="RUN_DIR_OR_MODEL",
                   help="a sasa train run directory, a .safetensors / .pt weights file, or a model name")
    p.add_argument("--format", dest="fmt", choices=["onnx", "torchscript", "exported-program"], default="onnx")
    p.add_argument("--out", required=True, help="the file to write")
    p.add_argument("--batch-size", type=int, default=2, help="batch of the example input and of the check")
    p.add_argument("--static-batch", action="store_true", help="fix the batch dimension (default: dynamic)")
    p.add_argument("--image-size", type=int, help="input side (default: the run's, else the model's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs for a model name (default 1000)")
    p.add_argument("--model-args", type=_model_args, action="append", default=[], metavar="KEY=VALUE,...",
                   help="create_model overrides for a model name")
    p.add_argument("--onnx-exporter", choices=["torchscript", "dynamo"], default="torchscript",
                   help="torch.onnx.export(dynamo=False) or the dynamo exporter (needs onnxscript)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset version")
    p.add_argument("--atol", type=float, default=1e-4, help="largest absolute difference accepted")
    p.set_defaults(func=_run_export)


def _run_export(args) -> int:
    from .export import export_model

    result = export_model(args.source, args.out, fmt=args.fmt, batch_size=args.batch_size,
                          dynamic_batch=not args.static_batch, num_classes=args.num_classes,
                          model_args={k: v for d in args.model_args for k, v in d.items()} or None,
                          image_size=args.image_size, onnx_exporter=args.onnx_exporter, opset=args.opset,
                          atol=args.atol)
    print(result.summary(), file=sys.stdout if result.ok else sys.stderr)
    return 0 if result.ok else 1


COMMANDS = [_add_info, _add_show_attention, _add_bench, _add_train, _add_eval, _add_detect_train, _add_detect_eval,
            _add_export]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sasa", description="Stand-Alone Self-Attention in Vision Models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


# Modules of the optional extras (pyproject.toml) -> the extra that brings them.
EXTRAS = {"yaml": "train", "tqdm": "train", "matplotlib": "train", "safetensors": "train", "numpy": "train",
          "pycocotools": "detection", "timm": "timm", "onnx": "export", "onnxruntime": "export",
          "onnxscript": "export"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    _setup_process()
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        try:
            return int(args.func(args) or 0)
        except (ValueError, TypeError, FileNotFoundError) as err:
            print(f"sasa {args.command}: error: {err}", file=sys.stderr)
            return 2
    except ModuleNotFoundError as err:
        extra = EXTRAS.get((err.name or "").split(".")[0])
        if extra is None:
            raise
        print(f"sasa: error: needs {err.name}, which the library alone does not install: "
              f"pip install 'sasa-vision[{extra}]'", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
