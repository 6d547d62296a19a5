"""evaluate_rank: the same CMC and mAP as torchreid's Python evaluate_rank on random matrices (ties
included), mINP against a slow reference, and clear behaviour on bad input."""

import numpy as np
import pytest
import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.evaluation import evaluate_rank, native_metrics, rank_metrics


@pytest.fixture(params=["kernel", "torch"])
def path(request, monkeypatch):
    """Both ways of placing the gallery among each query's matches: the C kernel and searchsorted."""
    if request.param == "kernel" and native_metrics.load_kernel() is None:
        pytest.skip("no C compiler: the kernel cannot be built here")
    if request.param == "torch":
        monkeypatch.setattr(native_metrics, "match_bins", lambda *arguments: None)
    return request.param


def random_case(seed, num_query=30, num_gallery=90, num_ids=10, tied=False):
    rng = np.random.default_rng(seed)
    if tied:  # few distinct values: many exact ties between matches and non-matches
        distmat = rng.integers(0, 6, (num_query, num_gallery)).astype(np.float32)
    else:
        distmat = rng.random((num_query, num_gallery)).astype(np.float32)
    q_pids = rng.integers(0, num_ids, num_query)
    g_pids = rng.integers(0, num_ids, num_gallery)
    q_camids = rng.integers(0, 3, num_query)
    g_camids = rng.integers(0, 3, num_gallery)
    return distmat, q_pids, g_pids, q_camids, g_camids


def slow_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank, order_of=None):
    """Per query: sort, drop same-pid-same-camera, read matches off the list (one query at a time)."""
    order_of = order_of or (lambda row: np.argsort(row, kind="stable"))
    cmcs, aps, inps = [], [], []
    for q in range(len(q_pids)):
        order = order_of(distmat[q])
        kept = [g for g in order if not (g_pids[g] == q_pids[q] and g_camids[g] == q_camids[q])]
        matches = [g_pids[g] == q_pids[q] for g in kept]
        if not any(matches):
            continue
        positions = [i + 1 for i, is_match in enumerate(matches) if is_match]
        aps.append(np.mean([(j + 1) / position for j, position in enumerate(positions)]))
        inps.append(len(positions) / positions[-1])
        cmcs.append([1.0 if positions[0] <= r + 1 else 0.0 for r in range(max_rank)])
    return np.mean(cmcs, axis=0), float(np.mean(aps)), float(np.mean(inps)), len(cmcs)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_matches_torchreid_python_evaluate_rank_on_numpy_input(seed, tied, path):
    case = random_case(seed, tied=tied)
    reference_cmc, reference_mAP = compat.torchreid_evaluate_rank(*case, max_rank=20, use_cython=False)
    cmc, mAP = evaluate_rank(*case, max_rank=20)
    np.testing.assert_allclose(cmc, reference_cmc, atol=1e-6)
    assert mAP == pytest.approx(reference_mAP, abs=1e-9)


@pytest.mark.parametrize("tied", [False, True])
def test_torch_input_matches_a_stable_sort_reference_and_reports_minp(tied, path):
    case = random_case(11, tied=tied)
    reference_cmc, reference_mAP, reference_mINP, valid = slow_reference(*case, max_rank=10)
    tensors = [torch.from_numpy(np.asarray(values)) for values in case]
    metrics = rank_metrics(*tensors, max_rank=10)
    np.testing.assert_allclose(metrics.cmc, reference_cmc, atol=1e-6)
    assert metrics.mAP == pytest.approx(reference_mAP, abs=1e-9)
    assert metrics.mINP == pytest.approx(reference_mINP, abs=1e-9)
    assert metrics.num_valid_queries == valid


def test_chunking_does_not_change_the_numbers(path):
    case = random_case(3, num_query=50, tied=True)
    whole = rank_metrics(*case, max_rank=10, query_chunk=1000)
    chunked = rank_metrics(*case, max_rank=10, query_chunk=7)
    np.testing.assert_array_equal(whole.cmc, chunked.cmc)
    assert whole.mAP == pytest.approx(chunked.mAP, abs=1e-12)


def test_queries_without_a_valid_match_are_skipped_and_counted():
    distmat, q_pids, g_pids, q_camids, g_camids = random_case(5, num_ids=4)
    q_pids[:3] = 99  # identity absent from the gallery
    g_pids[g_pids == q_pids[3]] = 98
    g_pids[:2], g_camids[:2] = q_pids[3], q_camids[3]  # only same-camera images: all junk
    metrics = rank_metrics(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
    reference = slow_reference(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=5)
    assert metrics.num_skipped_queries >= 4
    assert metrics.num_valid_queries == reference[3]
    assert metrics.mAP == pytest.approx(reference[1], abs=1e-9)


def test_gallery_smaller_than_max_rank_reports_the_ranks_it_has():
    case = random_case(7, num_query=8, num_gallery=6, num_ids=3)
    metrics = rank_metrics(*case, max_rank=50)
    assert len(metrics.cmc) == 6
    assert metrics.cmc[-1] == pytest.approx(1.0)
    reference = slow_reference(*case, max_rank=6)
    np.testing.assert_allclose(metrics.cmc, reference[0], atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_distances_give_a_clear_error(bad):
    case = list(random_case(1))
    case[0][4, 7] = bad
    with pytest.raises(ValueError, match="row 4, column 7"):
        evaluate_rank(*case)


def test_empty_query_or_gallery_and_no_valid_query_give_clear_errors():
    distmat, q_pids, g_pids, q_camids, g_camids = random_case(2)
    with pytest.raises(ValueError, match="empty"):
        evaluate_rank(distmat[:0], q_pids[:0], g_pids, q_camids[:0], g_camids)
    with pytest.raises(ValueError, match="empty"):
        evaluate_rank(distmat[:, :0], q_pids, g_pids[:0], q_camids, g_camids[:0])
    with pytest.raises(ValueError, match="must match"):
        evaluate_rank(distmat, q_pids[:-1], g_pids, q_camids, g_camids)
    with pytest.raises(ValueError, match="none of the"):
        evaluate_rank(distmat, q_pids + 1000, g_pids, q_camids, g_camids)


def test_cuhk03_mode_equals_torchreid_when_each_identity_has_one_image(monkeypatch):
    # torchreid's eval_cuhk03 still uses np.bool (removed in numpy 1.24); give it back for the reference.
    monkeypatch.setattr(np, "bool", bool, raising=False)
    rng = np.random.default_rng(4)
    num_query, num_gallery = 20, 30
    distmat = rng.random((num_query, num_gallery)).astype(np.float32)
    g_pids = rng.permutation(num_gallery)  # one image per identity: the single-shot draw is forced
    q_pids = rng.choice(g_pids, num_query)
    q_camids, g_camids = np.zeros(num_query, int), np.ones(num_gallery, int)
    reference_cmc, reference_mAP = compat.torchreid_evaluate_rank(
        distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10, use_metric_cuhk03=True, use_cython=False)
    cmc, mAP = evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=10, use_metric_cuhk03=True)
    np.testing.assert_allclose(cmc, reference_cmc, atol=1e-6)
    assert mAP == pytest.approx(reference_mAP, abs=1e-9)


def test_cuhk03_mode_keeps_torchreids_average_precision_and_a_monotone_cmc():
    case = random_case(9, num_ids=5)
    _, market_mAP = evaluate_rank(*case, max_rank=10)
    cmc, mAP = evaluate_rank(*case, max_rank=10, use_metric_cuhk03=True)
    assert mAP == pytest.approx(market_mAP)
    assert np.all(np.diff(cmc) >= 0) and cmc[-1] == pytest.approx(1.0)
