"""``sasa train`` / ``sasa eval`` end to end on tiny models and data: run-directory contents, SIGKILL + resume and
SIGTERM + resume equal an uninterrupted run bit for bit, bad input of every kind fails early with a message naming
it (or, for unreadable images, is skipped and counted). 2-process DDP against 1 process: tests/test_distributed.py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from sasa.cli import main
from sasa.io.checkpoint import load_checkpoint, load_safetensors

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model", "test_resnet", "--dataset", "synthetic", "--train-subset", "320", "--batch-size", "32",
        "--epochs", "2", "--checkpoint-every", "5", "--log-every", "5", "--threads", "1", "--seed", "3",
        "--ema-decay", "0.9", "--optimizer", "sgd", "--lr", "0.1", "--quiet"]
# 10 steps per epoch; mid-epoch checkpoints at steps 5, 15; one loader worker (the default) in every run


def _env() -> dict:
    return {**os.environ, "SASA_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _sasa(*args: str, cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sasa", *args], capture_output=True, text=True, env=_env(),
                          cwd=cwd or ROOT, timeout=timeout, check=False)


def _weights(run: Path, name: str = "model.safetensors") -> dict:
    return load_safetensors(run / name)[0]


def _assert_same_weights(a: Path, b: Path, *, atol: float = 0.0) -> None:
    for name in ("model.safetensors", "model_ema.safetensors"):
        wa, wb = _weights(a, name), _weights(b, name)
        assert wa.keys() == wb.keys()
        for k in wa:
            if atol == 0.0:
                assert torch.equal(wa[k], wb[k]), f"{name}:{k} differs"
            else:
                assert torch.allclose(wa[k].double(), wb[k].double(), rtol=1e-4, atol=atol), f"{name}:{k} differs"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> Path:
    """The uninterrupted run every interrupted one is compared with."""
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = _sasa("train", *TINY, "--output", str(run))
    assert proc.returncode == 0, proc.stderr + proc.stdout
    return run


def _start_and_wait_for_checkpoint(run: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "sasa", "train", *TINY, "--output", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=_env(), cwd=ROOT)
    deadline = time.time() + 180
    while not (run / "last.pt").exists():
        assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stdout.read()}"
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.005)
    return proc


@pytest.mark.slow
def test_run_directory_contents(reference_run):
    run = reference_run
    for name in ("config.yaml", "env.json", "metrics.jsonl", "last.pt", "best.pt", "model.safetensors",
                 "model_ema.safetensors", "metrics.png", "summary.json"):
        assert (run / name).is_file(), name
    summary = json.loads((run / "summary.json").read_text())
    for key in ("model", "dataset", "epochs", "top1", "top1_ema", "wall_s"):
        assert key in summary, key
    assert summary["model"] == "test_resnet" and summary["epochs"] == 2 and summary["top1"] > 15
    env = json.loads((run / "env.json").read_text())
    assert env["torch"] == torch.__version__ and "commit" in env and env["device"] == "cpu"
    assert env["attention_backend"] == "shifted (SASA_BACKEND)"  # tests/conftest.py sets it
    assert env["cpu_malloc"] != "default (not changed)"  # `sasa train` applies the process settings (sasa.process)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "step"] == [5, 10, 15, 20]
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    meta = load_safetensors(run / "model.safetensors")[1]
    assert meta["model"] == "test_resnet" and meta["num_classes"] == 10


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(reference_run, tmp_path):
    run = tmp_path / "killed"
    proc = _start_and_wait_for_checkpoint(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL and not (run / "summary.json").exists()
    progress = load_checkpoint(run / "last.pt")["progress"]
    assert progress["global_step"] < 20
    resumed = _sasa("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    assert "resuming" in resumed.stdout
    _assert_same_weights(reference_run, run)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "step"]
    assert steps == [5, 10, 15, 20]  # records written after the checkpoint by the killed run were dropped


@pytest.mark.slow
def test_sigterm_saves_exits_cleanly_and_resumes(reference_run, tmp_path):
    run = tmp_path / "term"
    proc = _start_and_wait_for_checkpoint(run)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived (machine too fast for this test's timing)")
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "stopped by SIGTERM" in out and f"sasa train --resume {run}" in out and "Traceback" not in out
    assert load_checkpoint(run / "last.pt")["progress"]["global_step"] < 20
    resumed = _sasa("train", "--resume", str(run))
    assert resumed.returncode == 0, resumed.stderr + resumed.stdout
    _assert_same_weights(reference_run, run)


@pytest.mark.slow
def test_eval_run_dir_table_and_json(reference_run, tmp_path, capsys):
    out = tmp_path / "eval.json"
    assert main(["eval", str(reference_run), "--output", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "top-1" in printed and "top-5" in printed
    result = json.loads(out.read_text())
    summary = json.loads((reference_run / "summary.json").read_text())
    assert result["top1"] == pytest.approx(summary["top1"]) and result["images"] == 512
    assert main(["eval", str(reference_run / "last.pt"), "--ema", "--output", str(out), "--quiet"]) == 0
    assert json.loads(out.read_text())["top1"] == pytest.approx(summary["top1_ema"])


def _tree(root: Path, corrupt: int) -> Path:
    for split in ("train", "val"):
        for c, cls in enumerate(("a", "b")):
            (root / split / cls).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (20, 20), (100 * c + 10 * i, 50, 200 - 100 * c)).save(root / split / cls / f"{i}.png")
    for i in range(corrupt):
        (root / "train" / "a" / f"broken{i}.jpg").write_bytes(b"\xff\xd8 truncated jpeg")
    return root


@pytest.mark.slow
def test_unreadable_images_are_skipped_counted_and_bounded(tmp_path, capsys):
    tree = _tree(tmp_path / "tree", corrupt=1)
    args = ["train", "--model", "test_resnet", "--dataset", "imagefolder", "--data-dir", str(tree), "--image-size",
            "16", "--batch-size", "4", "--epochs", "1", "--threads", "1", "--quiet"]
    assert main([*args, "--max-bad-fraction", "0.1", "--output", str(tmp_path / "ok")]) == 0
    summary = json.loads((tmp_path / "ok" / "summary.json").read_text())
    assert summary["bad_train_images"] == 1 and "broken0.jpg" in summary["bad_examples"][0]
    assert "skipped 1 unreadable" in capsys.readouterr().out
    assert main([*args, "--max-bad-fraction", "0", "--output", str(tmp_path / "strict")]) == 1
    out = capsys.readouterr().out
    assert "unreadable training samples" in out and "broken0.jpg" in out and "max_bad_fraction=0.0" in out


@pytest.mark.slow
def test_eval_mismatched_model_or_classes(reference_run, tmp_path, capsys):
    assert main(["eval", str(reference_run / "model.safetensors"), "--model", "resnet26"]) == 2
    assert "written for model 'test_resnet'" in capsys.readouterr().err
    tree = _tree(tmp_path / "tree", corrupt=0)
    assert main(["eval", str(reference_run), "--dataset", "imagefolder", "--data-dir", str(tree)]) == 2
    assert "num_classes=10" in capsys.readouterr().err


@pytest.mark.slow
def test_resume_with_other_model_fails_naming_it(reference_run, tmp_path, capsys):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(reference_run, run)
    cfg = (run / "config.yaml").read_text().replace("model: test_resnet", "model: test_sasa_resnet")
    (run / "config.yaml").write_text(cfg)
    assert main(["train", "--resume", str(run)]) == 2
    assert "written for model 'test_resnet'" in capsys.readouterr().err
    assert main(["train", "--resume", str(reference_run), "--lr", "1.0"]) == 2
    assert "'lr' cannot change on --resume" in capsys.readouterr().err


def test_config_errors_fail_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SASA_NO_DOWNLOAD", "1")
    (tmp_path / "bad.yaml").write_text("epochs: 1\nwarmup_epoch: 2\n")
    out = tmp_path / "never"
    assert main(["train", "--config", str(tmp_path / "bad.yaml"), "--output", str(out)]) == 2
    assert "'warmup_epoch'" in capsys.readouterr().err
    assert main(["train", "--data-dir", str(tmp_path / "missing"), "--output", str(out)]) == 2
    assert "'data_dir'" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()  # a named folder without the data is an error, never silently another source
    assert main(["train", "--data-dir", str(tmp_path / "empty"), "--output", str(out)]) == 2
    assert f"in {tmp_path / 'empty'}: missing train-images-idx3-ubyte" in capsys.readouterr().err
    assert main(["train", "--dataset", "imagefolder", "--output", str(out)]) == 2
    assert "data_dir is required" in capsys.readouterr().err
    assert main(["train", "--model-args", "kernel_size=4", "--output", str(out)]) == 2
    assert "model_args" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--epochs", "many"])
    assert "--epochs" in capsys.readouterr().err
    assert not out.exists()


def test_non_finite_loss_from_the_command_line(tmp_path, capsys):
    run = tmp_path / "nan"
    rc = main(["train", "--model", "test_resnet", "--dataset", "synthetic", "--train-subset", "128", "--batch-size",
               "32", "--epochs", "3", "--optimizer", "sgd", "--lr", "1e30", "--warmup-epochs", "0", "--momentum", "0",
               "--checkpoint-every",
               "1", "--threads", "1", "--quiet", "--output", str(run)])
    out = capsys.readouterr().out
    assert rc == 1 and "non-finite training loss at epoch" in out and "global step" in out
    state = load_checkpoint(run / "last.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert not (run / "summary.json").exists()


def _snapshot(run: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(run.iterdir())}


def _copy(run: Path, to: Path) -> Path:
    import shutil

    shutil.copytree(run, to, copy_function=shutil.copy2)
    return to


@pytest.mark.slow
def test_resume_of_a_finished_run_changes_nothing(reference_run, tmp_path, capsys):
    run = _copy(reference_run, tmp_path / "done")
    before = _snapshot(run)
    assert main(["train", "--resume", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"{run} is complete: 2 epochs" in out and f"sasa train --resume {run} --epochs N" in out
    assert _snapshot(run) == before  # not a byte, not a timestamp


@pytest.mark.slow
def test_resume_a_finished_run_to_more_epochs(reference_run, tmp_path):
    run = _copy(reference_run, tmp_path / "more")
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["epochs"] == 3 and load_checkpoint(run / "last.pt")["progress"]["epoch"] == 3
    env = json.loads((run / "env.json").read_text())
    assert env["argv"] == json.loads((reference_run / "env.json").read_text())["argv"]  # the first start is kept
    assert [r["resumed_from"] for r in env["resumes"]] == ["last.pt"]


@pytest.mark.slow
def test_resume_after_training_but_before_the_summary_finishes_it(reference_run, tmp_path):
    run = _copy(reference_run, tmp_path / "unfinished")
    (run / "summary.json").unlink()
    (run / "model.safetensors").unlink()
    assert main(["train", "--resume", str(run), "--quiet"]) == 0
    ref = json.loads((reference_run / "summary.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["top1"], summary["top1_ema"], summary["epochs"]) == (ref["top1"], ref["top1_ema"], 2)
    _assert_same_weights(reference_run, run)


class _Crash(Exception):
    """Stands for a kill, a full disk or an I/O error at the moment a file is committed."""


def _readable(run: Path) -> None:
    """Every file of the run directory parses as what it is."""
    import yaml

    for name in ("last.pt", "last.prev.pt", "best.pt"):
        assert load_checkpoint(run / name)["progress"]
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert load_safetensors(run / name)[0]
    assert yaml.safe_load((run / "config.yaml").read_text())["model"] == "test_resnet"
    assert json.loads((run / "env.json").read_text())["torch"] == torch.__version__
    assert isinstance(json.loads((run / "summary.json").read_text())["top1"], float)
    assert (run / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    assert all(json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())


@pytest.mark.parametrize("target", [
    "summary.json",
    pytest.param("config.yaml", marks=pytest.mark.slow), pytest.param("env.json", marks=pytest.mark.slow),
    pytest.param("metrics.jsonl", marks=pytest.mark.slow), pytest.param("last.prev.pt", marks=pytest.mark.slow),
    pytest.param("last.pt", marks=pytest.mark.slow), pytest.param("best.pt", marks=pytest.mark.slow),
    pytest.param("model.safetensors", marks=pytest.mark.slow),
    pytest.param("model_ema.safetensors", marks=pytest.mark.slow), pytest.param("metrics.png", marks=pytest.mark.slow),
])
@pytest.mark.slow
def test_a_write_that_fails_leaves_the_run_directory_whole(reference_run, tmp_path, monkeypatch, target):
    """Break each file a run writes at its commit and check that the file is the previous one, that nothing half
    written or temporary is left, and that the run then resumes to the end."""
    run = _copy(reference_run, tmp_path / "broken")
    before = _snapshot(run)
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == run / target:
            if os.stat(src).st_nlink == 1:  # (last.prev.pt's temporary is a hard link to last.pt: no write there)
                Path(src).write_bytes(b"torn")  # what a half-finished write leaves, were it not a temporary file
            raise _Crash(target)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    if target == "metrics.png":  # a plot that cannot be drawn is a warning, never a failed run
        assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    else:
        with pytest.raises(_Crash):
            main(["train", "--resume", str(run), "--epochs", "3", "--quiet"])
    monkeypatch.setattr(os, "replace", real_replace)
    assert run.joinpath(target).read_bytes() == before[target][0]
    assert sorted(p.name for p in run.iterdir()) == sorted(before)  # no temporary file left behind
    _readable(run)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    _readable(run)


@pytest.mark.slow
def test_unreadable_last_checkpoint_names_the_usable_ones(reference_run, tmp_path, capsys):
    run = _copy(reference_run, tmp_path / "corrupt")
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])  # a checkpoint copied half-way
    assert main(["train", "--resume", str(run), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "last.pt' is unreadable" in err and f"sasa train --resume {run / 'last.prev.pt'}" in err
    assert f"sasa eval {run / 'best.pt'}" in err and f"sasa train --config {run / 'config.yaml'}" in err
    assert main(["train", "--resume", str(run / "last.prev.pt"), "--epochs", "3", "--quiet"]) == 0
    assert json.loads((run / "summary.json").read_text())["epochs"] == 3
    _readable(run)
