"""What the interpreter returns for a batch of images, and the one implementation of the pairwise
target distance and attribute components (docs/method.md §2), used by the losses, the evaluator and
the explain API alike."""

from __future__ import annotations

from dataclasses import dataclass

import torch

METRICS = ("euclidean", "cosine")

# Squared distances are clamped before the square root so that identical pairs (the diagonal of
# a training batch) get a finite zero gradient instead of an infinite one.
SQUARED_DISTANCE_FLOOR = 1e-12


@dataclass
class Decomposition:
    """The interpreter's output for B images.

    embedding: (B, D) the frozen target's own eval embedding.
    attribute_embeddings: (B, M, D) the target tail applied to the feature map times each map.
    maps: (B, M, h, w) positive attribute-guided attention maps, or None when not kept.
    attribute_logits: (B, M) logits of the optional attribute-recognition branch, or None.
    """

    embedding: torch.Tensor
    attribute_embeddings: torch.Tensor
    maps: torch.Tensor | None = None
    attribute_logits: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.embedding.shape[0]

    @property
    def num_attributes(self) -> int:
        return self.attribute_embeddings.shape[1]

    def detach(self) -> Decomposition:
        return self.apply(lambda tensor: tensor.detach())

    def to(self, *args, **kwargs) -> Decomposition:
        return self.apply(lambda tensor: tensor.to(*args, **kwargs))

    def __getitem__(self, index) -> Decomposition:
        return self.apply(lambda tensor: tensor[index])

    def apply(self, function) -> Decomposition:
        return Decomposition(
            *(None if value is None else function(value) for value in
              (self.embedding, self.attribute_embeddings, self.maps, self.attribute_logits))
        )

    @staticmethod
    def cat(parts: list[Decomposition]) -> Decomposition:
        def join(name):
            values = [getattr(part, name) for part in parts]
            return None if any(value is None for value in values) else torch.cat(values)

        return Decomposition(*(join(name) for name in
                               ("embedding", "attribute_embeddings", "maps", "attribute_logits")))


@dataclass
class PairwiseDistances:
    """Distances between Q query and G gallery decompositions.

    target_distance: (Q, G) the target's distance d.
    attribute_components: (Q, G, M) the attribute component distances d^m.
    """

    target_distance: torch.Tensor
    attribute_components: torch.Tensor

    @property
    def reconstructed_distance(self) -> torch.Tensor:
        """(Q, G) the interpreter's distance, the mean of the components (1/M) sum_m d^m."""
        return self.attribute_components.mean(dim=-1)

    @property
    def shares(self) -> torch.Tensor:
        """(Q, G, M) p^m = d^m / sum_k d^k, the share of the distance each attribute explains."""
        total = self.attribute_components.sum(dim=-1, keepdim=True)
        return self.attribute_components / total.clamp_min(1e-12)


def check_metric(metric: str) -> str:
    if metric not in METRICS:
        raise ValueError(f"unknown distance metric '{metric}': use one of {METRICS}")
    return metric


def distance_terms(embeddings: torch.Tensor, metric: str = "euclidean") -> tuple[torch.Tensor, torch.Tensor | None]:
    """What a distance needs of each row of ``embeddings`` (..., N, D): for 'cosine' the unit rows and
    no norms, for 'euclidean' the rows themselves and their squared norms (..., N)."""
    check_metric(metric)
    if metric == "cosine":
        return torch.nn.functional.normalize(embeddings, dim=-1), None
    return embeddings, embeddings.pow(2).sum(dim=-1)


def distances_from_products(
    products: torch.Tensor,
    query_norms: torch.Tensor | None,
    gallery_norms: torch.Tensor | None,
    metric: str = "euclidean",
) -> torch.Tensor:
    """Distances (..., Q, G) from the inner products (..., Q, G) of rows prepared by ``distance_terms``
    and their norms (..., Q) and (..., G). Split from the product so that the evaluator can run one
    large product per tile and finish the distances block by block while they are in the CPU cache."""
    if metric == "cosine":
        return 1.0 - products
    squared = torch.add(query_norms.unsqueeze(-1), products, alpha=-2.0)
    if torch.is_grad_enabled() and squared.requires_grad:
        # clamp's backward needs its input: no in-place steps while autograd records.
        return (squared + gallery_norms.unsqueeze(-2)).clamp_min(SQUARED_DISTANCE_FLOOR).sqrt()
    squared.add_(gallery_norms.unsqueeze(-2))
    return squared.clamp_min_(SQUARED_DISTANCE_FLOOR).sqrt_()


def pairwise_distance(query: torch.Tensor, gallery: torch.Tensor, metric: str = "euclidean") -> torch.Tensor:
    """Distances between the rows of ``query`` (..., Q, D) and ``gallery`` (..., G, D) → (..., Q, G).

    'euclidean' is the plain (not squared) Euclidean distance; 'cosine' is 1 - cosine similarity.
    Leading batch dimensions are matched, so all M attribute components are one batched product.
    """
    query, query_norms = distance_terms(query, metric)
    gallery, gallery_norms = distance_terms(gallery, metric)
    return distances_from_products(query @ gallery.transpose(-1, -2), query_norms, gallery_norms, metric)


def pairwise_components(query: Decomposition, gallery: Decomposition, metric: str = "euclidean") -> PairwiseDistances:
    """Target distance (Q, G) and attribute components (Q, G, M) for every query × gallery pair."""
    target_distance = pairwise_distance(query.embedding, gallery.embedding, metric)
    # (M, Q, D) x (M, G, D) -> (M, Q, G): one batched product over all attributes.
    components = pairwise_distance(
        query.attribute_embeddings.transpose(0, 1), gallery.attribute_embeddings.transpose(0, 1), metric
    )
    return PairwiseDistances(target_distance, components.permute(1, 2, 0))
