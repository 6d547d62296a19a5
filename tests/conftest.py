"""Fixtures shared by the test files: the tiny synthetic dataset and untrained targets of tiny_run.py,
built once per test session, and the report tool as a module."""

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
    """The visualize tool (torchreid_attrimeter/cli/visualize.py, run by tools/visualize_decomposition.py):
    tests call its main()."""
    from torchreid_attrimeter.cli import visualize

    return visualize
