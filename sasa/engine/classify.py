"""Classification as a task of the shared ``Trainer``: a step is the cross-entropy of a ``sasa.data.Batch`` and
its correct count; an evaluation is loss, top-1 and top-5 on the validation loader."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .distributed import reduce_sum
from .trainer import NonFiniteLossError, StepResult, TooManyBadSamplesError, autocast

__all__ = ["ClassificationTask", "NonFiniteLossError", "TooManyBadSamplesError", "accuracy_counts", "evaluate",
           "format_epoch"]


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> list[torch.Tensor]:
    """Number of samples whose label is in the top-k predictions, for each k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices  # (B, kmax)
    hit = top == labels[:, None]  # (B, kmax)
    return [hit[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, device: torch.device, amp_dtype: torch.dtype | None = None,
             channels_last: bool = False, desc: str = "eval", show_progress: bool = False) -> dict:
    """``{"loss", "top1", "top5", "count", "bad", "bad_examples"}`` of ``model`` on ``loader`` over all ranks
    (top-k in percent; unreadable samples are skipped and counted)."""
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
        with autocast(device, amp_dtype):
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


class ClassificationTask:
    """Cross-entropy training (``label_smoothing``) and top-1 / top-5 evaluation on ``val_loader`` (batches of
    ``sasa.data.Batch``; ``None``: no evaluation), inputs moved to ``device`` (channels-last if asked);
    ``amp_dtype`` is the evaluation's autocast (the trainer's own wraps the training step)."""

    sums = ("loss", "correct")
    score = "val_top1"

    def __init__(self, *, val_loader, device: torch.device, label_smoothing: float = 0.0, channels_last: bool = False,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.val_loader, self.device, self.label_smoothing = val_loader, device, label_smoothing
        self.channels_last, self.amp_dtype = channels_last, amp_dtype

    def step(self, model: nn.Module, batch) -> StepResult:
        images, labels, bad = batch
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        reasons = [f"{b.where}: {b.reason}" for b in bad]
        if labels.numel() == 0:
            return StepResult(None, sums, 0, reasons)
        x = images.to(self.device, non_blocking=True)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = labels.to(self.device, non_blocking=True)
        logits = model(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        sums[0] = loss.detach().double() * y.numel()
        sums[1] = (logits.detach().argmax(dim=1) == y).sum()
        return StepResult(loss, sums, y.numel(), reasons)

    @staticmethod
    def summarize(sums: dict, count: float) -> dict:
        return {"loss": sums.get("loss", 0.0) / count, "top1": 100 * sums.get("correct", 0.0) / count}

    def evaluate(self, module: nn.Module, ema_module: nn.Module | None = None, *, show_progress: bool = False) -> dict:
        """``val_loss``, ``val_top1``, ``val_top5``, ``bad_val`` (and the ``_ema`` figures) on the validation set."""
        if self.val_loader is None:
            return {}
        kw = {"device": self.device, "amp_dtype": self.amp_dtype, "channels_last": self.channels_last,
              "show_progress": show_progress}
        res = evaluate(module, self.val_loader, desc="eval", **kw)
        record = {"val_loss": res["loss"], "val_top1": res["top1"], "val_top5": res["top5"], "bad_val": res["bad"]}
        if ema_module is not None:
            res_ema = evaluate(ema_module, self.val_loader, desc="eval ema", **kw)
            record.update(val_loss_ema=res_ema["loss"], val_top1_ema=res_ema["top1"], val_top5_ema=res_ema["top5"])
        return record

    def format_epoch(self, record: dict, epochs: int) -> str:
        return format_epoch(record, epochs)


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
