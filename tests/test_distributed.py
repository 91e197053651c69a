"""Data-parallel training equals one process: 2 gloo processes with synchronised BatchNorm against 1 process that
holds the whole global batch.

Two tests, because float32 cannot prove equality here:
- float64, in process (``torch.multiprocessing.spawn``): the real DDP + ``convert_sync_batchnorm`` path on a model
  with attention layers; loss, every parameter's gradient, the BN running statistics and the weights after the
  steps equal one process to ~1e-13 (relative), and the same comparison without sync-BN fails by orders of
  magnitude (so the check has teeth).
- float32, end to end (``torchrun ... -m sasa train`` against ``sasa train``): equal within a tolerance measured on
  float32 rounding drift, with a margin, and far below what a real mismatch (no ``--sync-bn``) produces.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from _procs import run_group
from torch import nn

from sasa.data.synthetic import MEAN, STD, SyntheticImages
from sasa.engine.distributed import all_reduce_mean, cleanup, init_distributed
from sasa.engine.optim import build_optimizer
from sasa.engine.syncbn import DistributedBatchNorm2d, convert_sync_batchnorm
from sasa.io.checkpoint import load_safetensors
from sasa.models import create_model

# ---- float64: the DDP + sync-BN path is exact -----------------------------------------------------------------------

WORLD = 2
STEPS = 2
GLOBAL_BATCH = 8  # 4 images per rank: BN statistics over tiny per-rank batches, the case that needs sync-BN most
F64_RTOL = 1e-10  # measured: <= 2.8e-13 (test_float64_ddp_sync_bn_equals_one_process)


def _batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``STEPS`` global batches of synthetic 32 x 32 images, normalised, float64: [((B, 3, 32, 32), (B,)), ...]."""
    data = SyntheticImages(STEPS * GLOBAL_BATCH, image_size=32, seed=5)
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    images = torch.stack([data[i][0] for i in range(len(data))]).double() / 255  # (STEPS * B, 3, 32, 32)
    images = (images - mean.double()) / std.double()
    labels = torch.tensor([data[i][1] for i in range(len(data))])
    return [(images[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH], labels[s * GLOBAL_BATCH:(s + 1) * GLOBAL_BATCH])
            for s in range(STEPS)]


def _model(sync_bn_device: torch.device | None = None) -> nn.Module:
    """``test_sasa_resnet`` (an attention stem, an attention layer in each of its 4 stages, 17 BatchNorms), float64;
    with ``sync_bn_device``, its BatchNorms converted as ``sasa train`` does: before the model is moved/cast."""
    torch.manual_seed(0)
    module = create_model("test_sasa_resnet", num_classes=10)
    if sync_bn_device is not None:
        module = convert_sync_batchnorm(module, sync_bn_device)
        assert sum(isinstance(m, DistributedBatchNorm2d) for m in module.modules()) == 17
    return module.double()


def _train(model: nn.Module, module: nn.Module, batches, *, rank: int = 0, world: int = 1) -> dict:
    """``STEPS`` SGD steps; rank ``rank`` of ``world`` takes every ``world``-th image of each global batch, as
    ``DistributedSampler`` does. Returns the (rank-averaged) losses, each step's gradients, and the final state."""
    optimizer = build_optimizer(module, name="sgd", lr=0.1, weight_decay=5e-5, momentum=0.9)
    model.train()
    out = {"loss": [], "grad": [], "state": None}
    for images, labels in batches:
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(images[rank::world]), labels[rank::world])
        loss.backward()  # DDP: gradients averaged over ranks = the gradient of the global-batch mean loss
        out["loss"].append(all_reduce_mean(loss.detach()))
        out["grad"].append({n: p.grad.clone() for n, p in module.named_parameters()})
        optimizer.step()
    out["state"] = {k: v.clone() for k, v in module.state_dict().items()}  # weights and BN running statistics
    return out


def _ddp_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One rank: the project's process-group entry, sync-BN conversion and DDP wrapping, as ``train._train``."""
    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    # file:// rendezvous (no port to pick); init_distributed then finds the group and reports this rank
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=120))  # a collective that never completes fails, not hangs
    info = init_distributed("cpu")
    assert info.distributed and info.rank == rank
    try:
        results = {}
        for sync_bn in (True, False):
            module = _model(info.device if sync_bn else None)
            model = nn.parallel.DistributedDataParallel(module, device_ids=None)
            results[sync_bn] = _train(model, module, _batches(), rank=rank, world=WORLD)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        cleanup()


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    """max |a - b| relative to max |b|, or to ``floor`` where that is larger (0 when both are all zero)."""
    scale = max(b.abs().max().item(), floor)
    diff = (a.double() - b.double()).abs().max().item()
    return diff / scale if scale > 0 else diff


def _worst(run: dict, ref: dict) -> tuple[float, str]:
    """Largest ``_rel`` over the losses, every step's gradients and the final state, and where it is."""
    worst = (0.0, "")
    for s in range(STEPS):
        worst = max(worst, (_rel(run["loss"][s], ref["loss"][s]), f"loss step {s}"))
        # a gradient that is zero in exact arithmetic (bn1's bias: without a ReLU after the attention stem, the next
        # BatchNorms cancel it) is rounding noise, measured against a thousandth of the step's largest gradient
        floor = 1e-3 * max(g.abs().max().item() for g in ref["grad"][s].values())
        for n in ref["grad"][s]:
            worst = max(worst, (_rel(run["grad"][s][n], ref["grad"][s][n], floor), f"grad step {s} {n}"))
    # bn1's bias stays at its zero init plus that noise: the same floor, a thousandth of the largest weight
    floor = 1e-3 * max(v.abs().max().item() for v in ref["state"].values() if v.is_floating_point())
    for k, v in ref["state"].items():
        worst = max(worst, (_rel(run["state"][k], v, floor if v.is_floating_point() else 0.0), f"state {k}"))
    return worst


@pytest.mark.slow  # 2 spawned processes importing torch: ~10 s on an idle 2-core machine, 30 s on a busy one
def test_float64_ddp_sync_bn_equals_one_process(tmp_path):
    """2 ranks x 4 images through DDP + sync-BN against 1 process x 8 images, float64, 2 SGD steps.

    Measured here (worst over the loss, every parameter's gradient at both steps, the weights and BN running
    statistics after them, relative to each tensor's largest entry or, where larger, a thousandth of the
    largest gradient or weight): 4.7e-14 for the first step's gradients,
    2.8e-13 for the second's, 1.1e-13 for the final state, 1.2e-14 for the losses. The same DDP run without
    sync-BN (per-rank BN statistics) is off by up to 6.5 (a gradient) and its first loss by 8%."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each rank; tiny float64 ops run slower on more threads
    try:
        module = _model()
        ref = _train(module, module, _batches())
    finally:
        torch.set_num_threads(threads)
    torch.multiprocessing.spawn(_ddp_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        run = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert run[True]["state"].keys() == ref["state"].keys()
        worst, where = _worst(run[True], ref)
        assert worst < F64_RTOL, f"rank {rank}, sync-BN, {where}: relative difference {worst:.3g}"
        worst, where = _worst(run[False], ref)
        assert worst > 1e-2, f"rank {rank}: without sync-BN the comparison passes too (worst {worst:.3g})"


# ---- float32, end to end: torchrun against one process --------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
SEED = 1
TRAIN = ["train", "--model", "test_resnet", "--dataset", "synthetic", "--train-subset", "64", "--val-subset", "64",
         "--batch-size", "32", "--epochs", "2", "--lr", "0.05", "--warmup-epochs", "0", "--threads", "1",
         "--seed", str(SEED), "--ema-decay", "0.5", "--sync-bn", "--optimizer", "sgd", "--weight-decay", "5e-5",
         "--workers", "0", "--log-every", "1", "--quiet"]
# 2 epochs x 2 steps, a loss record per step; every knob pinned (the demo defaults, AdamW with weight decay 0.05,
# make these steps chaotic).
#
# Tolerances, measured: 1 against 2 processes on 9 variants of this run on a 2-core AMD EPYC (AVX2): seeds 1-5, and
# seed 1 / 2 with oneDNN held to SSE4.1 (ONEDNN_MAX_CPU_ISA) or ATen to its scalar kernels (ATEN_CPU_CAPABILITY),
# which change the rounding as another CPU would, and with 2 threads. Each run is deterministic (a repeat gives the
# same bits, under load too). "Drift" is max |two - one| / max |one - init| (see _drift).
#                                     worst of the 9      without --sync-bn (3 seeds)   tolerance
#   loss of the first step            2.0e-7              6.8e-3 .. 1.3e-2              2e-6
#   loss of every step and epoch      3.0e-4              4.0e-2 .. 1.0e-1              3e-3
#   classifier (fc.*) drift           5.9e-4              0.72 .. 1.3                   6e-3
#   a file's tensors together (L2)    7.5e-4              0.24 .. 0.28                  7.5e-3
#   the worst single tensor           2.6e-2              1.76 .. 1.90                  0.25
# The first loss sees the same weights, so only the forward's rounding parts the runs; later, rounding sometimes
# flips a discrete choice (a ReLU, a max-pool) and a tensor jumps a few percent of its update (seeds 1, 2, 4; the
# issue's "bn1.bias differs" at rtol=atol=1e-4 is such a jump, reproduced here as 5.8e-4 in conv1.weight). Top-1 is
# not compared: it is 2 of the 64 images apart with sync-BN at seed 1, and equal without it.
FIRST_LOSS_RTOL = 2e-6
LOSS_RTOL = 3e-3
CLASSIFIER_RTOL = 6e-3
WEIGHTS_RTOL = 7.5e-3
TENSOR_RTOL = 0.25


def _env() -> dict:
    return {**os.environ, "SASA_NO_DOWNLOAD": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def _run(cmd: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return run_group(cmd, env=_env(), cwd=ROOT, timeout=timeout)


def _losses(run: Path) -> tuple[list[float], list[float]]:
    """The training loss of every step and the validation loss of every epoch, from ``metrics.jsonl``."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return ([r["loss"] for r in records if r["kind"] == "step"],
            [r["val_loss"] for r in records if r["kind"] == "epoch"])


def _drift(one: Path, two: Path, seed: int = SEED) -> dict[str, float]:
    """How far run ``two`` ended from run ``one``, relative to how far ``one`` moved from the initial weights: for
    every float tensor of ``model.safetensors`` and ``model_ema.safetensors``, max |two - one| / max |one - init|
    (keys ``"FILE:TENSOR"``), and over all of a file's float tensors together, |two - one| / |one - init| in the
    2-norm (keys ``"FILE"``). Integer tensors (BN batch counts) must be equal."""
    torch.manual_seed(seed)  # as train._train: the run's seed right before create_model
    init = create_model("test_resnet", num_classes=10, in_chans=3).state_dict()
    drift = {}
    for name in ("model.safetensors", "model_ema.safetensors"):
        w1, w2 = load_safetensors(one / name)[0], load_safetensors(two / name)[0]
        assert w1.keys() == w2.keys() == init.keys(), name
        diff_sq = moved_sq = 0.0
        for k, a in w1.items():
            if not a.is_floating_point():
                assert torch.equal(a, w2[k]), f"{name}:{k} differs"
                continue
            diff, moved = w2[k].double() - a.double(), a.double() - init[k].double()
            drift[f"{name}:{k}"] = diff.abs().max().item() / moved.abs().max().item()
            diff_sq, moved_sq = diff_sq + diff.square().sum().item(), moved_sq + moved.square().sum().item()
        drift[name] = math.sqrt(diff_sq / moved_sq)
    return drift


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tmp_path):
    """``torchrun`` with 2 gloo processes (global batch 32 = 2 x 16, ``--sync-bn``) against 1 process, float32:
    the same losses, classifier and weights within measured rounding drift (the table under TRAIN), run directories
    with the same files.

    Not bit for bit: BatchNorm over small per-rank batches amplifies float32 rounding, which differs with the
    reduction order (1 or 2 processes, the CPU's kernels), and this tiny BN net's training is chaotic.
    test_float64_ddp_sync_bn_equals_one_process shows the maths is exact."""
    one, two = tmp_path / "one", tmp_path / "two"
    proc = _run([sys.executable, "-m", "sasa", *TRAIN, "--output", str(one)])
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    proc = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "sasa",
                 *TRAIN, "--output", str(two)])
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    s1, s2 = (json.loads((run / "summary.json").read_text()) for run in (one, two))
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    assert sorted(p.name for p in two.iterdir()) == sorted(p.name for p in one.iterdir())

    (steps1, val1), (steps2, val2) = _losses(one), _losses(two)
    assert len(steps1) == len(steps2) == 4 and len(val1) == len(val2) == 2
    # the first loss comes from the same weights: only the sync-BN forward's rounding separates the runs
    assert steps2[0] == pytest.approx(steps1[0], rel=FIRST_LOSS_RTOL)
    assert steps2 + val2 == pytest.approx(steps1 + val1, rel=LOSS_RTOL)

    drift = _drift(one, two)
    for name in ("model.safetensors", "model_ema.safetensors"):
        assert drift[name] < WEIGHTS_RTOL, f"{name}: all weights {drift[name]:.3g} of their update apart"
        classifier = max(v for k, v in drift.items() if k.startswith(f"{name}:fc."))
        assert classifier < CLASSIFIER_RTOL, f"{name}: classifier {classifier:.3g} of its update apart"
    worst = max((v, k) for k, v in drift.items() if ":" in k)
    assert worst[0] < TENSOR_RTOL, f"{worst[1]}: {worst[0]:.3g} of its update apart"


def test_sync_bn_conversion_keeps_dtype_and_values():
    model = create_model("test_sasa_resnet", num_classes=10).double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    converted = convert_sync_batchnorm(model, torch.device("cpu"))
    bns = [m for m in converted.modules() if isinstance(m, DistributedBatchNorm2d)]
    assert len(bns) == 17 and all(m.weight.dtype == torch.float64 for m in bns)
    after = converted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # float64 BN weights not rounded to float32
