"""``sasa bench --small``: the record's shape and fields (never a timing), and failures as rows."""

from __future__ import annotations

import json
import os

import pytest
import torch

import sasa
from sasa.cli import main


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # steadier on a loaded machine; restored for the other tests
    yield
    torch.set_num_threads(threads)


def _stats_ok(stats):
    assert set(stats) >= {"median", "min", "max", "q1", "q3", "repeats"}
    assert stats["min"] <= stats["median"] <= stats["max"]


@pytest.mark.slow
def test_bench_small_record(tmp_path, one_thread, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "--small", "--device", "cpu", "--profile", "3", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Layer (" in text and "Op (" in text and "Stem (" in text and "Model:" in text
    assert "unfold (reference)" in text
    record = json.loads(out.read_text())

    meta = record["meta"]
    for key in ("command", "commit", "dirty", "date", "device", "device_name", "torch", "dtype", "threads", "memory",
                "cpu_malloc"):
        assert key in meta, key
    assert meta["device"] == "cpu" and meta["dtype"] == "fp32" and meta["torch"] == torch.__version__
    assert meta["cpu_malloc"] != "default (not changed)"  # the bench sets the allocator as training does

    layer = record["layer"]
    shapes = record["layer_config"]["shapes"]
    impls = ["conv3x3"] + [{"reference": "unfold (reference)"}.get(b, b) for b in sasa.available_backends("cpu")]
    assert [(r["shape"], r["impl"]) for r in layer] == [(s, i) for s in shapes for i in impls]
    for r in layer:
        assert r["error"] is None, r
        assert r["batch"] == record["layer_config"]["batch"]
        _stats_ok(r["fwd_ms"])
        _stats_ok(r["fwd_bwd_ms"])
        assert r["peak_mb"] > 0
        assert r["fwd_vs_conv"] > 0 and r["fwd_bwd_vs_conv"] > 0
    assert all(r["fwd_bwd_vs_conv"] == 1.0 for r in layer if r["impl"] == "conv3x3")
    op = record["op"]
    assert [(r["shape"], r["impl"]) for r in op] == [(s, i if i == "conv3x3" else f"op {i}") for s in shapes
                                                     for i in impls]
    assert all(r["error"] is None and r["fwd_bwd_ms"]["median"] > 0 for r in op)
    stem = record["stem"]
    assert [r["impl"] for r in stem] == ["conv7x7/2 stem", "attention stem", "attention stem textbook"]
    assert all(r["error"] is None and r["peak_mb"] > 0 and r["fwd_bwd_vs_conv"] > 0 for r in stem)
    assert stem[0]["batch"] == record["model_config"]["batch"] and stem[0]["height"] == 32

    models = record["model"]
    assert [r["model"] for r in models] == record["model_config"]["models"]
    for r in models:
        assert r["error"] is None, r
        _stats_ok(r["train_ms"])
        _stats_ok(r["infer_ms"])
        assert r["train_img_s"] > 0 and r["infer_img_s"] > 0 and r["peak_mb"] > 0 and r["params_m"] > 0
        assert r["vs_conv"] > 0
        assert len(r["profile"]) == 3 and {"op", "self_ms", "share", "calls"} <= set(r["profile"][0])
    assert models[0]["backend"] is None and models[0]["vs_conv"] == 1.0
    assert models[1]["backend"].endswith("(SASA_BACKEND)" if os.environ.get("SASA_BACKEND") else "(auto)")


@pytest.mark.slow
def test_bench_model_arguments(tmp_path, one_thread):
    from sasa.bench.model import parse_model

    assert parse_model("sasa_resnet26@recompute_qkv=True@kernel_size=5") == (
        "sasa_resnet26", {"recompute_qkv": True, "kernel_size": 5})
    out = tmp_path / "bench.json"
    models = "test_resnet,test_sasa_resnet@recompute_qkv=True,test_sasa_resnet@no_such_arg=1"
    assert main(["bench", "--small", "--device", "cpu", "--mode", "model", "--models", models, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["model"]
    assert rows[1]["model"] == "test_sasa_resnet@recompute_qkv=True" and rows[1]["error"] is None
    assert "no_such_arg" in rows[2]["error"]


def test_bench_failing_backend_is_a_row(tmp_path, one_thread):
    out = tmp_path / "bench.json"
    args = ["bench", "--small", "--device", "cpu", "--mode", "layer", "--shapes", "4x4x16", "--backends",
            "shifted,no-such-backend", "--out", str(out)]
    assert main(args) == 0
    rows = json.loads(out.read_text())["layer"]
    assert [r["impl"] for r in rows] == ["conv3x3", "shifted", "no-such-backend"]
    assert rows[1]["error"] is None
    assert "no-such-backend" in rows[2]["error"] and "fwd_ms" not in rows[2]


def test_bench_bad_arguments(capsys):
    assert main(["bench", "--small", "--device", "cpu", "--shapes", "32x32"]) == 2
    assert "HxWxC" in capsys.readouterr().err
    assert main(["bench", "--small", "--device", "cpu", "--mode", "layer,speed"]) == 2
    assert "--mode" in capsys.readouterr().err
    assert main(["bench", "--small", "--device", "cpu", "--dtype", "bf16"]) == 2


def test_bench_tables_print_clean(one_thread, capfd):
    """The profiler behind peak MB and --profile writes native lines to stderr (Kineto's USDT start / stop trace,
    its GPU probe, c10's note on earlier allocations); none may reach the terminal between the tables."""
    assert main(["bench", "--small", "--device", "cpu", "--mode", "stem,model", "--models", "test_resnet",
                 "--profile", "2"]) == 0
    out, err = capfd.readouterr()
    assert "Top operators of one training step, test_resnet" in out
    for noise in ("USDT", "profiler_start", "gpuGetDeviceCount", "allocated before the profiling started"):
        assert noise not in out + err, noise
