"""tools/train.py end to end on a tiny synthetic dataset, for two target families: a short run that is
interrupted, resumed from its checkpoint without losing the finished epoch, then evaluated; logs and
result files; and the command-line errors for bad input."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

import pytest
import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import list_checkpoints
from torchreid_attrimeter.cli import train as train_tool
from torchreid_attrimeter.data.synthetic import generate_synthetic_dataset
from torchreid_attrimeter.engine import AttriMeterEngine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_TOOL = os.path.join(REPO, "tools", "train.py")

TINY_DATASET = {
    "num_train_identities": 8, "num_test_identities": 6, "num_cameras": 2, "min_images_per_identity": 4,
    "max_images_per_identity": 4, "num_distractor_images": 0, "num_junk_images": 0, "image_height": 64,
    "image_width": 32,
}

CONFIG = """model:
  name: '{name}'
  pretrained: False
  load_weights: '{weights}'

data:
  root: '{root}'
  sources: ['synthetic_attr']
  targets: ['synthetic_attr']
  height: 64
  width: 32
  workers: 0
  save_dir: '{save_dir}'

sampler:
  train_sampler: 'RandomIdentitySampler'
  num_instances: 2

train:
  optim: 'adam'
  lr: 0.001
  max_epoch: 2
  batch_size: 8
  print_freq: 2

test:
  batch_size: 16
  ranks: [1, 5]

attrimeter:
  hidden_channels: 16
  warmup_epochs: 1
  eval:
    amp: False
"""


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    generate_synthetic_dataset(str(root), seed=5, **TINY_DATASET)
    return str(root)


def write_config(folder, data_root, name):
    torch.manual_seed(0)
    model = compat.build_model(name, num_classes=8, loss="softmax", pretrained=False, use_gpu=False)
    weights = os.path.join(folder, f"{name}.pth")
    torch.save(model.state_dict(), weights)
    path = os.path.join(folder, f"{name}.yaml")
    with open(path, "w") as handle:
        handle.write(CONFIG.format(name=name, weights=weights, root=data_root,
                                   save_dir=os.path.join(folder, "log")))
    return path, os.path.join(folder, "log")


def _read(path):
    with open(path, encoding="utf-8") as handle:
        return handle.read()


class _Interrupt(KeyboardInterrupt):
    pass


@pytest.mark.slow
@pytest.mark.parametrize("name", ["osnet_x0_25", "resnet18"])
def test_interrupted_run_resumes_then_evaluates(name, data_root, tmp_path, monkeypatch):
    config, save_dir = write_config(str(tmp_path), data_root, name)

    # 1. Interrupted in the middle of its second epoch: the first one must survive.
    original = AttriMeterEngine.forward_backward

    def interrupted(self, data):
        if self.epoch == 1:
            raise _Interrupt()
        return original(self, data)

    monkeypatch.setattr(AttriMeterEngine, "forward_backward", interrupted)
    with pytest.raises(_Interrupt):
        train_tool.main(["--config-file", config])
    monkeypatch.setattr(AttriMeterEngine, "forward_backward", original)
    assert [epoch for epoch, _ in list_checkpoints(save_dir)] == [1]
    assert glob.glob(os.path.join(save_dir, "train.log-*"))

    # 2. Resumed: trains only the second epoch, evaluates, saves the evaluated checkpoint (and leaves
    #    the earlier run's file alone).
    record = train_tool.main(["--config-file", config, "--resume", "auto"])
    assert [epoch for epoch, _ in list_checkpoints(save_dir)] == [1, 2]
    checkpoint = compat.load_checkpoint(list_checkpoints(save_dir)[-1][1])
    assert checkpoint["epoch"] == 2 and type(checkpoint["rank1"]) is float
    results = record["datasets"]["synthetic_attr"]
    assert checkpoint["rank1"] == pytest.approx(results["interpreter_rank1"] / 100.0)
    logs = sorted(glob.glob(os.path.join(save_dir, "train.log-*")))
    assert len(logs) == 2
    after_resume = _read(logs[-1]).split("Resumed from")[-1]
    assert "epoch: [2/2]" in after_resume and "epoch: [1/2]" not in after_resume

    # 3. Evaluation only, from the latest checkpoint; every result file is kept.
    evaluated = train_tool.main(["--config-file", config, "--evaluate"])
    assert evaluated["checkpoint"].endswith("model.pth.tar-2")
    result_files = sorted(glob.glob(os.path.join(save_dir, "results-*.json")))
    assert len(result_files) == 2
    saved = [json.loads(_read(path)) for path in result_files]
    for record_on_disk in saved:
        metrics = record_on_disk["datasets"]["synthetic_attr"]
        assert {"target_rank1", "interpreter_rank1", "ADRE"} <= set(metrics)
    assert saved[0]["target"]["name"] == name


def test_results_are_never_written_over_an_earlier_file(tmp_path):
    paths = {train_tool.save_results({"run": index}, str(tmp_path)) for index in range(3)}
    assert len(paths) == 3
    assert sorted(json.loads(_read(path))["run"] for path in paths) == [0, 1, 2]


def test_a_new_run_in_a_used_save_dir_is_refused(data_root, tmp_path):
    config, save_dir = write_config(str(tmp_path), data_root, "resnet18")
    os.makedirs(os.path.join(save_dir, "model"))
    with open(os.path.join(save_dir, "model", "model.pth.tar-1"), "wb") as handle:
        handle.write(b"an earlier run")
    with pytest.raises(FileExistsError, match="--resume"):
        train_tool.main(["--config-file", config])


def test_evaluate_without_any_checkpoint_names_the_fix(data_root, tmp_path):
    config, _ = write_config(str(tmp_path), data_root, "resnet18")
    with pytest.raises(train_tool.ConfigError, match="Train first"):
        train_tool.main(["--config-file", config, "--evaluate"])


def test_command_line_error_names_the_unknown_key_and_exits_2(tmp_path):
    config = tmp_path / "typo.yaml"
    config.write_text("train:\n  max_epochs: 3\n")
    completed = subprocess.run([sys.executable, TRAIN_TOOL, "--config-file", str(config)],
                               capture_output=True, text=True, cwd=str(tmp_path), timeout=300, check=False)
    assert completed.returncode == 2
    assert "train.max_epochs" in completed.stderr and "train.max_epoch" in completed.stderr


def test_the_wrong_run_is_refused_before_anything_is_written(data_root, tmp_path):
    # An older run reached epoch 7 in data.save_dir; a fresh 2-epoch run would record its epoch 7.
    config, save_dir = write_config(str(tmp_path), data_root, "resnet18")
    os.makedirs(os.path.join(save_dir, "model"))
    for epoch in range(1, 8):
        with open(os.path.join(save_dir, "model", f"model.pth.tar-{epoch}"), "wb") as handle:
            handle.write(b"an earlier run")
    with pytest.raises(FileExistsError) as raised:
        train_tool.main(["--config-file", config, "train.max_epoch", "2"])
    message = str(raised.value)
    for expected in (save_dir, "model.pth.tar-7", "another data.save_dir", "--resume auto"):
        assert expected in message
    assert not glob.glob(os.path.join(save_dir, "results-*.json"))
    assert [epoch for epoch, _ in list_checkpoints(save_dir)] == list(range(1, 8))


def test_results_name_the_checkpoint_this_run_wrote(data_root, tmp_path):
    config, save_dir = write_config(str(tmp_path), data_root, "resnet18")
    record = train_tool.main(["--config-file", config, "train.max_epoch", "1", "attrimeter.variant", "head"])
    assert record["checkpoint"] == os.path.join(save_dir, "model", "model.pth.tar-1")
    assert record["epoch"] == 1
    (results,) = glob.glob(os.path.join(save_dir, "results-*.json"))
    assert json.loads(_read(results))["checkpoint"] == record["checkpoint"]


@pytest.mark.parametrize("key, value", [("train.max_epoch", "-1"), ("train.batch_size", "0"),
                                        ("train.lr", "0"), ("sampler.num_instances", "0")])
def test_invalid_numbers_stop_the_tool_with_one_error_line_and_exit_2(data_root, tmp_path, capsys, key, value):
    config, save_dir = write_config(str(tmp_path), data_root, "resnet18")
    assert train_tool.cli(["--config-file", config, key, value]) == 2
    assert capsys.readouterr().err.startswith(f"error: {key} is ")
    assert not glob.glob(os.path.join(save_dir, "results-*.json"))


def test_a_batch_of_more_identities_than_the_training_set_is_a_config_error(data_root, tmp_path, capsys):
    config, _ = write_config(str(tmp_path), data_root, "resnet18")
    assert train_tool.cli(["--config-file", config, "train.batch_size", "400"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: train.batch_size=400") and "8 identities" in error
