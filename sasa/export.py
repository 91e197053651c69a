"""``sasa export``: a model for deployment as ONNX, TorchScript or a ``torch.export`` ExportedProgram, checked.

The source is a run directory or weights file of ``sasa train`` (the model name, class count, input channels, model
arguments and image size come from the weights' metadata) or a registered model name (random weights: for trying
the deployment path). The model is exported in eval mode on CPU in float32; the attention layers and the stem run
their standard-operator path while an exporter records them (``sasa/layers/attention.py``). The written file is then
loaded back and run on a random batch (ONNX: by onnxruntime on CPU) beside eager PyTorch; the export succeeds only if
the largest absolute difference is within ``atol`` (1e-4 by default).

ONNX uses the TorchScript-based exporter (``torch.onnx.export(dynamo=False)``, opset 17) unless ``onnx_exporter=
"dynamo"`` (which needs onnxscript); ``dynamic_batch`` makes the batch dimension symbolic (and the check then also
runs a second batch size). ONNX and onnxruntime come with the ``[export]`` extra.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import backends
from .io.checkpoint import load_state_dict_checked, read_weights, weights_file
from .models import MODEL_INFO, create_model, list_models

FORMATS = ("onnx", "torchscript", "exported-program")
ONNX_EXPORTERS = ("torchscript", "dynamo")


@dataclass
class ExportResult:
    """What ``export_model`` wrote and how close it runs to eager PyTorch."""

    path: Path
    format: str
    model: str
    input_shape: tuple[int, ...]
    max_abs_diff: float
    atol: float
    batch_sizes: tuple[int, ...]

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.atol

    def summary(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"{verdict}: {self.path} ({self.format}, {self.model}, input {self.input_shape})\n"
                f"max |exported - eager| = {self.max_abs_diff:.3g} on random batches of {list(self.batch_sizes)} "
                f"(tolerance {self.atol:g})")


def load_model(source: str | os.PathLike, *, num_classes: int | None = None, model_args: dict | None = None,
               image_size: int | None = None) -> tuple[nn.Module, str, tuple[int, int, int]]:
    """``(model in eval mode, model name, (C, H, W) input)`` for a run directory, a weights file or a model name.

    Args:
        source: a ``sasa train`` run directory, a ``.safetensors`` / ``.pt`` weights file, or a registered name.
        num_classes: classifier outputs for a model name (weights carry their own); 1000 by default.
        model_args: ``create_model`` overrides for a model name (weights carry their own).
        image_size: input side; default: the run's image size, else the model's default input size.
    """
    path = Path(source)
    if path.exists():
        weights = weights_file(path)
        state, meta = read_weights(weights)
        if not meta.get("model"):
            raise ValueError(f"{str(weights)!r} carries no model name in its metadata; it was not written by sasa")
        name, in_chans = meta["model"], int(meta.get("in_chans", 3))
        model = create_model(name, num_classes=int(meta["num_classes"]),
                             **{"in_chans": in_chans, **(meta.get("model_args") or {})})
        load_state_dict_checked(model, state, source=str(weights))
        size = image_size or meta.get("image_size") or MODEL_INFO[name]["input_size"][1:]
    elif str(source) in list_models():
        name = str(source)
        model = create_model(name, num_classes=1000 if num_classes is None else num_classes, **(model_args or {}))
        in_chans = model.in_chans
        size = image_size or MODEL_INFO[name]["input_size"][1:]
    else:
        raise FileNotFoundError(f"{str(source)!r} is neither a run directory, a weights file nor a model name "
                                f"(models: {', '.join(list_models())})")
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[-1]))
    return model.eval(), name, (in_chans, height, width)


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The reference output: eager PyTorch through the backends' eager CPU path (no compile)."""
    with torch.no_grad(), backends.force("shifted"):
        return model(x)


def _write(model: nn.Module, x: torch.Tensor, out: Path, fmt: str, *, dynamic_batch: bool, onnx_exporter: str,
           opset: int) -> None:
    if fmt == "onnx":
        if onnx_exporter == "dynamo":
            dims = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dims, opset_version=opset)
            program.save(str(out))
        else:
            axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
            torch.onnx.export(model, (x,), str(out), dynamo=False, input_names=["image"], output_names=["logits"],
                              dynamic_axes=axes, opset_version=opset)
    elif fmt == "torchscript":
        torch.jit.save(torch.jit.script(model), str(out))
    else:
        dims = {"x": {0: torch.export.Dim("batch", min=1)}} if dynamic_batch else None
        torch.export.save(torch.export.export(model, (x,), dynamic_shapes=dims), str(out))


def _runner(out: Path, fmt: str):
    """A callable running the written file on a CPU tensor batch."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    module = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    return lambda x: module(x)


def export_model(source: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "onnx", batch_size: int = 2,
                 dynamic_batch: bool = True, num_classes: int | None = None, model_args: dict | None = None,
                 image_size: int | None = None, onnx_exporter: str = "torchscript", opset: int = 17,
                 atol: float = 1e-4, seed: int = 0) -> ExportResult:
    """Export ``source`` (see ``load_model``) to ``out`` in format ``fmt`` and check it against eager PyTorch.

    Args:
        source: run directory, weights file or model name.
        out: the file to write (its folder is created).
        fmt: ``"onnx"``, ``"torchscript"`` or ``"exported-program"``.
        batch_size: batch of the example input and of the check.
        dynamic_batch: a symbolic batch dimension (ONNX, exported program; TorchScript always has one); the check
            then also runs batch ``batch_size + 1``.
        num_classes, model_args, image_size: see ``load_model``.
        onnx_exporter: ``"torchscript"`` (``torch.onnx.export(dynamo=False)``) or ``"dynamo"`` (needs onnxscript).
        opset: ONNX opset version.
        atol: the largest absolute difference accepted.
        seed: seed of the random check batches.

    Returns:
        An ``ExportResult``; ``result.ok`` is False when the exported file does not match eager PyTorch.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    if onnx_exporter not in ONNX_EXPORTERS:
        raise ValueError(f"onnx_exporter must be one of {ONNX_EXPORTERS}, got {onnx_exporter!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if fmt == "onnx":  # the check needs onnxruntime: fail before the export when the extra is missing
        import onnxruntime  # noqa: F401
    model, name, chw = load_model(source, num_classes=num_classes, model_args=model_args, image_size=image_size)
    model = model.float().cpu()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    example = torch.randn(batch_size, *chw, generator=gen)
    with torch.no_grad():
        _write(model, example, out, fmt, dynamic_batch=dynamic_batch, onnx_exporter=onnx_exporter, opset=opset)
    run = _runner(out, fmt)
    sizes = (batch_size, batch_size + 1) if dynamic_batch or fmt == "torchscript" else (batch_size,)
    diff = 0.0
    for b in sizes:
        x = torch.randn(b, *chw, generator=gen)
        with torch.no_grad():
            got = run(x)
        diff = max(diff, (got.float() - _eager(model, x)).abs().max().item())
    return ExportResult(path=out, format=fmt, model=name, input_shape=(batch_size, *chw), max_abs_diff=diff,
                        atol=atol, batch_sizes=sizes)
