"""The demo's guards for its output folder and its shipped target (the demo itself takes minutes and is run by hand)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from torchreid_attrimeter.cli import demo as demo_tool


def test_an_output_folder_keeps_the_image_size_it_was_made_with(tmp_path):
    output = str(tmp_path / "demo")
    demo_tool.check_settings(output, {"image_size": [256, 128]})
    with open(os.path.join(output, demo_tool.SETTINGS_FILE), encoding="utf-8") as handle:
        assert json.load(handle) == {"image_size": [256, 128]}
    demo_tool.check_settings(output, {"image_size": [256, 128]})  # the same settings continue the run
    with pytest.raises(SystemExit, match="Use another --output"):
        demo_tool.check_settings(output, {"image_size": [128, 64]})


def test_a_folder_from_before_the_settings_file_counts_as_the_default_size(tmp_path):
    os.makedirs(tmp_path / "target")
    with pytest.raises(SystemExit, match=r"\[128, 64\]"):
        demo_tool.check_settings(str(tmp_path), {"image_size": [256, 128]})
    demo_tool.check_settings(str(tmp_path), {"image_size": demo_tool.default_image_size()})
    assert demo_tool.default_image_size() == [128, 64]


def test_settings_of_a_folder_from_before_the_shipped_target_mean_a_trained_target(tmp_path):
    output = str(tmp_path)
    with open(os.path.join(output, demo_tool.SETTINGS_FILE), "w", encoding="utf-8") as handle:
        json.dump({"image_size": [128, 64]}, handle)
    demo_tool.check_settings(output, {"image_size": [128, 64], "target": "trained"})
    with pytest.raises(SystemExit, match="'target': 'trained'"):
        demo_tool.check_settings(output, {"image_size": [128, 64], "target": "shipped"})


def test_the_shipped_target_is_the_published_file_and_fits_osnet_x0_25():
    from torchreid_attrimeter import compat

    assert demo_tool.shipped_target() == demo_tool.SHIPPED_TARGET
    state = compat.load_checkpoint(demo_tool.SHIPPED_TARGET)  # a bare state dict, as model-zoo files are
    model = compat.build_model("osnet_x0_25", num_classes=400, pretrained=False)  # the 400 demo identities
    model.load_state_dict(state, strict=True)


def test_a_damaged_shipped_target_is_refused_with_the_fix(tmp_path, monkeypatch):
    from torchreid_attrimeter import compat

    damaged = tmp_path / "synthetic_demo_target.pth"
    data = bytearray(Path(demo_tool.SHIPPED_TARGET).read_bytes())
    data[-100] ^= 1
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(demo_tool, "SHIPPED_TARGET", str(damaged))
    with pytest.raises(compat.CheckpointError, match="damaged or replaced.*--train-target"):
        demo_tool.shipped_target()
    monkeypatch.setattr(demo_tool, "SHIPPED_TARGET", str(tmp_path / "gone.pth"))
    with pytest.raises(FileNotFoundError, match="--train-target"):
        demo_tool.shipped_target()


def test_a_trained_target_is_compared_with_the_shipped_one_tensor_by_tensor(tmp_path, capsys):
    import torch

    from torchreid_attrimeter import compat

    state = compat.load_checkpoint(demo_tool.SHIPPED_TARGET)
    checkpoint = tmp_path / "model.pth.tar-15"
    torch.save({"state_dict": state, "epoch": 15}, checkpoint)  # torchreid's engine checkpoint layout
    demo_tool.compare_with_shipped(str(checkpoint))
    assert f"equals the shipped one ({len(state)} tensors, bit for bit)" in capsys.readouterr().out
    state["classifier.bias"] = state["classifier.bias"] + 1e-6
    torch.save({"state_dict": state, "epoch": 15}, checkpoint)
    demo_tool.compare_with_shipped(str(checkpoint))
    assert f"differs from the shipped one in 1 of {len(state)} tensors" in capsys.readouterr().out
