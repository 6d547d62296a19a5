"""The compatibility layer: torchreid import, flavour detection and checkpoint loading in the three
formats users have (torchreid Engine checkpoint with a numpy rank1, model-zoo bare state dict with a
`module.` prefix, plain state dict)."""

import argparse
import pickle
import subprocess
import sys
from collections import OrderedDict

import numpy as np
import pytest
import torch

from torchreid_attrimeter import compat


@pytest.fixture(scope="module")
def small_model():
    return compat.build_model("osnet_x0_25", num_classes=7, pretrained=False, use_gpu=False)


def test_imports_against_the_installed_torchreid_flavour():
    assert compat.TORCHREID_FLAVOUR.split("-")[0] in ("pypi", "official")
    assert "osnet_x0_25" in compat.available_model_names()
    assert len(compat.available_model_names()) == 49


def test_engine_checkpoint_with_numpy_rank1_loads_under_safe_loading(tmp_path, small_model):
    state = {
        "state_dict": small_model.state_dict(),
        "epoch": 3,
        "rank1": np.float64(0.875),  # what torchreid's engine saves; torch >= 2.6 refuses it by default
        "optimizer": torch.optim.Adam(small_model.parameters()).state_dict(),
    }
    compat.save_checkpoint(state, str(tmp_path))
    path = tmp_path / "model.pth.tar-3"
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)  # the trap this loader exists for
    checkpoint = compat.load_checkpoint(path)
    assert float(checkpoint["rank1"]) == 0.875
    loaded = compat.extract_state_dict(checkpoint)
    assert set(loaded) == set(small_model.state_dict())
    for key, value in small_model.state_dict().items():
        assert torch.equal(loaded[key], value)


def test_module_prefixed_model_zoo_state_dict_is_stripped(tmp_path, small_model):
    prefixed = OrderedDict(("module." + key, value) for key, value in small_model.state_dict().items())
    torch.save(prefixed, tmp_path / "zoo.pth")
    loaded = compat.load_state_dict_file(tmp_path / "zoo.pth")
    assert list(loaded) == list(small_model.state_dict())


def test_plain_state_dict_loads_into_a_model_with_another_classifier(tmp_path, small_model):
    torch.save(small_model.state_dict(), tmp_path / "plain.pth")
    other = compat.build_model("osnet_x0_25", num_classes=751, pretrained=False, use_gpu=False)
    report = compat.load_matching_weights(other, compat.load_state_dict_file(tmp_path / "plain.pth"))
    assert report["skipped"] == ["classifier.weight", "classifier.bias"]
    assert torch.equal(other.conv1.conv.weight, small_model.conv1.conv.weight)


def test_weights_of_another_architecture_are_refused(tmp_path, small_model):
    resnet = compat.build_model("resnet18", num_classes=7, pretrained=False, use_gpu=False)
    with pytest.raises(compat.CheckpointError, match="another architecture"):
        compat.load_matching_weights(small_model, resnet.state_dict(), source="resnet18.pth")


def test_untrusted_pickled_objects_need_explicit_trust(tmp_path):
    path = tmp_path / "objects.pth"
    # Training scripts often save their argparse options next to the weights.
    torch.save({"state_dict": {"w": torch.zeros(1)}, "args": argparse.Namespace(lr=0.1)}, path)
    with pytest.raises(compat.CheckpointError, match="trusted=True"):
        compat.load_checkpoint(path)
    assert compat.load_checkpoint(path, trusted=True)["args"].lr == 0.1


def test_corrupt_and_missing_files_name_the_file(tmp_path):
    broken = tmp_path / "broken.pth"
    broken.write_bytes(b"not a checkpoint")
    with pytest.raises(compat.CheckpointError, match="broken.pth"):
        compat.load_checkpoint(broken)
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        compat.load_checkpoint(tmp_path / "absent.pth")


def _import_in_subprocess(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)


def test_missing_torchreid_gives_one_clear_error():
    # A meta-path finder that hides torchreid, as on a machine where it is not installed.
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'torchreid':\n"
        "            raise ModuleNotFoundError(\"No module named 'torchreid'\", name='torchreid')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torchreid_attrimeter\n"
    )
    result = _import_in_subprocess(code)
    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert "TorchreidMissingError" in last_line and "pip install torchreid" in last_line


def test_missing_torchreid_dependency_is_named():
    code = (
        "import sys\n"
        "class Hide:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'gdown':\n"
        "            raise ModuleNotFoundError(\"No module named 'gdown'\", name='gdown')\n"
        "sys.meta_path.insert(0, Hide())\n"
        "import torchreid_attrimeter\n"
    )
    result = _import_in_subprocess(code)
    last_line = result.stderr.strip().splitlines()[-1]
    assert "'gdown'" in last_line and "pip install" in last_line
