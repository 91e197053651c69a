"""Training configuration: one typed dataclass, YAML files, command-line overrides, validation before any work.

Precedence: the dataclass defaults (the embedded Fashion-MNIST demo; ``configs/default.yaml`` is a commented copy)
< ``--config FILE`` < command-line flags. ``model_args`` merges key by key instead of being replaced. Every field
is also a flag (``batch_size`` -> ``--batch-size``; booleans get ``--no-...`` too), so a YAML file and a command
line say the same things. Unknown keys, wrong types and impossible values raise ``ConfigError`` naming the key,
the value and what was expected, before any data is read or any model is built.

This module imports no torch: the CLI can validate a config and print help quickly.

Status: complete.
"""

import argparse
import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml

from .atomic import atomic_write_text

DATASETS = ("fashion-mnist", "imagefolder", "cifar10", "cifar100", "synthetic")
AUGMENTS = ("crop-flip", "inception", "flip", "none")
OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "bf16", "off")
DEVICES = ("cpu", "cuda")
# Keys a resumed run may change; anything else would make the resumed run a different experiment.
RESUMABLE_OVERRIDES = ("epochs", "quiet", "workers", "threads", "checkpoint_every", "log_every", "device",
                       "eval_every", "compile")


# The Fashion-MNIST demo's model (configs/default.yaml and TRAINING.md say why each value).
DEMO_MODEL_ARGS = {"width_multiplier": 0.25, "heads": 4, "kernel_size": 7, "padding": "mask",
                   "zero_init_residual": True}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


def _f(default, help: str, *, choices: tuple | None = None, flag: bool = True, **kw):
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag}, **kw)


@dataclass
class TrainConfig:
    """Everything a ``sasa train`` run needs. The defaults are the Fashion-MNIST demo (``configs/default.yaml``)."""

    # model
    model: str = _f("sasa_resnet26_convstem", "registered model name (sasa info --list)")
    model_args: dict = field(default_factory=lambda: dict(DEMO_MODEL_ARGS), metadata={
        "help": "create_model overrides, e.g. width_multiplier=0.5 heads=8 (in_chans is set from the data; these "
                "defaults apply to the default model only)", "choices": None, "flag": True})
    # data
    dataset: str = _f("fashion-mnist", "dataset", choices=DATASETS)
    data_dir: str | None = _f(None, "data folder (Fashion-MNIST: optional; imagefolder, cifar: required)")
    image_size: int | None = _f(None, "input side in pixels (default: 32 for 28-32 px datasets, 224 for folders)")
    augment: str | None = _f(None, "training augmentation (default: per dataset)", choices=AUGMENTS)
    holdout_fraction: float = _f(0.0, "fraction of the training set held out as validation (paper: 0.04)")
    holdout_seed: int = _f(0, "seed of the hold-out split (independent of --seed)")
    train_subset: int | None = _f(None, "use only the first N training images")
    val_subset: int | None = _f(None, "use only the first N validation images")
    max_bad_fraction: float = _f(0.001, "fraction of unreadable images tolerated (skipped and counted) before failing")
    workers: int = _f(1, "DataLoader worker processes per rank")
    # optimisation
    epochs: int = _f(3, "training epochs")
    batch_size: int = _f(128, "global batch size (split evenly across ranks)")
    optimizer: str = _f("adamw", "optimizer (sgd = Nesterov momentum SGD)", choices=OPTIMIZERS)
    lr: float = _f(0.003, "peak learning rate at batch size lr_base_batch (or at batch_size when that is unset)")
    lr_base_batch: int | None = _f(None, "if set, lr scales linearly: lr * batch_size / lr_base_batch")
    momentum: float = _f(0.9, "SGD momentum (adamw: beta1)")
    nesterov: bool = _f(True, "Nesterov momentum for SGD")
    weight_decay: float = _f(0.05, "weight decay (not applied to norms, biases, relative/stem embeddings)")
    warmup_epochs: float = _f(0.3, "linear warm-up epochs, then cosine decay")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of the peak")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy")
    ema_decay: float = _f(0.0, "EMA decay of the weights (0: no EMA); EMA weights are evaluated beside the raw ones")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: off)")
    # execution
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)", choices=DEVICES)
    amp: str = _f("auto", "bf16 autocast: auto = on for CUDA, off for CPU", choices=AMP)
    channels_last: bool | None = _f(None, "channels-last memory format (default: on for CUDA)")
    compile: bool = _f(False, "torch.compile the model")
    sync_bn: bool = _f(False, "synchronise BatchNorm statistics across ranks (DDP)")
    threads: int | None = _f(1, "torch CPU threads per process (null: torch's choice)")
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    # run directory
    output: str | None = _f(None, "run directory (default: runs/<model>-<dataset>-<time>)")
    checkpoint_every: int = _f(0, "also checkpoint every N optimizer steps (0: at epoch ends only)")
    log_every: int = _f(50, "write a metrics.jsonl step record every N steps")
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)")
    quiet: bool = _f(False, "no progress bar: one line per epoch, for logs")
    resume: str | None = _f(None, "continue the run in this directory from its last checkpoint", flag=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
DEFAULT_MODEL = TrainConfig.model


def _base_type(tp) -> tuple[type, bool]:
    """(underlying type, optional?) of a field annotation such as ``Optional[int]``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = _base_type(tp)
    name = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping"}[base]
    return name + (" or null" if optional else "")


def check_value(key: str, value: Any, *, source: str = "") -> Any:
    """Return ``value`` converted to the type of ``key`` (ints are accepted where numbers are), or raise."""
    where = f" in {source}" if source else ""
    if key not in FIELDS:
        close = difflib.get_close_matches(key, FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{where}{hint}; valid keys: {', '.join(FIELDS)}")
    f = FIELDS[key]
    base, optional = _base_type(f.type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r}{where} must be {_type_name(f.type)}, got null")
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, int) and not isinstance(value, bool) if base is int else isinstance(value, base))
    if not ok:
        raise ConfigError(f"config key {key!r}{where} must be {_type_name(f.type)}, got {value!r} "
                          f"({type(value).__name__})")
    if base is float:
        value = float(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"config key {key!r}{where} must be one of {choices}, got {value!r}")
    return value


def load_yaml(path: str | os.PathLike) -> dict:
    """A YAML mapping of config keys (validated key by key)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys, got {type(data).__name__}")
    return {k: check_value(str(k), v, source=str(path)) for k, v in data.items()}


def validate(cfg: TrainConfig) -> TrainConfig:
    """Value checks beyond types; raises ``ConfigError`` naming the key."""
    positive = ("epochs", "batch_size", "log_every", "eval_every")
    for key in positive:
        if getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1, got {getattr(cfg, key)}")
    for key in ("checkpoint_every", "workers", "weight_decay", "warmup_epochs", "label_smoothing", "grad_clip",
                "min_lr_ratio", "max_bad_fraction"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"config key {key!r} must be >= 0, got {getattr(cfg, key)}")
    for key in ("train_subset", "val_subset", "image_size", "threads", "lr_base_batch"):
        if getattr(cfg, key) is not None and getattr(cfg, key) < 1:
            raise ConfigError(f"config key {key!r} must be >= 1 or null, got {getattr(cfg, key)}")
    if cfg.lr <= 0:
        raise ConfigError(f"config key 'lr' must be > 0, got {cfg.lr}")
    if not 0 <= cfg.holdout_fraction < 1:
        raise ConfigError(f"config key 'holdout_fraction' must be in [0, 1), got {cfg.holdout_fraction}")
    if not 0 <= cfg.ema_decay < 1:
        raise ConfigError(f"config key 'ema_decay' must be in [0, 1), got {cfg.ema_decay}")
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"config key 'label_smoothing' must be in [0, 1), got {cfg.label_smoothing}")
    if cfg.max_bad_fraction > 1:
        raise ConfigError(f"config key 'max_bad_fraction' must be in [0, 1], got {cfg.max_bad_fraction}")
    if cfg.warmup_epochs > cfg.epochs:
        raise ConfigError(f"config key 'warmup_epochs' ({cfg.warmup_epochs}) exceeds 'epochs' ({cfg.epochs})")
    for k, v in cfg.model_args.items():
        if not isinstance(k, str):
            raise ConfigError(f"config key 'model_args' must map names to values, got key {k!r}")
        if isinstance(v, list):
            cfg.model_args[k] = tuple(v)  # YAML lists -> tuples (attention_stages=(3, 4))
    if cfg.data_dir is not None and not os.path.isdir(cfg.data_dir):
        raise ConfigError(f"config key 'data_dir': {cfg.data_dir!r} does not exist or is not a folder")
    return cfg


def resolve(config_file: str | os.PathLike | None = None, overrides: dict | None = None) -> TrainConfig:
    """Defaults < ``config_file`` < ``overrides`` (flags), validated. ``model_args`` merges key by key."""
    values: dict = {}
    if config_file is not None:
        values.update(load_yaml(config_file))
    flag_model_args: dict = {}
    for k, v in (overrides or {}).items():
        v = check_value(k, v, source="command line")
        if k == "model_args":
            flag_model_args = v
        else:
            values[k] = v
    # the default model_args belong to the default model: another model starts from its own defaults
    if "model_args" in values:
        model_args = dict(values["model_args"])
    elif values.get("model", DEFAULT_MODEL) == DEFAULT_MODEL:
        model_args = dict(TrainConfig().model_args)
    else:
        model_args = {}
    values["model_args"] = {**model_args, **flag_model_args}
    return validate(TrainConfig(**values))


def to_dict(cfg: TrainConfig) -> dict:
    """Plain dict (tuples become lists) for YAML/JSON and checkpoints."""
    def plain(v):
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def dump_yaml(cfg: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (``resume`` left out: it is not part of the experiment)."""
    data = to_dict(cfg)
    data.pop("resume", None)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def from_dict(data: dict, *, source: str = "") -> TrainConfig:
    """A config from a plain dict (a run directory's ``config.yaml`` or a checkpoint), validated key by key."""
    values = {k: check_value(k, v, source=source) for k, v in data.items()}
    values.setdefault("model_args", {})
    return TrainConfig(**values)


# ---- command-line flags: one per field ------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets: ``"a=1,b=(3, 4)"`` -> ``["a=1", "b=(3, 4)"]``."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text + ","):
        depth += ch in "([{"
        depth -= ch in ")]}"
        if ch == "," and depth == 0:
            if text[start:i].strip():
                parts.append(text[start:i].strip())
            start = i + 1
    return parts


def parse_model_args(items: list[str]) -> dict:
    """``["width_multiplier=0.5", "attention_stages=(3, 4)"]`` or ``["a=1,b=2"]`` -> dict (Python literals, else
    strings), the same syntax as ``sasa show-attention --model-args``."""
    import ast

    out = {}
    for item in (part for text in items for part in _split_top_level(text)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ConfigError(f"--model-args expects KEY=VALUE items, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add one flag per config field to ``parser``; unset flags stay absent from the parsed namespace."""
    for name, f in FIELDS.items():
        if not f.metadata.get("flag", True):
            continue
        flag = "--" + name.replace("_", "-")
        base, _ = _base_type(f.type)
        kw: dict = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif base is dict:
            parser.add_argument(flag, nargs="+", metavar="KEY=VALUE", **kw)
        else:
            parser.add_argument(flag, type=base, **kw)


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The config keys given on the command line."""
    out = {k: getattr(args, k) for k in FIELDS if hasattr(args, k) and FIELDS[k].metadata.get("flag", True)}
    if "model_args" in out:
        out["model_args"] = parse_model_args(out["model_args"])
    return out
