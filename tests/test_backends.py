"""One backend mechanism for both ops (``window`` and ``stem``), one reader of the environment, and the boundary:
nothing outside ``sasa/backends`` imports a backend module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

from sasa import AttentionStem, SelfAttention2d, backends

PACKAGE = Path(__file__).resolve().parents[1] / "sasa"
BACKEND_MODULES = {p.stem for p in (PACKAGE / "backends").glob("*.py")} - {"__init__"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        yield path, ast.parse(path.read_text(), str(path))


def _imported(path: Path, node: ast.AST) -> list[str]:
    """Dotted names an import statement reaches (``from x import y`` gives ``x.y``), relative ones resolved."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-node.level]
        base = ".".join((*package, *([base] if base else [])))
    return [base] + [f"{base}.{a.name}" for a in node.names]


def test_no_backend_module_imported_outside_backends():
    offenders = []
    for path, tree in _modules():
        if path.parent == PACKAGE / "backends":
            continue
        for node in ast.walk(tree):
            for name in _imported(path, node):
                parts = name.split(".")
                if parts[:2] == ["sasa", "backends"] and len(parts) > 2 and parts[2] in BACKEND_MODULES:
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} imports {name}")
    assert not offenders, offenders


def test_settings_is_the_only_reader_of_sasa_variables():
    offenders = set()
    for path, tree in _modules():
        if path == PACKAGE / "settings.py":
            continue
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Call, ast.Subscript, ast.Compare)):
                continue
            text = ast.unparse(node)
            if ("os.environ" in text or "getenv" in text) and any(
                    isinstance(c, ast.Constant) and isinstance(c.value, str) and c.value.startswith("SASA_")
                    for c in ast.walk(node)):
                offenders.add(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}")
    assert not offenders, sorted(offenders)


class _Both(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = AttentionStem(3, 8, heads=2)
        self.layer = SelfAttention2d(8, 8, 3, heads=2)

    def forward(self, x):
        return self.layer(self.stem(x))


@pytest.mark.parametrize("name", ["reference", "shifted"])
def test_force_pins_both_ops(name, monkeypatch):
    monkeypatch.setenv("SASA_BACKEND", "inductor")  # force wins over the environment (no compile happens)
    model, x = _Both(), torch.randn(1, 3, 8, 8)
    with backends.record() as used, backends.force(name):
        model(x)
    assert used == {("window", name), ("stem", name)}
    monkeypatch.delenv("SASA_STEM_BACKEND", raising=False)
    with backends.record() as used, backends.force("inductor"):  # the stem has no inductor: its own choice stands
        model.stem(x)
    assert used == {("stem", "shifted")}


def test_unknown_and_old_names():
    with pytest.raises(ValueError, match=r"valid backends: \['inductor', 'reference', 'shifted'"):
        backends.force("cuda-magic").__enter__()
    with pytest.raises(ValueError, match=r"unknown for the stem op; valid backends: \['reference', 'shifted'"):
        AttentionStem(backend="inductor")
    with pytest.raises(ValueError, match="'torch' is now called 'shifted'"):
        AttentionStem(backend="torch")


def test_old_stem_env_spelling_names_the_new_one(monkeypatch):
    """``SASA_STEM_BACKEND=torch`` (before the registry) fails at the first stem call, naming ``shifted``."""
    stem, x = AttentionStem(3, 8, heads=2), torch.randn(1, 3, 4, 4)
    monkeypatch.setenv("SASA_STEM_BACKEND", "torch")
    with pytest.raises(ValueError, match="'torch' is now called 'shifted'"):
        stem(x)
    monkeypatch.setenv("SASA_STEM_BACKEND", "Reference")
    torch.testing.assert_close(stem(x), stem.reference_forward(x))


@pytest.mark.parametrize("values", ["spatial", "plain"])
def test_stem_reference_backend_matches_textbook(values):
    """The stem op's ``reference`` backend against the layer's q / k / v formulation, output and gradients."""
    torch.manual_seed(0)
    stem = AttentionStem(3, 8, heads=2, block_size=2, values=values, mixtures=3, backend="reference").double()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    out, expected = stem(x), stem.reference_forward(x)
    torch.testing.assert_close(out, expected)
    params = [x, *stem.parameters()]
    for got, want in zip(torch.autograd.grad(out.sum(), params), torch.autograd.grad(expected.sum(), params)):
        torch.testing.assert_close(got, want)
