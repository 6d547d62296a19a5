"""The keep / remove attribute probe (losses.AttributeProbeLoss): hand-built feature maps whose
informative region is known, and its plumbing in the engine (only the interpreter and the probe
learn, the target stays bit-identical, checkpoints carry the probe)."""

from __future__ import annotations

import pytest
import torch
from tiny_run import tiny_config

from torchreid_attrimeter import compat
from torchreid_attrimeter.checkpoints import ResumeError
from torchreid_attrimeter.config import ConfigError
from torchreid_attrimeter.engine import build_engine
from torchreid_attrimeter.losses import AttributeProbeLoss, PlacePriorLoss, attention_pool, complement_maps

# --- pooling ------------------------------------------------------------------------------------------


def test_attention_pool_is_the_map_weighted_mean_and_ignores_the_map_scale():
    feature_map = torch.tensor([[[[2.0, 6.0]], [[1.0, -1.0]]]])  # (1, C=2, 1, 2)
    maps = torch.tensor([[[[1.0, 3.0]]]])  # (1, M=1, 1, 2)
    pooled = attention_pool(feature_map, maps)
    assert pooled.shape == (1, 1, 2)
    assert torch.allclose(pooled[0, 0], torch.tensor([(2 + 18) / 4, (1 - 3) / 4]))
    assert torch.allclose(attention_pool(feature_map, 7.0 * maps), pooled)


def test_attention_pool_refuses_maps_of_another_grid():
    with pytest.raises(ValueError, match="same|one batch and grid"):
        attention_pool(torch.zeros(1, 2, 2, 2), torch.ones(1, 3, 2, 1))


def test_complement_is_zero_at_the_peak_and_a_flat_maps_complement_is_uniform():
    maps = torch.tensor([[[[1.0, 4.0]], [[2.0, 2.0]]]])  # (1, 2, 1, 2)
    complement = complement_maps(maps)
    floor = complement[0, 0, 0, 1].item()
    assert 0 < floor <= 0.1  # the peak keeps only the floor
    assert complement[0, 0, 0, 0].item() == pytest.approx(0.75 + floor)
    assert torch.allclose(complement[0, 1], torch.full((1, 2), floor))  # flat -> uniform (everything)


# --- a feature map that tells the attribute in one known cell --------------------------------------


def one_cell_case(batch: int = 64, seed: int = 0, noise: float = 2.0):
    """F (B, 1, 2, 2): the cell (0, 0) holds +1 for positives and -1 for negatives plus a little noise,
    the other three cells hold noise (loud by default) that says nothing about the attribute."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.arange(batch) % 2).float().unsqueeze(1)  # (B, 1), half positive
    feature_map = noise * torch.randn(batch, 1, 2, 2, generator=generator)
    feature_map[:, 0, 0, 0] = (2 * labels[:, 0] - 1) + 0.1 * torch.randn(batch, generator=generator)
    return feature_map, labels


def test_keep_gradient_raises_the_map_on_the_informative_cell_and_lowers_it_elsewhere():
    feature_map, labels = one_cell_case()
    probe = AttributeProbeLoss(1, 1, torch.tensor([0.5]))
    with torch.no_grad():
        probe.weight.fill_(1.0)  # a classifier that reads the sign of the pooled feature
    maps = torch.ones(len(labels), 1, 2, 2, requires_grad=True)
    keep, _ = probe(feature_map, maps, labels, with_remove=False)
    keep.backward()
    gradient = maps.grad.sum(0)[0]  # (2, 2), summed over the batch
    assert gradient[0, 0] < 0  # more weight on the informative cell lowers the loss
    assert (gradient.flatten()[1:] > 0).all()


def test_training_maps_with_the_keep_probe_concentrates_them_on_the_informative_cell():
    feature_map, labels = one_cell_case()
    probe = AttributeProbeLoss(1, 1, torch.tensor([0.5]))
    logits = torch.zeros(1, 1, 2, 2, requires_grad=True)  # one map for every image, flat at first
    optimizer = torch.optim.Adam([logits, *probe.parameters()], lr=0.05)
    for _ in range(200):
        maps = torch.exp(logits).expand(len(labels), -1, -1, -1)
        keep, _ = probe(feature_map, maps, labels, with_remove=False)
        optimizer.zero_grad()
        keep.backward()
        optimizer.step()
    mass = torch.softmax(logits.flatten(), 0)
    assert mass[0] > 0.8  # from 0.25 (flat) to most of the mass on cell (0, 0)
    assert keep.item() < 0.3  # and the attribute is then told from the pooled feature


def test_remove_prefers_a_map_that_takes_the_informative_cell_away_and_leaves_the_classifier_alone():
    feature_map, labels = one_cell_case(noise=0.3)
    probe = AttributeProbeLoss(1, 1, torch.tensor([0.5]))
    with torch.no_grad():
        probe.weight.fill_(3.0)
    flat = torch.ones(len(labels), 1, 2, 2)
    on_cell = flat.clone()
    on_cell[:, 0, 0, 0] = 20.0
    _, remove_flat = probe(feature_map, flat, labels)
    _, remove_on_cell = probe(feature_map, on_cell.requires_grad_(True), labels)
    # the flat map leaves the informative cell in its complement, which then beats chance
    assert remove_flat.item() > 0.1
    assert remove_on_cell.item() < 0.5 * remove_flat.item()
    flat.requires_grad_(True)
    _, remove_flat = probe(feature_map, flat, labels)
    remove_flat.backward()
    assert probe.weight.grad is None and probe.bias.grad is None  # the remove term trains only maps
    # raising the map on the informative cell takes that cell out of the complement: lower loss
    assert flat.grad.sum(0)[0, 0, 0] < 0


def test_unknown_labels_are_left_out_and_no_known_label_gives_zero():
    feature_map, labels = one_cell_case(batch=4)
    probe = AttributeProbeLoss(1, 1, torch.tensor([0.5]))
    maps = torch.ones(4, 1, 2, 2, requires_grad=True)
    keep, remove = probe(feature_map, maps, labels, torch.zeros(4, 1, dtype=torch.bool))
    assert keep.item() == 0 and remove.item() == 0
    keep.backward()  # still part of the graph


def test_probe_refuses_shapes_it_was_not_built_for():
    probe = AttributeProbeLoss(2, 3, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError, match="2 maps over 3 channels"):
        probe(torch.zeros(1, 4, 2, 2), torch.ones(1, 2, 2, 2), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="one ratio per attribute"):
        AttributeProbeLoss(2, 3, torch.tensor([0.5]))


# --- in the engine ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def target_file(tiny_targets):
    return tiny_targets["osnet_x0_25"]


def probe_config(tiny_data_root, target_file, save_dir, **overrides):
    options = {"attrimeter.weight_probe": 2.0, "attrimeter.weight_probe_remove": 0.5, **overrides}
    return tiny_config(tiny_data_root, target_file, save_dir, name="osnet_x0_25", **options)


def test_engine_adds_the_weighted_probe_terms_trains_the_probe_and_never_the_target(tiny_data_root, target_file,
                                                                                   tmp_path):
    engine = build_engine(probe_config(tiny_data_root, target_file, tmp_path / "log"))
    optimised = {id(parameter) for group in engine.optimizer.param_groups for parameter in group["params"]}
    assert optimised == ({id(parameter) for parameter in engine.model.interpreter_parameters()}
                         | {id(parameter) for parameter in engine.attribute_probe.parameters()})
    target_before = {key: value.clone() for key, value in engine.model.target.state_dict().items()}
    probe_before = engine.attribute_probe.weight.detach().clone()
    engine.set_model_mode("train")
    summary = engine.forward_backward(next(iter(engine.train_loader)))
    expected = (summary["loss_dd"] + 10.0 * summary["loss_ap"] + 2.0 * summary["loss_keep"]
                + 0.5 * summary["loss_remove"])
    assert summary["loss"] == pytest.approx(expected, rel=1e-5)
    assert all(parameter.grad is None for parameter in engine.model.target.parameters())
    for key, value in engine.model.target.state_dict().items():
        assert torch.equal(value, target_before[key]), key
    assert not torch.equal(engine.attribute_probe.weight.detach(), probe_before)


def test_decompose_keeps_the_targets_feature_map_only_when_asked(tiny_data_root, target_file, tmp_path):
    engine = build_engine(probe_config(tiny_data_root, target_file, tmp_path / "log"))
    images = next(iter(engine.train_loader))["img"][:2]
    model = engine.model.eval()
    assert model.decompose(images).feature_map is None
    kept = model.decompose(images, keep_feature_map=True).feature_map
    reference, _ = model.target_split.trunk(model.target_split.stem(images))
    assert kept.shape[1] == model.feature_channels
    assert torch.equal(kept, reference)


def test_checkpoints_carry_the_probe_and_resume_needs_the_same_losses(tiny_data_root, target_file, tmp_path):
    first = build_engine(probe_config(tiny_data_root, target_file, tmp_path / "log"))
    first.set_model_mode("train")
    first.forward_backward(next(iter(first.train_loader)))
    path = first.save_model(0, None, str(tmp_path / "run"))
    assert "attribute_probe" in compat.load_checkpoint(path)

    second = build_engine(probe_config(tiny_data_root, target_file, tmp_path / "log2"))
    second.resume(path)
    assert torch.equal(second.attribute_probe.weight, first.attribute_probe.weight)

    without = build_engine(tiny_config(tiny_data_root, target_file, tmp_path / "log3", name="osnet_x0_25"))
    with pytest.raises(ResumeError, match="weight_probe"):
        without.resume(path)


def test_negative_probe_weight_is_a_config_error(tiny_data_root, target_file, tmp_path):
    with pytest.raises(ConfigError, match="weight_probe"):
        build_engine(probe_config(tiny_data_root, target_file, tmp_path / "log", **{"attrimeter.weight_probe": -1.0}))


# --- presets ---------------------------------------------------------------------------------------------


def test_paper_preset_turns_the_probe_off_and_conflicts_are_errors(tmp_path):
    from torchreid_attrimeter.config import load_config

    assert load_config(opts=["attrimeter.preset", "paper"]).attrimeter.weight_probe == 0.0
    with pytest.raises(ConfigError, match="preset 'paper' sets attrimeter.weight_probe"):
        load_config(opts=["attrimeter.preset", "paper", "attrimeter.weight_probe", "2.0"])
    with pytest.raises(ConfigError, match="attrimeter.preset is 'papr'"):
        load_config(opts=["attrimeter.preset", "papr"])


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
