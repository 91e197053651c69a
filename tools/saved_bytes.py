#!/usr/bin/env python
"""Bytes autograd keeps for the backward, per model part, counted on CPU (no GPU needed).

Runs one forward of each model under ``torch.autograd.graph.saved_tensors_hooks`` and sums the bytes of every tensor
saved for the backward (each storage counted once), split into the stem part (``conv1 / bn1 / relu / maxpool``, or
the whole checkpointed region) and the rest. bf16 autocast and channels_last by default, as the GPU benchmark runs.
Saved bytes are what peak training memory grows with (plus gradients and the allocator's slack); they depend on the
dtype and on what each op saves, not on the device, except for the attention op, whose backend decides what it
keeps: the CPU backend (``shifted``) keeps its softmax probabilities (k*k values per pixel and head) where the Triton
kernels keep one log-sum-exp, so for attention models the stem part is the figure that transfers to the GPU.

    python tools/saved_bytes.py --models resnet50,sasa_resnet50,sasa_resnet50@checkpoint_stem=True --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def saved_bytes(fn) -> int:
    """Bytes of the distinct storages autograd saves while ``fn()`` runs."""
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def count(model, x: torch.Tensor) -> tuple[int, int]:
    """(stem part, stages) saved bytes of one training forward of ``model`` on ``x``."""
    with torch.no_grad():
        y = model._stem(x)

    def stages():
        return model.layer4(model.layer3(model.layer2(model.layer1(y))))

    rest = saved_bytes(stages)
    if model.checkpoint_stem:  # the stages see the region's output: count both, take the stages off
        return saved_bytes(lambda: model.forward_features(x)) - rest, rest
    return saved_bytes(lambda: model._stem(x)), rest


def main(argv=None) -> int:
    from sasa.bench.model import parse_model
    from sasa.models import create_model

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet50,sasa_resnet50,sasa_resnet50@checkpoint_stem=True")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--out", help="also write the rows as JSON")
    args = parser.parse_args(argv)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size).to(memory_format=torch.channels_last)
    rows = []
    print(f"{'model':45s} {'stem part MB':>12s} {'stages MB':>10s}   (batch {args.batch}, {args.image_size}px, "
          f"{args.dtype}, torch {torch.__version__})")
    for spec in args.models.split(","):
        name, overrides = parse_model(spec)
        model = create_model(name, **overrides).to(memory_format=torch.channels_last).train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            stem, rest = count(model, x)
        row = {"model": spec, "batch": args.batch, "image_size": args.image_size, "dtype": args.dtype,
               "stem_part_mb": stem / 2**20, "stages_mb": rest / 2**20}
        rows.append(row)
        print(f"{spec:45s} {row['stem_part_mb']:12.1f} {row['stages_mb']:10.1f}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
