"""Fixtures shared by the test files: the tiny synthetic dataset and untrained targets of tiny_run.py,
built once per test session, and the report tool as a module."""

import importlib.util
from pathlib import Path

import pytest
from tiny_run import make_synthetic_root, save_untrained_target


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    return make_synthetic_root(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_targets(tmp_path_factory):
    """Weights files of untrained targets of two families, by model name (8 classes)."""
    folder = tmp_path_factory.mktemp("tiny_targets")
    return {name: save_untrained_target(folder, name) for name in ("osnet_x0_25", "resnet18")}


@pytest.fixture(scope="session")
def report_tool():
    """tools/visualize_decomposition.py as a module (tools/ is not a package): tests call its main()."""
    path = Path(__file__).resolve().parent.parent / "tools" / "visualize_decomposition.py"
    spec = importlib.util.spec_from_file_location("visualize_decomposition", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
