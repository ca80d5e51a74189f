"""Every notebook in analysis/ runs top to bottom with its default (small CPU) parameters.

Executed with nbclient on the ``python3`` kernel. Where no such kernelspec is
installed, the test registers this interpreter's ipykernel for the current user
(``python -m ipykernel install --user``), the same thing a user does once.
"""
from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ANALYSIS = Path(__file__).resolve().parents[1] / "analysis"
NOTEBOOKS = sorted(ANALYSIS.glob("*.ipynb"))
TIMEOUT_S = 180  # per cell; each notebook is meant to finish in under 3 minutes on 2 cores


@pytest.fixture(scope="session")
def kernel():
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
    try:
        KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        subprocess.run([sys.executable, "-m", "ipykernel", "install", "--user", "--name", "python3"],
                       check=True, capture_output=True)
    return "python3"


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 5, NOTEBOOKS


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_runs(path, kernel, tmp_path, monkeypatch):
    # The kernel starts in a session of its own, so it competes with the other test workers as a
    # separate scheduling group: with two OpenMP threads spin-waiting on one core, notebook 03 took
    # 150-300 s where one thread takes 20 s. One thread per worker, as conftest pins torch.
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(path, as_version=4)
    assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), \
        f"{path.name} needs a cell tagged 'parameters'"
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), \
        f"{path.name} is stored with outputs: clear them (notebooks are stored without outputs)"
    start = time.perf_counter()
    client = nbclient.NotebookClient(nb, timeout=TIMEOUT_S, kernel_name=kernel,
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()  # raises CellExecutionError on the first failing cell
    assert time.perf_counter() - start < 180, f"{path.name} took over 3 minutes"
    blank = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and makes_a_figure(c.source)
             and not any("image/png" in o.get("data", {}) for o in c.get("outputs", []))]
    assert not blank, f"{path.name}: cells {blank} make a figure but show none (end the cell with `fig`)"


FIGURE = re.compile(r"^\s*fig\s*=|display\((plot|fig|report)\b", re.M)


def makes_a_figure(source: str) -> bool:
    """A cell that makes a figure: it assigns ``fig = ...`` or displays a plot."""
    return bool(FIGURE.search(source))


def test_the_figure_rule_sees_the_cells_that_make_figures():
    assert makes_a_figure("x = 1\nfig = plot.gradient_depth(units)\n")
    assert makes_a_figure("for r in runs:\n    display(plot.gradient_flow_over_training(r.probe))")
    assert not makes_a_figure("rates = plot.decay_rate_table(units)\nrates")
    figure_cells = sum(makes_a_figure(c.source) for p in NOTEBOOKS
                       for c in nbformat.read(p, as_version=4).cells if c.cell_type == "code")
    assert figure_cells >= len(NOTEBOOKS)     # every notebook draws something
