"""Model accounting tables for ``sasa info``: parameters and GFLOPs, optionally beside the paper's Table 1.

With ``paper=True`` each of our counts stands beside the figure the paper printed (``MODEL_INFO``, SPEC section 3)
and the difference, ours minus the paper's."""

from __future__ import annotations

from .flops import count_flops, count_params
from .models import MODEL_INFO, create_model


def diff(ours: float, paper: float, digits: int) -> str:
    """``ours - paper`` with a sign and ``digits`` decimals: ``diff(14.166, 14.1, 2) == "+0.07"`` (a difference
    that rounds to zero is ``"+0.00"``, never ``"-0.00"``)."""
    return f"{round(ours - paper, digits) + 0.0:+.{digits}f}"


def model_table(names: list[str] | None = None, *, paper: bool = False, num_classes: int = 1000,
                image_size: int = 224) -> str:
    """A plain-text table of params (M) and GFLOPs per model; with ``paper``, the paper's printed params, GFLOPs
    and top-1 beside ours, each count followed by the difference."""
    names = names or [n for n in MODEL_INFO if "paper_params_m" in MODEL_INFO[n]]  # paper order
    if paper:
        header = (f"{'model':<26} {'params (M)':>10} {'paper':>6} {'diff':>6} {'GFLOPs':>7} {'paper':>6} "
                  f"{'diff':>6} {'paper top-1':>11}")
    else:
        header = f"{'model':<26} {'params (M)':>10} {'GFLOPs':>7}"
    lines = [header, "-" * len(header)]
    for name in names:
        model = create_model(name, num_classes=num_classes)
        params = count_params(model) / 1e6
        gflops = count_flops(model, (1, 3, image_size, image_size)) / 1e9
        info = MODEL_INFO[name]
        if paper and "paper_params_m" in info:
            p_params, p_gflops = info["paper_params_m"], info["paper_gflops"]
            lines.append(f"{name:<26} {params:>10.2f} {p_params:>6} {diff(params, p_params, 2):>6} {gflops:>7.2f} "
                         f"{p_gflops:>6} {diff(gflops, p_gflops, 2):>6} {info['paper_top1']:>11}")
        elif paper:  # not a row of the paper's table
            lines.append(f"{name:<26} {params:>10.2f} {'-':>6} {'-':>6} {gflops:>7.2f} {'-':>6} {'-':>6} {'-':>11}")
        else:
            lines.append(f"{name:<26} {params:>10.2f} {gflops:>7.2f}")
    if paper:
        lines.append("paper: Ramachandran et al. 2019, Table 1, as printed (ImageNet 224x224, 1000 classes; SPEC "
                     "section 3); diff = ours - paper; GFLOPs count a multiply-add as 2")
    return "\n".join(lines)
