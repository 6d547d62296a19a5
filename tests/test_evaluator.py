"""The explanation-aware evaluator, both fast paths (C kernel and torch), against the readable one-pair-at-a-time
definitions of evaluation/definitions.py (docs/method.md §6): retrieval of target and interpreter, ADRE, X-mAP_e, X-mAP_c (N = 0 rule), top-k precision, agreement,
unknown labels, pair modes, tiling, and the extraction loop."""

import json
import math

import numpy as np
import pytest
import torch

from torchreid_attrimeter.decomposition import Decomposition
from torchreid_attrimeter.evaluation import (
    ExplanationEvaluator,
    extract_decompositions,
    format_table,
    native_metrics,
    pair_explanation_stats,
)
from torchreid_attrimeter.evaluation.definitions import Split, evaluate_pairs, pair_metrics
from torchreid_attrimeter.evaluation.definitions import share_auc as reference_auc
from torchreid_attrimeter.evaluation.explanation_metrics import (
    SHARE_BINS,
    descending_sorting_network,
    share_auc,
    share_bins,
    share_histogram,
    sort_rows_descending,
)

M, D = 5, 4
NAMES = tuple(f"attribute_{index}" for index in range(M))


# -- the readable definitions, applied to the fixtures' dicts --------------------------------------------

def as_split(data):
    return Split(data["decomposition"], data["pids"], data["camids"], data["attributes"], data["known"])


def reference_results(query, gallery, metric, top_k=3, pairs=None):
    return evaluate_pairs(as_split(query), as_split(gallery), NAMES, metric, top_k=top_k, pairs=pairs)


# -- fixtures ------------------------------------------------------------------------------------------

def make_split(generator, size, identity_attributes, num_ids=6):
    pids = torch.randint(0, num_ids, (size,), generator=generator)
    attribute_embeddings = torch.randn(size, M, D, generator=generator)
    return {
        "decomposition": Decomposition(attribute_embeddings.mean(1) * 1.5 + 0.1 * torch.randn(size, D, generator=generator),
                                       attribute_embeddings),
        "pids": pids,
        "camids": torch.randint(0, 3, (size,), generator=generator),
        "attributes": identity_attributes[pids],
        "known": torch.rand(size, M, generator=generator) > 0.2,  # unknown labels, masked per pair
    }


@pytest.fixture(scope="module")
def splits():
    generator = torch.Generator().manual_seed(0)
    # Only three attribute patterns among six identities: many pairs with N = 0.
    patterns = (torch.rand(3, M, generator=generator) > 0.5).float()
    identity_attributes = patterns[torch.tensor([0, 1, 2, 0, 1, 2])]
    return make_split(generator, 9, identity_attributes), make_split(generator, 23, identity_attributes)


@pytest.fixture(params=[True, False], ids=["kernel", "torch"])
def native(request):
    """Both ways of finishing the pairs: the fused C kernel and the torch path."""
    if request.param and native_metrics.load_kernel() is None:
        pytest.skip("no C compiler: the evaluator's kernel cannot be built here")
    return request.param


def run(query, gallery, batch=4, **options):
    options.setdefault("progress", False)
    evaluator = ExplanationEvaluator(NAMES, **options)
    for split, data in (("query", query), ("gallery", gallery)):
        for start in range(0, len(data["pids"]), batch):
            rows = slice(start, start + batch)
            evaluator.process(data["decomposition"][rows], data["pids"][rows], data["camids"][rows],
                              data["attributes"][rows], data["known"][rows], split=split)
    return evaluator.evaluate()


# Figures built from float32 products differ in their last bits with the summation order (tile shape,
# kernel or torch path, the CPU's vector width): compare them relative to their size, with an absolute
# floor for figures near zero. 1e-5 is about 80 float32 ulps.
FLOAT32_REL, FLOOR = 1e-5, 1e-4


def close_to(value):
    return pytest.approx(value, rel=FLOAT32_REL, abs=FLOOR)


def assert_matches_reference(results, reference):
    for key in ("target_rank1", "target_rank5", "target_mAP", "interpreter_rank1", "interpreter_rank5",
                "interpreter_mAP", "ADRE", "X-mAP_e", "X-mAP_c"):
        if key in reference:
            assert results[key] == close_to(reference[key]), key
    for key in ("X-mAP_e_pairs", "X-mAP_c_pairs"):
        assert results[key] == reference[key], key
    for name, values in reference["per_attribute"].items():
        for metric, value in values.items():
            # The evaluator's AUC bins shares 0.54 % wide (shares in one bin tie): close, not exact.
            tolerance = 0.02 if metric == "share_auc" else 1e-6
            assert results["per_attribute"][name][metric] == pytest.approx(value, abs=tolerance), (name, metric)


# -- tests ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_every_metric_matches_the_slow_reference_over_all_pairs(splits, metric, native):
    query, gallery = splits
    reference = reference_results(query, gallery, metric)
    results = run(query, gallery, native=native, metric=metric)
    assert_matches_reference(results, reference)
    assert results["explained_pairs"] == 9 * 23
    assert results["X-mAP_c_pairs"] > results["X-mAP_e_pairs"] - 9 * 23  # N = 0 pairs counted in X-mAP_c


def test_the_fixture_has_pairs_with_nothing_differing(splits):
    query, gallery = splits
    same = (query["attributes"][:, None] == gallery["attributes"][None]).all(-1)
    assert int(same.sum()) > 20


def test_results_do_not_depend_on_the_tiling(splits, native):
    query, gallery = splits
    big = run(query, gallery, native=native, memory_budget_mb=64)
    tiny = run(query, gallery, native=native, memory_budget_mb=0.002)  # tiles of a few pairs
    for key, value in big.items():
        if isinstance(value, float):
            assert tiny[key] == close_to(value), key  # float32 products per tile shape
        else:
            assert tiny[key] == value, key


def test_topk_mode_explains_only_each_querys_nearest_gallery_images(splits, native):
    query, gallery = splits
    target = torch.cdist(query["decomposition"].embedding, gallery["decomposition"].embedding)
    nearest = torch.topk(target, 4, dim=1, largest=False).indices
    pairs = [(q, int(g)) for q in range(9) for g in nearest[q]]
    reference = reference_results(query, gallery, "euclidean", pairs=pairs)
    results = run(query, gallery, native=native, pairs="topk", topk=4)
    assert results["explained_pairs"] == len(pairs)
    assert results["interpreter_mAP"] is None  # needs every pair
    assert results["target_mAP"] == close_to(reference["target_mAP"])
    for key in ("ADRE", "X-mAP_e", "X-mAP_c"):
        assert results[key] == close_to(reference[key]), key


def test_pair_subsample_is_deterministic_and_the_requested_size(splits, native):
    query, gallery = splits
    first = run(query, gallery, native=native, pair_fraction=0.5, seed=3)
    again = run(query, gallery, native=native, pair_fraction=0.5, seed=3, memory_budget_mb=0.002)
    assert first["explained_pairs"] == again["explained_pairs"]
    assert first["X-mAP_e"] == pytest.approx(again["X-mAP_e"], abs=1e-9)
    assert 0.3 * 207 < first["explained_pairs"] < 0.7 * 207
    assert first["target_mAP"] == pytest.approx(run(query, gallery, native=native)["target_mAP"])  # retrieval: every pair


def test_adre_percentiles_follow_the_error_distribution(splits, native):
    query, gallery = splits
    errors = reference_results(query, gallery, "euclidean")["ADRE_errors"]
    results = run(query, gallery, native=native)
    for percentile in (50, 90):
        exact = 100 * np.percentile(errors, percentile, method="inverted_cdf")
        assert results[f"ADRE_p{percentile}"] == pytest.approx(exact, rel=0.02)
    assert results["ADRE_max"] == pytest.approx(100 * errors.max(), rel=1e-5)


def test_ties_between_shares_rank_the_relevant_attribute_first():
    components = torch.tensor([[2.0, 1.0, 1.0, 0.5]]).t()  # attributes 1 and 2 tie
    known = torch.ones(4, 1, dtype=torch.bool)
    differ = torch.tensor([[True, False, True, False]]).t()
    stats = pair_explanation_stats(components, differ, known)
    ref_e, ref_c, _, _ = pair_metrics(components[:, 0].numpy(), differ[:, 0].numpy(), known[:, 0].numpy(), 3)
    assert float(stats.exclusive_ap[0]) == pytest.approx(1.0) == pytest.approx(ref_e)
    assert float(stats.common_ap[0]) == pytest.approx(ref_c)


def test_nothing_differs_uses_the_two_over_m_rule():
    # Shares 0.6, 0.2, 0.1, 0.1 with M = 4: only 0.6 exceeds 2/M, and it ranks first (descending).
    components = torch.tensor([[6.0, 2.0, 1.0, 1.0]]).t()
    stats = pair_explanation_stats(components, torch.zeros(4, 1, dtype=torch.bool), torch.ones(4, 1, dtype=torch.bool))
    assert not bool(stats.has_exclusive[0]) and bool(stats.has_common[0])
    assert float(stats.common_ap[0]) == pytest.approx((1 / 2 + 2 / 3 + 3 / 4) / 3)


def test_unknown_attributes_are_left_out_of_the_pair():
    components = torch.tensor([[9.0, 1.0, 3.0, 2.0]]).t()
    differ = torch.tensor([[True, False, True, False]]).t()
    known = torch.tensor([[False, True, True, True]]).t()  # the big differing attribute is unknown
    stats = pair_explanation_stats(components, differ, known, top_k=1)
    assert float(stats.exclusive_ap[0]) == pytest.approx(1.0)  # 3.0 is the largest known share
    assert stats.top_k.tolist() == [0, 0, 1, 0] and stats.known.tolist() == [0, 1, 1, 1]


@pytest.mark.parametrize("size", [1, 2, 5, 17, 26, 33])
def test_sorting_network_sorts_like_torch_sort(size):
    keys = torch.randint(-2, 50, (size, 300), dtype=torch.int32)
    expected = torch.sort(keys, dim=0, descending=True).values
    assert torch.equal(sort_rows_descending(keys), expected)
    assert all(first < second < size for first, second in descending_sorting_network(size))


def test_without_attribute_labels_the_attribute_metrics_are_unavailable(splits, native):
    query, gallery = splits
    evaluator = ExplanationEvaluator(NAMES, native=native, progress=False)
    for split, data in (("query", query), ("gallery", gallery)):
        evaluator.process(data["decomposition"], data["pids"], data["camids"], split=split)
    results = evaluator.evaluate()
    assert results["attributes_available"] is False and results["X-mAP_e"] is None
    assert results["target_mAP"] is not None and results["ADRE"] is not None
    json.dumps(results)


def test_results_are_json_safe_and_print_as_a_table(splits):
    results = run(*splits)
    assert json.loads(json.dumps(results))["X-mAP_e"] == pytest.approx(results["X-mAP_e"])
    table = format_table(results)
    assert "X-mAP_c" in table and NAMES[0] in table and "top3_precision" in table


def test_ranks_beyond_the_gallery_are_reported_as_none(splits):
    query, gallery = splits
    small_gallery = {key: value[:4] for key, value in gallery.items()}
    results = run(query, small_gallery, ranks=(1, 10))
    assert results["target_rank10"] is None or results["target_valid_queries"] == 0


def test_bad_input_gives_clear_errors(splits):
    query, _ = splits
    evaluator = ExplanationEvaluator(NAMES[:3], progress=False)
    with pytest.raises(ValueError, match="3 attribute names"):
        evaluator.process(query["decomposition"], query["pids"], query["camids"], split="query")
    evaluator = ExplanationEvaluator(NAMES, progress=False)
    evaluator.process(query["decomposition"], query["pids"], query["camids"], split="query")
    with pytest.raises(ValueError, match="no gallery images"):
        evaluator.evaluate()
    broken = Decomposition(query["decomposition"].embedding.clone(), query["decomposition"].attribute_embeddings)
    broken.embedding[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        evaluator.process(broken, query["pids"], query["camids"], split="gallery")
    with pytest.raises(ValueError, match="pairs must be"):
        ExplanationEvaluator(NAMES, pairs="some")


class TinyInterpreter(torch.nn.Module):
    """Stands in for an AttriMeter: a linear map per attribute on flattened images."""

    def __init__(self):
        super().__init__()
        self.attribute_heads = torch.nn.Linear(3 * 8 * 4, M * D)

    def decompose(self, images):
        attribute_embeddings = self.attribute_heads(images.flatten(1)).view(len(images), M, D)
        maps = torch.ones(len(images), M, 2, 1)
        return Decomposition(attribute_embeddings.mean(1), attribute_embeddings, maps, torch.randn(len(images), M))


def test_extract_decompositions_drops_the_maps_and_keeps_the_labels():
    generator = torch.Generator().manual_seed(1)
    loader = [{"img": torch.randn(4, 3, 8, 4, generator=generator), "pid": torch.arange(4) + 4 * batch,
               "camid": torch.zeros(4, dtype=torch.long), "attributes": torch.ones(4, M),
               "attributes_known": torch.ones(4, M, dtype=torch.bool)} for batch in range(3)]
    model = TinyInterpreter().train()
    decomposition, pids, _, attributes, known = extract_decompositions(model, loader, progress=False)
    assert decomposition.maps is None and decomposition.embedding.shape == (12, D)
    assert pids.tolist() == list(range(12)) and attributes.shape == (12, M) and known.all()
    assert model.training  # restored
    for batch in loader:
        del batch["attributes"], batch["attributes_known"]
    assert extract_decompositions(model, loader, progress=False)[3] is None


@pytest.mark.slow
def test_benchmark_script_runs_small():
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "tools" / "benchmark_evaluator.py"
    spec = importlib.util.spec_from_file_location("benchmark_evaluator", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--quick", "--num-query", "60", "--num-gallery", "200", "--num-identities", "20",
                          "--torch-path"])
    assert report["torch_path_max_difference"] < 1e-3  # percent points: both paths give the same figures
    assert report["evaluate_rank_max_cmc_difference"] == 0.0
    assert report["evaluate_rank_mAP_difference"] < 1e-9
    assert report["explanation_evaluation_s"] > 0 and report["results"]["X-mAP_e"] is not None


def test_share_auc_counts_a_bin_as_a_tie_and_matches_a_brute_force_count():
    generator = torch.Generator().manual_seed(4)
    shares = torch.rand(3, 400, generator=generator) * 0.5  # (M, n)
    differ = (torch.rand(3, 400, generator=generator) < 0.3).int()
    shares[1] += 0.3 * differ[1]  # attribute 1 takes more when it differs
    known = (torch.rand(3, 400, generator=generator) < 0.9).int()
    values = shares * known
    histogram = share_histogram(values, values.sum(0), differ * known, known)
    assert int(histogram.sum()) == int(known.sum())
    auc = share_auc(histogram)
    bins = share_bins(values / values.sum(0))
    for m in range(3):
        chosen = known[m].bool()
        positives = bins[m][chosen & differ[m].bool()].tolist()
        negatives = bins[m][chosen & ~differ[m].bool()].tolist()
        assert float(auc[m]) == pytest.approx(reference_auc(positives, negatives), rel=1e-12)
    assert 0.4 < float(auc[0]) < 0.6 and float(auc[1]) > 0.75  # chance; the share grows when it differs


def test_share_auc_is_undefined_without_both_kinds_of_pair():
    histogram = torch.zeros(2, 2, SHARE_BINS, dtype=torch.int64)
    histogram[1, 0, 10] = 3  # attribute 0 always differs, attribute 1 never seen
    assert torch.isnan(share_auc(histogram)).all()
