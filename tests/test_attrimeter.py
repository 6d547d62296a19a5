"""The AttriMeter module: eval forward is the target's, decompositions, the frozen target, the
interpreter's parameters and state, the positive map and bad input."""

import warnings

import pytest
import torch
from torch import nn

from torchreid_attrimeter import compat
from torchreid_attrimeter.decomposition import Decomposition, pairwise_components
from torchreid_attrimeter.losses import AttributePriorLoss, DistanceDistillationLoss
from torchreid_attrimeter.models import (
    AttriMeter,
    TargetSplitError,
    build_attrimeter,
    positive_map,
    split_target,
)

IMAGE_SIZE = (128, 64)
NUM_ATTRIBUTES = 4


def small_target(num_classes: int = 10) -> nn.Module:
    return compat.build_model("osnet_x0_25", num_classes=num_classes, pretrained=False, use_gpu=False)


@pytest.fixture(scope="module")
def meter() -> AttriMeter:
    torch.manual_seed(0)
    return build_attrimeter("osnet_x0_25", NUM_ATTRIBUTES, image_size=IMAGE_SIZE, attribute_branch=True)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(3, 3, *IMAGE_SIZE, generator=torch.Generator().manual_seed(1))


def test_eval_forward_returns_exactly_the_target_embedding(meter, images):
    meter.eval()
    with torch.no_grad():
        assert torch.equal(meter(images), meter.target(images))


def test_decompose_shapes_and_positive_maps(meter, images):
    meter.eval()
    with torch.no_grad():
        decomposition = meter.decompose(images)
    assert isinstance(decomposition, Decomposition)
    assert decomposition.embedding.shape == (3, 512)
    assert decomposition.attribute_embeddings.shape == (3, NUM_ATTRIBUTES, 512)
    assert decomposition.maps.shape == (3, NUM_ATTRIBUTES, 8, 4)
    assert decomposition.attribute_logits.shape == (3, NUM_ATTRIBUTES)
    assert (decomposition.maps > 0).all()
    with torch.no_grad():
        assert torch.allclose(decomposition.embedding, meter.target(images), atol=1e-6)


def test_train_mode_forward_returns_the_decomposition_and_keeps_the_target_in_eval(meter, images):
    meter.train()
    output = meter(images)
    assert isinstance(output, Decomposition)
    assert not meter.target.training
    assert all(not module.training for module in meter.target.modules())
    assert meter.head.training and meter.interpreter_trunk.training
    meter.eval()


def test_attribute_embeddings_go_through_the_tail_in_one_batched_call(meter, images):
    calls = []
    hook = meter.target.fc.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    try:
        with torch.no_grad():
            meter.eval().decompose(images)
    finally:
        hook.remove()
    # one call for the target embedding (B rows), one for all attribute embeddings (B * M rows)
    assert calls == [3, 3 * NUM_ATTRIBUTES]


@pytest.mark.parametrize("name, size", [("osnet_x0_25", (128, 64)), ("pcb_p4", (64, 32)),
                                        ("hacnn", (160, 64)), ("mlfn", (64, 32))])
def test_batched_tail_equals_the_literal_tail_of_each_product(name, size):
    model = compat.build_model(name, num_classes=1, pretrained=False, use_gpu=False).eval()
    split = split_target(model, name)
    with torch.no_grad():
        _, feature_map, context = split.features(torch.randn(2, 3, *size))
        maps = torch.rand(2, 3, *feature_map.shape[2:]) * 2
        fast = split.tail_of_products(feature_map, maps, context)
        literal = split.tail_of_products_materialised(feature_map, maps, context)
        one_by_one = torch.stack([split.tail(feature_map * maps[:, m:m + 1], context) for m in range(3)], dim=1)
    assert torch.allclose(fast, literal, atol=1e-5, rtol=1e-4)
    assert torch.allclose(fast, one_by_one, atol=1e-5, rtol=1e-4)


def test_positive_map_is_exp_below_zero_and_sqrt_above():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.5, 3.0])
    expected = torch.tensor([torch.e ** -2, torch.e ** -0.5, 1.0, 1.5 ** 0.5, 2.0])
    assert torch.allclose(positive_map(z), expected)


def test_positive_map_has_finite_gradients_at_extreme_logits():
    z = torch.tensor([-1e4, -1.0, 0.0, 1.0, 1e4], requires_grad=True)
    positive_map(z).sum().backward()
    assert torch.isfinite(z.grad).all()
    assert z.grad[2] == pytest.approx(0.5)  # the sqrt branch's slope at 0 (exp's is 1): z >= 0 is sqrt


@pytest.mark.parametrize("trained_on", ["distillation", "prior", "total"])
def test_one_step_lowers_the_loss_and_leaves_the_target_bit_identical(trained_on, images):
    """One SGD step on the distance distillation loss lowers it, one on the attribute prior lowers
    it, one on the authors' total (1 * L_dd + 10 * L_ap) lowers the total; the target's parameters
    and BN buffers stay bit-identical. (At initialisation the two losses pull in different
    directions: the prior moves shares away from uniform, which first costs some distillation.)"""
    torch.manual_seed(0)
    meter = build_attrimeter("osnet_x0_25", NUM_ATTRIBUTES, image_size=IMAGE_SIZE, attribute_branch=True)
    # start from a non-uniform decomposition so both losses have something to correct
    nn.init.normal_(meter.head.attribute_logits.weight, std=0.05)
    target_state = {key: value.clone() for key, value in meter.target.state_dict().items()}
    attributes = torch.tensor([[1.0, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 0.0, 0.0]])
    known = torch.ones_like(attributes, dtype=torch.bool)
    distillation, prior = DistanceDistillationLoss(), AttributePriorLoss()
    optimizer = torch.optim.SGD(meter.interpreter_parameters(), lr=1e-4)

    def loss():
        distances = pairwise_components(*(2 * [meter.train()(images)]))
        values = {"distillation": distillation(distances), "prior": prior(distances, attributes, known)}
        values["total"] = values["distillation"] + 10.0 * values["prior"]
        return values[trained_on]

    before = loss()
    optimizer.zero_grad()
    before.backward()
    optimizer.step()
    with torch.no_grad():
        after = loss()
    assert after < before
    for key, value in meter.target.state_dict().items():
        assert torch.equal(value, target_state[key]), key
    assert all(parameter.grad is None for parameter in meter.target.parameters())


def test_interpreter_parameters_and_state_exclude_the_target(meter):
    target_ids = {id(parameter) for parameter in meter.target.parameters()}
    assert meter.interpreter_parameters()
    assert not any(id(parameter) in target_ids for parameter in meter.interpreter_parameters())
    state = meter.interpreter_state_dict()
    assert state and not any(key.startswith("target.") for key in state)
    assert any(key.startswith("head.") for key in state) and any(key.startswith("interpreter_trunk.") for key in state)


def test_interpreter_state_round_trips_into_a_fresh_model(meter, images):
    fresh = build_attrimeter("osnet_x0_25", NUM_ATTRIBUTES, image_size=IMAGE_SIZE, attribute_branch=True)
    fresh.target.load_state_dict(meter.target.state_dict())
    fresh.load_interpreter_state_dict(meter.interpreter_state_dict())
    with torch.no_grad():
        assert torch.equal(fresh.eval().decompose(images).maps, meter.eval().decompose(images).maps)


def test_interpreter_state_of_another_configuration_is_refused(meter):
    other = build_attrimeter("osnet_x0_25", NUM_ATTRIBUTES + 1, image_size=IMAGE_SIZE, variant="head")
    with pytest.raises(ValueError, match="do not fit"):
        other.load_interpreter_state_dict(meter.interpreter_state_dict())


def test_head_variant_reads_the_target_feature_map(images):
    meter = build_attrimeter("osnet_x0_25", NUM_ATTRIBUTES, image_size=IMAGE_SIZE, variant="head")
    assert meter.interpreter_trunk is None
    assert meter.head.hidden.in_channels == 128  # osnet_x0_25's conv5 channels (fc maps them to 512)
    with torch.no_grad():
        assert meter.eval().decompose(images).maps.shape == (3, NUM_ATTRIBUTES, 8, 4)


def test_target_in_train_mode_is_frozen_with_one_warning():
    target = small_target()
    with pytest.warns(UserWarning, match="eval mode and freezes it") as record:
        meter = build_attrimeter(target, NUM_ATTRIBUTES, image_size=IMAGE_SIZE)
    assert len([warning for warning in record if "freezes" in str(warning.message)]) == 1
    assert not target.training
    assert not any(parameter.requires_grad for parameter in target.parameters())
    assert meter.target_spec["name"] is None


def test_target_built_from_a_name_is_frozen_silently():
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        meter = build_attrimeter("osnet_x0_25", NUM_ATTRIBUTES, image_size=IMAGE_SIZE)
    assert meter.target_spec["name"] == "osnet_x0_25" and meter.target_spec["image_size"] == IMAGE_SIZE


# --- bad input ----------------------------------------------------------------------------------------


def test_unknown_model_name_is_refused_with_suggestions():
    with pytest.raises(ValueError, match="unknown torchreid model 'osnet_x1'.*osnet_x1_0"):
        build_attrimeter("osnet_x1", NUM_ATTRIBUTES)


@pytest.mark.parametrize("count", [0, -3, 2.5, True])
def test_num_attributes_must_be_a_positive_integer(count):
    with pytest.raises(ValueError, match="num_attributes"):
        build_attrimeter("osnet_x0_25", count)


def test_image_size_too_small_for_the_target_is_refused():
    with pytest.raises(ValueError, match="too small"):
        build_attrimeter("hacnn", NUM_ATTRIBUTES, image_size=(128, 64))


def test_nan_in_the_images_is_refused(meter, images):
    images[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        meter.eval()(images)
    with pytest.raises(ValueError, match="NaN"):
        meter.decompose(images)


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant"):
        build_attrimeter("osnet_x0_25", NUM_ATTRIBUTES, variant="full")


class PlainEmbedder(nn.Module):
    """A model of no torchreid family, without featuremaps()."""

    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        return self.body(x).mean(dim=(2, 3))


class GenericEmbedder(PlainEmbedder):
    """No torchreid family, but featuremaps() + global_avgpool + fc: head variant only."""

    def __init__(self):
        super().__init__()
        self.global_avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 5)

    def featuremaps(self, x):
        return torch.relu(self.body(x))

    def forward(self, x):
        return self.fc(self.global_avgpool(self.featuremaps(x)).flatten(1))


def test_model_that_cannot_be_split_is_refused_naming_what_is_missing():
    with pytest.warns(UserWarning), pytest.raises(TargetSplitError, match="PlainEmbedder.*featuremaps"):
        build_attrimeter(PlainEmbedder(), NUM_ATTRIBUTES, image_size=(32, 16))


def test_unknown_family_with_featuremaps_grafts_head_only():
    with pytest.warns(UserWarning):
        meter = build_attrimeter(GenericEmbedder(), NUM_ATTRIBUTES, image_size=(32, 16), variant="head")
    with torch.no_grad():
        assert meter.eval().decompose(torch.randn(2, 3, 32, 16)).attribute_embeddings.shape == (2, NUM_ATTRIBUTES, 5)
    with pytest.warns(UserWarning), pytest.raises(TargetSplitError, match="variant='head'"):
        build_attrimeter(GenericEmbedder(), NUM_ATTRIBUTES, image_size=(32, 16), variant="trunk")


def test_split_that_does_not_reproduce_the_embedding_is_refused():
    class Tampered(GenericEmbedder):
        def forward(self, x):
            return super().forward(x) * 2.0  # the eval path is not featuremaps -> pool -> fc

    with pytest.warns(UserWarning), pytest.raises(TargetSplitError, match="differs from the model's own"):
        build_attrimeter(Tampered(), NUM_ATTRIBUTES, image_size=(32, 16), variant="head")
