"""The checkpoint module on its own (no model, no training): the file layout, the record check and
the target verification both readers (resume, explainer) rely on."""

from __future__ import annotations

import os

import pytest
import torch

from torchreid_attrimeter.checkpoints import (
    CHECKPOINT_FORMAT,
    ResumeError,
    attrimeter_record,
    checkpoint_path,
    latest_checkpoint,
    list_checkpoints,
    read_checkpoint,
    verify_target,
    write_file_safely,
)
from torchreid_attrimeter.models.attrimeter import file_sha256


class _Refused(ValueError):
    pass


def _weights(tmp_path, name="target.pth", value=0.0):
    path = str(tmp_path / name)
    torch.save({"conv.weight": torch.full((2, 2), value)}, path)
    return path


def _record(weights, name="resnet18"):
    spec = {"name": name, "weights": weights, "weights_sha256": file_sha256(weights), "image_size": (64, 32)}
    return attrimeter_record(spec, ["a", "b"], "schema", "euclidean")


def test_the_layout_is_torchreids_and_the_latest_is_the_highest_epoch(tmp_path):
    save_dir = str(tmp_path / "run")
    assert list_checkpoints(save_dir) == [] and latest_checkpoint(save_dir) is None
    os.makedirs(os.path.dirname(checkpoint_path(save_dir, 1)))
    for epoch in (2, 10, 1):
        with open(checkpoint_path(save_dir, epoch), "wb") as handle:
            handle.write(b"x")
    with open(os.path.join(save_dir, "model", "model.pth.tar-3.partial"), "wb") as handle:
        handle.write(b"x")
    assert checkpoint_path(save_dir, 2) == os.path.join(save_dir, "model", "model.pth.tar-2")
    assert [epoch for epoch, _ in list_checkpoints(save_dir)] == [1, 2, 10]
    assert latest_checkpoint(save_dir) == checkpoint_path(save_dir, 10)


def test_a_written_record_reads_back(tmp_path):
    weights = _weights(tmp_path)
    path = str(tmp_path / "model.pth.tar-1")
    state = {"state_dict": {}, "attrimeter": _record(weights)}
    write_file_safely(path, lambda stream: torch.save(state, stream))
    checkpoint, record = read_checkpoint(path, error=_Refused, fix="the fix")
    assert record["format"] == CHECKPOINT_FORMAT and record["attribute_names"] == ["a", "b"]
    assert checkpoint["state_dict"] == {}


@pytest.mark.parametrize("content, said", [
    ({"state_dict": {}}, "no 'attrimeter' record"),
    ({"state_dict": {}, "attrimeter": {"format": "torchreid-attrimeter/0"}}, "torchreid-attrimeter/0"),
], ids=["no-record", "other-format"])
def test_a_file_without_a_record_of_this_format_is_refused_naming_it_and_the_fix(tmp_path, content, said):
    path = str(tmp_path / "weights.pth")
    torch.save(content, path)
    with pytest.raises(_Refused) as raised:
        read_checkpoint(path, error=_Refused, fix="give it as attrimeter.target_weights")
    message = str(raised.value)
    assert path in message and said in message and message.endswith("give it as attrimeter.target_weights")


def test_the_same_target_passes_with_or_without_a_known_hash(tmp_path):
    weights = _weights(tmp_path)
    target = _record(weights)["target"]
    verify_target("ckpt", target, weights, name="resnet18", error=_Refused, fix="fix")
    verify_target("ckpt", target, "elsewhere.pth", name="resnet18", weights_sha256=target["weights_sha256"],
                  error=_Refused, fix="fix")


def test_other_target_weights_are_refused_naming_both_files_and_hashes(tmp_path):
    weights, changed = _weights(tmp_path), _weights(tmp_path, "changed.pth", 1.0)
    target = _record(weights)["target"]
    with pytest.raises(_Refused) as raised:
        verify_target("ckpt", target, changed, name="resnet18", error=_Refused, fix="use the original file")
    message = str(raised.value)
    assert weights in message and changed in message and "'ckpt'" in message
    assert file_sha256(weights)[:12] in message and file_sha256(changed)[:12] in message
    assert message.endswith("use the original file")


def test_another_target_model_is_refused_naming_both(tmp_path):
    target = _record(_weights(tmp_path))["target"]
    with pytest.raises(ResumeError, match="'resnet18', not 'osnet_x0_25': start anew"):
        verify_target("ckpt", target, None, name="osnet_x0_25", error=ResumeError, fix="start anew")


def test_weights_given_for_a_target_trained_without_any_are_refused(tmp_path):
    target = {"name": "resnet18", "weights": None, "weights_sha256": None}
    with pytest.raises(_Refused, match="none"):
        verify_target("ckpt", target, _weights(tmp_path), name="resnet18", error=_Refused, fix="fix")
