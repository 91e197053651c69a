"""Classification training and evaluation loops. They take objects (model, optimizer, scheduler, loaders, EMA,
logger, stop flag, a save callback) and know nothing of configs, files or the command line (``runner.py`` wires
them).

What the loop guarantees:
- **Exact resume.** ``Progress`` (epoch, batches done, step, running meters, best score) is part of every
  checkpoint; ``fit`` restarts the sampler ``batches_done`` batches into the epoch, and the data pipeline's
  augmentation is seeded per sample (``sasa.data.loader``), so a resumed run replays what an uninterrupted one
  would have done.
- **Agreement across ranks.** Once per step, one ``all_reduce`` carries the step's loss sum, correct count,
  sample count, unreadable-sample count and the "non-finite loss" / "stop requested" / "empty batch" flags, so
  every rank takes the same decision (stop, skip, raise) at the same step and no rank hangs in a collective.
- **Non-finite loss** raises ``NonFiniteLossError`` naming the step, *before* the backward pass, so the weights
  and the last checkpoint on disk stay good.
- **Unreadable samples** are skipped and counted; more than ``max_bad_fraction`` of the training set in one epoch
  raises ``TooManyBadSamplesError``.

Status: complete.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .distributed import DistInfo, reduce_sum
from .metrics import MetricsLogger
from .signals import GracefulStop


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN or infinite."""


class TooManyBadSamplesError(RuntimeError):
    """More unreadable samples than the configured fraction."""


@dataclass
class Progress:
    """Where a run is; saved in every checkpoint (plain numbers only)."""

    epoch: int = 0  # current epoch, 0-based
    batches_done: int = 0  # batches of `epoch` already trained
    global_step: int = 0  # optimizer steps taken
    best_top1: float = -1.0
    best_epoch: int = -1
    elapsed_s: float = 0.0  # wall time of earlier segments of a resumed run
    ep_loss_sum: float = 0.0  # running sums over the current epoch
    ep_correct: float = 0.0
    ep_count: float = 0.0
    ep_bad: float = 0.0
    bad_train_total: float = 0.0
    bad_examples: list = field(default_factory=list)  # "path: reason" of the first unreadable samples


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is in the top-k predictions, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == labels[:, None]  # (B, kmax)
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, desc: str = "eval", show_progress: bool = False) -> dict:
    """Cross-entropy loss, top-1 and top-5 (percent) of ``model`` on ``loader``, summed over all ranks.

    Returns:
        ``{"loss", "top1", "top5", "count", "bad", "bad_examples"}``; unreadable samples are skipped and counted.
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, dtype=torch.float64, device=device)  # loss_sum, top1, top5, count, bad
    examples: list[str] = []
    for images, labels, bad in tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True):
        if bad:
            sums[4] += len(bad)
            examples += [f"{b.where}: {b.reason}" for b in bad][: max(0, 5 - len(examples))]
        if labels.numel() == 0:
            continue
        x = images.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(device, non_blocking=True)
        with _autocast(device, amp_dtype):
            logits = model(x)
        logits = logits.float()
        c1, c5 = accuracy_counts(logits, y)
        sums[0] += F.cross_entropy(logits, y, reduction="sum")
        sums[1] += c1
        sums[2] += c5
        sums[3] += y.numel()
    sums = reduce_sum(sums).tolist()
    model.train(was_training)
    n = max(sums[3], 1.0)
    return {"loss": sums[0] / n, "top1": 100.0 * sums[1] / n, "top5": 100.0 * sums[2] / n, "count": int(sums[3]),
            "bad": int(sums[4]), "bad_examples": examples}


class ClassificationTrainer:
    """Runs epochs of training and evaluation on objects built elsewhere.

    Args:
        model: what the forward pass runs (possibly DDP- and/or compile-wrapped).
        module: the bare model (state dicts, evaluation, EMA updates).
        optimizer, scheduler: stepped once per batch (``scheduler`` may be None).
        train_loader: yields ``sasa.data.Batch``; its sampler must be a ``ResumableDistributedSampler`` and its
            dataset must have ``set_epoch``.
        val_loader: yields ``sasa.data.Batch`` (``None``: no per-epoch evaluation).
        dist: this process's ``DistInfo``.
        epochs: total epochs.
        ema: an ``AveragedModel`` updated after every step, evaluated beside the raw weights (or None).
        label_smoothing: of the training cross-entropy.
        amp_dtype: autocast dtype (``torch.bfloat16``) or None.
        channels_last: convert inputs to channels-last memory.
        grad_clip: max gradient norm (0: off).
        logger: ``MetricsLogger`` for step and epoch records.
        log_every: steps between step records.
        checkpoint_every: steps between mid-epoch ``save("last")`` calls (0: epoch ends only).
        eval_every: epochs between evaluations (the last epoch is always evaluated).
        save: ``save(kind)`` callback, ``kind`` in ``"last"``, ``"best"``; called on every rank.
        stop: a ``GracefulStop`` polled once per step (or None).
        max_bad_fraction: tolerated fraction of unreadable training samples per epoch.
        quiet: no progress bar; a log line every ``log_every`` steps and per epoch instead.
        print_fn: where messages go (rank 0 prints; tests capture).
    """

    def __init__(self, *, model: nn.Module, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 train_loader, val_loader, dist: DistInfo, epochs: int, ema: nn.Module | None = None,
                 label_smoothing: float = 0.0, amp_dtype: torch.dtype | None = None, channels_last: bool = False,
                 grad_clip: float = 0.0, logger: MetricsLogger | None = None, log_every: int = 50,
                 checkpoint_every: int = 0, eval_every: int = 1, save: Callable[[str], None] | None = None,
                 stop: GracefulStop | None = None, max_bad_fraction: float = 0.001, quiet: bool = False,
                 print_fn: Callable[[str], None] = print) -> None:
        self.model, self.module, self.optimizer, self.scheduler = model, module, optimizer, scheduler
        self.train_loader, self.val_loader, self.dist, self.epochs, self.ema = (train_loader, val_loader, dist,
                                                                                 epochs, ema)
        self.sampler = train_loader.sampler
        self.label_smoothing, self.amp_dtype, self.channels_last = label_smoothing, amp_dtype, channels_last
        self.grad_clip, self.logger = grad_clip, logger or MetricsLogger(".", enabled=False)
        self.log_every, self.checkpoint_every, self.eval_every = log_every, checkpoint_every, eval_every
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
        self.stopped_by: str = ""

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
        from .checkpoint import load_state_dict_checked

        load_state_dict_checked(self.module, state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        self.progress = Progress(**state["progress"])
        rng = state.get("rng", {})
        if "torch" in rng:
            torch.set_rng_state(rng["torch"].cpu())
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"].cpu(), self.device)

    # ---- loops ---------------------------------------------------------------------------------------------------

    def fit(self) -> str:
        """Train until ``epochs`` are done (returns ``"done"``) or a stop was requested (returns ``"stopped"``,
        after ``save("last")``). Raises ``NonFiniteLossError`` / ``TooManyBadSamplesError``."""
        p = self.progress
        while p.epoch < self.epochs:
            if self._train_epoch() == "stopped":
                return "stopped"
            record = self._end_epoch()
            self.logger.log(record)
            improved = "val_top1" in record and record["val_top1"] > p.best_top1
            if improved:
                p.best_top1, p.best_epoch = record["val_top1"], p.epoch + 1
            p.epoch += 1
            p.batches_done = 0
            p.ep_loss_sum = p.ep_correct = p.ep_count = p.ep_bad = 0.0
            self.save("last")
            if improved:
                self.save("best")
            if self._stop_requested():
                self.stopped_by = self.stopped_by or "signal"
                return "stopped"
        return "done"

    def _stop_requested(self) -> bool:
        flag = torch.tensor([1.0 if (self.stop is not None and self.stop.requested) else 0.0], device=self.device)
        return bool(reduce_sum(flag).item() > 0)

    def _train_epoch(self) -> str:
        p = self.progress
        epoch = p.epoch
        self.sampler.set_epoch(epoch, start=p.batches_done * self.local_batch)
        dataset = self.sampler.dataset
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        self.model.train()
        bar = tqdm(total=self.steps_per_epoch, initial=p.batches_done, desc=f"epoch {epoch + 1}/{self.epochs}",
                   disable=self.quiet or not self.dist.is_main, dynamic_ncols=True, unit="step")
        window = {"loss": 0.0, "correct": 0.0, "count": 0.0, "t": time.perf_counter()}
        t_epoch, n_epoch = time.perf_counter(), 0.0
        allowed_bad = self.max_bad_fraction * self.train_size
        try:
            for images, labels, bad in self.train_loader:
                if p.batches_done >= self.steps_per_epoch:
                    break
                if bad:
                    p.bad_examples += [f"{b.where}: {b.reason}" for b in bad][: max(0, 5 - len(p.bad_examples))]
                sums = self._step(images, labels, len(bad))
                loss_sum, correct, count, n_bad, nonfinite, stop_flag, empty = sums
                if nonfinite > 0:
                    raise NonFiniteLossError(
                        f"non-finite training loss at epoch {epoch + 1}, batch {p.batches_done + 1}/"
                        f"{self.steps_per_epoch} (global step {p.global_step + 1}); stopping without saving, so the "
                        f"last checkpoint (global step <= {p.global_step}) is the last good state. Lower lr, "
                        f"add grad_clip or check the data.")
                p.batches_done += 1
                p.ep_loss_sum += loss_sum
                p.ep_correct += correct
                p.ep_count += count
                p.ep_bad += n_bad
                p.bad_train_total += n_bad
                if p.ep_bad > allowed_bad:
                    raise TooManyBadSamplesError(
                        f"{int(p.ep_bad)} unreadable training samples in epoch {epoch + 1} (of {self.train_size}), "
                        f"more than max_bad_fraction={self.max_bad_fraction} allows ({allowed_bad:.1f}); first: "
                        + "; ".join(p.bad_examples[:3]))
                n_epoch += count
                window["loss"] += loss_sum
                window["correct"] += correct
                window["count"] += count
                bar.update(1)
                if not empty:
                    bar.set_postfix(loss=f"{p.ep_loss_sum / max(p.ep_count, 1):.3f}",
                                    acc=f"{100 * p.ep_correct / max(p.ep_count, 1):.1f}",
                                    img_s=f"{n_epoch / max(time.perf_counter() - t_epoch, 1e-9):.0f}",
                                    refresh=False)
                if p.global_step % self.log_every == 0 and window["count"]:
                    self._log_step(window)
                if stop_flag > 0:
                    self.stopped_by = "signal"
                    self.save("last")
                    return "stopped"
                if (self.checkpoint_every and p.global_step % self.checkpoint_every == 0
                        and p.batches_done < self.steps_per_epoch):
                    self.save("last")
        finally:
            bar.close()
        self._epoch_time = time.perf_counter() - t_epoch
        self._epoch_images = n_epoch
        return "done"

    def _step(self, images: torch.Tensor, labels: torch.Tensor, n_bad: int) -> list[float]:
        """One optimizer step; returns the rank-summed ``[loss_sum, correct, count, bad, nonfinite, stop, empty]``."""
        p = self.progress
        flags = torch.zeros(7, dtype=torch.float64, device=self.device)
        flags[3] = n_bad
        flags[5] = 1.0 if (self.stop is not None and self.stop.requested) else 0.0
        loss = None
        if labels.numel() == 0:
            flags[6] = 1.0
        else:
            x = images.to(self.device, non_blocking=True)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = labels.to(self.device, non_blocking=True)
            with _autocast(self.device, self.amp_dtype):
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
            flags[0] = loss.detach().double() * y.numel()
            flags[1] = (logits.detach().argmax(dim=1) == y).sum()
            flags[2] = y.numel()
            flags[4] = (~torch.isfinite(loss.detach())).double()
        sums = reduce_sum(flags).tolist()
        if sums[4] > 0 or sums[6] > 0:  # a NaN anywhere, or an empty batch anywhere: no rank steps
            return sums
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
        return sums

    def _log_step(self, window: dict) -> None:
        p = self.progress
        now = time.perf_counter()
        record = {"kind": "step", "epoch": p.epoch + p.batches_done / self.steps_per_epoch, "step": p.global_step,
                  "loss": window["loss"] / window["count"], "top1": 100 * window["correct"] / window["count"],
                  "lr": self.optimizer.param_groups[0]["lr"], "img_s": window["count"] / max(now - window["t"], 1e-9)}
        self.logger.log(record)
        if self.quiet:
            self.print(f"epoch {p.epoch + 1}/{self.epochs} step {p.batches_done}/{self.steps_per_epoch} "
                       f"loss {record['loss']:.4f} top1 {record['top1']:.2f} lr {record['lr']:.4g} "
                       f"{record['img_s']:.0f} img/s")
        window.update(loss=0.0, correct=0.0, count=0.0, t=now)

    def validate(self) -> dict:
        """``val_loss``, ``val_top1``, ``val_top5``, ``bad_val`` (and the ``_ema`` figures) on the validation set."""
        show = not self.quiet and self.dist.is_main
        res = evaluate(self.module, self.val_loader, device=self.device, amp_dtype=self.amp_dtype,
                       channels_last=self.channels_last, desc="eval", show_progress=show)
        record = {"val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"], "bad_val": res["bad"]}
        if self.ema is not None:
            res_ema = evaluate(self.ema.module, self.val_loader, device=self.device, amp_dtype=self.amp_dtype,
                               channels_last=self.channels_last, desc="eval ema", show_progress=show)
            record.update(val_loss_ema=res_ema["loss"], val_top1_ema=res_ema["top1"], val_top5_ema=res_ema["top5"])
        return record

    def _end_epoch(self) -> dict:
        p = self.progress
        epoch = p.epoch
        record = {"kind": "epoch", "epoch": epoch + 1, "step": p.global_step,
                  "train_loss": p.ep_loss_sum / max(p.ep_count, 1),
                  "train_top1": 100 * p.ep_correct / max(p.ep_count, 1),
                  "lr": self.optimizer.param_groups[0]["lr"], "epoch_s": getattr(self, "_epoch_time", float("nan")),
                  "img_s": getattr(self, "_epoch_images", 0.0) / max(getattr(self, "_epoch_time", 0.0), 1e-9),
                  "bad_train": int(p.ep_bad)}
        if self.val_loader is not None and ((epoch + 1) % self.eval_every == 0 or epoch + 1 == self.epochs):
            record.update(self.validate())
            self.last_eval = record
        self.print(format_epoch(record, self.epochs))
        if record["bad_train"]:
            self.print(f"  skipped {record['bad_train']} unreadable training samples this epoch; e.g. "
                       + "; ".join(p.bad_examples[:2]))
        return record


def format_epoch(record: dict, epochs: int) -> str:
    """One human line for an epoch record."""
    parts = [f"epoch {record['epoch']}/{epochs}", f"train loss {record['train_loss']:.4f}",
             f"train top1 {record['train_top1']:.2f}"]
    if "val_top1" in record:
        parts += [f"val loss {record['val_loss']:.4f}", f"val top1 {record['val_top1']:.2f}",
                  f"top5 {record['val_top5']:.2f}"]
    if "val_top1_ema" in record:
        parts.append(f"ema top1 {record['val_top1_ema']:.2f}")
    if math.isfinite(record.get("epoch_s", float("nan"))):
        parts.append(f"{record['epoch_s']:.0f}s ({record['img_s']:.0f} img/s)")
    return " | ".join(parts)
