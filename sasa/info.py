"""Model accounting tables for ``sasa info``: parameters and GFLOPs, optionally beside SPEC section 3."""

from __future__ import annotations

from .flops import count_flops, count_params
from .models import MODEL_INFO, create_model


def model_table(names: list[str] | None = None, *, paper: bool = False, num_classes: int = 1000,
                image_size: int = 224) -> str:
    """A plain-text table of params (M) and GFLOPs per model, with the paper's figures when ``paper``."""
    names = names or [n for n in MODEL_INFO if "paper_params_m" in MODEL_INFO[n]]  # paper order
    header = f"{'model':<26} {'params (M)':>10} {'GFLOPs':>7}"
    if paper:
        header += f" {'paper params':>12} {'paper GFLOPs':>12} {'paper top-1':>11}"
    lines = [header, "-" * len(header)]
    for name in names:
        model = create_model(name, num_classes=num_classes)
        params = count_params(model) / 1e6
        gflops = count_flops(model, (1, 3, image_size, image_size)) / 1e9
        row = f"{name:<26} {params:>10.2f} {gflops:>7.2f}"
        info = MODEL_INFO[name]
        if paper and "paper_params_m" in info:
            row += f" {info['paper_params_m']:>12} {info['paper_gflops']:>12} {info['paper_top1']:>11}"
        lines.append(row)
    if paper:
        lines.append("paper: Ramachandran et al. 2019, ImageNet 224x224, 1000 classes (SPEC section 3); "
                     "GFLOPs count a multiply-add as 2")
    return "\n".join(lines)
