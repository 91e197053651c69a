"""Engine pieces: atomic checkpoints, weights_only loading, compatibility errors, config validation, optimizer
groups and schedule, EMA, metrics, signals, the non-finite-loss stop. Fast: no training beyond a few tiny steps."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import sasa
from sasa.engine import GracefulStop, MetricsLogger, plot_metrics
from sasa.engine import config as C
from sasa.engine.classify import ClassificationTask, NonFiniteLossError, accuracy_counts
from sasa.engine.distributed import init_distributed
from sasa.engine.ema import build_ema
from sasa.engine.optim import build_optimizer, build_scheduler, no_weight_decay, warmup_cosine
from sasa.engine.train import precheck
from sasa.engine.trainer import Trainer
from sasa.io.checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_safetensors,
    load_state_dict_checked,
    save_checkpoint,
    save_safetensors,
)
from sasa.models.args import parse_model_args

ROOT = Path(__file__).resolve().parents[1]


# ---- checkpoints -------------------------------------------------------------------------------------------------


def test_checkpoint_roundtrip_weights_only(tmp_path):
    state = {"model": {"w": torch.arange(3.0)}, "step": 7, "rng": torch.get_rng_state(), "names": ["a", "b"]}
    save_checkpoint(tmp_path / "c.pt", state)
    back = load_checkpoint(tmp_path / "c.pt")
    assert back["step"] == 7 and torch.equal(back["model"]["w"], torch.arange(3.0))
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]  # no temp file left


def test_failed_save_keeps_previous_checkpoint(tmp_path):
    save_checkpoint(tmp_path / "c.pt", {"step": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom mid-write")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint(tmp_path / "c.pt", {"step": 2, "x": torch.zeros(1000), "bad": Unpicklable()})
    assert load_checkpoint(tmp_path / "c.pt")["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_torn_checkpoint(tmp_path):
    """A writer saving in a loop is SIGKILLed at arbitrary moments; the file on disk always loads."""
    script = textwrap.dedent(f"""
        import torch, sys
        sys.path.insert(0, {str(ROOT)!r})
        from sasa.io.checkpoint import save_checkpoint
        i = 0
        while True:
            i += 1
            save_checkpoint({str(tmp_path / "c.pt")!r}, {{"step": i, "w": torch.full((200_000,), float(i))}})
            print(i, flush=True)
    """)
    for delay in (0.6, 0.75, 0.9):
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "1"  # at least one save finished before the kill
        time.sleep(delay)
        proc.kill()
        proc.wait()
        state = load_checkpoint(tmp_path / "c.pt")
        assert torch.equal(state["w"], torch.full((200_000,), float(state["step"])))


def test_load_rejects_garbage_and_pickled_objects(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_checkpoint(tmp_path / "garbage.pt")
    torch.save({"obj": Path("x")}, tmp_path / "pickle.pt")  # a class outside the weights_only allow-list
    with pytest.raises(CheckpointError, match="PosixPath|WindowsPath|global"):
        load_checkpoint(tmp_path / "pickle.pt")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt")


def test_mismatch_errors_name_the_difference():
    with pytest.raises(CheckpointError, match="model 'resnet26'.*model='sasa_resnet26'"):
        check_compatible({"model": "resnet26", "num_classes": 10}, model="sasa_resnet26")
    with pytest.raises(CheckpointError, match="num_classes=10.*num_classes=100"):
        check_compatible({"model": "resnet26", "num_classes": 10}, model="resnet26", num_classes=100)
    a = sasa.create_model("test_resnet", num_classes=10)
    b = sasa.create_model("test_resnet", num_classes=3)
    with pytest.raises(CheckpointError, match=r"shape mismatch.*fc\.weight"):
        load_state_dict_checked(b, a.state_dict())


def test_safetensors_roundtrip_with_meta(tmp_path):
    m = sasa.create_model("test_resnet", num_classes=4)
    save_safetensors(tmp_path / "m.safetensors", m.state_dict(), {"model": "test_resnet", "num_classes": 4,
                                                                   "model_args": {"in_chans": 3}})
    state, meta = load_safetensors(tmp_path / "m.safetensors")
    assert meta == {"model": "test_resnet", "num_classes": 4, "model_args": {"in_chans": 3}}
    load_state_dict_checked(sasa.create_model("test_resnet", num_classes=4), state)


# ---- config ------------------------------------------------------------------------------------------------------


def test_config_unknown_key_and_wrong_type_name_the_key(tmp_path):
    (tmp_path / "a.yaml").write_text("epochs: 2\nbatch_szie: 64\n")
    with pytest.raises(C.ConfigError, match="'batch_szie'.*did you mean 'batch_size'"):
        C.resolve(tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text("epochs: two\n")
    with pytest.raises(C.ConfigError, match="'epochs'.*must be an integer.*'two'"):
        C.resolve(tmp_path / "b.yaml")
    with pytest.raises(C.ConfigError, match="'dataset'.*must be one of"):
        C.resolve(None, {"dataset": "mnist"})
    with pytest.raises(C.ConfigError, match="'data_dir'.*does not exist"):
        C.resolve(None, {"data_dir": str(tmp_path / "nope")})
    with pytest.raises(C.ConfigError, match="'lr' must be > 0"):
        C.resolve(None, {"lr": 0.0})


def test_config_precedence_and_model_args_merge(tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 5\nlr: 0.5\nmodel_args: {width_multiplier: 0.5}\n")
    cfg = C.resolve(tmp_path / "c.yaml", {"lr": 0.1, "model_args": {"heads": 2}})
    assert (cfg.epochs, cfg.lr, cfg.model_args) == (5, 0.1, {"width_multiplier": 0.5, "heads": 2})
    assert C.resolve(None, {"model": "resnet26"}).model_args == {}  # the demo's model_args stay with the demo


def test_default_yaml_is_the_embedded_default():
    cfg = C.resolve(ROOT / "configs" / "default.yaml")
    assert C.to_dict(cfg) == C.to_dict(C.TrainConfig())


def test_default_yaml_quotes_no_wall_time():
    """Wall times depend on the machine and drift; they live in TRAINING.md beside their record, not in comments."""
    text = (ROOT / "configs" / "default.yaml").read_text()
    amount = r"\b(?:\d+(?:\.\d+)?|one|two|three|four|five|ten)\s*"
    assert not re.findall(amount + r"(?:minutes?|min|hours?)\b", text, re.I)


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("imagenet_*.yaml")), ids=lambda p: p.stem)
def test_imagenet_configs_follow_the_paper(path):
    cfg = C.resolve(path)
    assert (cfg.epochs, cfg.optimizer, cfg.nesterov, cfg.lr, cfg.lr_base_batch) == (130, "sgd", True, 1.6, 4096)
    assert (cfg.warmup_epochs, cfg.ema_decay, cfg.augment, cfg.image_size) == (10, 0.9999, "inception", 224)
    assert cfg.dataset == "imagefolder" and path.stem == f"imagenet_{cfg.model}"
    with pytest.raises(C.ConfigError, match="data_dir"):
        precheck(cfg)  # no --data-dir: fails before any work
    # the paper's BatchNorm decay 0.9999, as PyTorch's momentum, in the model sasa train builds from the config
    model = sasa.create_model(cfg.model, num_classes=10, **cfg.model_args)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) > 20 and all(m.momentum == 1e-4 for m in norms)


def test_bn_momentum_model_arg():
    model = sasa.create_model("test_sasa_resnet", bn_momentum=0.01)
    assert {m.momentum for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {0.01}
    assert {m.momentum for m in sasa.create_model("test_sasa_resnet").modules()
            if isinstance(m, nn.BatchNorm2d)} == {0.1}  # PyTorch's default stays the default
    with pytest.raises(ValueError, match="bn_momentum must be in"):
        sasa.create_model("test_resnet", bn_momentum=1.5)
    seen = []
    model.bn1.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    model.train()(torch.randn(2, 3, 32, 32))
    # one training step moves the running mean from 0 by momentum x the batch mean
    torch.testing.assert_close(model.bn1.running_mean, 0.01 * seen[0].mean((0, 2, 3)))


def test_stem_relu_follows_the_paper_and_is_an_option():
    """SPEC section 2: the attention stem is attention, BN, max pool (no ReLU); conv stems keep ResNet's ReLU;
    ``stem_relu`` sets it either way, from a config or the command line, and weights load across the two."""
    torch.manual_seed(0)
    paper = sasa.create_model("test_sasa_resnet", num_classes=3)
    with_relu = sasa.create_model("test_sasa_resnet", num_classes=3, stem_relu=True)
    x = torch.randn(2, 3, 32, 32)
    assert isinstance(paper.relu, nn.Identity) and isinstance(with_relu.relu, nn.ReLU)

    def pool_input(model):
        seen = []
        handle = model.maxpool.register_forward_hook(lambda module, args, out: seen.append(args[0]))
        with torch.no_grad():
            model.eval()(x)
        handle.remove()
        return seen[0]

    assert pool_input(paper).min() < 0  # BN straight into the pool: negative activations pass
    with_relu.load_state_dict(paper.state_dict())  # no parameters differ
    assert pool_input(with_relu).min() >= 0
    assert isinstance(sasa.create_model("test_resnet").relu, nn.ReLU)  # the conv stem keeps ResNet's
    assert isinstance(sasa.create_model("test_resnet", stem_relu=False).relu, nn.Identity)
    cfg = C.resolve(None, {"model": "test_sasa_resnet", "model_args": parse_model_args(["stem_relu=True"])})
    assert cfg.model_args == {"stem_relu": True}
    assert isinstance(sasa.create_model(cfg.model, num_classes=3, **cfg.model_args).relu, nn.ReLU)


def test_precheck_names_bad_model_args():
    with pytest.raises(C.ConfigError, match="model_args"):
        precheck(C.resolve(None, {"model_args": {"no_such_arg": 1}}))
    with pytest.raises(C.ConfigError, match="unknown model 'resnet27'"):
        precheck(C.resolve(None, {"model": "resnet27"}))


# ---- optimisation ------------------------------------------------------------------------------------------------


def test_no_weight_decay_on_norms_biases_and_embeddings():
    model = sasa.create_model("test_sasa_resnet", num_classes=10)
    names = {n for n, p in model.named_parameters() if no_weight_decay(n, p)}
    assert any(n.endswith("rel_rows") for n in names) and any(n.endswith("rel_cols") for n in names)
    assert any(".emb_" in n for n in names) and "fc.bias" in names and "bn1.weight" in names
    assert "fc.weight" not in names and not any(n.endswith("qkv.weight") for n in names)
    opt = build_optimizer(model, name="sgd", lr=0.1, weight_decay=1e-4)
    assert [g["weight_decay"] for g in opt.param_groups] == [1e-4, 0.0] and opt.defaults["nesterov"]


def test_warmup_then_cosine():
    f = [warmup_cosine(s, total_steps=100, warmup_steps=10, min_ratio=0.0) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0)
    assert all(f[i] >= f[i + 1] for i in range(10, 99)) and f[-1] < 0.01


def test_scheduler_and_optimizer_state_survive_weights_only(tmp_path):
    model = nn.Linear(4, 2)
    opt = build_optimizer(model, name="sgd", lr=0.1, weight_decay=1e-4)
    sched = build_scheduler(opt, total_steps=20, warmup_steps=5)
    for _ in range(3):
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    save_checkpoint(tmp_path / "s.pt", {"opt": opt.state_dict(), "sched": sched.state_dict()})
    back = load_checkpoint(tmp_path / "s.pt")
    opt2 = build_optimizer(model, name="sgd", lr=0.1, weight_decay=1e-4)
    sched2 = build_scheduler(opt2, total_steps=20, warmup_steps=5)
    opt2.load_state_dict(back["opt"])
    sched2.load_state_dict(back["sched"])
    assert sched2.get_last_lr() == sched.get_last_lr()


def test_ema_first_copies_then_averages():
    model = nn.Linear(2, 1, bias=False)
    ema = build_ema(model, 0.9)
    ema.update_parameters(model)
    with torch.no_grad():
        before = model.weight.clone()
        model.weight.add_(1.0)
    ema.update_parameters(model)
    assert torch.allclose(ema.module.weight, 0.9 * before + 0.1 * model.weight)


def test_accuracy_counts():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.2], [0.3, 0.2, 0.5]])
    top1, top5 = accuracy_counts(logits, torch.tensor([1, 2, 0]))
    assert (int(top1), int(top5)) == (1, 3)  # top-5 capped at 3 classes


# ---- metrics and signals -----------------------------------------------------------------------------------------


def test_metrics_jsonl_truncate_and_plot(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (10, 20, 30):
        log.log({"kind": "step", "epoch": step / 20, "step": step, "loss": 1.0 / step})
    log.log({"kind": "epoch", "epoch": 1, "step": 20, "train_loss": 0.5, "val_top1": 80.0, "val_loss": float("nan")})
    with open(log.path, "a") as f:
        f.write('{"kind": "step", "tor')  # a write torn by a kill
    assert len(log.read()) == 4 and log.read()[-1]["val_loss"] is None
    log.truncate(lambda r: r["step"] <= 20)
    assert [r["step"] for r in log.read()] == [10, 20, 20]
    plot_metrics(log.path, tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    MetricsLogger(tmp_path / "off", enabled=False).log({"a": 1})
    assert not (tmp_path / "off").exists()


def test_graceful_stop_turns_signals_into_a_flag():
    previous = signal.getsignal(signal.SIGTERM)
    with GracefulStop() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)
        assert stop.requested and stop.signal_name == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) is previous


# ---- the loop ----------------------------------------------------------------------------------------------------


class _NaNAfter(nn.Module):
    """A tiny classifier whose output turns NaN from the ``n``-th forward on."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)
        self.n, self.calls = n, 0

    def forward(self, x):
        self.calls += 1
        out = self.fc(x.flatten(1))
        return out * float("nan") if self.calls >= self.n else out


def test_non_finite_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    from torch.utils.data import DataLoader

    from sasa.data import ResumableDistributedSampler, build_data, collate_skip_bad

    data = build_data("synthetic", train_subset=64)
    sampler = ResumableDistributedSampler(data.train, num_replicas=1, rank=0)
    loader = DataLoader(data.train, batch_size=8, sampler=sampler, collate_fn=collate_skip_bad, drop_last=True)
    model = _NaNAfter(5)
    opt = build_optimizer(model, name="sgd", lr=0.01, weight_decay=0.0)
    saved = []

    def save(kind):
        saved.append(trainer.progress.global_step)
        save_checkpoint(tmp_path / "last.pt", {"model": model.state_dict(), "step": trainer.progress.global_step})

    dist = init_distributed("cpu")
    trainer = Trainer(task=ClassificationTask(val_loader=None, device=dist.device), model=model, module=model,
                      optimizer=opt, scheduler=None, train_loader=loader, dist=dist, epochs=2, checkpoint_every=2,
                      save=save, quiet=True, print_fn=lambda m: None)
    good = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLossError, match=r"epoch 1, batch 5/8 \(global step 5\)"):
        trainer.fit()
    assert saved == [2, 4]
    ckpt = load_checkpoint(tmp_path / "last.pt")
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values())
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())  # no NaN step was applied
    assert not torch.equal(good["fc.weight"], model.state_dict()["fc.weight"])


def test_default_config_file_parses_as_yaml():
    data = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    assert data["dataset"] == "fashion-mnist"


_FREED_MEMORY_PROBE = textwrap.dedent("""
    import torch
    from sasa.process import allocator_state, configure_process

    def rss_mb():
        return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

    configure_process("cpu")
    x = torch.ones(32 * 2**20 // 4)  # 32 MiB, above glibc's largest mmap threshold
    before = rss_mb()
    del x
    print(allocator_state(), "|", round(before - rss_mb()))
""")


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("setting", ["", "default"])
@pytest.mark.slow
def test_cpu_processes_keep_freed_memory(setting):
    env = {**os.environ, "SASA_CPU_MALLOC": setting}
    out = subprocess.run([sys.executable, "-c", _FREED_MEMORY_PROBE], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.strip().splitlines()[-1]
    state, returned_mb = out.split(" | ")
    if setting == "default":
        assert state == "default (SASA_CPU_MALLOC=default)"
        assert int(returned_mb) >= 30  # glibc gave the freed block back to the OS at once
    elif state == "kept (glibc mallopt)":
        assert int(returned_mb) <= 2  # kept for the next step's tensors: no page faults to get it back
    else:
        assert state == "default (not glibc)"
