"""tools/demo.py's guard for its output folder (the demo itself takes minutes and is run by hand)."""

from __future__ import annotations

import json
import os

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
