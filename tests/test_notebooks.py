"""Every notebook in analysis/ runs top to bottom with its default (small CPU) parameters.

Executed with nbclient on the ``python3`` kernel. Where no such kernelspec is
installed, the test registers this interpreter's ipykernel for the current user
(``python -m ipykernel install --user``), the same thing a user does once.
"""
from __future__ import annotations

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
def test_notebook_runs(path, kernel, tmp_path):
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
