"""Shared fixture of the tests of the experiment scripts."""

import importlib
from pathlib import Path

import pytest

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.fixture
def experiment(monkeypatch):
    """``experiment("name")`` imports ``experiments/name.py`` as running the script does: with
    ``experiments/`` first on ``sys.path`` (for this test only), so that its imports of sibling
    scripts resolve."""
    monkeypatch.syspath_prepend(str(EXPERIMENTS))
    return importlib.import_module
