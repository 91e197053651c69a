"""The command line stays quiet and never waits without need: commands that only count or list never compile, torch's
toolchain notices that say nothing to the user are dropped, and compiled kernels are found again by a later process
(``sasa train --resume``) even when its temporary directory is another one."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sasa.backends import inductor
from sasa.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _env(**changes: str | None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


@pytest.mark.slow
def test_counting_and_listing_never_compile(tmp_path, monkeypatch, capsys):
    """``sasa info`` and ``sasa show-attention --list-layers`` on the default CPU backend (conftest's SASA_BACKEND
    unset) never reach the inductor backend's compiled loops, whatever the models (sasa_resnet26: attention stem)."""
    from PIL import Image

    compiled = []
    monkeypatch.setattr(inductor, "_run", lambda name, args: compiled.append(name))  # None: the eager fallback
    monkeypatch.delenv("SASA_BACKEND", raising=False)
    image = tmp_path / "in.png"
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8), "RGB").save(image)

    assert main(["info", "sasa_resnet26", "sasa_resnet26_convstem"]) == 0
    assert main(["show-attention", "--model", "test_sasa_resnet", "--image", str(image), "--list-layers"]) == 0
    out = capsys.readouterr().out
    assert "sasa_resnet26 " in out and "layer1.0.conv2" in out
    assert compiled == []

    monkeypatch.setenv("SASA_BACKEND", "inductor")  # a forced backend does not reach counting either
    assert main(["info", "sasa_resnet26"]) == 0
    assert compiled == []


@pytest.mark.skipif(torch.version.cuda is None or torch.cuda.is_available(),
                    reason="only a CUDA build of torch on a machine without a GPU logs the notice")
@pytest.mark.slow
def test_cli_drops_the_cuda_home_notice(tmp_path):
    """A CUDA build of torch on a machine without a GPU logs "No CUDA runtime is found, using CUDA_HOME=..." when
    torch.compile loads its C++-extension helper; the command line drops it (and nothing else)."""
    code = ("from sasa.cli import main; main(['info', '--list']); import torch.utils.cpp_extension; import logging; "
            "logging.getLogger('torch.utils.cpp_extension').warning('another message')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=_env(CUDA_HOME=str(tmp_path)), cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "No CUDA runtime is found" not in proc.stderr and "another message" in proc.stderr


def test_inductor_cache_dir_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main(["info", "--list"]) == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "sasa" / "inductor")

    from torch._inductor.runtime.cache_dir_utils import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    cache_dir()  # torch's lookup writes its default (in the temporary directory) into the environment
    assert main(["info", "--list"]) == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "xdg" / "sasa" / "inductor")

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice stays
    assert main(["info", "--list"]) == 0
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")


@pytest.mark.slow
def test_a_later_process_loads_the_compiled_kernels(tmp_path):
    """Two processes with different temporary directories (a run and its resume in two batch jobs): the second finds
    the first one's compiled forward and backward in Inductor's cache instead of compiling them again."""
    code = ("from sasa.cli import main; from sasa.backends import inductor; from torch._dynamo.utils import counters; "
            "assert main(['bench', '--small', '--device', 'cpu', '--mode', 'op', '--backends', 'inductor', "
            "'--shapes', '8x8x16']) == 0; "
            "print('fxgraph', counters['inductor']['fxgraph_cache_hit'], counters['inductor']['fxgraph_cache_miss']); "
            "print('calls', inductor.calls())")
    hits = []
    for job in ("first", "second"):
        tmp = tmp_path / f"tmp-{job}"
        tmp.mkdir()
        env = _env(SASA_BACKEND=None, TORCHINDUCTOR_CACHE_DIR=None, TMPDIR=str(tmp), XDG_CACHE_HOME=str(tmp_path))
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT,
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        calls = ast.literal_eval(proc.stdout.rsplit("calls", 1)[1].strip())
        assert calls["fallback"] == {"forward": 0, "backward": 0}, proc.stderr[-3000:]  # the compiled loops ran
        assert calls["compiled"]["forward"] > 0 and calls["compiled"]["backward"] > 0
        hits.append([int(n) for n in proc.stdout.rsplit("fxgraph", 1)[1].split("calls")[0].split()])
    (_, compiled), (hit_later, compiled_later) = hits
    assert compiled >= 2  # a fresh cache: forward and backward (and any specialisation) compiled
    assert hit_later >= 2 and compiled_later == 0  # every graph found again
