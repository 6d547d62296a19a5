"""The one pairwise implementation: plain Euclidean and cosine distances, batched over attributes."""

import pytest
import torch

from torchreid_attrimeter.decomposition import Decomposition, pairwise_components, pairwise_distance


def test_euclidean_is_plain_not_squared():
    query, gallery = torch.randn(5, 8, dtype=torch.float64), torch.randn(7, 8, dtype=torch.float64)
    expected = torch.cdist(query, gallery)
    assert torch.allclose(pairwise_distance(query, gallery, "euclidean"), expected, atol=1e-6)


def test_cosine_is_one_minus_cosine_similarity():
    query, gallery = torch.randn(4, 6), torch.randn(3, 6)
    expected = 1 - torch.nn.functional.cosine_similarity(query[:, None], gallery[None], dim=-1)
    assert torch.allclose(pairwise_distance(query, gallery, "cosine"), expected, atol=1e-6)


def test_components_match_one_distance_per_attribute():
    query = Decomposition(torch.randn(3, 4), torch.randn(3, 5, 4))
    gallery = Decomposition(torch.randn(6, 4), torch.randn(6, 5, 4))
    distances = pairwise_components(query, gallery)
    assert distances.attribute_components.shape == (3, 6, 5)
    for m in range(5):
        expected = torch.cdist(query.attribute_embeddings[:, m], gallery.attribute_embeddings[:, m])
        assert torch.allclose(distances.attribute_components[..., m], expected, atol=1e-5)
    assert torch.allclose(distances.reconstructed_distance, distances.attribute_components.mean(-1))
    assert torch.allclose(distances.shares.sum(-1), torch.ones(3, 6), atol=1e-6)


def test_identical_rows_have_a_finite_gradient():
    embeddings = torch.randn(4, 3, requires_grad=True)
    pairwise_distance(embeddings, embeddings).sum().backward()
    assert torch.isfinite(embeddings.grad).all()


def test_unknown_metric_is_refused():
    with pytest.raises(ValueError, match="unknown distance metric 'manhattan'"):
        pairwise_distance(torch.zeros(1, 2), torch.zeros(1, 2), "manhattan")
