"""``sasa export`` and ``sasa.export.export_model``: ONNX (run by onnxruntime), TorchScript and ExportedProgram files
of a run's weights or a model name, equal to eager PyTorch within 1e-4 (float32) at a fixed and a dynamic batch;
the command's exit status on a mismatch and on a missing ``[export]`` extra."""

from __future__ import annotations

import sys

import pytest
import torch

import sasa
from sasa import export as sasa_export
from sasa.cli import main

ARGS = {"kernel_size": 5, "padding": "mask"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory as ``sasa train`` leaves it: model.safetensors with the run's metadata."""
    pytest.importorskip("safetensors")
    from sasa.io.checkpoint import save_safetensors

    torch.manual_seed(0)
    model = sasa.create_model("test_sasa_resnet", num_classes=10, in_chans=1, **ARGS)
    for m in model.modules():  # trained-looking BN statistics, so eval mode is not the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    path = tmp_path_factory.mktemp("run")
    save_safetensors(path / "model.safetensors", model.state_dict(),
                     {"model": "test_sasa_resnet", "model_args": ARGS, "num_classes": 10, "in_chans": 1,
                      "image_size": 32, "dataset": "fashion-mnist"})
    return path


def _eager(run_dir, x):
    model, _, _ = sasa_export.load_model(run_dir)
    with torch.no_grad(), sasa.backends.force("shifted"):
        return model(x)


def test_onnx_dynamic_batch_runs_in_onnxruntime(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "model.onnx"
    result = sasa_export.export_model(run_dir, out, fmt="onnx", batch_size=2)
    assert result.ok and result.max_abs_diff < 1e-4 and result.batch_sizes == (2, 3)
    assert result.input_shape == (2, 1, 32, 32) and result.model == "test_sasa_resnet"
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(5, 1, 32, 32)
    got = torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    ref = _eager(run_dir, x)
    assert got.shape == (5, 10)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-4)


def test_onnx_static_batch_is_fixed(run_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "static.onnx"
    result = sasa_export.export_model(run_dir, out, fmt="onnx", batch_size=2, dynamic_batch=False)
    assert result.ok and result.batch_sizes == (2,)
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 1, 32, 32]
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(torch.from_numpy(session.run(None, {"image": x.numpy()})[0]), _eager(run_dir, x),
                               rtol=0, atol=1e-4)


@pytest.mark.parametrize("fmt", ["torchscript", pytest.param("exported-program", marks=pytest.mark.slow)])
def test_cli_writes_a_checked_file(run_dir, tmp_path, capsys, fmt):
    out = tmp_path / f"model.{fmt}"
    assert main(["export", str(run_dir), "--format", fmt, "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"ok: {out} ({fmt}, test_sasa_resnet, input (2, 1, 32, 32))")
    module = torch.jit.load(str(out)) if fmt == "torchscript" else torch.export.load(str(out)).module()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(module(x), _eager(run_dir, x), rtol=0, atol=1e-4)


def test_cli_model_name_and_mismatch_exit_status(tmp_path, capsys, monkeypatch):
    out = tmp_path / "m.pt"
    argv = ["export", "test_sasa_resnet", "--format", "torchscript", "--out", str(out), "--num-classes", "3",
            "--model-args", "kernel_size=5", "--image-size", "16"]
    assert main(argv) == 0
    assert "input (2, 3, 16, 16)" in capsys.readouterr().out
    assert torch.jit.load(str(out))(torch.randn(1, 3, 16, 16)).shape == (1, 3)
    eager = sasa_export._eager
    monkeypatch.setattr(sasa_export, "_eager", lambda model, x: eager(model, x) + 1e-3)
    assert main(argv) == 1
    assert capsys.readouterr().err.startswith("MISMATCH")


def test_cli_names_the_export_extra_and_bad_sources(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if the [export] extra were not installed
    assert main(["export", "test_sasa_resnet", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'sasa-vision[export]'" in capsys.readouterr().err
    assert main(["export", "no_such_model", "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    assert "neither a run directory, a weights file nor a model name" in capsys.readouterr().err
    assert main(["export", str(tmp_path), "--format", "torchscript", "--out", str(tmp_path / "m.pt")]) == 2
    assert "holds none of" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("name", [f"sasa_resnet{d}{s}" for d in (26, 38, 50) for s in ("", "_convstem")])
def test_onnx_every_timm_model(name, tmp_path):
    """Each of the six paper models (random weights, 64 px) through ONNX at a dynamic batch, checked at 2 and 3
    (a fixed batch exports the same graph with one more constant: test_onnx_static_batch_is_fixed)."""
    pytest.importorskip("onnxruntime")
    result = sasa_export.export_model(name, tmp_path / f"{name}.onnx", num_classes=10, image_size=64)
    assert result.ok and result.max_abs_diff < 1e-4 and result.batch_sizes == (2, 3), result.summary()


@pytest.mark.slow
def test_onnx_dynamo_exporter(run_dir, tmp_path):
    pytest.importorskip("onnxscript")
    result = sasa_export.export_model(run_dir, tmp_path / "dynamo.onnx", onnx_exporter="dynamo")
    assert result.ok and result.max_abs_diff < 1e-4 and result.batch_sizes == (2, 3)
