"""The one training loop (detectron2's ``train_loop.py`` shape): epochs of optimizer steps on objects built
elsewhere; a task says what a step and an evaluation are (``classify.ClassificationTask``,
``sasa.detection.task.DetectionTask``): ``sums`` (names of the per-step sums), ``score`` (the evaluation key that
picks ``best.pt``, higher is better), ``step(model, batch) -> StepResult``, ``evaluate(module, ema_module,
show_progress)``, ``summarize(sums, count)`` and ``format_epoch(record, epochs)``.

Whatever the task: ``Progress`` is in every checkpoint, so a resumed run restarts the sampler mid-epoch exactly;
one ``all_reduce`` per step carries the sums and the non-finite / stop / empty-batch flags, so every rank decides
alike and none hangs; a non-finite loss raises ``NonFiniteLossError`` before the backward pass (weights and the
last checkpoint stay good); more than ``max_bad_fraction`` unreadable samples in an epoch raise
``TooManyBadSamplesError``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from tqdm import tqdm

from ..io.checkpoint import load_state_dict_checked
from .distributed import DistInfo, reduce_sum
from .metrics import MetricsLogger
from .signals import GracefulStop


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TooManyBadSamplesError(RuntimeError):
    """More unreadable samples than the configured fraction."""


class StepResult(NamedTuple):
    """What a task's ``step`` returns: the loss to back-propagate (``None`` for an empty batch), the sums named by
    ``task.sums`` (a float64 tensor), the number of samples, and ``"where: why"`` of the unreadable ones."""

    loss: torch.Tensor | None
    sums: torch.Tensor
    count: int
    bad: list


def autocast(device: torch.device, dtype: torch.dtype | None):
    """``torch.autocast`` to ``dtype`` on ``device``, or nothing when ``dtype`` is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the config key ``amp`` (``auto``: bf16 on CUDA, none on CPU)."""
    return torch.bfloat16 if amp == "bf16" or (amp == "auto" and device.type == "cuda") else None


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint (plain numbers only)."""

    epoch: int = 0  # current epoch, 0-based
    batches_done: int = 0  # batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken
    best_score: float = -1.0
    best_epoch: int = -1
    elapsed_s: float = 0.0  # wall time of earlier segments of a resumed run
    ep_sums: dict = field(default_factory=dict)  # running sums of the task's `sums` over the current epoch
    ep_count: float = 0.0
    ep_bad: float = 0.0
    bad_train_total: float = 0.0
    bad_examples: list = field(default_factory=list)  # "path: reason" of the first unreadable samples

    @classmethod
    def from_dict(cls, d: dict) -> Progress:
        d = dict(d)
        if "ep_loss_sum" in d:  # written by the classification loop before tasks shared this one
            d["ep_sums"] = {"loss": d.pop("ep_loss_sum"), "correct": d.pop("ep_correct")}
            d["best_score"] = d.pop("best_top1")
        return cls(**d)


class Trainer:
    """Runs epochs of training and evaluation for ``task`` on objects built elsewhere.

    Args:
        model: what the forward pass runs (possibly DDP- and/or compile-wrapped); ``module``: the bare model.
        optimizer, scheduler: stepped once per batch (``scheduler`` may be None).
        train_loader: its sampler must be a ``ResumableDistributedSampler``; a dataset with ``set_epoch`` gets it.
        ema: an ``AveragedModel`` updated after every step, evaluated beside the raw weights (or None).
        amp_dtype: autocast dtype or None; ``grad_clip``: max gradient norm (0: off).
        log_every, checkpoint_every, eval_every: steps between step records, steps between mid-epoch
            ``save("last")`` (0: epoch ends only), epochs between evaluations (0: only after the last).
        max_steps: stop after this many optimizer steps (smoke runs; the schedule still spans ``epochs``).
        save: ``save(kind)``, ``kind`` in ``"last"``, ``"best"``; called on every rank.
        stop: a ``GracefulStop`` polled once per step (or None).
        max_bad_fraction: tolerated fraction of unreadable training samples per epoch.
        quiet: no progress bar; a log line every ``log_every`` steps instead. ``print_fn``: where rank 0 prints.
    """

    def __init__(self, *, task, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 train_loader, dist: DistInfo, epochs: int, ema: nn.Module | None = None,
                 amp_dtype: torch.dtype | None = None, grad_clip: float = 0.0, logger: MetricsLogger | None = None,
                 log_every: int = 50, checkpoint_every: int = 0, eval_every: int = 1, max_steps: int | None = None,
                 save: Callable[[str], None] | None = None, stop: GracefulStop | None = None,
                 max_bad_fraction: float = 0.001, quiet: bool = False, print_fn: Callable[[str], None] = print) -> None:
        self.task, self.model, self.module, self.optimizer, self.scheduler = task, model, module, optimizer, scheduler
        self.train_loader, self.dist, self.epochs, self.ema = train_loader, dist, epochs, ema
        self.sampler = train_loader.sampler
        self.amp_dtype, self.grad_clip = amp_dtype, grad_clip
        self.logger = logger or MetricsLogger(".", enabled=False)
        self.log_every, self.checkpoint_every, self.eval_every = log_every, checkpoint_every, eval_every
        self.max_steps = max_steps
        self.save = save or (lambda kind: None)
        self.stop, self.max_bad_fraction, self.quiet = stop, max_bad_fraction, quiet
        self.print = print_fn if dist.is_main else (lambda msg: None)
        self.device = dist.device
        self.local_batch = train_loader.batch_size
        self.steps_per_epoch = self.sampler.num_samples // self.local_batch
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set has {len(self.sampler.dataset)} samples, fewer than one global "
                             f"batch ({self.local_batch * dist.world_size}); lower batch_size")
        self.train_size = len(self.sampler.dataset)
        self.progress = Progress()
        self.last_eval: dict = {}

    # ---- state ---------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: weights, optimizer, scheduler, EMA, progress, RNG."""
        state = {"model": self.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "progress": dataclasses.asdict(self.progress), "rng": {"torch": torch.get_rng_state()}}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.device.type == "cuda":
            state["rng"]["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        load_state_dict_checked(self.module, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.progress = Progress.from_dict(state["progress"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    # ---- loops ---------------------------------------------------------------------------------------------------

    def fit(self) -> str:
        """Train until ``epochs`` are done (returns ``"done"``), ``max_steps`` were taken (``"max_steps"``) or a stop
        was requested (``"stopped"``); ``save("last")`` first in the last two cases. Raises ``NonFiniteLossError`` /
        ``TooManyBadSamplesError``."""
        p = self.progress
        while p.epoch < self.epochs:
            status = self._train_epoch()
            if status != "done":
                return status
            record = self._end_epoch()
            self.logger.log(record)
            score = record.get(self.task.score)
            improved = score is not None and score > p.best_score
            if improved:
                p.best_score, p.best_epoch = score, p.epoch + 1
            p.epoch += 1
            p.batches_done = 0
            p.ep_sums, p.ep_count, p.ep_bad = {}, 0.0, 0.0
            self.save("last")
            if improved:
                self.save("best")
            if self._stop_requested():
                return "stopped"
        return "done"

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if (self.stop is not None and self.stop.requested) else 0.0], device=self.device)
        return bool(reduce_sum(flag).item() > 0)

    def _train_epoch(self) -> str:
        p, names = self.progress, self.task.sums
        epoch = p.epoch
        self.sampler.set_epoch(epoch, start=p.batches_done * self.local_batch)
        if hasattr(self.sampler.dataset, "set_epoch"):
            self.sampler.dataset.set_epoch(epoch)
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=p.batches_done, desc=f"epoch {epoch + 1}/{self.epochs}",
                   disable=self.quiet or not self.dist.is_main, dynamic_ncols=True, unit="step")
        window = {"sums": dict.fromkeys(names, 0.0), "count": 0.0, "t": time.perf_counter()}
        t_epoch, n_epoch = time.perf_counter(), 0.0
        allowed_bad = self.max_bad_fraction * self.train_size
        try:
            for batch in self.train_loader:
                if p.batches_done >= self.steps_per_epoch:
                    break
                *sums, count, n_bad, nonfinite, stop_flag, empty = self._step(batch)
                if nonfinite > 0:
                    raise NonFiniteLossError(
                        f"non-finite training loss at epoch {epoch + 1}, batch {p.batches_done + 1}/"
                        f"{self.steps_per_epoch} (global step {p.global_step + 1}); stopping without saving, so the "
                        f"last checkpoint (global step <= {p.global_step}) is the last good state. Lower lr, "
                        f"add grad_clip or check the data.")
                p.batches_done += 1
                for name, value in zip(names, sums, strict=True):
                    p.ep_sums[name] = p.ep_sums.get(name, 0.0) + value
                    window["sums"][name] += value
                p.ep_count += count
                p.ep_bad += n_bad
                p.bad_train_total += n_bad
                if p.ep_bad > allowed_bad:
                    raise TooManyBadSamplesError(
                        f"{int(p.ep_bad)} unreadable training samples in epoch {epoch + 1} (of {self.train_size}), "
                        f"more than max_bad_fraction={self.max_bad_fraction} allows ({allowed_bad:.1f}); first: "
                        + "; ".join(p.bad_examples[:3]))
                n_epoch += count
                window["count"] += count
                bar.update(1)
                if not empty:
                    shown = self.task.summarize(p.ep_sums, max(p.ep_count, 1))
                    bar.set_postfix({**{k: f"{v:.3f}" for k, v in shown.items()},
                                     "img_s": f"{n_epoch / max(time.perf_counter() - t_epoch, 1e-9):.0f}"},
                                    refresh=False)
                if p.global_step % self.log_every == 0 and window["count"]:
                    self._log_step(window)
                if stop_flag > 0:
                    self.save("last")
                    return "stopped"
                if self.max_steps is not None and p.global_step >= self.max_steps:
                    self.save("last")
                    return "max_steps"
                if (self.checkpoint_every and p.global_step % self.checkpoint_every == 0
                        and p.batches_done < self.steps_per_epoch):
                    self.save("last")
        finally:
            bar.close()
        self._epoch_time, self._epoch_images = time.perf_counter() - t_epoch, n_epoch
        return "done"

    def _step(self, batch) -> list[float]:
        """One optimizer step; returns the rank-summed ``[*task sums, count, bad, nonfinite, stop, empty]``."""
        n = len(self.task.sums)
        flags = torch.zeros(n + 5, dtype=torch.float64, device=self.device)
        with autocast(self.device, self.amp_dtype):
            loss, sums, count, bad = self.task.step(self.model, batch)
        p = self.progress
        if bad:
            p.bad_examples += bad[: max(0, 5 - len(p.bad_examples))]
        flags[n + 1] = len(bad)
        flags[n + 3] = 1.0 if (self.stop is not None and self.stop.requested) else 0.0
        if loss is None:
            flags[n + 4] = 1.0
        else:
            flags[:n] = sums
            flags[n] = count
            flags[n + 2] = (~torch.isfinite(loss.detach())).double()
        out = reduce_sum(flags).tolist()
        if out[n + 2] > 0 or out[n + 4] > 0:  # a NaN anywhere, or an empty batch anywhere: no rank steps
            return out
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        if self.ema is not None:
            self.ema.update_parameters(self.module)
        p.global_step += 1
        return out

    def _log_step(self, window: dict) -> None:
        p = self.progress
        now = time.perf_counter()
        means = self.task.summarize(window["sums"], window["count"])
        record = {"kind": "step", "epoch": p.epoch + p.batches_done / self.steps_per_epoch, "step": p.global_step,
                  **means, "lr": self.optimizer.param_groups[0]["lr"],
                  "img_s": window["count"] / max(now - window["t"], 1e-9)}
        self.logger.log(record)
        if self.quiet:
            self.print(f"epoch {p.epoch + 1}/{self.epochs} step {p.batches_done}/{self.steps_per_epoch} "
                       + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                       + f" lr {record['lr']:.4g} {record['img_s']:.0f} img/s")
        window.update(sums=dict.fromkeys(window["sums"], 0.0), count=0.0, t=now)

    def validate(self) -> dict:
        """The task's evaluation of the raw weights (and of the EMA weights, ``_ema`` keys)."""
        return self.task.evaluate(self.module, None if self.ema is None else self.ema.module,
                                  show_progress=not self.quiet and self.dist.is_main)

    def _end_epoch(self) -> dict:
        p = self.progress
        epoch = p.epoch
        train = self.task.summarize(p.ep_sums, max(p.ep_count, 1))
        record = {"kind": "epoch", "epoch": epoch + 1, "step": p.global_step,
                  **{f"train_{k}": v for k, v in train.items()},
                  "lr": self.optimizer.param_groups[0]["lr"], "epoch_s": getattr(self, "_epoch_time", float("nan")),
                  "img_s": getattr(self, "_epoch_images", 0.0) / max(getattr(self, "_epoch_time", 0.0), 1e-9),
                  "bad_train": int(p.ep_bad)}
        if epoch + 1 == self.epochs or (self.eval_every and (epoch + 1) % self.eval_every == 0):
            record.update(self.validate())
            self.last_eval = record
        self.print(self.task.format_epoch(record, self.epochs))
        if record["bad_train"]:
            self.print(f"  skipped {record['bad_train']} unreadable training samples this epoch; e.g. "
                       + "; ".join(p.bad_examples[:2]))
        return record
