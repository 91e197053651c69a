"""The library core (op, backends, layers, models, FLOP counts) imports and runs without the applications'
dependencies, and the command line names the extra to install when one is missing."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A meta-path finder that makes the applications' dependencies look uninstalled: `import tqdm` raises
# ModuleNotFoundError as it would without the package (find_spec still answers, as torch's import probes expect).
BLOCK = textwrap.dedent("""
    import importlib.abc, importlib.machinery, sys
    BLOCKED = {"pycocotools", "matplotlib", "tqdm", "yaml", "safetensors"}

    class _Missing(importlib.abc.Loader):
        def create_module(self, spec):
            raise ModuleNotFoundError(f"No module named {spec.name!r}", name=spec.name)

        def exec_module(self, module):
            pass

    class _Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                return importlib.machinery.ModuleSpec(name, _Missing())
            return None

    sys.meta_path.insert(0, _Block())
""")


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=ROOT, timeout=300, check=False)


def test_core_runs_without_the_applications_dependencies():
    proc = _run("""
        import torch, sasa
        model = sasa.create_model("test_sasa_resnet", num_classes=3)
        x = torch.randn(2, 3, 32, 32)  # (B, C, H, W)
        model(x).sum().backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        q = torch.randn(1, 8, 8, 2, 4, requires_grad=True)  # (B, H, W, heads, head_dim)
        out = sasa.local_attention_2d(q, q, q, torch.randn(3, 2), torch.randn(3, 2), kernel_size=3)
        out.sum().backward()
        assert out.shape == q.shape and q.grad is not None
        assert sasa.count_flops(model, (1, 3, 32, 32)) > 0
        for name in ("tqdm", "matplotlib", "pycocotools", "yaml", "safetensors"):
            assert name not in sys.modules or sys.modules[name] is None, name
        print("core ok")
    """)
    assert proc.returncode == 0 and "core ok" in proc.stdout, proc.stderr[-3000:]


def test_cli_names_the_missing_extra():
    proc = _run("""
        from sasa.cli import main
        sys.exit(main(["train", "--epochs", "1"]))
    """)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "pip install 'sasa-vision[train]'" in proc.stderr and "Traceback" not in proc.stderr


# The import tiers, lowest first: a module may import from its own tier and the ones below, never above. The
# library (tiers 0-4) is what `pip install sasa-vision` needs; the applications sit on top of it.
TIERS = [
    ("version", "settings", "process"),
    ("backends",),
    ("functional",),
    ("layers",),
    ("models", "flops", "timm_compat", "io"),
    ("data", "viz"),
    ("engine",),
    ("detection", "bench", "info", "timm_train", "export"),
    ("cli", "__main__", "__init__"),
]


def _tier(module: str) -> int:
    """Tier of a dotted module name below ``sasa`` (``"engine.train"`` -> its package's tier)."""
    head = module.split(".")[0] if not module.endswith("__main__") else "__main__"  # entry points: the top
    for level, names in enumerate(TIERS):
        if head in names:
            return level
    raise AssertionError(f"sasa.{module} is in no tier of tests/test_tiers.py: add it")


def _imports(path: Path) -> list[tuple[str, int]]:
    """``(imported sasa module relative to the package, line)`` for every import in ``path``."""
    package = path.relative_to(ROOT / "sasa").with_suffix("").parts
    package = package[:-1] if package[-1] != "__init__" else package[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = list(package[: len(package) - node.level + 1])
            names = [".".join(base + ([node.module] if node.module else []))]
            if not node.module:  # `from . import x` / `from .. import x`: each name is a module or an attribute
                names = [".".join(base + [a.name]) for a in node.names]
            found += [(n.strip("."), node.lineno) for n in names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("sasa."):
            found.append((node.module[len("sasa."):], node.lineno))
        elif isinstance(node, ast.Import):
            found += [(a.name[len("sasa."):], node.lineno) for a in node.names if a.name.startswith("sasa.")]
    return found


def test_imports_only_run_downward():
    upward = []
    for path in sorted((ROOT / "sasa").rglob("*.py")):
        own = ".".join(path.relative_to(ROOT / "sasa").with_suffix("").parts)
        for target, line in _imports(path):
            if target and _tier(target) > _tier(own):
                upward.append(f"sasa/{path.relative_to(ROOT / 'sasa')}:{line} imports sasa.{target}")
    assert not upward, "imports running upward:\n" + "\n".join(upward)
