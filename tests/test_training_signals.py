"""Training signals beyond the authors' losses and the named recipes: the place prior
(losses.PlacePriorLoss) and its plumbing in the engine, the presets (config.PRESETS), and what is
left of the removed keep / remove probe (its config keys and checkpoints are refused with the reason)."""

from __future__ import annotations

import re

import pytest
import torch
from tiny_run import tiny_config

from torchreid_attrimeter.checkpoints import ResumeError
from torchreid_attrimeter.config import PRESETS, ConfigError, get_default_config, load_config
from torchreid_attrimeter.engine import build_engine
from torchreid_attrimeter.explain import Explainer
from torchreid_attrimeter.losses import PlacePriorLoss


@pytest.fixture(scope="module")
def target_file(tiny_targets):
    return tiny_targets["osnet_x0_25"]


# --- the place prior ---------------------------------------------------------------------------------


def test_place_prior_is_the_mass_outside_the_band_and_leaves_unplaced_maps_alone():
    prior = PlacePriorLoss([(0.0, 0.25), None])
    maps = torch.ones(1, 2, 4, 2)  # flat: a quarter of the mass in the top quarter
    assert prior(maps).item() == pytest.approx(0.75)
    on_top = maps.clone()
    on_top[:, 0, 0] = 1000.0
    assert prior(on_top).item() < 0.01
    maps.requires_grad_(True)
    prior(maps).backward()
    assert (maps.grad[0, 1] == 0).all()  # the map without a place gets no gradient
    assert (maps.grad[0, 0, 0] < 0).all() and (maps.grad[0, 0, 1:] > 0).all()


def test_place_prior_counts_rows_the_band_covers_in_part():
    prior = PlacePriorLoss([(0.0, 0.375)])  # 1.5 rows of 4
    maps = torch.zeros(1, 1, 4, 1)
    maps[0, 0, 1, 0] = 1.0  # all the mass in the second row, half of which is in the band
    assert prior(maps).item() == pytest.approx(0.5)
    with pytest.raises(ValueError, match="top, bottom"):
        PlacePriorLoss([(0.5, 0.2)])


def test_engine_adds_the_weighted_place_prior(tiny_data_root, target_file, tmp_path):
    engine = build_engine(tiny_config(tiny_data_root, target_file, tmp_path / "log", name="osnet_x0_25",
                                      **{"attrimeter.weight_place": 3.0}))
    engine.set_model_mode("train")
    summary = engine.forward_backward(next(iter(engine.train_loader)))
    expected = summary["loss_dd"] + 10.0 * summary["loss_ap"] + 3.0 * summary["loss_place"]
    assert summary["loss"] == pytest.approx(expected, rel=1e-5)
    assert 0.0 < summary["loss_place"] < 1.0


# --- presets ---------------------------------------------------------------------------------------------


def test_the_presets_are_the_paper_recipe_and_the_localised_one():
    assert PRESETS["paper"] == {"attribute_branch": False, "weight_place": 0.0}
    assert PRESETS["localised"] == {"attribute_branch": True, "weight_place": 5.0}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_each_preset_fills_its_keys_with_the_defaults_types(name):
    defaults = get_default_config().attrimeter
    cfg = load_config(opts=["attrimeter.preset", name])
    for key, value in PRESETS[name].items():
        assert cfg.attrimeter[key] == value and type(cfg.attrimeter[key]) is type(defaults[key]), key
    assert cfg.attrimeter.weight_attr == defaults.weight_attr  # keys the preset does not name stay


def test_a_key_set_to_its_presets_value_is_fine():
    cfg = load_config(opts=["attrimeter.preset", "localised", "attrimeter.attribute_branch", "True",
                            "attrimeter.weight_place", "5"])
    assert cfg.attrimeter.attribute_branch is True and cfg.attrimeter.weight_place == 5.0


@pytest.mark.parametrize("name, key, value", [("paper", "attribute_branch", "True"),
                                              ("paper", "weight_place", "2.0"),
                                              ("localised", "weight_place", "2.0")])
def test_a_key_set_otherwise_than_its_preset_is_an_error_naming_it(name, key, value):
    with pytest.raises(ConfigError, match=f"preset '{name}' sets attrimeter.{key} .* drop attrimeter.{key}"):
        load_config(opts=["attrimeter.preset", name, f"attrimeter.{key}", value])


def test_an_unknown_preset_is_an_error_listing_the_presets():
    with pytest.raises(ConfigError, match=r"attrimeter.preset is 'papr': use one of \['localised', 'paper'\]"):
        load_config(opts=["attrimeter.preset", "papr"])


# --- the removed keep / remove probe -----------------------------------------------------------------------


@pytest.mark.parametrize("key", ["attrimeter.weight_probe", "attrimeter.weight_probe_remove"])
def test_the_removed_probe_keys_are_refused_with_the_reason_and_the_fix(key, tmp_path):
    expected = rf"'{key}' was removed: .*did not improve the explanations \(docs/results.md.*Drop the key"
    with pytest.raises(ConfigError, match=f"command line: config key {expected}"):
        load_config(opts=[key, "2.0"])
    path = tmp_path / "old.yaml"
    path.write_text(f"attrimeter:\n  {key.split('.')[1]}: 2.0\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=f"config file '.*old.yaml': config key {expected}"):
        load_config(path)


def test_a_checkpoint_of_the_probe_explains_but_does_not_resume(tiny_data_root, target_file, tmp_path):
    engine = build_engine(tiny_config(tiny_data_root, target_file, tmp_path / "log", name="osnet_x0_25"))
    path = engine.save_model(0, None, str(tmp_path / "run"))
    # What versions with the probe wrote: the interpreter plus the probe's classifier.
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["attribute_probe"] = {"weight": torch.zeros(engine.model.num_attributes, 128),
                                     "bias": torch.zeros(engine.model.num_attributes),
                                     "positive_ratios": torch.full((engine.model.num_attributes,), 0.5)}
    torch.save(checkpoint, path)

    with pytest.raises(ResumeError, match=rf"'{re.escape(path)}' was trained with the keep / remove attribute probe.*"
                                          r"removed.*start a new data.save_dir"):
        engine.resume(path)
    assert engine.resumed_from is None

    explainer = Explainer.from_checkpoint(path, device="cpu")  # the probe was training-only
    assert explainer.checkpoint_record["attribute_names"] == list(engine.attribute_names)
    loaded = explainer.model.interpreter_state_dict()
    for key, value in engine.model.interpreter_state_dict().items():
        assert torch.equal(loaded[key].cpu(), value.cpu()), key
