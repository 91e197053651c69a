"""The results pages are generated from the records: BENCHMARKS.md and TRAINING.md equal what
``tools/bench_report.py`` makes of ``benchmarks/*.json``, every record is used, and the records follow the naming
and schema of ``benchmarks/README.md``."""

import importlib.util
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECORDS = ROOT / "benchmarks"
NAME = re.compile(r"^\d{4}-\d{2}-\d{2}_(cpu|cpu-1thread|cpu-2threads|h100|h200)_[a-z0-9-]+(_[a-z0-9-]+)?\.json$")


@pytest.fixture(scope="module")
def report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "tools" / "bench_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("page", ["BENCHMARKS.md", "TRAINING.md"])
def test_page_is_what_the_records_give(report, page):
    text = (ROOT / page).read_text()
    assert text == report.render(text), f"{page} differs from the records: run python tools/bench_report.py"


def test_every_block_has_a_generator_and_every_generator_a_block(report):
    names = [m["name"] for page in report.PAGES for m in report.BLOCK.finditer((ROOT / page).read_text())]
    assert sorted(names) == sorted(report.BLOCKS), "a block without a generator, or a generator without a block"
    with pytest.raises(KeyError, match="no-such-table"):
        report.render("<!-- bench_report: no-such-table -->\n<!-- /bench_report -->")


def test_every_record_is_used_and_named_by_the_scheme(report):
    rendered = "".join(report.render((ROOT / page).read_text()) for page in report.PAGES)
    records = sorted(p.name for p in RECORDS.glob("*.json"))
    assert set(records) == report.used_records(rendered), "records no page uses (git rm them) or links to none"
    bad = [n for n in records if not NAME.match(n)]
    assert not bad, f"not <date>_<device>_<mode>[_<variant>].json (benchmarks/README.md): {bad}"


def test_bench_records_carry_the_schema():
    """Every ``sasa bench`` record says what ran, where and on which tree, and its rows have the documented fields."""
    for path in RECORDS.glob("*.json"):
        rec = json.loads(path.read_text())
        if not (isinstance(rec, dict) and "config" in rec and "meta" in rec):
            continue
        meta = rec["meta"]
        for key in ("command", "commit", "date", "device", "device_name", "torch", "dtype", "threads"):
            assert key in meta, (path.name, key)
        assert meta["command"].startswith("sasa bench"), path.name
        assert path.name.startswith(meta["date"][:10]), (path.name, meta["date"])
        for mode in ("layer", "op", "stem"):
            for row in rec.get(mode, []):
                assert {"shape", "impl", "backend", "error", "fwd_ms", "fwd_bwd_ms", "peak_mb"} <= row.keys()
        for row in rec.get("model", []):
            assert {"model", "error"} <= row.keys()
            assert row["error"] is not None or {"backend", "params_m", "train_ms", "train_img_s", "peak_mb",
                                                "infer_img_s", "vs_conv"} <= row.keys()


def test_check_mode_reports_a_stale_page(report, tmp_path, monkeypatch, capsys):
    """``--check`` exits 1 with a diff when a generated figure was edited by hand, and 0 when the page is current."""
    page = tmp_path / "BENCHMARKS.md"
    text = (ROOT / "BENCHMARKS.md").read_text()
    page.write_text(text)
    (tmp_path / "TRAINING.md").write_text((ROOT / "TRAINING.md").read_text())
    monkeypatch.setattr(report, "ROOT", str(tmp_path))
    assert report.main(["--check"]) == 0
    block = next(report.BLOCK.finditer(text))
    page.write_text(text[:block.start("body")] + "| edited |\n" + text[block.end("body"):])
    assert report.main(["--check"]) == 1
    assert "| edited |" in capsys.readouterr().out
    assert report.main([]) == 0 and page.read_text() == text
