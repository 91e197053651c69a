"""Subprocess helper for the multi-process tests: a command in its own process group, killed whole on timeout."""

from __future__ import annotations

import os
import signal
import subprocess


def run_group(cmd: list[str], *, env: dict | None = None, cwd=None,
              timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group; on timeout the whole group (torchrun and its workers) is killed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
