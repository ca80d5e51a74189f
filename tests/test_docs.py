"""The README's and the docs' code runs as written.

Every ```python block of README.md and docs/*.md runs, and every command line a
```bash block names (``python -m gradflow <command> ...``) is checked against
its ``--help``: the command exists and takes each ``--flag`` the docs give it.

A page's blocks share one namespace and run in order, like a notebook: a block
may use what an earlier block of the same page defined. A block preceded by
``<!-- skip: REASON -->`` does not run and is reported as skipped with REASON
(data on disk, a GPU, hours of training); ``<!-- slow -->`` puts it in the slow
tier (``-m "not slow"`` leaves it out). Blocks run in a temporary folder, so a
block that writes files writes them there.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^(?:<!--\s*(?P<mark>skip|slow)(?::\s*(?P<reason>[^>]*?))?\s*-->\n)?"
                   r"```(?P<lang>[\w-]*)\n(?P<body>.*?)^```$", re.S | re.M)


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    body: str
    mark: str | None
    reason: str

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    return [Block(page, text.count("\n", 0, m.start("body")), m["lang"], m["body"], m["mark"],
                  (m["reason"] or "").strip()) for m in FENCE.finditer(text)]


ALL = [b for p in PAGES for b in blocks(p)]
PYTHON = [b for b in ALL if b.lang == "python"]


@dataclass
class PageRun:
    """One page's namespace and how far its blocks have run."""
    blocks: list
    folder: Path
    ns: dict = field(default_factory=lambda: {"__name__": "__docs__"})
    done: int = 0

    def run_to(self, block: Block) -> None:
        """Run every block of the page up to and including ``block`` that has not run yet."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        here = os.getcwd()
        os.chdir(self.folder)
        try:
            while self.done <= self.blocks.index(block):
                b = self.blocks[self.done]
                self.done += 1
                if b.mark != "skip":
                    exec(compile(b.body, b.id, "exec"), self.ns)
        finally:
            os.chdir(here)
            plt.close("all")


_RUNS: dict[Path, PageRun] = {}


def _param(b: Block):
    marks = [pytest.mark.slow] if b.mark == "slow" else []
    return pytest.param(b, id=b.id, marks=marks)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("block", [_param(b) for b in PYTHON])
def test_python_block_runs(block: Block, tmp_path_factory):
    if block.mark == "skip":
        pytest.skip(f"{block.id}: {block.reason or 'no reason given'}")
    run = _RUNS.get(block.page)
    if run is None:
        page = [b for b in PYTHON if b.page == block.page]
        run = _RUNS[block.page] = PageRun(page, tmp_path_factory.mktemp(block.page.stem))
    run.run_to(block)


def test_skips_name_their_reason():
    bad = [b.id for b in ALL if b.mark == "skip" and not b.reason]
    assert not bad, f"<!-- skip: REASON --> needs a reason: {bad}"


# --- command lines ------------------------------------------------------------------------

COMMAND = re.compile(r"-m (gradflow(?:\.[\w.]+)?)((?: [a-z][\w-]*)?)(.*)")


INLINE = re.compile(r"`((?:python|torchrun)[^`\n]* -m gradflow[^`\n]*)`")


def command_lines() -> list[str]:
    """Every command line the docs give: the lines of bash blocks, and inline `python -m gradflow ...` spans."""
    lines = []
    for b in ALL:
        if b.lang in ("bash", "sh", "console"):
            lines += [line.split("#")[0] for line in b.body.replace("\\\n", " ").splitlines()]
    for page in PAGES:
        lines += INLINE.findall(page.read_text())
    return lines


def commands() -> dict[tuple[str, ...], set[str]]:
    """(module, command) -> the --flags the docs give it."""
    found: dict[tuple[str, ...], set[str]] = {}
    for line in command_lines():
        m = COMMAND.search(line)
        if not m:
            continue
        key = (m[1], *m[2].split())
        flags = found.setdefault(key, set())
        flags.update(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", m[3]))
    return found


def _help(module: str, *command: str) -> str:
    """--help of ``python -m module command`` run in this process (sys.argv as ``-m`` sets it)."""
    out = io.StringIO()
    argv = sys.argv
    sys.argv = [module, *command, "--help"]
    try:
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as e:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
    finally:
        sys.argv = argv
    assert e.value.code in (0, None), f"python -m {module} {' '.join(command)} --help exited {e.value.code}"
    return out.getvalue()


@pytest.mark.parametrize("key", sorted(commands()), ids=lambda k: " ".join(k))
def test_documented_command_takes_its_flags(key):
    text = _help(*key)
    assert "usage" in text.lower()
    missing = sorted(f for f in commands()[key] if f not in text)
    assert not missing, f"python -m {' '.join(key)}: the docs use {missing}, which its --help does not list"


def test_the_entry_point_lists_every_documented_command():
    r = subprocess.run([sys.executable, "-m", "gradflow", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    named = {k[1] for k in commands() if k[0] == "gradflow" and len(k) > 1}
    assert named and all(c in r.stdout for c in named), (named, r.stdout)


def test_the_readme_lists_every_command():
    from gradflow.__main__ import COMMANDS
    readme = (ROOT / "README.md").read_text()
    missing = [c for c in COMMANDS if f"| `{c}`" not in readme]
    assert not missing, f"README's command table lacks {missing}"


def test_the_readme_predictions_table_is_the_one_figures_wrote():
    # the README's claims about the zoo are figures/predictions_zoo.md, not a copy that drifts from it
    made = (ROOT / "figures" / "predictions_zoo.md").read_text()
    rows = [line for line in made.splitlines() if line.startswith("| ")]
    readme = (ROOT / "README.md").read_text()
    assert len(rows) == 7 and all(line in readme for line in rows)
