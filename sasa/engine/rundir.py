"""A training run's directory and resuming it, for every task (``sasa train`` and ``sasa detect-train``).

A run directory holds ``config.yaml``, ``env.json`` (a resumed run appends to ``resumes``), ``metrics.jsonl``,
``last.pt`` (full training state), ``last.prev.pt`` (the one before), ``best.pt`` and, once finished,
``summary.json``; every file is written atomically, by rank 0 only. ``--resume`` takes a run directory or a
checkpoint in one; the run's own ``config.yaml`` is used and only the config's ``resumable`` keys may change. A
finished run is left as it is; an unreadable checkpoint fails naming the usable files and their commands.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from ..io.atomic import atomic_write_text, keep_previous
from ..io.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from . import config as C
from .distributed import DistInfo, barrier, broadcast_object
from .metrics import MetricsLogger

LAST, BEST, PREVIOUS = "last.pt", "best.pt", "last.prev.pt"  # PREVIOUS: the checkpoint before LAST
EVAL_COMMANDS = {"sasa train": "sasa eval", "sasa detect-train": "sasa detect-eval"}


def say(dist: DistInfo, msg: str) -> None:
    if dist.is_main:
        print(msg, flush=True)


def resume_paths(resume: str | os.PathLike) -> tuple[Path, Path]:
    """``(run directory, checkpoint)`` of ``--resume``: a run directory (its ``last.pt``) or a checkpoint in one."""
    path = Path(resume)
    if path.is_file():
        return path.parent, path
    return path, path / LAST


def _checkpoint_summary(path: Path) -> str | None:
    """``"epoch 2, step 15, full training state"`` for a readable checkpoint, ``None`` for an unreadable one."""
    try:
        state = load_checkpoint(path, mmap=True)
        p = state["progress"]
    except (CheckpointError, FileNotFoundError, KeyError, TypeError):
        return None
    kind = "full training state" if "optimizer" in state else "weights only"
    where = (f"end of epoch {p['epoch']}" if not p.get("batches_done") else
             f"epoch {p['epoch'] + 1}, batch {p['batches_done']}")
    return f"{where}, global step {p['global_step']}; {kind}"


def unusable_checkpoint_message(run_dir: Path, ckpt: Path, reason: str, command: str = "sasa train") -> str:
    """The error for a checkpoint that cannot be resumed from: what else in ``run_dir`` is usable, and how."""
    evaluate = EVAL_COMMANDS[command]
    lines = [f"--resume {str(run_dir)!r}: {reason}", "usable files in the run directory:"]
    found = False
    previous = run_dir / PREVIOUS
    if previous != ckpt and (about := _checkpoint_summary(previous)):
        lines.append(f"  {PREVIOUS} ({about}): continue training from it with\n      {command} --resume {previous}")
        found = True
    if (about := _checkpoint_summary(run_dir / BEST)):
        lines.append(f"  {BEST} (best evaluation, {about}): evaluate or export it with\n"
                     f"      {evaluate} {run_dir / BEST}")
        found = True
    if (run_dir / "model.safetensors").is_file():
        lines.append(f"  model.safetensors (final weights): {evaluate} {run_dir / 'model.safetensors'}")
        found = True
    if not found:
        lines.append("  none")
    if (run_dir / "config.yaml").is_file():
        lines.append(f"or start the same run again: {command} --config {run_dir / 'config.yaml'} --output NEW_DIR")
    return "\n".join(lines)


def load_resume_checkpoint(run_dir: Path, ckpt: Path, map_location="cpu", command: str = "sasa train", *,
                           mmap: bool = False) -> dict:
    try:
        state = load_checkpoint(ckpt, map_location=map_location, mmap=mmap)
    except CheckpointError as err:
        raise CheckpointError(unusable_checkpoint_message(run_dir, ckpt, str(err), command)) from err
    if "progress" not in state:
        raise CheckpointError(unusable_checkpoint_message(
            run_dir, ckpt, f"{ckpt.name} holds no training progress (written by an older sasa: keys "
                           f"{sorted(state)})", command))
    return state


def config_for_resume(resume: str | os.PathLike, overrides: dict, *, schema: type = C.TrainConfig,
                      command: str = "sasa train") -> C.RunConfig:
    """The config saved in the run directory, with the few keys a resumed run may change (``schema.resumable``)."""
    run_dir, ckpt = resume_paths(resume)
    if not ckpt.is_file():
        if not run_dir.is_dir():
            raise C.ConfigError(f"--resume {str(resume)!r}: no such run directory")
        raise C.ConfigError(unusable_checkpoint_message(
            run_dir, ckpt, f"no {ckpt.name} there (not a run directory, or it never reached its first checkpoint)",
            command))
    import yaml

    saved = yaml.safe_load((run_dir / "config.yaml").read_text()) if (run_dir / "config.yaml").is_file() else None
    if saved is None:
        saved = load_resume_checkpoint(run_dir, ckpt, command=command)["config"]
    cfg = C.from_dict(saved, source=str(run_dir / "config.yaml"), schema=schema)
    for k, v in overrides.items():
        if k in ("resume", "config"):
            continue
        if k not in schema.resumable and v != getattr(cfg, k):
            raise C.ConfigError(f"config key {k!r} cannot change on --resume ({getattr(cfg, k)!r} -> {v!r}); "
                                f"only {', '.join(schema.resumable)} can")
        setattr(cfg, k, C.check_value(k, v, source="command line", schema=schema))
    cfg.resume = str(ckpt if ckpt.name != LAST else run_dir)
    cfg.output = str(run_dir)
    return cfg.validate()


def finished_summary(cfg: C.RunConfig, *, check: Callable[[dict, str], None], complete: Callable[[dict], bool],
                     command: str = "sasa train") -> dict | None:
    """The run's ``summary.json`` when ``--resume`` names a run that has nothing left to do: its checkpoint has
    trained ``cfg.epochs`` epochs (or more) and ``complete(summary)``. ``None`` when there is work left.
    ``check(meta, source)`` raises when the checkpoint belongs to another model."""
    run_dir, ckpt = resume_paths(cfg.resume)
    state = load_resume_checkpoint(run_dir, ckpt, command=command, mmap=True)  # start() reads the tensors
    check(state.get("meta", {}), str(ckpt))
    epoch = state["progress"]["epoch"]
    if epoch < cfg.epochs:
        return None
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None  # trained to the end but stopped before its final evaluation: finish it
    if not isinstance(summary, dict) or summary.get("epochs") != epoch or not complete(summary):
        return None
    return summary


def say_finished(run_dir: Path, summary: dict, result: str, command: str = "sasa train") -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{command}: {run_dir} is complete: {summary['epochs']} epochs, {result} (summary.json); nothing to "
              f"do, nothing changed.\nTo train it further: {command} --resume {run_dir} --epochs N "
              f"(N > {summary['epochs']})", flush=True)


class RunDirectory:
    """The run directory of ``cfg`` (``cfg.output`` or ``default_name``, or the one ``cfg.resume`` names) and the
    writes into it; ``meta`` (model name, classes, ...) goes into every checkpoint and is compared on resume by the
    caller's ``check``; ``command`` names the command in messages."""

    def __init__(self, cfg: C.RunConfig, dist: DistInfo, *, default_name: str, command: str, meta: dict) -> None:
        self.cfg, self.dist, self.command, self.meta = cfg, dist, command, meta
        self.started = time.time()
        if cfg.resume:
            self.path, self.checkpoint = resume_paths(cfg.resume)
        else:
            self.path, self.checkpoint = Path(broadcast_object(cfg.output or default_name)), None
            if (self.path / LAST).exists():
                raise C.ConfigError(f"config key 'output': {str(self.path)!r} already holds a run ({LAST}); continue "
                                    f"it with --resume {self.path} or choose another --output")
        self.logger = MetricsLogger(self.path, enabled=dist.is_main)
        self.trainer = None
        # last.pt is linked to last.prev.pt before each new one replaces it, so an unreadable checkpoint still has
        # a predecessor; not while last.pt is the unreadable one.
        self._last_is_good = self.checkpoint is None or self.checkpoint.name == LAST

    def save(self, kind: str) -> None:
        """The trainer's ``save`` callback: ``last.pt`` (full state) or ``best.pt`` (weights and progress)."""
        if not self.dist.is_main:
            return
        state = self.trainer.state_dict()
        state["progress"]["elapsed_s"] = self.trainer.progress.elapsed_s + (time.time() - self.started)
        if kind == "best":
            state = {k: state[k] for k in ("model", "ema", "progress") if k in state}
        state.update(meta=self.meta, config=C.to_dict(self.cfg))
        if kind == "last" and self._last_is_good:
            keep_previous(self.path / LAST, self.path / PREVIOUS)
        save_checkpoint(self.path / (LAST if kind == "last" else BEST), state)
        self._last_is_good = self._last_is_good or kind == "last"

    def start(self, trainer, env: dict, *, check: Callable[[dict, str], None]) -> None:
        """Attach ``trainer``; on resume load its checkpoint (``check(meta, source)`` first) and drop the metrics
        written after it; write ``config.yaml`` and ``env.json``."""
        self.trainer = trainer
        if self.checkpoint is not None:
            state = load_resume_checkpoint(self.path, self.checkpoint, map_location=self.dist.device,
                                           command=self.command)
            check(state.get("meta", {}), str(self.checkpoint))
            trainer.load_state_dict(state)
            p = trainer.progress
            self.logger.truncate(lambda r: r.get("step", 0) <= p.global_step)
            say(self.dist, f"resuming {self.path} at epoch {p.epoch + 1}, batch {p.batches_done}/"
                           f"{trainer.steps_per_epoch} (global step {p.global_step})")
        if self.dist.is_main:
            self.path.mkdir(parents=True, exist_ok=True)
            C.dump_yaml(self.cfg, self.path / "config.yaml")
            atomic_write_text(self.path / "env.json", json.dumps(self._env_record(env), indent=2))

    def _env_record(self, env: dict) -> dict:
        """``env.json``: the environment the run started in; a resumed run keeps it and appends its own to
        ``resumes`` (an unreadable earlier file is replaced)."""
        if self.checkpoint is not None:
            try:
                first = json.loads((self.path / "env.json").read_text())
            except (OSError, ValueError):
                first = None
            if isinstance(first, dict):
                first.setdefault("resumes", []).append({**env, "resumed_from": self.checkpoint.name})
                return first
        return env

    def stopped(self, stop) -> int:
        """Say where a stopped run stands and how to continue it; the exit code (128 + signal number)."""
        p, signum = self.trainer.progress, stop.signum or signal.SIGTERM
        say(self.dist, f"{self.command}: stopped by {signal.Signals(signum).name} at epoch {p.epoch + 1}, batch "
                       f"{p.batches_done}/{self.trainer.steps_per_epoch} (global step {p.global_step}); checkpoint "
                       f"saved to {self.path / LAST}.\nResume with: {self.command} --resume {self.path}")
        barrier()
        return 128 + int(signum)
