#!/usr/bin/env python
"""Fill the results tables of BENCHMARKS.md and TRAINING.md from the JSON records in ``benchmarks/``.

The pages hold their prose by hand and their figures between markers::

    <!-- bench_report: cpu-layer -->
    ...generated: record, command, commit, torch version, then the table...
    <!-- /bench_report -->

Each block name maps to a function below that reads one or more records (``benchmarks/README.md`` gives their
schema and naming) and returns the markdown. ``tests/test_bench_report.py`` fails when a page differs from what
this script generates, when a block names no function, and when a record in ``benchmarks/`` is used by no block.

Usage, from the repository root::

    python tools/bench_report.py           # rewrite the blocks of BENCHMARKS.md and TRAINING.md in place
    python tools/bench_report.py --check   # exit 1 and print a diff if a page is not what the records give
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDS = os.path.join(ROOT, "benchmarks")
PAGES = ("BENCHMARKS.md", "TRAINING.md")
BLOCK = re.compile(r"(<!-- bench_report: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /bench_report -->)", re.S)

# Records whose meta says "commit unknown" (the GPU machine's copy of the tree had no .git): the commit of the tree
# that was copied there.
TREE_COMMIT = {"2026-11-26_h200_layer-op-model.json": "4b885d2", "2026-11-26_h200_layer-model_tiles-first.json":
               "4b885d2 with the first TILES", "2026-11-26_h200_correctness.json": "4b885d2"}


def load(name: str) -> dict | list:
    with open(os.path.join(RECORDS, name)) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------------- formatting


def _f(x: float, digits: int = 1) -> str:
    return f"{x:.{digits}f}"


def _ms(x: float) -> str:
    """Milliseconds with three significant figures (0.247, 6.46, 20.6, 206)."""
    if x < 1:
        return f"{x:.3f}"
    if x < 10:
        return f"{x:.2f}"
    return f"{x:.1f}" if x < 100 else f"{x:.0f}"


def _x(ratio: float) -> str:
    return f"{ratio:.2f}x"


def _commit(name: str, meta: dict) -> str:
    commit = TREE_COMMIT.get(name) or str(meta.get("commit", "?"))[:7]
    return commit + (" + local changes" if meta.get("dirty") else "")


def source(name: str) -> str:
    """The line under every table: record file, command, commit, torch version, date, conditions."""
    rec = load(name)
    m = rec["meta"]
    cmd = re.sub(r" --out \S+", " --out FILE", m["command"])
    parts = [f"Record [`benchmarks/{name}`](benchmarks/{name})", f"`{cmd}`", f"commit `{_commit(name, m)}`",
             f"torch {m['torch']}", m["device_name"],
             m["dtype"] + (", channels_last" if m.get("channels_last") else "")]
    if m["device"] == "cpu":
        parts.append(f"load average {m['load_average']:.2f}")
    parts.append(m["date"])
    return "; ".join(parts) + "."


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def rows_by(rec: dict, mode: str) -> dict[tuple[str, str], dict]:
    """(shape, implementation) -> row, for the layer / op / stem rows; implementation names without 'op '."""
    out = {}
    for r in rec.get(mode, []):
        if r["error"] is None:
            out[(r["shape"], r["impl"].removeprefix("op ").removesuffix(" (reference)"))] = r
    return out


def fb(row: dict) -> float:
    return row["fwd_bwd_ms"]["median"]


def models(rec: dict) -> dict[str, dict]:
    return {r["model"]: r for r in rec["model"] if r["error"] is None}


def train_ms(row: dict) -> float:
    return row["train_ms"]["median"]


# ---------------------------------------------------------------------------------------------------- blocks


def _layer_vs_conv(name: str, impls: list[str]) -> str:
    rec = load(name)
    by = rows_by(rec, "layer")
    shapes = rec["layer_config"]["shapes"]
    header = ["shape HxWxC", "conv3x3"] + [f"`{i}`" for i in impls] + [f"`{impls[0]}` / conv", "peak MB: conv / "
                                                                           + " / ".join(impls)]
    rows = []
    for s in shapes:
        conv = by[(s, "conv3x3")]
        present = [i for i in impls if (s, i) in by]
        rows.append([s, _ms(fb(conv))] + [_ms(fb(by[(s, i)])) if (s, i) in by else "-" for i in impls]
                    + [_x(fb(by[(s, impls[0])]) / fb(conv))]
                    + [" / ".join([_f(conv["peak_mb"])] + [_f(by[(s, i)]["peak_mb"]) for i in present])])
    return table(header, rows) + "\n\n" + source(name)


def _op_vs_unfold(name: str, impls: list[str]) -> str:
    rec = load(name)
    by = rows_by(rec, "op")
    shapes = rec["layer_config"]["shapes"]
    header = ["shape HxWxC"] + [f"`{i}`" for i in impls] + ["unfold", f"unfold / `{impls[0]}`",
                                                            f"peak MB: `{impls[0]}` / unfold"]
    rows = []
    for s in shapes:
        unfold = by[(s, "unfold")]
        best = by[(s, impls[0])]
        rows.append([s] + [_ms(fb(by[(s, i)])) for i in impls] + [_ms(fb(unfold)), _x(fb(unfold) / fb(best)),
                                                                   f"{_f(best['peak_mb'])} / {_f(unfold['peak_mb'])}"])
    return table(header, rows) + "\n\n" + source(name)


def _model_table(name: str, conv: str) -> str:
    rec = load(name)
    ms = models(rec)
    base = ms[conv]
    header = ["model", "backend", "params (M)", "train step ms", f"step vs {conv}", "train img/s",
              f"img/s vs {conv}", "peak MB", f"peak vs {conv}", "inference img/s"]
    rows = []
    for model, r in ms.items():
        rows.append([f"`{model}`", (r["backend"] or "-").split(" ")[0], f"{r['params_m']:.2f}", _ms(train_ms(r)),
                     _x(train_ms(r) / train_ms(base)), _f(r["train_img_s"]), _x(r["train_img_s"] / base["train_img_s"]),
                     f"{r['peak_mb']:.0f}",
                     _x(r["peak_mb"] / base["peak_mb"]), _f(r["infer_img_s"])])
    mc = rec["model_config"]
    return (f"Batch {mc['batch']}, {mc['image_size']}x{mc['image_size']}, median of {mc['repeats']} steps.\n\n"
            + table(header, rows) + "\n\n" + source(name))


def cpu_layer() -> str:
    return _layer_vs_conv("2026-11-26_cpu-1thread_layer-op.json", ["inductor", "shifted", "unfold"])


def cpu_op() -> str:
    return _op_vs_unfold("2026-11-26_cpu-1thread_layer-op.json", ["inductor", "shifted"])


def cpu_2threads() -> str:
    name = "2026-11-26_cpu-2threads_layer-op.json"
    rec = load(name)
    rows = []
    for mode in ("layer", "op"):
        by = rows_by(rec, mode)
        for (shape, impl), r in by.items():
            if mode == "op" and impl == "conv3x3":
                continue
            rows.append([mode, shape, impl, _ms(fb(r)), _f(r["peak_mb"])])
    return table(["what", "shape", "implementation", "fwd+bwd ms", "peak MB"], rows) + "\n\n" + source(name)


def cpu_stem() -> str:
    name = "2026-11-26_cpu-1thread_stem-model.json"
    rec = load(name)
    rows_ = [r for r in rec["stem"] if r["error"] is None]
    conv = rows_[0]
    rows = [[r["impl"], r["backend"] or "-", _ms(r["fwd_ms"]["median"]), _ms(fb(r)), _x(fb(r) / fb(conv)),
             _f(r["peak_mb"])] for r in rows_]
    r0 = rows_[0]
    return (f"Batch {r0['batch']}, {r0['height']}x{r0['width']} images, 3 -> 64 channels.\n\n"
            + table(["stem", "backend", "fwd ms", "fwd+bwd ms", "fwd+bwd vs conv", "peak MB"], rows)
            + "\n\n" + source(name))


def cpu_model() -> str:
    return _model_table("2026-11-26_cpu-1thread_model.json", "resnet26")


def cpu_memory() -> str:
    name = "2026-11-26_cpu-1thread_model_memory-options.json"
    out = _model_table(name, "resnet26")
    sb_name = "2026-11-26_cpu_saved-bytes.json"
    sb = load(sb_name)
    rows = [[f"`{r['model']}`", _f(r["stem_part_mb"]), _f(r["stages_mb"])] for r in sb["rows"]]
    r0 = sb["rows"][0]
    out += ("\n\nActivations saved for the backward (counted with `saved_tensors_hooks`; batch "
            f"{r0['batch']}, {r0['image_size']}x{r0['image_size']}, {r0['dtype']} autocast; the stem part is stem, "
            "BN, ReLU and max pool; the attention stages are those of the CPU backend, which keeps k x k "
            "probabilities where the Triton kernels keep one log-sum-exp):\n\n"
            + table(["model", "stem part MB", "stages MB"], rows)
            + f"\n\nRecord [`benchmarks/{sb_name}`](benchmarks/{sb_name}); `python tools/saved_bytes.py --models "
            + ",".join(r["model"] for r in sb["rows"]) + f" --batch {r0['batch']} --out FILE`; torch {sb['torch']}.")
    return out


def h200_layer() -> str:
    return _layer_vs_conv("2026-11-26_h200_layer-op-model.json", ["triton", "shifted", "unfold"])


def h200_op() -> str:
    return _op_vs_unfold("2026-11-26_h200_layer-op-model.json", ["triton", "shifted"])


def h200_model() -> str:
    return _model_table("2026-11-26_h200_layer-op-model.json", "resnet50")


def h200_profile() -> str:
    name = "2026-11-26_h200_layer-op-model.json"
    rows = []
    for r in load(name)["model"]:
        for p in r.get("profile", [])[:5]:
            rows.append([f"`{r['model']}`", f"`{p['op'][:60]}`", _f(p["self_ms"]), f"{100 * p['share']:.0f}%"])
    return (table(["model", "operator (top 5 by device self time)", "ms", "share"], rows)
            + f"\n\nSame record: [`benchmarks/{name}`](benchmarks/{name}) (`--profile 12`).")


def h200_correctness() -> str:
    name = "2026-11-26_h200_correctness.json"
    rec = load(name)
    m = rec["meta"]
    groups: dict[str, list[dict]] = {}
    for c in rec["correctness"]:
        kind = c.get("dtype") or ("determinism" if c["case"].startswith("determinism") else c["case"])
        groups.setdefault(kind, []).append(c)
    for c in rec["compile"]:
        groups.setdefault("torch.compile", []).append(c)
    rows = []
    for kind, cases in groups.items():
        errs = [e for c in cases for e in (c.get("errors") or {}).values()] if kind != "torch.compile" else [
            e for c in cases for e in c.get("errors", [])]
        worst = f"{max(errs):.1e}" if errs else "bitwise equal"
        rows.append([kind, f"{sum(c['passed'] for c in cases)} / {len(cases)}", worst])
    return (table(["cases (triton vs reference)", "passed", "max error, normalised by max of the reference"], rows)
            + f"\n\nRecord [`benchmarks/{name}`](benchmarks/{name}); the cases are now `tests/test_gpu.py` "
            f"(`pytest -m gpu`); commit `{_commit(name, m)}`; torch {m['torch']}, Triton {m['triton']}, "
            f"{m['device']}.")


def _ratio_cell(before: float, after: float, unit: str) -> str:
    return f"{_ms(before)} -> {_ms(after)} {unit} ({_x(before / after)})"


def tried() -> str:
    """One row per idea: what it changed, by how much (from records), and whether it stayed."""
    rec = {n: load(n) for n in os.listdir(RECORDS) if n.endswith(".json")}
    lo = rows_by(rec["2026-11-26_cpu-1thread_layer-op.json"], "op")
    t = "32x32x128"
    m_ind = models(rec["2026-11-26_cpu-1thread_model.json"])
    m_shf = models(rec["2026-11-26_cpu-1thread_model_backend-shifted.json"])
    stem = rows_by(rec["2026-11-26_cpu-1thread_stem-model.json"], "stem")
    m_after = models(rec["2026-11-26_cpu-1thread_stem-model.json"])
    m_before = models(rec["2026-11-26_cpu-1thread_stem-model_tree-136e98c.json"])
    m_glibc = models(rec["2026-11-26_cpu-1thread_stem-model_malloc-glibc.json"])
    m_mem = models(rec["2026-11-26_cpu-1thread_model_memory-options.json"])
    m_comp = models(rec["2026-11-26_cpu-1thread_model_compile.json"])
    g_first = rows_by(rec["2026-11-26_h200_layer-model_tiles-first.json"], "layer")
    g_now = rows_by(rec["2026-11-26_h200_layer-op-model.json"], "layer")
    g_first_m = models(rec["2026-11-26_h200_layer-model_tiles-first.json"])
    g_now_m = models(rec["2026-11-26_h200_layer-op-model.json"])
    s = "sasa_resnet26"
    c = "sasa_resnet26_convstem"
    st1 = ("64x64x64", "triton")
    ckpt = "sasa_resnet26@checkpoint_stem=True"
    ckpt_qkv = ckpt + "@recompute_qkv=True"
    tb = ("attention stem textbook", "attention stem")
    rows = [
        ["CPU: `inductor` backend (`shifted`'s layout as whole-tensor expressions compiled by Inductor) instead of "
         "eager `shifted`",
         f"op at {t}: {_ratio_cell(fb(lo[(t, 'shifted')]), fb(lo[(t, 'inductor')]), 'ms')}; `{c}` step: "
         f"{_ratio_cell(train_ms(m_shf[c]), train_ms(m_ind[c]), 'ms')}",
         "kept: default on CPU", ["cpu-1thread_layer-op", "cpu-1thread_model", "cpu-1thread_model_backend-shifted"]],
        ["CPU: the attention stem as an exact reassociation around its 3 input channels, in cache-sized chunks, "
         "instead of the textbook q / k / v",
         f"stem fwd+bwd {_ratio_cell(fb(stem[('128x128x3', tb[0])]), fb(stem[('128x128x3', tb[1])]), 'ms')}, "
         f"peak {_f(stem[('128x128x3', tb[0])]['peak_mb'], 0)} -> {_f(stem[('128x128x3', tb[1])]['peak_mb'], 0)} MB",
         "kept (`AttentionStem.reference_forward` keeps the textbook form as the oracle)", ["cpu-1thread_stem-model"]],
        ["CPU: chunked stem op and the masked window clipped to maps smaller than it (tree `136e98c` -> "
         "`753beb5`)",
         f"`{s}` step {_ratio_cell(train_ms(m_before[s]), train_ms(m_after[s]), 'ms')}",
         "kept", ["cpu-1thread_stem-model", "cpu-1thread_stem-model_tree-136e98c"]],
        ["CPU: keep freed memory for reuse (glibc `mallopt`; `SASA_CPU_MALLOC=default` opts out) instead of "
         "glibc's defaults",
         f"`resnet26` step {_ratio_cell(train_ms(m_glibc['resnet26']), train_ms(m_after['resnet26']), 'ms')}, "
         f"`{s}` {_ratio_cell(train_ms(m_glibc[s]), train_ms(m_after[s]), 'ms')}",
         "kept", ["cpu-1thread_stem-model", "cpu-1thread_stem-model_malloc-glibc"]],
        ["`checkpoint_stem=True` (recompute the stem part in the backward), with and without `recompute_qkv=True`",
         f"`{s}` peak {_f(m_mem[s]['peak_mb'], 0)} -> {_f(m_mem[ckpt]['peak_mb'], 0)} / "
         f"{_f(m_mem[ckpt_qkv]['peak_mb'], 0)} MB for a step "
         f"{_x(train_ms(m_mem[ckpt]) / train_ms(m_mem[s]))} / {_x(train_ms(m_mem[ckpt_qkv]) / train_ms(m_mem[s]))} "
         "as long (CPU)",
         "kept, opt-in (meant for the GPU, no GPU record yet)", ["cpu-1thread_model_memory-options"]],
        ["CPU: `--compile` (`torch.compile` of the whole model)",
         f"step vs `resnet26` compiled the same way: `{c}` {_x(train_ms(m_comp[c]) / train_ms(m_comp['resnet26']))}, "
         f"`{s}` {_x(train_ms(m_comp[s]) / train_ms(m_comp['resnet26']))} (eager, `cpu-1thread_model_memory-options`:"
         f" `{s}` {_x(train_ms(m_mem[s]) / train_ms(m_mem['resnet26']))})",
         "kept as an option, not the default", ["cpu-1thread_model_compile", "cpu-1thread_model_memory-options"]],
        ["H200: Triton tiles from a timed sweep (`tools/tile_sweep.py`) instead of chosen by register counts",
         f"stage-1 layer fwd+bwd {_ratio_cell(fb(g_first[st1]), fb(g_now[st1]), 'ms')}; "
         f"`sasa_resnet50_convstem` {_f(g_first_m['sasa_resnet50_convstem']['train_img_s'], 0)} -> "
         f"{_f(g_now_m['sasa_resnet50_convstem']['train_img_s'], 0)} img/s",
         "kept: `TILES` in `sasa/backends/triton_kernels.py`",
         ["h200_layer-model_tiles-first", "h200_tile-sweep", "h200_layer-op-model"]],
    ]
    for row in rows:
        row[3] = ", ".join(f"[`{n}`](benchmarks/2026-11-26_{n}.json)" for n in row[3])
    return table(["idea", "measured effect", "kept?", "records (`benchmarks/2026-11-26_*.json`)"], rows)


def default_net() -> str:
    """TRAINING.md: the default network's training step against its conv counterpart and the other candidates."""
    name = "2026-12-07_cpu-1thread_model_default-net.json"
    rec = load(name)
    mc = rec["model_config"]
    ms = models(rec)
    conv = next(r for m, r in ms.items() if m.startswith("resnet26"))
    default = "sasa_resnet26_convstem@width_multiplier=0.25@heads=4@padding=mask@in_chans=1"

    def cpu(r: dict) -> float:
        return r["train_ms"]["cpu_median"]

    rows = []
    for model, r in ms.items():
        label = f"`{model}`" + (" (the default)" if model == default else "")
        rows.append([label, f"{r['params_m']:.2f}", _ms(cpu(r)), _x(cpu(r) / cpu(conv)), f"{r['peak_mb']:.0f}"])
    return (f"Batch {mc['batch']}, {mc['image_size']}x{mc['image_size']}, one thread, median of {mc['repeats']} steps "
            "(the bench's models have a 1000-class head).\n\n"
            + table(["model", "params (M)", "train step, CPU ms", "vs conv", "peak MB"], rows)
            + "\n\n" + source(name))


def fresh_clone() -> str:
    """TRAINING.md / README: make test and make train from a fresh clone."""
    name = "2026-12-07_cpu_fresh-clone.json"
    rec = load(name)
    rows = []
    for r in rec["runs"]:
        if "top1" in r:
            what = f"{r['top1']:.2f}% test top-1, {r['top5']:.2f}% top-5"
        else:
            what = r.get("result", "")
        if "wall_s" not in r or "failed" in what:  # a failing run is no figure to expect
            continue
        wall = f"{int(r['wall_s'] // 60)}m{r['wall_s'] % 60:02.0f}s"
        rows.append([f"`{r['command']}`", f"`{str(r['commit'])[:7]}`", wall, what])
    return (table(["command", "commit", "wall time", "result"], rows)
            + f"\n\nRecord [`benchmarks/{name}`](benchmarks/{name}): {rec['device']}, torch {rec['torch']}, "
            f"python {rec['python']}; {rec['what']}.")


BLOCKS: dict[str, Callable[[], str]] = {
    "cpu-layer": cpu_layer, "cpu-op": cpu_op, "cpu-2threads": cpu_2threads, "cpu-stem": cpu_stem,
    "cpu-model": cpu_model, "cpu-memory": cpu_memory, "h200-layer": h200_layer, "h200-op": h200_op,
    "h200-model": h200_model, "h200-profile": h200_profile, "h200-correctness": h200_correctness, "tried": tried,
    "default-net": default_net, "fresh-clone": fresh_clone,
}


def render(text: str) -> str:
    """``text`` with every block's body replaced by what its function generates."""
    def fill(m: re.Match) -> str:
        name = m["name"]
        if name not in BLOCKS:
            raise KeyError(f"bench_report block {name!r} has no generator; known: {sorted(BLOCKS)}")
        return m.group(1) + BLOCKS[name]() + "\n" + m.group(4)
    return BLOCK.sub(fill, text)


def used_records(text: str) -> set[str]:
    """Record file names that the rendered ``text`` links or names."""
    names = set(os.listdir(RECORDS))
    return {n for n in names if n.endswith(".json") and f"benchmarks/{n}" in text}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing; exit 1 on a difference")
    args = parser.parse_args(argv)
    status = 0
    for page in PAGES:
        path = os.path.join(ROOT, page)
        with open(path) as f:
            old = f.read()
        new = render(old)
        if new == old:
            continue
        if args.check:
            status = 1
            diff = difflib.unified_diff(old.splitlines(True), new.splitlines(True), page, page + " (generated)")
            sys.stdout.writelines(diff)
        else:
            with open(path, "w") as f:
                f.write(new)
            print(f"updated {page}")
    return status


if __name__ == "__main__":
    sys.exit(main())
