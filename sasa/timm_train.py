"""Run timm's ``train.py`` (or any timm script) with the ``sasa_*`` models registered.

timm's scripts never import sasa, so ``--model sasa_resnet26`` is unknown to them. This launcher imports sasa (which
registers the models with timm as soon as timm is imported, see ``sasa/timm_compat.py``) and then runs the script as
``__main__`` with the remaining arguments, as ``python SCRIPT ARGS...`` would::

    python -m sasa.timm_train path/to/pytorch-image-models/train.py --model sasa_resnet26 --num-classes 10 ..."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

USAGE = "usage: python -m sasa.timm_train SCRIPT [ARGS...]   (e.g. timm's train.py with --model sasa_resnet26)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script = Path(argv[0])
    if not script.is_file():
        print(f"sasa.timm_train: error: script {str(script)!r} does not exist\n{USAGE}", file=sys.stderr)
        return 2
    import sasa  # noqa: F401  (registers the sasa_* models with timm)

    sys.argv = [str(script), *argv[1:]]
    sys.path.insert(0, str(script.resolve().parent))  # as `python SCRIPT` puts the script's folder first
    runpy.run_path(str(script), run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
