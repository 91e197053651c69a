"""The package version, in one place: ``pyproject.toml`` reads it, ``sasa.__version__`` and run records show it."""

__version__ = "0.1.0"
