"""The ``inductor`` backend: the ``shifted`` layout with its passes fused by ``torch.compile`` into C++ loops (CPU).

Same buffers and maths as ``shifted.py`` (one zero-padded, flattened plane per (batch, head) with row pitch
``P = W + r``, so window offset ``(a, b)`` of query ``n`` is element ``n + a * P + b``), written as whole-tensor
expressions over overlapping strided views instead of per-channel / per-offset in-place passes:

- forward: logits ``(q[:, :, None, None, :] * K_window).sum(channels)`` plus the row / column table terms and a
  bias (-inf outside the image for ``padding="mask"``), softmax over the k*k offsets, ``out = (probs *
  V_window).sum(offsets)``;
- backward: ``dprobs`` like the logits, the softmax gradient, ``dq`` like ``out``, the table gradients; the
  scatters for ``dk`` / ``dv`` stay ``shifted``'s eager ones (written as gathers over flipped, shifted copies of
  the logit gradients and probabilities, Inductor ran them slower: 6.8 against 5.9 ms at the target shape).

Inductor fuses each reduction with its product into one vectorised loop nest (eagerly they would materialise
``(B*heads, head_dim, k, k, H*P)`` products): forward + backward 1.4x faster than ``shifted`` at the issue's CPU
shape, a SASA-ResNet-26 training step 8-9% (BENCHMARKS.md). One compiled graph per dtype serves every variant and
size (batch and heads merged, missing keys and tables as zeros, the padding mode as the bias, dynamic shapes without
"duck sizing"). The first call in a process compiles (~10 s on 2 cores; the result is cached on disk, in
``~/.cache/sasa/inductor`` under the command line) and says so on stderr; without a working compiler it warns once
and runs ``shifted``'s eager core: the same results. ``calls()`` counts which of the two ran (tests assert on it, so
that a fallback cannot pass for the compiled path). Shape-only passes (FLOP counts, ``sasa show-attention``) pin
``shifted`` with ``sasa.backends.force``.

CPU only (on CUDA the ``triton`` backend is the fused kernel); fp16 / bf16 are computed in fp32 as in ``shifted``.
Default on CPU. ``SASA_BACKEND=shifted`` skips the compilation (the test suite does that, except where it tests
this backend)."""

from __future__ import annotations

import contextlib
import functools
import sys
import warnings

import torch

from . import Backend, register, shifted
from .shifted import geometry, outside_mask, padded_keys, padded_queries


def _windows(xp: torch.Tensor, K: int, P: int, n: int) -> torch.Tensor:
    """``(BH, c, K, K, n)`` overlapping view of a contiguous ``(BH, c, L)`` buffer: ``[..., a, b, m] =
    xp[..., m + a*P + b]``."""
    s = xp.stride()
    return xp.as_strided((xp.shape[0], xp.shape[1], K, K, n), (s[0], s[1], P, 1, 1))


def _fwd_math(qf, kp, vp, rows, cols, bias, K: int, P: int):
    """``(out (BH, d, N), probs (BH, K*K, N))`` from the flat buffers (batch and heads merged) and per-plane
    tables ``(BH, K, d/2)``; ``bias`` ``(K*K, N)`` is added to the logits: -inf outside the image for
    ``padding="mask"``, else 0 (an additive bias ran the forward in 3.0 ms where a boolean ``masked_fill`` took
    5.0)."""
    BH, d, N = qf.shape
    c = d // 2
    table = torch.matmul(rows, qf[:, :c])[:, :, None, :] + torch.matmul(cols, qf[:, c:])[:, None, :, :]
    logits = (qf[:, :, None, None, :] * _windows(kp, K, P, N)).sum(1) + table  # (BH, K, K, N)
    probs = torch.softmax(logits.view(BH, K * K, N) + bias, dim=1)
    out = (probs.view(BH, 1, K, K, N) * _windows(vp, K, P, N)).sum((2, 3))  # (BH, d, N)
    return out, probs


def _bwd_math(dof, qf, kp, vp, probs, rows, cols, scale, K: int, P: int):
    """``(ds, dq, drows, dcols)``: dL/dlogits ``(BH, K*K, N)`` for the scatters (they stay eager, see
    ``_backward_core``), dq ``(BH, d, N)`` and the per-plane table gradients ``(BH, K, d/2)``; ``scale`` a 0-d
    tensor."""
    BH, d, N = qf.shape
    c = d // 2
    dp = (dof[:, :, None, None, :] * _windows(vp, K, P, N)).sum(1).view(BH, K * K, N)
    ds = probs * (dp - (probs * dp).sum(1, keepdim=True)) * scale  # dL/dlogits
    ds5 = ds.view(BH, K, K, N)
    g_rows, g_cols = ds5.sum(2), ds5.sum(1)  # (BH, K, N): gradients of the row / column offset logits
    dq = (ds5[:, None] * _windows(kp, K, P, N)).sum((2, 3))  # (BH, d, N)
    dq = dq + torch.cat([torch.matmul(rows.transpose(1, 2), g_rows), torch.matmul(cols.transpose(1, 2), g_cols)], 1)
    drows = torch.matmul(g_rows, qf[:, :c].transpose(1, 2))
    dcols = torch.matmul(g_cols, qf[:, c:].transpose(1, 2))
    return ds, dq, drows, dcols


def _settings() -> contextlib.ExitStack:
    """Compile settings for these calls only: sizes that happen to be equal (batch, heads and half the head_dim are
    often all 2 in tests) must not be merged into one symbol ("duck sizing"), which would recompile for every new
    shape; and room for the variants and size-1 specialisations beyond dynamo's default of 8 compiles."""
    stack = contextlib.ExitStack()
    fx_config = getattr(torch.fx.experimental, "_config", None)
    if fx_config is not None and hasattr(fx_config, "use_duck_shape"):
        stack.enter_context(fx_config.patch(use_duck_shape=False))
    dynamo_config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    stack.enter_context(dynamo_config.patch(**{limit: max(64, getattr(dynamo_config, limit))}))
    return stack


@functools.cache
def _compiled(name: str):
    fn = {"forward": _fwd_math, "backward": _bwd_math}[name]
    return torch.compile(fn, dynamic=True, fullgraph=True)


_STATE = {"announced": False, "broken": None}
_CALLS = {"compiled": {"forward": 0, "backward": 0}, "fallback": {"forward": 0, "backward": 0}}


def calls() -> dict[str, dict[str, int]]:
    """How many forward / backward calls of this backend ran the compiled loops (``"compiled"``) and how many ran
    ``shifted``'s eager core after a failed compile (``"fallback"``), in this process so far (a copy)."""
    return {kind: dict(counts) for kind, counts in _CALLS.items()}


def failure() -> str | None:
    """Why compiling failed in this process (every later call then falls back), or None."""
    return _STATE["broken"]


def _run(name: str, args: tuple):
    """The compiled ``name`` on ``args``, or None once compiling has failed in this process (callers then run
    ``shifted``'s eager core: the same maths)."""
    result = _try_compiled(name, args)
    _CALLS["fallback" if result is None else "compiled"][name] += 1
    return result


def _try_compiled(name: str, args: tuple):
    if _STATE["broken"] is not None:
        return None
    if not _STATE["announced"]:
        _STATE["announced"] = True
        print("sasa: the inductor attention backend compiles its CPU loops on first use in this process (~10 s, "
              "less once cached on disk; SASA_BACKEND=shifted skips it)", file=sys.stderr)
    # detached: a table that requires grad makes the compiled graph a slower one (measured 3x, forward)
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    try:
        with torch.no_grad(), _settings():
            return _compiled(name)(*args)
    except Exception as err:  # no C++ compiler, an Inductor failure: same maths, eager
        _STATE["broken"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        warnings.warn(f"sasa: torch.compile failed for the inductor backend ({_STATE['broken']}); running the "
                      "shifted backend's eager loops instead", stacklevel=4)
        return None


@functools.lru_cache(maxsize=64)
def _bias(H: int, W: int, K: int, mask: bool, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``(K*K, H*P)`` logit bias: -inf where the window leaves the image if ``mask``, else zeros."""
    if not mask:
        return torch.zeros(K * K, geometry(H, W, K)[1] * H, dtype=dtype, device=device)
    return torch.zeros((), dtype=dtype, device=device).masked_fill(outside_mask(H, W, K, device), float("-inf"))


def _planes(q, k, v, rel_rows, rel_cols, K: int) -> tuple:
    """``(qf, kp, vp, rows, cols)`` in the one form the compiled functions take (so that one compile serves every
    variant): flat buffers with batch and heads merged, zero keys for ``k=None``, per-plane ``(B*h, K, d/2)``
    tables, zeros for a missing one."""
    B, H, W, h, d = q.shape
    r = K // 2
    qf = padded_queries(q, r)
    kp = padded_keys(k, r) if k is not None else qf.new_zeros(B, h, d, (geometry(H, W, K)[2]) * (W + r))
    tables = []
    for t in (rel_rows, rel_cols):
        t = t.to(qf.dtype) if t is not None else qf.new_zeros(K, d // 2)
        # shared (K, c) or per-head (h, K, c); contiguous, since a stride-0 view would be another compile
        tables.append(t.expand(B, h, K, d // 2).reshape(B * h, K, d // 2).contiguous())
    return (qf.view(B * h, d, -1), kp.view(B * h, d, -1), padded_keys(v, r).view(B * h, d, -1), *tables)


def _forward_core(q, k, v, rel_rows, rel_cols, K: int, mask: bool, scale: float):
    B, H, W, h, d = q.shape
    qf, kp, vp, rows, cols = _planes(q, k, v, rel_rows, rel_cols, K)
    if scale != 1.0:
        qf *= scale  # scale * (q.k + q.r) = (scale q).k + (scale q).r
    bias = _bias(H, W, K, mask, qf.dtype, q.device)
    result = _run("forward", (qf, kp, vp, rows, cols, bias, K, geometry(H, W, K)[1]))
    if result is None:
        return shifted.eager_forward(q, k, v, rel_rows, rel_cols, K, mask, scale)
    out, probs = result
    return out.view(B, h, d, -1), probs.view(B, h, K * K, -1)


def _backward_core(dout, q, k, v, probs, rel_rows, rel_cols, K: int, scale: float, needs: tuple[bool, ...]):
    B, H, W, h, d = q.shape
    r, P, rows = geometry(H, W, K)
    qf, kp, vp, trows, tcols = _planes(q, k, v, rel_rows, rel_cols, K)
    dof = padded_queries(dout, r).view(B * h, d, -1)
    args = (dof, qf, kp, vp, probs.view(B * h, K * K, -1), trows, tcols, torch.tensor(scale, dtype=qf.dtype), K, P)
    result = _run("backward", args)
    if result is None:
        return shifted.eager_backward(dout, q, k, v, probs, rel_rows, rel_cols, K, scale, needs)
    ds, dq, drows, dcols = result
    # the scatters stay eager: as gathers over flipped, shifted copies of ds and probs, Inductor was slower
    starts = shifted.window_starts(K, P)
    planes = lambda x: x.view(B, h, x.shape[1], -1)  # noqa: E731  (BH, ., N) -> (B, h, ., N)
    dk = shifted.scatter(planes(ds), planes(qf), starts, rows * P) if k is not None and needs[1] else None
    dv = shifted.scatter(probs, planes(dof), starts, rows * P) if needs[2] else None
    tables = []
    for table, grad, need in ((rel_rows, drows, needs[3]), (rel_cols, dcols, needs[4])):
        grad = grad.view(B, h, K, d // 2).sum(0)  # (h, K, c)
        tables.append((grad if table.dim() == 3 else grad.sum(0)) if table is not None and need else None)
    return (planes(dq) if needs[0] else None, dk, dv, *tables)


shifted.register_core("inductor", _forward_core, _backward_core)


def inductor_attention(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale):
    return shifted.shifted_attention(q, k, v, rel_rows, rel_cols, kernel_size, padding, scale, core="inductor")


def _can_run(q, device=None, **_) -> str | None:
    device = torch.device(device) if device is not None else q.device
    if device.type != "cpu":
        return "CPU only (the triton backend is the fused kernel on CUDA)"
    return None


register(Backend(name="inductor", op="window", apply=inductor_attention, can_run=_can_run, priority={"cpu": 20}))
