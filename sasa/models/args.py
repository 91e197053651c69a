"""Model arguments as the command line writes them: ``"width_multiplier=0.5,attention_stages=(3, 4)"`` -> dict.

One syntax for ``sasa train --model-args``, ``sasa detect-train --backbone-args``, ``sasa show-attention
--model-args`` and ``sasa bench --models NAME@KEY=VALUE``."""

from __future__ import annotations

import ast


def split_top_level(text: str) -> list[str]:
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
    """``["width_multiplier=0.5", "attention_stages=(3, 4)"]`` or ``["a=1,b=2"]`` -> dict of Python literals (a
    value that is not one stays a string). Raises ``ValueError`` naming an item that is not ``KEY=VALUE``."""
    out = {}
    for item in (part for text in items for part in split_top_level(text)):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise ValueError(f"--model-args expects KEY=VALUE items, got {item!r}")
        try:
            out[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            out[key.strip()] = value.strip()
    return out
