"""Training configuration: a typed dataclass per task, YAML files, command-line flags, validation first.

``RunConfig`` holds the fields every training task shares; ``TrainConfig`` (``sasa train``) here and
``DetectConfig`` (``sasa.detection.config``) subclass it. Precedence: dataclass defaults < ``--config FILE`` <
flags; dict fields (``model_args``, ``backbone_args``) merge key by key. Every field is a flag (``batch_size`` ->
``--batch-size``). Bad keys, types and values raise ``ConfigError`` naming the key before any data is read; a
renamed key names its new spelling (``RENAMED``)."""

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Union

import yaml

from ..io.atomic import atomic_write_text

DATASETS = ("fashion-mnist", "imagefolder", "cifar10", "cifar100", "synthetic")
AUGMENTS = ("crop-flip", "inception", "flip", "none")
OPTIMIZERS = ("sgd", "adamw")
AMP = ("auto", "bf16", "off")
DEVICES = ("cpu", "cuda")
# Old spellings (the detection engine's own vocabulary until it joined the shared trainer) -> what to write now.
RENAMED = {"lr_batch": "lr_base_batch", "backbone_overrides": "backbone_args",
           "progress": "quiet (inverted: progress: false is quiet: true)"}
RENAMED_VALUES = {("amp", "none"): "off"}

# The Fashion-MNIST demo's model (configs/default.yaml and TRAINING.md say why each value).
DEMO_MODEL_ARGS = {"width_multiplier": 0.25, "heads": 4, "kernel_size": 7, "padding": "mask",
                   "zero_init_residual": True}


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key."""


def _f(default, help: str, *, choices: tuple | None = None, flag: bool = True, bound: str | None = None, **kw):
    """A config field: its flag's help, its allowed values (``choices``, ``bound``), whether it is a flag."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "bound": bound}, **kw)


def _within(value: float, bound: str) -> bool:
    """Whether ``value`` satisfies ``bound``: ``">= 1"``, ``"> 0"``, ``"in [0, 1)"`` or ``"in [0, 1]"``."""
    op, _, rest = bound.partition(" ")
    if op == ">=":
        return value >= float(rest)
    if op == ">":
        return value > float(rest)
    low, high = (float(x) for x in rest[1:-1].split(","))
    return low <= value and (value < high if rest.endswith(")") else value <= high)


@dataclass
class RunConfig:
    """The fields every training task shares; subclasses add their model and data fields and may change defaults."""

    # Keys a resumed run may change; anything else would make the resumed run a different experiment.
    resumable: ClassVar[tuple[str, ...]] = ("epochs", "quiet", "workers", "threads", "checkpoint_every", "log_every",
                                            "device", "eval_every", "compile")
    # optimisation
    epochs: int = _f(3, "training epochs", bound=">= 1")
    batch_size: int = _f(128, "global batch size (split evenly across ranks)", bound=">= 1")
    optimizer: str = _f("adamw", "optimizer (sgd = SGD with momentum, Nesterov if --nesterov)", choices=OPTIMIZERS)
    lr: float = _f(0.003, "peak learning rate at batch size lr_base_batch (or batch_size when unset)", bound="> 0")
    lr_base_batch: int | None = _f(None, "if set, lr scales linearly: lr * batch_size / lr_base_batch", bound=">= 1")
    momentum: float = _f(0.9, "SGD momentum (adamw: beta1)")
    nesterov: bool = _f(True, "Nesterov momentum for SGD")
    weight_decay: float = _f(0.05, "weight decay (not on norms, biases, relative/stem embeddings)", bound=">= 0")
    warmup_epochs: float = _f(0.3, "linear warm-up epochs, then cosine decay", bound=">= 0")
    min_lr_ratio: float = _f(0.0, "final learning rate as a fraction of the peak", bound=">= 0")
    ema_decay: float = _f(0.0, "EMA decay of the weights (0: no EMA; EMA weights are evaluated too)", bound="in [0, 1)")
    grad_clip: float = _f(0.0, "clip the gradient norm to this value (0: off)", bound=">= 0")
    # execution
    workers: int = _f(1, "DataLoader worker processes per rank", bound=">= 0")
    device: str | None = _f(None, "cpu or cuda (default: cuda when available)", choices=DEVICES)
    amp: str = _f("auto", "bf16 autocast: auto = on for CUDA, off for CPU", choices=AMP)
    compile: bool = _f(False, "torch.compile the model")
    sync_bn: bool = _f(False, "synchronise BatchNorm statistics across ranks (DDP)")
    threads: int | None = _f(1, "torch CPU threads per process (null: torch's choice)", bound=">= 1")
    seed: int = _f(0, "seed of initialisation, data order and augmentation")
    # run directory
    output: str | None = _f(None, "run directory")
    checkpoint_every: int = _f(0, "also checkpoint every N optimizer steps (0: at epoch ends only)", bound=">= 0")
    log_every: int = _f(50, "write a metrics.jsonl step record every N steps", bound=">= 1")
    eval_every: int = _f(1, "evaluate every N epochs (and after the last; 0: after the last only)",
                         bound=">= 0")
    quiet: bool = _f(False, "no progress bar: one line per epoch, for logs")
    resume: str | None = _f(None, "continue the run in this directory from its last checkpoint", flag=False)

    @classmethod
    def dict_default(cls, name: str, values: dict) -> dict:
        """The value a dict field starts from when the YAML file does not set it (``values``: the other keys)."""
        return dict(cls.__dataclass_fields__[name].default_factory())

    def validate(self) -> "RunConfig":
        """Value checks beyond types (each field's ``bound``); raises ``ConfigError`` naming the key."""
        for name, f in fields_of(type(self)).items():
            value, bound = getattr(self, name), f.metadata.get("bound")
            if bound and value is not None and not _within(value, bound):
                null = " or null" if base_type(f.type)[1] else ""
                raise ConfigError(f"config key {name!r} must be {bound}{null}, got {value}")
            if base_type(f.type)[0] is dict:
                for k, v in value.items():
                    if not isinstance(k, str):
                        raise ConfigError(f"config key {name!r} must map names to values, got key {k!r}")
                    if isinstance(v, list):
                        value[k] = tuple(v)  # YAML lists -> tuples (attention_stages=(3, 4))
        if self.warmup_epochs > self.epochs:
            raise ConfigError(f"config key 'warmup_epochs' ({self.warmup_epochs}) exceeds 'epochs' ({self.epochs})")
        if getattr(self, "data_dir", None) is not None and not os.path.isdir(self.data_dir):
            raise ConfigError(f"config key 'data_dir': {self.data_dir!r} does not exist or is not a folder")
        return self


@dataclass
class TrainConfig(RunConfig):
    """Everything a ``sasa train`` run needs. The defaults are the Fashion-MNIST demo (``configs/default.yaml``)."""

    # model
    model: str = _f("sasa_resnet26_convstem", "registered model name (sasa info --list)")
    model_args: dict = field(default_factory=lambda: dict(DEMO_MODEL_ARGS), metadata={
        "help": "create_model overrides, e.g. width_multiplier=0.5 heads=8 (in_chans is set from the data; these "
                "defaults apply to the default model only)", "choices": None, "flag": True})
    # data
    dataset: str = _f("fashion-mnist", "dataset", choices=DATASETS)
    data_dir: str | None = _f(None, "data folder (Fashion-MNIST: optional; imagefolder, cifar: required)")
    image_size: int | None = _f(None, "input side in pixels (default: 32 for 28-32 px, 224 for folders)", bound=">= 1")
    augment: str | None = _f(None, "training augmentation (default: per dataset)", choices=AUGMENTS)
    holdout_fraction: float = _f(0.0, "training set fraction held out as validation (paper: 0.04)", bound="in [0, 1)")
    holdout_seed: int = _f(0, "seed of the hold-out split (independent of --seed)")
    train_subset: int | None = _f(None, "use only the first N training images", bound=">= 1")
    val_subset: int | None = _f(None, "use only the first N validation images", bound=">= 1")
    max_bad_fraction: float = _f(0.001, "fraction of unreadable images skipped before failing", bound="in [0, 1]")
    label_smoothing: float = _f(0.1, "label smoothing of the cross-entropy", bound="in [0, 1)")
    channels_last: bool | None = _f(None, "channels-last memory format (default: on for CUDA)")
    output: str | None = _f(None, "run directory (default: runs/<model>-<dataset>-<time>)")
    eval_every: int = _f(1, "evaluate every N epochs (and always after the last)", bound=">= 1")

    @classmethod
    def dict_default(cls, name: str, values: dict) -> dict:
        # the default model_args belong to the default model: another model starts from its own defaults
        return dict(DEMO_MODEL_ARGS) if values.get("model", DEFAULT_MODEL) == DEFAULT_MODEL else {}


DEFAULT_MODEL = TrainConfig.model


def fields_of(schema: type = TrainConfig) -> dict[str, dataclasses.Field]:
    """Field name -> dataclass field of a config class."""
    return {f.name: f for f in dataclasses.fields(schema)}


def base_type(tp) -> tuple[type, bool]:
    """(underlying type, optional?) of a field annotation such as ``Optional[int]``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _type_name(tp) -> str:
    base, optional = base_type(tp)
    name = {int: "an integer", float: "a number", str: "a string", bool: "true/false", dict: "a mapping",
            list: "a list"}[base]
    return name + (" or null" if optional else "")


def check_value(key: str, value: Any, *, source: str = "", schema: type = TrainConfig) -> Any:
    """Return ``value`` converted to the type of ``key`` (ints are accepted where numbers are), or raise."""
    where = f" in {source}" if source else ""
    fields = fields_of(schema)
    if key not in fields:
        if key in RENAMED:
            raise ConfigError(f"config key {key!r}{where} was renamed to {RENAMED[key]}")
        close = difflib.get_close_matches(key, fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"unknown config key {key!r}{where}{hint}; valid keys: {', '.join(fields)}")
    f = fields[key]
    base, optional = base_type(f.type)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"config key {key!r}{where} must be {_type_name(f.type)}, got null")
    ok = (isinstance(value, bool) if base is bool else
          isinstance(value, (int, float)) and not isinstance(value, bool) if base is float else
          isinstance(value, int) and not isinstance(value, bool) if base is int else
          isinstance(value, (list, tuple)) if base is list else isinstance(value, base))
    if not ok:
        raise ConfigError(f"config key {key!r}{where} must be {_type_name(f.type)}, got {value!r} "
                          f"({type(value).__name__})")
    if base is float:
        value = float(value)
    if base is list:
        value = list(value)
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        new = RENAMED_VALUES.get((key, value))
        hint = f" ({value!r} was renamed to {new!r})" if new else ""
        raise ConfigError(f"config key {key!r}{where} must be one of {choices}, got {value!r}{hint}")
    return value


def load_yaml(path: str | os.PathLike, schema: type = TrainConfig) -> dict:
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
    return {k: check_value(str(k), v, source=str(path), schema=schema) for k, v in data.items()}


def resolve(config_file: str | os.PathLike | None = None, overrides: dict | None = None, *,
            schema: type = TrainConfig) -> RunConfig:
    """Defaults < ``config_file`` < ``overrides`` (flags), validated. Dict fields merge key by key."""
    values: dict = {}
    if config_file is not None:
        values.update(load_yaml(config_file, schema))
    flag_dicts: dict = {}
    for k, v in (overrides or {}).items():
        v = check_value(k, v, source="command line", schema=schema)
        (flag_dicts if isinstance(v, dict) else values)[k] = v
    for name, f in fields_of(schema).items():
        if base_type(f.type)[0] is dict:
            start = dict(values[name]) if name in values else schema.dict_default(name, values)
            values[name] = {**start, **flag_dicts.get(name, {})}
    return schema(**values).validate()


def to_dict(cfg: RunConfig) -> dict:
    """Plain dict (tuples become lists) for YAML/JSON and checkpoints."""
    def plain(v):
        if isinstance(v, tuple | list):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return {k: plain(v) for k, v in dataclasses.asdict(cfg).items()}


def dump_yaml(cfg: RunConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (``resume`` left out: it is not part of the experiment)."""
    data = to_dict(cfg)
    data.pop("resume", None)
    atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def from_dict(data: dict, *, source: str = "", schema: type = TrainConfig) -> RunConfig:
    """A config from a plain dict (a run directory's ``config.yaml`` or a checkpoint), validated key by key."""
    values = {k: check_value(k, v, source=source, schema=schema) for k, v in data.items()}
    for name, f in fields_of(schema).items():
        if base_type(f.type)[0] is dict:
            values.setdefault(name, {})
    return schema(**values)
