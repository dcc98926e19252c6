"""The notebooks run as shipped: their code cells, in order, on this CPU.

Shell and magic lines (``%pip``, ``!...``) are left out, as they are Colab set-up; plots go to a
non-interactive backend. This keeps ``notebooks/`` from drifting away from the library's API.
"""

import json
from pathlib import Path

import matplotlib
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def code_of(notebook: Path) -> str:
    """The notebook's code cells joined into one script, without shell / magic lines."""
    cells = json.loads(notebook.read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    lines = [
        line for source in sources for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))
    ]
    return "\n".join(lines)


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


@pytest.mark.slow
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_runs(notebook, monkeypatch, tmp_path):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.chdir(tmp_path)  # anything a notebook writes lands here
    try:
        exec(compile(code_of(notebook), str(notebook), "exec"), {"__name__": "__notebook__"})
    finally:
        plt.close("all")
