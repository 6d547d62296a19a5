"""Resuming a run: killed after its first epoch and resumed, a run ends with the same interpreter,
optimizer state and random-number state, bit for bit, as the uninterrupted run with the same seed
(CPU, data.workers 0 and 2); checkpoints carry that state and still load with weights_only and in
the explainer; older checkpoints without it still resume, with a log line saying so.

Evaluation is replaced here by a function that only draws random numbers (as a real one does when
it creates its loaders): what is compared is training, which must not depend on evaluations in
between (the uninterrupted run evaluates after every epoch, the resumed one does not)."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from tiny_run import TINY_DATASET, make_synthetic_root, save_untrained_target, tiny_config

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import list_checkpoints
from torchreid_attrimeter.cli import train as train_tool
from torchreid_attrimeter.engine import AttriMeterEngine, build_engine

# 4 training identities x 4 images with P=4, K=2: two batches per epoch.
SMALL_DATASET = {**TINY_DATASET, "num_train_identities": 4, "num_test_identities": 3}


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return make_synthetic_root(tmp_path_factory.mktemp("data"), seed=11, **SMALL_DATASET)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return save_untrained_target(tmp_path_factory.mktemp("target"), "resnet18", num_classes=4)


def _evaluation_drawing_random_numbers(self, *args, **kwargs):
    # Like a real evaluation, which creates loaders (each draws a seed from torch's generator).
    random.random(), np.random.rand(), torch.rand(1)
    return 0.0


@pytest.fixture
def no_evaluation(monkeypatch):
    monkeypatch.setattr(AttriMeterEngine, "evaluate_here", _evaluation_drawing_random_numbers)


def run_config(data_root, weights, save_dir, workers, **overrides):
    # random_flip: augmentation draws random numbers in the loader (main process or workers);
    # warm-up: the scheduler state must be restored too.
    return tiny_config(data_root, weights, save_dir, **{
        "data.workers": workers, "train.max_epoch": 2, "train.seed": 7, "attrimeter.variant": "head",
        "attrimeter.warmup_epochs": 1, "data.transforms": ["random_flip"], **overrides})


class _Killed(KeyboardInterrupt):
    pass


def _run_killed_in_second_epoch(cfg, monkeypatch):
    original = AttriMeterEngine.forward_backward

    def killed(self, data):
        if self.epoch == 1:
            raise _Killed()
        return original(self, data)

    monkeypatch.setattr(AttriMeterEngine, "forward_backward", killed)
    with pytest.raises(_Killed):
        train_tool.run(cfg)
    monkeypatch.setattr(AttriMeterEngine, "forward_backward", original)


def _final_checkpoint(save_dir):
    return compat.load_checkpoint(list_checkpoints(save_dir)[-1][1])


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 2])
def test_a_resumed_run_equals_the_uninterrupted_one_bit_for_bit(workers, data_root, weights, tmp_path,
                                                                 monkeypatch, no_evaluation):
    # Uninterrupted, with an evaluation after each epoch: evaluating must not change training.
    train_tool.run(run_config(data_root, weights, tmp_path / "whole", workers, **{"test.eval_freq": 1}))

    interrupted = run_config(data_root, weights, tmp_path / "resumed", workers)
    _run_killed_in_second_epoch(interrupted, monkeypatch)
    assert [epoch for epoch, _ in list_checkpoints(str(tmp_path / "resumed"))] == [1]
    interrupted.model.resume = "auto"
    record = train_tool.run(interrupted)
    assert record["checkpoint"].endswith(os.path.join("resumed", "model", "model.pth.tar-2"))

    whole, resumed = _final_checkpoint(str(tmp_path / "whole")), _final_checkpoint(str(tmp_path / "resumed"))
    assert whole["epoch"] == resumed["epoch"] == 2
    for key, value in whole["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for key, state in whole["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed["optimizer"]["state"][key][name]))
    assert whole["scheduler"] == resumed["scheduler"]
    assert torch.equal(whole["rng"]["torch"], resumed["rng"]["torch"])


def test_a_checkpoint_with_random_state_loads_safely_and_in_the_explainer(data_root, weights, tmp_path,
                                                                          no_evaluation):
    from torchreid_attrimeter.checkpoints import load_attrimeter_checkpoint

    cfg = run_config(data_root, weights, tmp_path / "run", 0, **{"train.max_epoch": 1})
    train_tool.run(cfg)
    path = list_checkpoints(str(tmp_path / "run"))[-1][1]
    checkpoint = compat.load_checkpoint(path)  # weights_only
    assert set(checkpoint["rng"]) >= {"python", "numpy", "torch", "loader"}
    model, record = load_attrimeter_checkpoint(path)
    assert record["attribute_names"] and not model.training


def test_an_older_checkpoint_without_random_state_still_resumes_and_says_so(data_root, weights, tmp_path,
                                                                            capsys, no_evaluation):
    cfg = run_config(data_root, weights, tmp_path / "run", 0, **{"train.max_epoch": 1})
    train_tool.run(cfg)
    path = list_checkpoints(str(tmp_path / "run"))[-1][1]
    checkpoint = torch.load(path, weights_only=True)
    del checkpoint["rng"]  # as written before the random state was saved
    torch.save(checkpoint, path)

    engine = build_engine(cfg)
    assert engine.resume(path) == 1
    assert "not bit for bit" in capsys.readouterr().out
    assert engine.training_rng_state is None
    engine.run(save_dir=str(tmp_path / "run"), max_epoch=2, start_epoch=1, print_freq=10)
    assert [epoch for epoch, _ in list_checkpoints(str(tmp_path / "run"))] == [1, 2]
