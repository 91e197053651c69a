"""Exponential moving average of the weights (the paper's EMA, decay 0.9999): ``AveragedModel`` with
``use_buffers=True``, so BatchNorm statistics are averaged too and the EMA model can be evaluated as it is. The first
update copies the weights, each later one is ``ema = decay * ema + (1 - decay) * weights``; the ``state_dict`` is
plain tensors (``module.*``, ``n_averaged``)."""

from __future__ import annotations

from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def build_ema(model: nn.Module, decay: float) -> AveragedModel:
    """An EMA copy of ``model`` (pass the bare module, not a DDP or compiled wrapper); ``.module`` is the model."""
    if not 0.0 < decay < 1.0:
        raise ValueError(f"ema decay must be in (0, 1), got {decay}")
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
