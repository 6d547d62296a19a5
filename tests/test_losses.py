"""The losses of docs/method.md §4 on small cases computed by hand, with masks and gradients."""

import math

import pytest
import torch

from torchreid_attrimeter.decomposition import PairwiseDistances
from torchreid_attrimeter.losses import AttributePriorLoss, DistanceDistillationLoss, WeightedAttributeBCE


def symmetric_pair(target_distance: float, components: list[float], garbage: float = 100.0) -> PairwiseDistances:
    """A batch of two images: pairs (0, 1) and (1, 0) carry the given values, the diagonal garbage
    (which the losses must ignore)."""
    num_attributes = len(components)
    target = torch.full((2, 2), garbage, dtype=torch.float64)
    target[0, 1] = target[1, 0] = target_distance
    parts = torch.full((2, 2, num_attributes), garbage, dtype=torch.float64)
    parts[0, 1] = parts[1, 0] = torch.tensor(components, dtype=torch.float64)
    return PairwiseDistances(target, parts)


# --- distance distillation -------------------------------------------------------------------------


def test_distillation_is_mean_absolute_error_to_the_component_mean_over_off_diagonal_pairs():
    target = torch.tensor([[50.0, 3.0], [3.0, 50.0]])
    components = torch.tensor([[[9.0, 9.0], [2.0, 6.0]], [[3.0, 3.0], [9.0, 9.0]]])
    # pair (0, 1): |3 - (2 + 6) / 2| = 1; pair (1, 0): |3 - 3| = 0; diagonal ignored
    loss = DistanceDistillationLoss()(PairwiseDistances(target, components))
    assert loss.item() == pytest.approx(0.5)


def test_distillation_gradient_reaches_components_only():
    target = torch.tensor([[0.0, 3.0], [3.0, 0.0]], requires_grad=True)
    components = torch.tensor([[[0.0, 0.0], [2.0, 6.0]], [[1.0, 1.0], [0.0, 0.0]]], requires_grad=True)
    DistanceDistillationLoss()(PairwiseDistances(target, components)).backward()
    assert target.grad is None  # the target distance is detached
    # pair (0, 1): mean 4 > 3 -> +1/(M * pairs) = 0.25; pair (1, 0): mean 1 < 3 -> -0.25; diagonal 0
    expected = torch.tensor([[[0.0, 0.0], [0.25, 0.25]], [[-0.25, -0.25], [0.0, 0.0]]])
    assert torch.allclose(components.grad, expected)


def test_distillation_refuses_a_single_image_batch():
    with pytest.raises(ValueError, match="at least two images"):
        DistanceDistillationLoss()(PairwiseDistances(torch.zeros(1, 1), torch.zeros(1, 1, 3)))


# --- attribute prior --------------------------------------------------------------------------------


def one_differing_of_two_by_hand() -> float:
    """M = 2, attribute 0 differs (N = 1), components (1, 3) -> shares (0.25, 0.75)."""
    r = math.sqrt(1 / 2)
    tau = math.sqrt((r / 1) * ((1 - r) / (2 - 1)))
    set_terms = max(0.0, r - 0.25) + max(0.0, 0.75 - (1 - r))
    attribute_terms = max(0.0, tau - 0.25) + max(0.0, 0.75 - tau)
    return set_terms + 10 * attribute_terms


def test_prior_one_differing_attribute_matches_the_hand_computation():
    distances = symmetric_pair(4.0, [1.0, 3.0])
    attributes = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    loss = AttributePriorLoss()(distances, attributes, torch.ones(2, 2, dtype=torch.bool))
    assert loss.item() == pytest.approx(one_differing_of_two_by_hand(), rel=1e-9)
    assert loss.item() == pytest.approx(5.914214, rel=1e-6)


def test_prior_is_zero_when_the_differing_attribute_takes_its_share():
    # shares (0.8, 0.2): differing one above r and tau, shared one below 1 - r and tau
    distances = symmetric_pair(4.0, [4.0, 1.0])
    loss = AttributePriorLoss()(distances, torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert loss.item() == 0.0


def test_prior_when_nothing_differs_caps_every_share_at_two_over_m():
    distances = symmetric_pair(1.0, [0.1, 0.2, 0.7])
    attributes = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0]])
    loss = AttributePriorLoss()(distances, attributes, torch.ones(2, 3, dtype=torch.bool))
    # N = 0: set terms vanish (r = 0, shares sum to 1); only 0.7 exceeds 2/3
    assert loss.item() == pytest.approx(10 * (0.7 - 2 / 3), rel=1e-9)


def test_prior_all_differing_clamps_n_and_stays_finite():
    components = torch.tensor([0.5, 1.5], dtype=torch.float64)
    distances = symmetric_pair(1.0, components.tolist())
    loss = AttributePriorLoss()(distances, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    clamped = 2 - 0.1
    r = math.sqrt(clamped / 2)
    tau = math.sqrt((r / clamped) * ((1 - r) / (2 - clamped)))
    # both differ: set terms ReLU(r - 1) and ReLU(0 - (1 - r)) are 0; each share must reach tau
    expected = 10 * (max(0.0, tau - 0.25) + max(0.0, tau - 0.75))
    assert loss.item() == pytest.approx(expected, rel=1e-9)


def test_prior_unknown_attributes_are_masked_and_shares_renormalised_over_known_ones():
    # attribute 2 is unknown for image 1: the pair uses K = 2 and shares over attributes 0 and 1 only
    distances = symmetric_pair(4.0, [1.0, 3.0, 100.0])
    attributes = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    known = torch.tensor([[True, True, True], [True, True, False]])
    loss = AttributePriorLoss()(distances, attributes, known)
    assert loss.item() == pytest.approx(one_differing_of_two_by_hand(), rel=1e-9)


def test_prior_skips_pairs_without_any_attribute_known_on_both_sides():
    target = torch.ones(3, 3, dtype=torch.float64)
    components = torch.ones(3, 3, 2, dtype=torch.float64) * 7.0
    components[0, 1] = components[1, 0] = torch.tensor([1.0, 3.0], dtype=torch.float64)
    attributes = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0]])
    known = torch.tensor([[True, True], [True, True], [False, False]])
    loss = AttributePriorLoss()(PairwiseDistances(target, components), attributes, known)
    assert loss.item() == pytest.approx(one_differing_of_two_by_hand(), rel=1e-9)


def test_prior_weights_of_set_and_attribute_terms_are_configurable():
    distances = symmetric_pair(4.0, [1.0, 3.0])
    attributes = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    set_only = AttributePriorLoss(set_weight=1.0, attribute_weight=0.0)(distances, attributes)
    r = math.sqrt(0.5)
    assert set_only.item() == pytest.approx(2 * (r - 0.25), rel=1e-9)


def test_prior_gradient_matches_finite_differences():
    torch.manual_seed(0)
    target = torch.rand(4, 4, dtype=torch.float64) + 1.0
    components = (torch.rand(4, 4, 5, dtype=torch.float64) + 0.2).requires_grad_(True)
    attributes = torch.randint(0, 2, (4, 5)).double()
    known = torch.rand(4, 5) > 0.2
    loss = AttributePriorLoss()

    def function(parts):
        return loss(PairwiseDistances(target, parts), attributes, known)

    assert torch.autograd.gradcheck(function, (components,), eps=1e-6, atol=1e-5)


def test_prior_rejects_labels_of_the_wrong_shape():
    with pytest.raises(ValueError, match="attributes must be"):
        AttributePriorLoss()(symmetric_pair(1.0, [1.0, 2.0]), torch.zeros(2, 3))


# --- weighted attribute BCE --------------------------------------------------------------------------


def test_weighted_bce_matches_the_hand_computation():
    bce = WeightedAttributeBCE(torch.tensor([0.25, 0.5]))
    logits = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    loss = bce(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, True]]))
    positive = math.exp(1 - 0.25) * math.log(2.0)  # positive of attribute 0 weighs exp(1 - r)
    negative = math.exp(0.5) * math.log(1 + math.exp(2.0))  # negative of attribute 1 weighs exp(r)
    assert loss.item() == pytest.approx((positive + negative) / 2, rel=1e-9)


def test_weighted_bce_ignores_unknown_labels():
    bce = WeightedAttributeBCE(torch.tensor([0.25, 0.5]))
    logits = torch.tensor([[0.0, 50.0]], dtype=torch.float64, requires_grad=True)
    loss = bce(logits, torch.tensor([[1.0, 0.0]]), torch.tensor([[True, False]]))
    assert loss.item() == pytest.approx(math.exp(0.75) * math.log(2.0), rel=1e-9)
    loss.backward()
    assert logits.grad[0, 1] == 0.0


def test_weighted_bce_rejects_ratios_outside_zero_one():
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        WeightedAttributeBCE(torch.tensor([0.5, 1.5]))
