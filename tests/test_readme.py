"""The README is executed, so that it cannot drift from the code.

Conventions for README.md's fenced blocks:

- ```` ```pycon ````: a doctest (``>>> `` lines and their output; ELLIPSIS and NORMALIZE_WHITESPACE), run here;
  preceded by the line ``<!-- test: slow -->``, in the slow tier (``pytest -m slow``).
- ```` ```console ```` preceded by the line ``<!-- test: run -->``: each ``$ `` line is run by the shell in a
  temporary directory, with this Python's ``bin`` first on PATH; the lines after it, if any, must equal its stdout
  (trailing spaces aside; a line ``...`` stands for any number of lines).
- every other shell block (``bash``, ``console``, no language): not run, but the commands it names must exist: make
  targets, ``sasa`` subcommands and their flags, ``python -m`` modules, pip extras, pytest markers.
- ```` ```python ````: compiled, and shows no output (``print``): output belongs in a ``pycon`` block.

Figures quoted in the prose (wall times such as ``11m53s``, accuracies such as ``88.67% test top-1``) must name
the ``benchmarks/*.json`` record they come from in the same paragraph and match it; minutes and test counts written
by hand are not allowed.
"""

from __future__ import annotations

import doctest
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(?P<lang>[\w-]*)[ \t]*\n(?P<body>.*?)^```[ \t]*$", re.M | re.S)
RUN_MARK = "<!-- test: run -->"
SLOW_MARK = "<!-- test: slow -->"
SHELL_LANGS = ("bash", "sh", "shell", "console", "")


@dataclass(frozen=True)
class Block:
    lang: str
    body: str
    line: int  # of the opening fence, 1-based
    run: bool  # preceded by RUN_MARK
    slow: bool  # preceded by SLOW_MARK

    @property
    def id(self) -> str:
        return f"{self.lang or 'plain'}@{self.line}:" + (self.body.strip().splitlines() or [""])[0][:40]


def read_blocks(text: str) -> list[Block]:
    blocks = []
    for m in FENCE.finditer(text):
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1].strip()
        blocks.append(Block(m["lang"], m["body"], text.count("\n", 0, m.start()) + 1, before == RUN_MARK,
                            before == SLOW_MARK))
    return blocks


BLOCKS = read_blocks(README.read_text())
PYCON = [b for b in BLOCKS if b.lang == "pycon"]
RUN = [b for b in BLOCKS if b.run]
SHELL = [b for b in BLOCKS if b.lang in SHELL_LANGS and not b.run]
PYTHON = [b for b in BLOCKS if b.lang == "python"]


def test_the_readme_has_executable_blocks():
    assert PYCON and RUN, "the README's examples are no longer run by this file"
    assert all(b.lang == "console" for b in RUN), [b.id for b in RUN if b.lang != "console"]


@pytest.mark.parametrize("block", [pytest.param(b, marks=[pytest.mark.slow] if b.slow else []) for b in PYCON],
                         ids=lambda b: b.id)
def test_pycon_block(block):
    test = doctest.DocTestParser().get_doctest(block.body, {}, f"README.md:{block.line}", str(README), block.line)
    assert test.examples
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    report: list[str] = []
    runner.run(test, out=report.append)
    assert runner.failures == 0, "".join(report)


def split_session(body: str) -> list[tuple[str, list[str]]]:
    """``[(command, expected output lines)]`` of a console block."""
    session: list[tuple[str, list[str]]] = []
    for line in body.splitlines():
        if line.startswith("$ "):
            session.append((line[2:], []))
        elif session:
            session[-1][1].append(line.rstrip())
        else:
            raise AssertionError(f"console block: output before the first '$ ' command: {line!r}")
    return session


def lines_match(expected: list[str], got: list[str]) -> bool:
    """``got`` equals ``expected``, where an expected line ``...`` matches any number of lines."""
    if not expected:
        return not got
    if expected[0] == "...":
        return any(lines_match(expected[1:], got[i:]) for i in range(len(got) + 1))
    return bool(got) and got[0] == expected[0] and lines_match(expected[1:], got[1:])


def test_lines_match():
    assert lines_match(["a", "...", "d"], ["a", "b", "c", "d"]) and lines_match(["a", "..."], ["a"])
    assert not lines_match(["a", "d"], ["a", "b", "d"]) and not lines_match(["a"], ["a", "b"])


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=lambda b: b.id)
def test_console_block_runs_as_shown(block, tmp_path):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    session = split_session(block.body)
    assert session
    for command, expected in session:
        proc = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=900, check=False)
        assert proc.returncode == 0, f"$ {command}\n{proc.stderr[-3000:]}"
        while expected and not expected[-1]:
            expected.pop()
        got = [line.rstrip() for line in proc.stdout.rstrip("\n").splitlines()]
        if expected:
            assert lines_match(expected, got), f"$ {command}: README shows\n" + "\n".join(expected) + \
                "\n--- the command prints\n" + "\n".join(got)


# ---- commands named in the other shell blocks ------------------------------------------------------------------


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*:(?!=)", (ROOT / "Makefile").read_text(), re.M))


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def sasa_subparsers() -> dict:
    from sasa.cli import build_parser

    parser = build_parser()
    return next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction").choices


def commands(body: str) -> list[list[str]]:
    """The token lists of a shell block's commands (prompts, comments and line continuations handled)."""
    out, pending = [], ""
    for line in body.splitlines():
        line = line[2:] if line.startswith("$ ") else line
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        tokens = shlex.split(pending + line, comments=True)
        pending = ""
        if tokens:
            out.append(tokens)
    return out


def check_command(tokens: list[str], subparsers: dict) -> list[str]:
    """What of ``tokens`` is checked (for the count), raising AssertionError naming what does not exist."""
    if tokens[0] == "pytest":
        return check_command(["python", "-m", *tokens], subparsers)
    checked = []
    if tokens[0] == "make":
        for target in (t for t in tokens[1:] if "=" not in t and not t.startswith("-")):
            assert target in make_targets(), f"make {target}: no such Makefile target"
            checked.append(f"make {target}")
    if tokens[0] == "pip" or tokens[:3] == ["python", "-m", "pip"]:
        extras = pyproject()["project"]["optional-dependencies"]
        for t in tokens:
            for group in re.findall(r"\.\[([\w,-]+)\]", t):
                for extra in group.split(","):
                    assert extra in extras, f"pip extra [{extra}] is not in pyproject.toml"
                    checked.append(f"extra {extra}")
    sasa_at = None
    for i, t in enumerate(tokens):
        if t == "-m" and i + 1 < len(tokens):
            module = tokens[i + 1]
            if module == "sasa":
                sasa_at = i + 1
            else:
                assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
                checked.append(f"-m {module}")
            if module == "pytest" and "-m" in tokens[i + 2:]:
                expr = tokens[i + 2:][tokens[i + 2:].index("-m") + 1]
                markers = {m.split(":")[0] for m in pyproject()["tool"]["pytest"]["ini_options"]["markers"]}
                for word in set(re.findall(r"\w+", expr)) - {"not", "and", "or"}:
                    assert word in markers, f"pytest -m {expr!r}: no marker {word!r}"
                    checked.append(f"marker {word}")
            break
        if Path(t).name == "sasa" and i == 0 or (t == "sasa" and i > 0 and tokens[i - 1] in ("&&", ";")):
            sasa_at = i
            break
    if sasa_at is not None and sasa_at + 1 < len(tokens) and tokens[sasa_at + 1] != "...":
        sub = tokens[sasa_at + 1]
        assert sub in subparsers, f"sasa {sub}: no such subcommand (have {sorted(subparsers)})"
        options = {o for a in subparsers[sub]._actions for o in a.option_strings}
        for t in tokens[sasa_at + 2:]:
            if t.startswith("--"):
                assert t.split("=")[0] in options, f"sasa {sub} {t}: no such flag"
        checked.append(f"sasa {sub}")
    return checked


@pytest.mark.parametrize("block", SHELL, ids=lambda b: b.id)
def test_shell_block_names_commands_that_exist(block):
    subparsers = sasa_subparsers()
    for tokens in commands(block.body):
        check_command(tokens, subparsers)


def test_command_check_catches_what_does_not_exist():
    subparsers = sasa_subparsers()
    assert check_command(["make", "train"], subparsers) == ["make train"]
    assert check_command(["torchrun", "--nproc_per_node=8", "-m", "sasa", "train", "--config", "x"],
                         subparsers) == ["sasa train"]
    for tokens, message in ((["make", "trian"], "no such Makefile target"),
                            (["sasa", "train", "--epoch", "3"], "no such flag"),
                            (["sasa", "fly"], "no such subcommand"),
                            (["pip", "install", "-e", ".[trainer]"], "not in pyproject"),
                            (["python", "-m", "sasa.no_such_module"], "no such module"),
                            (["pytest", "-m", "not slowest"], "no marker")):
        with pytest.raises(AssertionError, match=message):
            check_command(tokens, subparsers)


def test_shell_blocks_are_checked():
    subparsers = sasa_subparsers()
    checked = [c for b in SHELL for tokens in commands(b.body) for c in check_command(tokens, subparsers)]
    for needed in ("make train", "make test", "sasa train", "sasa bench", "sasa detect-train"):
        assert needed in checked


@pytest.mark.parametrize("block", PYTHON, ids=lambda b: b.id)
def test_python_block_compiles_and_shows_no_output(block):
    compile(block.body, f"README.md:{block.line}", "exec")
    assert "print(" not in block.body, "a python block that prints: make it a pycon block with the real output"


# ---- figures ---------------------------------------------------------------------------------------------------

WALL = re.compile(r"\b(\d+)m(\d+(?:\.\d+)?)s\b")
ACCURACY = re.compile(r"(\d+(?:\.\d+)?)%\s*(?:\(?test\s+)?top-[15]|\btop-1\D{0,20}?(\d+\.\d+)%")
MINUTES = re.compile(r"\b\d+(?:\s*-\s*\d+)?\s*(?:min|minutes|hours?)\b")
TEST_COUNT = re.compile(r"\b\d+\s+(?:tests|passed)\b")


def numbers(record, key: str = "") -> list[tuple[str, float]]:
    """Every number of a JSON record with the key it sits under."""
    if isinstance(record, dict):
        return [n for k, v in record.items() for n in numbers(v, k)]
    if isinstance(record, list):
        return [n for v in record for n in numbers(v, key)]
    return [(key, float(record))] if isinstance(record, (int, float)) and not isinstance(record, bool) else []


def unchecked_figures(text: str) -> list[str]:
    """Problems with the figures quoted in ``text`` (markdown with the executed blocks left out)."""
    problems = []
    for para in re.split(r"\n\s*\n", text):
        walls, accs = WALL.findall(para), [a or b for a, b in ACCURACY.findall(para)]
        problems += [f"{m!r}: a hand-written duration; quote one from a record" for m in MINUTES.findall(para)]
        problems += [f"{m!r}: a hand-written test count" for m in TEST_COUNT.findall(para)]
        if not walls and not accs:
            continue
        cited = re.findall(r"benchmarks/[\w.-]+\.json", para)
        if not cited:
            problems.append(f"figures {walls + accs} without the record they come from: {para[:120]!r}")
            continue
        values = [n for path in cited if (ROOT / path).exists()
                  for n in numbers(json.loads((ROOT / path).read_text()))]
        problems += [f"{path} does not exist" for path in cited if not (ROOT / path).exists()]
        for minutes, seconds in walls:
            total, digits = int(minutes) * 60 + float(seconds), len(seconds.partition(".")[2])
            if not any("wall" in k and abs(v - total) <= 0.5 * 10 ** -digits + 1e-9 for k, v in values):
                problems.append(f"{minutes}m{seconds}s is no wall time of {cited}")
        for acc in accs:
            if not any(abs(v - float(acc)) < 1e-6 for _, v in values):
                problems.append(f"{acc}% is not in {cited}")
    return problems


def prose(text: str) -> str:
    """``text`` without the blocks that are executed (their figures are the code's own)."""
    return FENCE.sub(lambda m: "" if m["lang"] == "pycon" or text[:m.start()].rstrip().endswith(RUN_MARK)
                     else m[0], text)


def test_figures_come_from_the_records_they_cite():
    assert not unchecked_figures(prose(README.read_text()))


def test_figure_check_catches_unsourced_and_wrong_figures():
    record = "benchmarks/2026-12-07_cpu_fresh-clone.json"
    assert json.loads((ROOT / record).read_text())  # the check below needs a real record
    assert unchecked_figures("From the default run (`make train`, 88.73% test top-1).")
    assert unchecked_figures("  wall time           5m03.4s on 1 x cpu")
    assert unchecked_figures("The suite (426 tests, 7 GPU-only skipped) takes about 14 minutes.")
    assert unchecked_figures(f"it reached 88.60% test top-1 in 11m53.1s (`{record}`)")  # not the record's
    assert not unchecked_figures(f"it reached 88.67% test top-1 in 11m53.1s (`{record}`)")
