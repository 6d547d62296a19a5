"""The interpreter's losses (docs/method.md §4): distance distillation, attribute prior, the
frequency-weighted attribute BCE, and the optional place prior. The training batch is compared with
itself, so every loss over pairs excludes the diagonal pairs i == j."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional

from torchreid_attrimeter.decomposition import PairwiseDistances

# The authors clamp N to at most M - 0.1 so that tau stays finite when every attribute differs.
_DIFFERING_MARGIN = 0.1
_EPSILON = 1e-12


def _off_diagonal_mask(distances: PairwiseDistances) -> torch.Tensor:
    """(Q, G) True for the pairs the losses use: all of them, except i == j for a square (self) batch."""
    num_query, num_gallery = distances.target_distance.shape
    device = distances.target_distance.device
    if num_query != num_gallery:
        return torch.ones(num_query, num_gallery, dtype=torch.bool, device=device)
    return ~torch.eye(num_query, dtype=torch.bool, device=device)


class DistanceDistillationLoss(nn.Module):
    """L_dd = mean over pairs i != j of | d_ij - (1/M) sum_m d^m_ij |, d from the frozen target
    (detached): the components must add up to the target's distance."""

    def forward(self, distances: PairwiseDistances) -> torch.Tensor:
        mask = _off_diagonal_mask(distances)
        if not mask.any():
            raise ValueError("distance distillation needs at least two images in the batch")
        error = (distances.target_distance.detach() - distances.reconstructed_distance).abs()
        return error[mask].mean()


def _check_attribute_labels(attributes: torch.Tensor, known: torch.Tensor | None, num_attributes: int,
                            num_images: int, what: str) -> torch.Tensor:
    if attributes.dim() != 2 or attributes.shape != (num_images, num_attributes):
        raise ValueError(f"{what}: attributes must be (B, M) = ({num_images}, {num_attributes}), "
                         f"got {tuple(attributes.shape)}")
    if known is None:
        return torch.ones_like(attributes, dtype=torch.bool)
    if known.shape != attributes.shape:
        raise ValueError(f"{what}: attributes_known {tuple(known.shape)} must match attributes "
                         f"{tuple(attributes.shape)}")
    return known.bool()


class AttributePriorLoss(nn.Module):
    """Components of attributes two people differ in should take a large share of their distance,
    shared attributes a small one (docs/method.md §4, reconstructed from the authors' code).

    Per pair (i, j), over the K attributes known for both images (unknown ones are masked out):
    delta_m = 1 if the attribute differs, N = sum delta, shares p^m = d^m / sum_known d^k,
    r = sqrt(N / K), tau = sqrt((r / N) * ((1 - r) / (K - N))) with N clamped to [0, K - 0.1].
    set terms:      ReLU(r - sum delta p) + ReLU(sum (1 - delta) p - (1 - r))
    attribute terms: sum ReLU(delta tau - p) + sum ReLU((1 - delta) p - tau)
    N = 0:          attribute terms are sum ReLU(p - 2 / K) (no attribute above twice the even share)
    loss = mean over pairs with K >= 1 of set_weight * set terms + attribute_weight * attribute terms.
    """

    def __init__(self, set_weight: float = 1.0, attribute_weight: float = 10.0):
        super().__init__()
        self.set_weight = set_weight
        self.attribute_weight = attribute_weight

    def forward(self, distances: PairwiseDistances, attributes: torch.Tensor,
                attributes_known: torch.Tensor | None = None,
                gallery_attributes: torch.Tensor | None = None,
                gallery_attributes_known: torch.Tensor | None = None) -> torch.Tensor:
        """distances over Q x G pairs; attributes (Q, M) in {0, 1}; attributes_known (Q, M) bool.
        For a batch compared with itself the gallery labels are the query labels (the default)."""
        components = distances.attribute_components  # (Q, G, M)
        num_query, num_gallery, num_attributes = components.shape
        known = _check_attribute_labels(attributes, attributes_known, num_attributes, num_query, "attribute prior")
        if gallery_attributes is None:
            gallery_attributes, gallery_known = attributes, known
        else:
            gallery_known = _check_attribute_labels(gallery_attributes, gallery_attributes_known, num_attributes,
                                                    num_gallery, "attribute prior (gallery)")
        labels = attributes.to(components.dtype)
        gallery_labels = gallery_attributes.to(components.dtype)

        pair_known = (known.unsqueeze(1) & gallery_known.unsqueeze(0)).to(components.dtype)  # (Q, G, M)
        differs = (labels.unsqueeze(1) - gallery_labels.unsqueeze(0)).abs() * pair_known
        shared = (1.0 - differs) * pair_known
        num_known = pair_known.sum(-1)  # K per pair
        num_differing = differs.sum(-1)  # N per pair

        known_components = components * pair_known
        shares = known_components / known_components.sum(-1, keepdim=True).clamp_min(_EPSILON)

        safe_known = num_known.clamp_min(1.0)
        clamped_differing = torch.minimum(num_differing, safe_known - _DIFFERING_MARGIN).clamp_min(0.0)
        r = torch.sqrt(clamped_differing / safe_known)
        tau = torch.sqrt((r / clamped_differing.clamp_min(_EPSILON))
                         * ((1.0 - r) / (safe_known - clamped_differing)))

        set_terms = (functional.relu(r - (differs * shares).sum(-1))
                     + functional.relu((shared * shares).sum(-1) - (1.0 - r)))
        tau = tau.unsqueeze(-1)
        attribute_terms = ((functional.relu(differs * tau - shares) * pair_known).sum(-1)
                           + (functional.relu(shared * shares - tau) * pair_known).sum(-1))
        nothing_differs_terms = (functional.relu(shares - 2.0 / safe_known.unsqueeze(-1)) * pair_known).sum(-1)
        attribute_terms = torch.where(num_differing > 0, attribute_terms, nothing_differs_terms)

        per_pair = self.set_weight * set_terms + self.attribute_weight * attribute_terms
        valid = _off_diagonal_mask(distances) & (num_known > 0)
        if not valid.any():
            # no pair has an attribute known on both sides: nothing to learn from this batch
            return components.sum() * 0.0
        return per_pair[valid].mean()


class WeightedAttributeBCE(nn.Module):
    """Binary cross-entropy of the attribute-recognition branch, weighted against class imbalance:
    positives of attribute m weigh exp(1 - r_m), negatives exp(r_m), r_m the positive ratio of m
    in the training labels. Averaged over the known labels."""

    positive_ratios: torch.Tensor

    def __init__(self, positive_ratios: torch.Tensor):
        super().__init__()
        ratios = torch.as_tensor(positive_ratios, dtype=torch.float32)
        if ratios.dim() != 1 or ratios.numel() == 0:
            raise ValueError(f"positive_ratios must be a 1-D tensor with one ratio per attribute, got shape "
                             f"{tuple(ratios.shape)}")
        if not torch.isfinite(ratios).all() or (ratios < 0).any() or (ratios > 1).any():
            raise ValueError(f"positive_ratios must lie in [0, 1], got {ratios.tolist()}")
        self.register_buffer("positive_ratios", ratios)

    def forward(self, logits: torch.Tensor, attributes: torch.Tensor,
                attributes_known: torch.Tensor | None = None) -> torch.Tensor:
        """logits (B, M), attributes (B, M) in {0, 1}, attributes_known (B, M) bool -> scalar."""
        num_attributes = self.positive_ratios.numel()
        if logits.dim() != 2 or logits.shape[1] != num_attributes:
            raise ValueError(f"attribute logits must be (B, {num_attributes}), got {tuple(logits.shape)}")
        known = _check_attribute_labels(attributes, attributes_known, num_attributes, logits.shape[0],
                                        "attribute BCE")
        targets = attributes.to(logits.dtype)
        ratios = self.positive_ratios.to(logits.dtype)
        weights = torch.where(targets > 0.5, torch.exp(1.0 - ratios), torch.exp(ratios))
        per_label = functional.binary_cross_entropy_with_logits(logits, targets, reduction="none")
        known_weight = known.to(logits.dtype)
        count = known_weight.sum()
        if count == 0:
            return logits.sum() * 0.0
        return (per_label * weights * known_weight).sum() / count


class PlacePriorLoss(nn.Module):
    """A weak spatial prior for attributes that have a place in an upright pedestrian crop (hat and
    hair at the top, lower-body length at the legs; ``attributes.ATTRIBUTE_PLACES``): per such map,
    1 - the fraction of its (spatially normalised) mass inside its band of rows, averaged over the
    placed maps and the batch. Scale-free (the distillation keeps setting each map's scale); a row
    that the band covers in part counts in part. Maps of attributes without a place are left alone."""

    bands: torch.Tensor
    placed: torch.Tensor

    def __init__(self, places: list[tuple[float, float] | None]):
        super().__init__()
        for place in places:
            if place is not None and not 0.0 <= place[0] < place[1] <= 1.0:
                raise ValueError(f"an attribute place must be (top, bottom) with 0 <= top < bottom <= 1, got {place}")
        self.register_buffer("placed", torch.tensor([place is not None for place in places]))
        self.register_buffer("bands", torch.tensor([place or (0.0, 1.0) for place in places], dtype=torch.float32))

    def row_weights(self, height: int) -> torch.Tensor:
        """(M, h): the part of each feature row inside each attribute's band."""
        edges = torch.arange(height + 1, dtype=torch.float32, device=self.bands.device) / height
        top, bottom = self.bands[:, :1], self.bands[:, 1:]
        overlap = (torch.minimum(edges[1:], bottom) - torch.maximum(edges[:-1], top)).clamp_min(0.0)
        return overlap * height

    def forward(self, maps: torch.Tensor) -> torch.Tensor:
        """maps (B, M, h, w) -> scalar."""
        if maps.dim() != 4 or maps.shape[1] != len(self.placed):
            raise ValueError(f"the place prior was built for {len(self.placed)} maps, got maps {tuple(maps.shape)}")
        if not bool(self.placed.any()):
            return maps.sum() * 0.0
        rows = maps.sum(-1)  # (B, M, h)
        rows = rows / rows.sum(-1, keepdim=True).clamp_min(_EPSILON)
        inside = (rows * self.row_weights(maps.shape[2]).to(rows.dtype)).sum(-1)  # (B, M)
        return (1.0 - inside)[:, self.placed].mean()


__all__ = [
    "AttributePriorLoss",
    "DistanceDistillationLoss",
    "PlacePriorLoss",
    "WeightedAttributeBCE",
]
