"""AttriMeterEngine: training steps on PK batches, the frozen target, checkpoints of the interpreter
alone (save without a scheduler, never overwrite, resume with target checks), warm-up, evaluation,
and the errors build_engine gives for unusable inputs. Tiny synthetic data, CPU, pretrained=False."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_run import tiny_config

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import ResumeError, latest_checkpoint, list_checkpoints
from torchreid_attrimeter.config import ConfigError
from torchreid_attrimeter.engine import AttriMeterEngine, batch_adre, build_engine


@pytest.fixture(scope="module")
def engine(tiny_data_root, tiny_targets, tmp_path_factory):
    """One engine shared by the tests that only read its state or write into their own folders."""
    save_dir = tmp_path_factory.mktemp("log")
    return build_engine(tiny_config(tiny_data_root, tiny_targets["resnet18"], save_dir, name="resnet18"))


def _first_batch(engine):
    return next(iter(engine.train_loader))


def _target_state(engine):
    return {key: value.clone() for key, value in engine.model.target.state_dict().items()}


def test_forward_backward_returns_each_loss_term_and_the_adre_as_floats(engine):
    engine.set_model_mode("train")
    summary = engine.forward_backward(_first_batch(engine))
    assert set(summary) == {"loss", "loss_dd", "loss_ap", "ADRE"}
    assert all(isinstance(value, float) for value in summary.values())
    assert summary["loss"] == pytest.approx(summary["loss_dd"] + 10.0 * summary["loss_ap"], rel=1e-5)
    assert summary["ADRE"] >= 0.0


def test_training_changes_the_interpreter_and_never_the_target(engine):
    target_before = _target_state(engine)
    interpreter_before = {key: value.clone() for key, value in engine.model.interpreter_state_dict().items()}
    # torchreid's train() runs its transfer-learning hook (open_all_layers) before the batches.
    engine.epoch, engine.max_epoch = 0, 1
    engine.train(print_freq=100, fixbase_epoch=0, open_layers=None)
    assert not any(parameter.requires_grad for parameter in engine.model.target.parameters())
    for key, value in engine.model.target.state_dict().items():
        assert torch.equal(value, target_before[key]), key
    changed = [key for key, value in engine.model.interpreter_state_dict().items()
               if not torch.equal(value, interpreter_before[key])]
    assert changed


def test_optimizer_holds_only_interpreter_parameters(engine):
    optimised = {id(parameter) for group in engine.optimizer.param_groups for parameter in group["params"]}
    assert optimised == {id(parameter) for parameter in engine.model.interpreter_parameters()}


def test_attribute_branch_adds_its_weighted_loss(tiny_data_root, tiny_targets, tmp_path):
    cfg = tiny_config(tiny_data_root, tiny_targets["resnet18"], tmp_path / "log",
                      **{"attrimeter.attribute_branch": True})
    engine = build_engine(cfg)
    engine.set_model_mode("train")
    summary = engine.forward_backward(_first_batch(engine))
    expected = summary["loss_dd"] + 10.0 * summary["loss_ap"] + 100.0 * summary["loss_attr"]
    assert summary["loss"] == pytest.approx(expected, rel=1e-5)


def test_batches_without_attributes_are_an_error_naming_the_fix(engine):
    batch = {key: value for key, value in _first_batch(engine).items()
             if key not in ("attributes", "attributes_known")}
    engine.set_model_mode("train")
    with pytest.raises(ConfigError, match="synthetic_attr"):
        engine.forward_backward(batch)


def test_checkpoint_holds_the_interpreter_only_and_loads_safely(engine, tmp_path):
    path = engine.save_model(0, 0.5, str(tmp_path / "run"))
    checkpoint = compat.load_checkpoint(path)  # weights_only: no numpy scalars, no code
    assert os.path.basename(path) == "model.pth.tar-1"
    assert not any(key.startswith("target.") for key in checkpoint["state_dict"])
    assert set(checkpoint["state_dict"]) == set(engine.model.interpreter_state_dict())
    assert type(checkpoint["rank1"]) is float and checkpoint["epoch"] == 1
    assert checkpoint["attrimeter"]["target"]["weights_sha256"] == engine.model.target_spec["weights_sha256"]


def test_save_model_works_without_a_scheduler(engine, tmp_path):
    engine_without = AttriMeterEngine(engine.datamanager, engine.model, engine.optimizer, None, use_gpu=False)
    path = engine_without.save_model(2, None, str(tmp_path / "run"))
    checkpoint = compat.load_checkpoint(path)
    assert "scheduler" not in checkpoint and "rank1" not in checkpoint and checkpoint["epoch"] == 3


def test_save_model_never_overwrites_a_file_it_did_not_write(engine, tmp_path):
    save_dir = tmp_path / "run"
    os.makedirs(save_dir / "model")
    (save_dir / "model" / "model.pth.tar-1").write_bytes(b"the user's own file")
    with pytest.raises(FileExistsError, match="model.pth.tar-1"):
        engine.save_model(0, None, str(save_dir))
    assert (save_dir / "model" / "model.pth.tar-1").read_bytes() == b"the user's own file"


def test_epoch_checkpoints_without_evaluation_roll_over_and_evaluated_ones_stay(engine, tmp_path):
    save_dir = str(tmp_path / "run")
    engine.save_model(0, None, save_dir)
    engine.save_model(1, 0.25, save_dir)  # evaluated: kept
    engine.save_model(2, None, save_dir)
    engine.save_model(3, None, save_dir)
    assert [epoch for epoch, _ in list_checkpoints(save_dir)] == [2, 4]
    assert latest_checkpoint(save_dir).endswith("model.pth.tar-4")


def test_resume_restores_interpreter_optimizer_and_epoch(tiny_data_root, tiny_targets, tmp_path):
    cfg = tiny_config(tiny_data_root, tiny_targets["osnet_x0_25"], tmp_path / "log", name="osnet_x0_25")
    first = build_engine(cfg)
    first.set_model_mode("train")
    first.forward_backward(_first_batch(first))
    path = first.save_model(4, None, str(tmp_path / "run"))

    second = build_engine(cfg)
    assert second.resume(path) == 5
    for key, value in first.model.interpreter_state_dict().items():
        assert torch.equal(value, second.model.interpreter_state_dict()[key]), key
    assert second.optimizer.state_dict()["state"].keys() == first.optimizer.state_dict()["state"].keys()


def test_resume_with_changed_target_weights_is_an_error(engine, tiny_data_root, tiny_targets, tmp_path):
    path = engine.save_model(0, None, str(tmp_path / "run"))
    changed = str(tmp_path / "changed.pth")
    state = torch.load(tiny_targets["resnet18"])
    state[next(iter(state))] += 1.0
    torch.save(state, changed)
    other = build_engine(tiny_config(tiny_data_root, changed, tmp_path / "log"))
    with pytest.raises(ResumeError, match="sha256"):
        other.resume(path)


def test_resume_with_another_target_model_is_an_error(engine, tiny_data_root, tiny_targets, tmp_path):
    path = engine.save_model(0, None, str(tmp_path / "run"))
    other = build_engine(tiny_config(tiny_data_root, tiny_targets["osnet_x0_25"], tmp_path / "b",
                                     name="osnet_x0_25"))
    with pytest.raises(ResumeError, match="resnet18"):
        other.resume(path)


def test_resume_from_a_plain_torchreid_file_is_an_error_explaining_the_keys(engine, tiny_targets):
    with pytest.raises(ResumeError, match="attrimeter.target_weights"):
        engine.resume(tiny_targets["resnet18"])


def test_a_fresh_run_refuses_to_overwrite_an_earlier_runs_checkpoints(engine, tmp_path):
    save_dir = str(tmp_path / "run")
    engine.save_model(0, None, save_dir)
    fresh = AttriMeterEngine(engine.datamanager, engine.model, engine.optimizer, engine.scheduler,
                             use_gpu=False)
    with pytest.raises(FileExistsError, match="model.resume auto"):
        fresh.run(save_dir=save_dir, max_epoch=1, start_epoch=0)


def test_warmup_rises_linearly_to_the_configured_lr_and_restores(tiny_data_root, tiny_targets, tmp_path):
    cfg = tiny_config(tiny_data_root, tiny_targets["resnet18"], tmp_path / "log",
                      **{"attrimeter.warmup_epochs": 4, "attrimeter.warmup_factor": 0.1,
                         "train.stepsize": [100]})
    engine = build_engine(cfg)
    rates = [engine.get_current_lr()]
    for _ in range(5):
        engine.optimizer.step()
        engine.update_lr()
        rates.append(engine.get_current_lr())
    assert rates == pytest.approx([1e-4, 3.25e-4, 5.5e-4, 7.75e-4, 1e-3, 1e-3])
    state = engine.scheduler.state_dict()
    again = build_engine(cfg)
    again.scheduler.load_state_dict(state)
    again.optimizer.load_state_dict(engine.optimizer.state_dict())
    assert again.get_current_lr() == pytest.approx(1e-3)


def test_batch_adre_is_the_mean_relative_error_off_the_diagonal_in_percent():
    target = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    reconstructed = torch.tensor([[5.0, 1.0], [5.0, 9.0]])
    assert batch_adre(target, reconstructed) == pytest.approx((0.5 + 0.25) / 2 * 100)


def test_test_runs_the_explanation_evaluation_and_returns_rank1_as_a_fraction(engine):
    rank1 = engine.test(ranks=[1, 5])
    results = engine.test_results["synthetic_attr"]
    assert type(rank1) is float and 0.0 <= rank1 <= 1.0
    assert rank1 == pytest.approx(results["interpreter_rank1"] / 100.0)
    for key in ("target_rank1", "target_mAP", "interpreter_mAP", "ADRE"):
        assert key in results


def test_a_dataset_without_attributes_is_an_error_naming_the_key(tiny_data_root, tiny_targets, tmp_path):
    cfg = tiny_config(tiny_data_root, tiny_targets["resnet18"], tmp_path / "log",
                      **{"data.sources": ["market1501"]})
    with pytest.raises(ConfigError, match="data.sources.*market1501_attr"):
        build_engine(cfg)


def test_target_weights_of_another_architecture_are_an_error_naming_the_keys(tiny_data_root, tiny_targets,
                                                                              tmp_path):
    cfg = tiny_config(tiny_data_root, tiny_targets["resnet18"], tmp_path / "log", name="osnet_x0_25")
    with pytest.raises(ConfigError, match="model.name"):
        build_engine(cfg)


def test_missing_target_weights_file_is_an_error_naming_it(tiny_data_root, tmp_path):
    cfg = tiny_config(tiny_data_root, str(tmp_path / "absent.pth"), tmp_path / "log")
    with pytest.raises(ConfigError, match="absent.pth"):
        build_engine(cfg)


def _fake_checkpoints(save_dir, epochs):
    os.makedirs(os.path.join(save_dir, "model"), exist_ok=True)
    for epoch in epochs:
        with open(os.path.join(save_dir, "model", f"model.pth.tar-{epoch}"), "wb") as handle:
            handle.write(b"another run's checkpoint")


def test_a_fresh_run_refuses_a_save_dir_holding_another_runs_later_checkpoints(engine, tmp_path):
    # The older run got to epoch 7; this one would train 2 epochs and leave 7 as the folder's latest.
    save_dir = str(tmp_path / "run")
    _fake_checkpoints(save_dir, range(1, 8))
    fresh = AttriMeterEngine(engine.datamanager, engine.model, engine.optimizer, engine.scheduler,
                             use_gpu=False)
    with pytest.raises(FileExistsError) as raised:
        fresh.run(save_dir=save_dir, max_epoch=2, start_epoch=0)
    message = str(raised.value)
    for expected in (save_dir, "model.pth.tar-7", "another data.save_dir", "--resume auto"):
        assert expected in message
    assert len(list_checkpoints(save_dir)) == 7


def test_a_resumed_run_refuses_to_branch_off_before_the_folders_latest_checkpoint(engine, tmp_path):
    save_dir = str(tmp_path / "run")
    path = engine.save_model(0, None, save_dir)
    engine.checkpoints.rolling = None
    _fake_checkpoints(save_dir, [5])
    resumed = AttriMeterEngine(engine.datamanager, engine.model, engine.optimizer, engine.scheduler,
                               use_gpu=False)
    assert resumed.resume(path) == 1
    with pytest.raises(FileExistsError, match="model.pth.tar-5"):
        resumed.run(save_dir=save_dir, max_epoch=8, start_epoch=1)


def test_a_run_resumed_from_another_folder_refuses_a_save_dir_with_checkpoints(engine, tmp_path):
    path = engine.save_model(0, None, str(tmp_path / "first"))
    engine.checkpoints.rolling = None
    _fake_checkpoints(str(tmp_path / "second"), [1])
    resumed = AttriMeterEngine(engine.datamanager, engine.model, engine.optimizer, engine.scheduler,
                               use_gpu=False)
    resumed.resume(path)
    with pytest.raises(FileExistsError, match="outside that folder"):
        resumed.run(save_dir=str(tmp_path / "second"), max_epoch=3, start_epoch=1)


@pytest.mark.parametrize("max_epoch", [0, -1])
def test_a_run_with_nothing_to_train_is_an_error_not_an_untrained_evaluation(engine, tmp_path, max_epoch):
    fresh = AttriMeterEngine(engine.datamanager, engine.model, engine.optimizer, engine.scheduler,
                             use_gpu=False)
    with pytest.raises(ConfigError, match="train.max_epoch"):
        fresh.run(save_dir=str(tmp_path / "run"), max_epoch=max_epoch, start_epoch=0)
    assert fresh.test_results == {} and not os.path.exists(tmp_path / "run" / "model")


def test_a_batch_of_more_identities_than_the_training_set_has_names_the_keys_and_the_fix(
        tiny_data_root, tiny_targets, tmp_path):
    cfg = tiny_config(tiny_data_root, tiny_targets["resnet18"], tmp_path / "log", **{"train.batch_size": 400})
    with pytest.raises(ConfigError) as raised:
        build_engine(cfg)
    message = str(raised.value)
    for expected in ("train.batch_size=400", "sampler.num_instances=2", "200 identities", "has 8 identities",
                     "train.batch_size <= 16"):
        assert expected in message


def test_truncated_target_weights_are_reported_as_unreadable_not_as_another_model(tiny_data_root, tiny_targets,
                                                                                  tmp_path):
    with open(tiny_targets["resnet18"], "rb") as handle:
        data = handle.read()
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError) as raised:
        build_engine(tiny_config(tiny_data_root, str(truncated), tmp_path / "log"))
    message = str(raised.value)
    assert "truncated.pth" in message and "truncated or corrupt" in message and "Download it again" in message
    assert "attrimeter.target_name" not in message
