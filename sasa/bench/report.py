"""Plain-text tables and the JSON record of a ``sasa bench`` run."""

from __future__ import annotations

import json
import os


def _ms(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['median']:.3f} [{stats['min']:.3f}-{stats['max']:.3f}]"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _cpu(stats: dict | None) -> str:
    return f"{stats['cpu_median']:.3f}" if stats and "cpu_median" in stats else "-"


def layer_table(rows: list[dict]) -> str:
    cpu = any("cpu_median" in (r.get("fwd_bwd_ms") or {}) for r in rows)
    header = (f"{'shape (HxWxC)':<14} {'impl':<22} {'fwd ms median [min-max]':>28} {'fwd+bwd ms median [min-max]':>30}"
              + (f" {'f+b cpu ms':>10}" if cpu else "") + f" {'peak MB':>9} {'fwd/conv':>8} {'f+b/conv':>8}")
    lines = [header, "-" * len(header)]
    for r in rows:
        if r["error"]:
            lines.append(f"{r['shape']:<14} {r['impl']:<22} {r['error']}")
            continue
        lines.append(f"{r['shape']:<14} {r['impl']:<22} {_ms(r['fwd_ms']):>28} {_ms(r['fwd_bwd_ms']):>30}"
                     + (f" {_cpu(r['fwd_bwd_ms']):>10}" if cpu else "")
                     + f" {r['peak_mb']:>9.1f} {_ratio(r.get('fwd_vs_conv')):>8} {_ratio(r.get('fwd_bwd_vs_conv')):>8}")
    return "\n".join(lines)


def model_table(rows: list[dict]) -> str:
    cpu = any("cpu_median" in (r.get("train_ms") or {}) for r in rows)
    w = max([24] + [len(r["model"]) for r in rows])
    header = (f"{'model':<{w}} {'backend':<24} {'params M':>8} {'train ms median [min-max]':>30}"
              + (f" {'cpu ms':>9}" if cpu else "") + f" {'img/s':>8} {'vs conv':>7} {'peak MB':>9} {'infer img/s':>11}")
    lines = [header, "-" * len(header)]
    for r in rows:
        backend = r.get("backend") or "-"
        if r["error"]:
            lines.append(f"{r['model']:<{w}} {backend:<24} {r['error']}")
            continue
        lines.append(f"{r['model']:<{w}} {backend:<24} {r['params_m']:>8.2f} {_ms(r['train_ms']):>30}"
                     + (f" {_cpu(r['train_ms']):>9}" if cpu else "")
                     + f" {r['train_img_s']:>8.1f} {_ratio(r.get('vs_conv')):>7} {r['peak_mb']:>9.1f}"
                     f" {r['infer_img_s']:>11.1f}")
    return "\n".join(lines)


def profile_tables(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        if r.get("profile"):
            out += ["", f"Top operators of one training step, {r['model']} (self time):"]
            out += [f"  {p['self_ms']:10.1f} ms {100 * p['share']:5.1f}% {p['calls']:6d} calls  {p['op'][:70]}"
                    for p in r["profile"]]
    return out


def render(result: dict) -> str:
    m = result["meta"]
    dirty = " (with local changes)" if m.get("dirty") else ""
    title = (f"sasa bench: {m['device_name']} | torch {m['torch']} | {m['dtype']}"
             f"{' channels_last' if m['channels_last'] else ''} | commit {m['commit']}{dirty} | {m['date']}")
    out = [title, f"peak MB = {m['memory']}"]
    if m.get("load_average") is not None and m["device"] == "cpu":
        out.append(f"load average at start: {m['load_average']:.2f} on {os.cpu_count()} cores "
                   f"(cpu ms = process CPU time per call, all threads); freed memory: {m.get('cpu_malloc', '?')}")
    if "layer" in result:
        lc = result["layer_config"]
        out += ["", (f"Layer (SelfAttention2d incl. projections): batch {lc['batch']}, k={lc['kernel_size']}, "
                     f"{lc['heads']} heads, warm-up {lc['warmup']}, {lc['repeats']} repeats"),
                layer_table(result["layer"])]
    if "op" in result:
        lc = result["layer_config"]
        out += ["", (f"Op (local_attention_2d alone, q/k/v views of one fused tensor): batch {lc['batch']}, "
                     f"k={lc['kernel_size']}, {lc['heads']} heads"), layer_table(result["op"])]
    if "stem" in result:
        r = result["stem"][0]
        out += ["", (f"Stem (ResNet's conv1 vs AttentionStem(3, 64), the attention at full resolution): batch "
                     f"{r['batch']}, {r['height']}x{r['width']} images"), layer_table(result["stem"])]
    if "model" in result:
        mc = result["model_config"]
        out += ["", (f"Model: batch {mc['batch']}, {mc['image_size']}x{mc['image_size']}, training step = fwd + "
                     f"loss + bwd + SGD, warm-up {mc['warmup']}, {mc['repeats']} repeats"
                     f"{', torch.compile' if mc['compile'] else ''}"), model_table(result["model"])]
        out += profile_tables(result["model"])
    return "\n".join(out)


def write_json(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
