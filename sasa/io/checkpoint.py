"""Checkpoints and weights files: atomic writes, ``weights_only`` loads, safetensors, compatibility checks.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (what ``torch.load(weights_only=True)``
accepts, so loading never runs pickle code); its ``meta`` dict (``{"model": name, "num_classes": n, ...}``) is what
``check_compatible`` compares. safetensors is imported only by the functions that use it."""

from __future__ import annotations

import json
import os
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from .atomic import atomic_write


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, or that belongs to another model / class count."""


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Write ``state`` (plain containers of tensors, numbers, strings and ``None``, so that ``load_checkpoint``
    reads it with ``weights_only=True``) to ``path`` atomically with ``torch.save``; the folder is created."""
    if not isinstance(state, dict):
        raise TypeError(f"state must be a dict, got {type(state).__name__}")
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu", *, mmap: bool = False) -> dict:
    """Read a checkpoint written by ``save_checkpoint`` with ``torch.load(weights_only=True)``; ``mmap`` maps the
    file instead of reading it, so a caller that only looks at ``progress`` or ``meta`` never reads the tensors.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is not a readable checkpoint (truncated, corrupt, not a torch file, or holds
            objects other than tensors and plain containers).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, AttributeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {str(path)!r} is unreadable or not a plain-tensor checkpoint "
                              f"(loaded with weights_only=True): {_reason(err)}") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {type(state).__name__}, expected a dict")
    return state


def _reason(err: BaseException) -> str:
    """The informative part of torch.load's error (its weights_only messages lead with generic advice)."""
    text = str(err)
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\.\s|\n\n|$)", text, flags=re.DOTALL)
    if match:
        return " ".join(match.group(1).split())
    first = text.strip().splitlines()[0] if text.strip() else type(err).__name__
    return first.split(". This is an internal")[0]


def check_compatible(meta: dict, *, model: str | None = None, num_classes: int | None = None,
                     source: str = "checkpoint") -> None:
    """Raise ``CheckpointError`` naming the mismatch when ``meta`` was written for another ``model`` or
    ``num_classes`` (``None``: not checked); ``source`` names the file in messages."""
    if model is not None and meta.get("model") not in (None, model):
        raise CheckpointError(f"{source} was written for model {meta['model']!r}, but model={model!r} was requested")
    if num_classes is not None and meta.get("num_classes") not in (None, num_classes):
        raise CheckpointError(f"{source} was written for num_classes={meta['num_classes']}, but the model/dataset "
                              f"needs num_classes={num_classes}")


def load_state_dict_checked(module: nn.Module, state_dict: dict, *, source: str = "checkpoint") -> None:
    """``module.load_state_dict(strict=True)`` with a short error naming missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}" for k in own
              if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:5]}{' ...' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected keys {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
        if shapes:
            parts.append(f"shape mismatch {shapes[:3]}{' ...' if len(shapes) > 3 else ''}")
        raise CheckpointError(f"{source} does not fit this model: " + "; ".join(parts))
    module.load_state_dict(state_dict, strict=True)


def save_safetensors(path: str | os.PathLike, state_dict: dict, meta: dict | None = None) -> None:
    """Write tensors as safetensors (atomically); ``meta`` is stored as JSON strings in the file's metadata."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items() if isinstance(v, torch.Tensor)}
    metadata = {k: json.dumps(v) for k, v in (meta or {}).items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_safetensors(path: str | os.PathLike) -> tuple[dict, dict]:
    """Read a safetensors file written by ``save_safetensors``: ``(state_dict, meta)``."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"weights file {str(path)!r} is not a readable safetensors file: {err}") from err
    return state, decode_meta(raw)


def decode_meta(raw: dict[str, str]) -> dict:
    """A safetensors header's string metadata as ``save_safetensors`` wrote it: JSON values decoded, other strings
    kept."""
    meta = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except json.JSONDecodeError:
            meta[k] = v
    return meta


def weights_file(path: str | os.PathLike, *, ema: bool = False) -> Path:
    """The weights file ``path`` names: a file itself, or in a run directory ``model_ema.safetensors`` (with
    ``ema``), else ``model.safetensors``, else ``last.pt``."""
    path = Path(path)
    if path.is_dir():
        names = (("model_ema.safetensors",) if ema else ()) + ("model.safetensors", "last.pt")
        for name in names:
            if (path / name).is_file():
                return path / name
        raise FileNotFoundError(f"{str(path)!r} holds none of {list(names)}")
    if not path.is_file():
        raise FileNotFoundError(f"weights {str(path)!r} do not exist")
    return path


def read_weights(path: str | os.PathLike) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a safetensors file (``save_safetensors``), a checkpoint dict with a ``'model'`` (or
    ``'state_dict'``) state dict and an optional ``'meta'`` dict (``save_checkpoint``), or a bare state dict.
    ``module.`` (DDP) and ``_orig_mod.`` (``torch.compile``) key prefixes are stripped.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: the file is unreadable or holds no state dict.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        state, meta = load_safetensors(path)
    else:
        ckpt = load_checkpoint(path)
        state = ckpt.get("model", ckpt.get("state_dict", ckpt))
        meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"weights {str(path)!r}: expected a safetensors file, a checkpoint dict with a 'model' "
                              "state dict, or a bare state dict")
    clean = {}
    for key, value in state.items():
        for prefix in ("module.", "_orig_mod."):
            key = key.removeprefix(prefix)
        clean[key] = value
    return clean, meta
