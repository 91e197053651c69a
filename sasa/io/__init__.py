"""Reading and writing files, below every application: atomic writes, checkpoints and weights files."""

from .atomic import atomic_write, atomic_write_text
from .checkpoint import (
    CheckpointError,
    check_compatible,
    load_checkpoint,
    load_safetensors,
    load_state_dict_checked,
    read_weights,
    save_checkpoint,
    save_safetensors,
)

__all__ = ["CheckpointError", "atomic_write", "atomic_write_text", "check_compatible", "load_checkpoint",
           "load_safetensors", "load_state_dict_checked", "read_weights", "save_checkpoint", "save_safetensors"]
