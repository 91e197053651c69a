"""The Makefile's set-up steps say what they do: `make data` installs Debian's Fashion-MNIST only as root."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _fake_bin(folder: Path, uid: int) -> Path:
    """``id -u`` that answers ``uid`` and an ``apt-get`` that only records its calls."""
    folder.mkdir()
    (folder / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (folder / "apt-get").write_text(f"#!/bin/sh\necho \"$@\" >> {folder / 'apt-calls'}\n")
    for tool in ("id", "apt-get"):
        (folder / tool).chmod(0o755)
    return folder


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
@pytest.mark.parametrize("uid", [0, 1000])
def test_make_data_installs_only_as_root_and_says_so(tmp_path, uid):
    fake = _fake_bin(tmp_path / "bin", uid)
    proc = subprocess.run(["make", "-s", "data", f"FMNIST={tmp_path / 'absent'}"], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "PATH": f"{fake}:{os.environ['PATH']}"}, check=False)
    assert proc.returncode == 0, proc.stderr
    calls = (fake / "apt-calls").read_text() if (fake / "apt-calls").exists() else ""
    if uid == 0:
        assert "with apt-get" in proc.stdout and "install -y -qq dataset-fashion-mnist" in calls
    else:
        assert "needs root" in proc.stdout and calls == ""
