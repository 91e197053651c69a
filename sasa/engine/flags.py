"""Command-line flags from a config dataclass: one flag per field (``batch_size`` -> ``--batch-size``), and back."""

import argparse

from ..models.args import parse_model_args
from .config import ConfigError, TrainConfig, base_type, fields_of


def add_flags(parser: argparse.ArgumentParser, schema: type = TrainConfig, *, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per config field to ``parser`` (but ``skip``); unset flags stay absent from the parsed namespace."""
    for name, f in fields_of(schema).items():
        if name in skip:
            continue
        if not f.metadata.get("flag", True):
            continue
        flag = "--" + name.replace("_", "-")
        base, _ = base_type(f.type)
        kw: dict = {"dest": name, "default": argparse.SUPPRESS, "help": f.metadata["help"]}
        if f.metadata.get("choices"):
            kw["choices"] = f.metadata["choices"]
        if base is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif base is dict:
            parser.add_argument(flag, nargs="+", metavar="KEY=VALUE", **kw)
        elif base is list:
            parser.add_argument(flag, nargs="+", type=float, **kw)
        else:
            parser.add_argument(flag, type=base, **kw)


def overrides_from_args(args: argparse.Namespace, schema: type = TrainConfig) -> dict:
    """The config keys given on the command line."""
    fields = fields_of(schema)
    out = {k: getattr(args, k) for k in fields if hasattr(args, k) and fields[k].metadata.get("flag", True)}
    for k, v in out.items():
        if base_type(fields[k].type)[0] is dict:
            try:
                out[k] = parse_model_args(v)
            except ValueError as err:
                raise ConfigError(str(err).replace("--model-args", "--" + k.replace("_", "-"))) from None
    return out
