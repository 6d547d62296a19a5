"""What a failure leaves behind: a kill or a full disk while a checkpoint is written keeps the
previous checkpoint loadable and leaves no partial file named like a checkpoint; a full disk while
the results are written keeps the earlier results and leaves no partial results file; truncated or
corrupt weights and checkpoints are reported as such; a corrupt query, gallery or training image
stops the run with an error naming the file (tools/train.py: one ``error:`` line, exit 2)."""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import shutil
import subprocess
import sys

import pytest
import torch

from torchreid_attrimeter import checkpoints as checkpoints_module
from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import list_checkpoints
from torchreid_attrimeter.cli import train as train_tool
from torchreid_attrimeter.cli.errors import error_line
from torchreid_attrimeter.config import ConfigError
from torchreid_attrimeter.data import CorruptImageError
from torchreid_attrimeter.engine import build_engine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TOOL = os.path.join(REPO, "tools", "train.py")
from tiny_run import tiny_config


@pytest.fixture(scope="module")
def weights(tiny_targets):
    return tiny_targets["resnet18"]


@pytest.fixture(scope="module")
def engine(tiny_data_root, weights, tmp_path_factory):
    return build_engine(tiny_config(tiny_data_root, weights, tmp_path_factory.mktemp("log"),
                                    **{"attrimeter.variant": "head"}))


def _corrupt_copy(tiny_data_root, folder, destination, every_image=False):
    """A copy of the dataset whose first (or every) image in ``folder`` is cut short; returns (root,
    the names of the cut images)."""
    shutil.copytree(tiny_data_root, destination)
    images = sorted(glob.glob(os.path.join(str(destination), "synthetic_attr", folder, "*.jpg")))
    images = images if every_image else images[:1]
    for image in images:
        with open(image, "rb") as handle:
            head = handle.read(100)
        with open(image, "wb") as handle:
            handle.write(head)
    return str(destination), [os.path.basename(image) for image in images]


# --- (a) checkpoints -------------------------------------------------------------------------------


class _Killed(KeyboardInterrupt):
    pass


def _save_that_dies_midway(error):
    def save(state, destination, *args, **kwargs):
        with contextlib.ExitStack() as stack:
            stream = (stack.enter_context(open(destination, "wb")) if isinstance(destination, (str, os.PathLike))
                      else destination)
            stream.write(b"PK\x03\x04 the first bytes of a checkpoint")
            raise error
    return save


@pytest.mark.parametrize("error", [_Killed(), RuntimeError("PytorchStreamWriter failed writing file data/0"),
                                   OSError(errno.ENOSPC, "No space left on device")],
                         ids=["killed", "torch-write-error", "disk-full"])
def test_a_failed_checkpoint_write_keeps_the_previous_checkpoint(engine, tmp_path, monkeypatch, error):
    save_dir = str(tmp_path / "run")
    first = engine.save_model(0, None, save_dir)  # a rolling (not evaluated) checkpoint
    before = compat.load_checkpoint(first)

    monkeypatch.setattr(checkpoints_module.torch, "save", _save_that_dies_midway(error))
    expected = _Killed if isinstance(error, _Killed) else OSError
    with pytest.raises(expected) as raised:
        engine.save_model(1, None, save_dir)
    if expected is OSError:
        assert "model.pth.tar-2" in str(raised.value) and "--resume auto" in str(raised.value)
    monkeypatch.undo()

    assert os.listdir(os.path.join(save_dir, "model")) == ["model.pth.tar-1"]  # no partial file at all
    after = compat.load_checkpoint(first)
    assert after["epoch"] == before["epoch"] == 1
    for key, value in before["state_dict"].items():
        assert torch.equal(value, after["state_dict"][key])
    engine.checkpoints.rolling = None  # the shared engine's next test starts afresh


def test_a_truncated_checkpoint_is_reported_as_unreadable_on_resume(engine, tmp_path):
    path = engine.save_model(0, None, str(tmp_path / "run"))
    with open(path, "rb") as handle:
        data = handle.read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    with pytest.raises(compat.UnreadableCheckpointError, match="model.pth.tar-1.*truncated or corrupt"):
        engine.resume(path)
    engine.checkpoints.rolling = None


# --- (b) results -------------------------------------------------------------------------------------


def test_a_full_disk_while_writing_results_keeps_the_earlier_files(tmp_path, monkeypatch):
    earlier = train_tool.save_results({"run": 1}, str(tmp_path))
    with open(earlier, "rb") as handle:
        earlier_bytes = handle.read()

    def full_disk(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints_module.os, "fsync", full_disk)  # the bytes are written, not stored
    with pytest.raises(OSError) as raised:
        train_tool.save_results({"run": 2, "big": list(range(1000))}, str(tmp_path))
    monkeypatch.undo()
    assert raised.value.errno == errno.ENOSPC and "results" in str(raised.value)
    assert os.listdir(tmp_path) == [os.path.basename(earlier)]
    with open(earlier, "rb") as handle:
        assert handle.read() == earlier_bytes


def test_the_tool_reports_a_failed_write_in_one_line_with_exit_1(monkeypatch, capsys):
    def full_disk(argv):
        raise OSError(errno.ENOSPC, "could not write the results file 'results-1.json' (No space left)")

    monkeypatch.setattr(train_tool, "main", full_disk)
    assert train_tool.cli([]) == 1
    assert capsys.readouterr().err.strip() == (
        "error: could not write the results file 'results-1.json' (No space left)")


# --- (c) corrupt images and weights ------------------------------------------------------------------


@pytest.mark.parametrize("folder", ["query", "bounding_box_test"])
def test_a_corrupt_query_or_gallery_image_stops_evaluation_naming_it(tiny_data_root, weights, tmp_path, folder):
    root, (image,) = _corrupt_copy(tiny_data_root, folder, tmp_path / "data")
    engine = build_engine(tiny_config(root, weights, tmp_path / "log", **{"attrimeter.variant": "head"}))
    with pytest.raises(CorruptImageError, match=image):
        engine.test(ranks=[1])


def test_a_corrupt_training_image_is_one_error_line_and_exit_2(tiny_data_root, weights, tmp_path):
    # Every training image: the identity sampler leaves some images out of an epoch.
    root, images = _corrupt_copy(tiny_data_root, "bounding_box_train", tmp_path / "data", every_image=True)
    config = tmp_path / "run.yaml"
    config.write_text(tiny_config(root, weights, tmp_path / "log", **{"attrimeter.variant": "head"}).dump())
    completed = subprocess.run([sys.executable, TRAIN_TOOL, "--config-file", str(config)],
                               capture_output=True, text=True, cwd=str(tmp_path), timeout=300, check=False)
    assert completed.returncode == 2, completed.stderr
    errors = [line for line in completed.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: cannot decode image")
    assert any(image in errors[0] for image in images) and "Traceback" not in completed.stderr
    assert list_checkpoints(str(tmp_path / "log")) == []


def test_an_error_raised_in_a_loader_worker_is_reported_by_its_own_message():
    wrapped = CorruptImageError(
        "Caught CorruptImageError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        "last):\n  File \"worker.py\", line 1, in _worker_loop\ntorchreid_attrimeter.data.datasets."
        "CorruptImageError: cannot decode image 'a/0001_c1s1_0001.jpg' (corrupt or truncated?): x\n")
    assert error_line(wrapped) == (
        "error: cannot decode image 'a/0001_c1s1_0001.jpg' (corrupt or truncated?): x")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_unreadable_target_weights_say_so_and_name_the_file(tiny_data_root, weights, tmp_path, damage):
    with open(weights, "rb") as handle:
        data = handle.read()
    broken = tmp_path / f"{damage}.pth"
    broken.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00garbage" * 50, "empty": b""}[damage])
    with pytest.raises(ConfigError) as raised:
        build_engine(tiny_config(tiny_data_root, str(broken), tmp_path / "log"))
    message = str(raised.value)
    assert f"{damage}.pth" in message and "truncated or corrupt" in message
    assert "Download it again" in message and "attrimeter.target_name" not in message


def test_weights_with_python_objects_still_ask_for_trust_not_a_new_copy(tmp_path):
    path = tmp_path / "objects.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "options": compat.CheckpointError("x")}, path)
    with pytest.raises(compat.CheckpointError, match="trust") as raised:
        compat.load_checkpoint(path)
    assert not isinstance(raised.value, compat.UnreadableCheckpointError)
