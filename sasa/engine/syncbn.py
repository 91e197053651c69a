"""Synchronised BatchNorm for DDP on any device: ``nn.SyncBatchNorm`` on CUDA, a gloo-capable one on CPU.

PyTorch's ``SyncBatchNorm`` refuses CPU tensors, so CPU DDP (gloo) gets ``DistributedBatchNorm2d``: batch
statistics are reduced across ranks with the differentiable ``torch.distributed.nn.functional.all_reduce``
(two passes: the mean, then the centred sum of squares, for float accuracy), so the forward, the backward and the
running statistics equal one process holding the whole global batch."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn


def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (its backward sums the gradients over ranks too)."""
    from torch.distributed.nn.functional import all_reduce as _all_reduce

    with warnings.catch_warnings():  # deprecated in favour of a private module; still the public autograd op
        warnings.simplefilter("ignore", FutureWarning)
        return _all_reduce(tensor)


class DistributedBatchNorm2d(nn.BatchNorm2d):
    """``nn.BatchNorm2d`` whose training-mode statistics cover the batch of every rank."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        self._check_input_dim(x)
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        n = all_reduce(count)  # global number of values per channel
        mean = all_reduce(x.sum(dim=(0, 2, 3))) / n  # (C,)
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum(dim=(0, 2, 3))) / n  # biased, (C,)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var * (n / (n - 1).clamp(min=1))
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased.detach(), alpha=m)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` by a synchronised one (``nn.SyncBatchNorm`` on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_cpu(module)


def _convert_cpu(module: nn.Module) -> nn.Module:
    out = module
    if type(module) is nn.BatchNorm2d:
        ref = module.weight if module.affine else module.running_mean  # keep the layer's dtype and device
        out = DistributedBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                     module.track_running_stats,
                                     **({"dtype": ref.dtype, "device": ref.device} if ref is not None else {}))
        with torch.no_grad():
            if module.affine:
                out.weight.copy_(module.weight)
                out.bias.copy_(module.bias)
            if module.track_running_stats:
                out.running_mean.copy_(module.running_mean)
                out.running_var.copy_(module.running_var)
                out.num_batches_tracked.copy_(module.num_batches_tracked)
        out.train(module.training)
    for name, child in module.named_children():
        out.add_module(name, _convert_cpu(child))
    return out
