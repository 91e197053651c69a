"""``sasa bench``: layer and model speed / memory of SASA against the convolution it replaces.

- ``layer``: each ResNet stage's 3x3 convolution against the full ``SelfAttention2d`` layer, once per backend
  (``sasa.bench.layer``);
- ``op``: the same shapes with the bare op ``local_attention_2d`` instead of the layer (no projections);
- ``stem``: ResNet's 7x7/2 convolution stem against the ``AttentionStem`` (fast and textbook forms);
- ``model``: training-step and inference images/s and peak memory of the conv ResNet and its SASA variants
  (``sasa.bench.model``).

Every run records the command, commit, device, torch version, dtype, batch and date beside its numbers (table on
stdout, JSON with ``--out``). Presets per device in ``sasa.bench.config``; CUDA events on GPU, median of repeats
with min / max / quartiles. ``python -m sasa.bench ...`` is ``sasa bench ...``.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys

import torch

from ..process import keep_freed_memory
from .config import MODES, BenchConfig, preset, stage_shapes
from .report import render, write_json
from .timing import environment

__all__ = ["BenchConfig", "config_from_args", "preset", "run", "stage_shapes"]


def _shapes(text: str) -> list[tuple[int, int, int]]:
    try:
        shapes = [tuple(int(n) for n in item.lower().split("x")) for item in text.split(",") if item.strip()]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        raise ValueError(f"--shapes must be a comma-separated list of HxWxC (e.g. 32x32x128,16x16x256), got {text!r}")
    return shapes


def config_from_args(args) -> BenchConfig:
    """Build a ``BenchConfig`` from ``sasa bench``'s parsed arguments (see ``sasa bench --help``)."""
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: CUDA is not available on this machine")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cfg = preset(device, small=args.small)
    modes = [m.strip() for m in args.mode.split(",") if m.strip()]
    if not modes or any(m not in MODES + ("all",) for m in modes):
        raise ValueError(f"--mode must be 'all' or a comma-separated subset of {', '.join(MODES)}, got {args.mode!r}")
    cfg.modes = MODES if "all" in modes else tuple(m for m in MODES if m in modes)
    if args.image_size is not None:
        cfg.image_size = args.image_size
        cfg.shapes = stage_shapes(args.image_size)
        cfg.model_image_size = args.image_size
    for name in ("batch", "kernel_size", "heads", "model_batch", "backend", "dtype", "warmup", "repeats",
                 "model_warmup", "model_repeats", "slow_guard_gb"):
        value = getattr(args, name, None)
        if value is not None:
            setattr(cfg, name, value)
    if args.shapes:
        cfg.shapes = _shapes(args.shapes)
    if args.backends:
        cfg.backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    if args.models:
        cfg.models = [m.strip() for m in args.models.split(",") if m.strip()]
    if args.channels_last is not None:
        cfg.channels_last = args.channels_last
    cfg.skip_slow = args.skip_slow
    cfg.compile = args.compile
    cfg.profile = args.profile or 0
    if cfg.device.type == "cpu" and cfg.dtype != "fp32":
        raise ValueError(f"--dtype {cfg.dtype}: CPU benchmarks run in fp32 only")
    return cfg


def run(cfg: BenchConfig, *, command: str = "", log=print) -> dict:
    """Run the configured modes; returns the JSON-ready record (``meta``, ``layer`` and / or ``model`` rows)."""
    dtype = cfg.dtype if cfg.dtype == "fp32" else f"{cfg.dtype} autocast"
    if cfg.device.type == "cpu":
        keep_freed_memory()  # as `sasa train` on CPU does; SASA_CPU_MALLOC=default measures without it
    result = {"meta": environment(cfg.device, dtype=dtype, channels_last=cfg.channels_last, command=command)}
    if "layer" in cfg.modes or "op" in cfg.modes:
        from .layer import layer_rows

        result["layer_config"] = {"batch": cfg.batch, "image_size": cfg.image_size, "kernel_size": cfg.kernel_size,
                                  "heads": cfg.heads, "warmup": cfg.warmup, "repeats": cfg.repeats,
                                  "shapes": ["x".join(map(str, s)) for s in cfg.shapes]}
    if "layer" in cfg.modes:
        result["layer"] = layer_rows(cfg, log=lambda s: log("  layer" + s))
    if "op" in cfg.modes:
        result["op"] = layer_rows(cfg, log=lambda s: log("  op   " + s), op=True)
    if "stem" in cfg.modes:
        from .layer import stem_rows

        result["stem"] = stem_rows(cfg, log=lambda s: log("  stem " + s))
    if "model" in cfg.modes:
        from .model import model_rows

        result["model_config"] = {"batch": cfg.model_batch, "image_size": cfg.model_image_size,
                                  "backend": cfg.backend, "compile": cfg.compile, "warmup": cfg.model_warmup,
                                  "repeats": cfg.model_repeats, "models": list(cfg.models)}
        result["model"] = model_rows(cfg, log=log)
    result["config"] = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in dataclasses.asdict(cfg).items()}
    return result


def main(args) -> int:
    """The ``sasa bench`` handler: run, print the tables, write ``--out``."""
    cfg = config_from_args(args)
    if sys.argv[1:2] == ["bench"]:
        command = "sasa " + shlex.join(sys.argv[1:])
    else:
        command = "sasa bench (called from Python; the settings are under 'config')"
    result = run(cfg, command=command, log=lambda s: print(s, flush=True))
    print()
    print(render(result))
    if args.out:
        write_json(result, args.out)
        print(f"\nwrote {args.out}")
    return 0
