"""The evaluator's fused C kernel (evaluation/pair_metrics.c) against its torch path, which the slow
reference in test_evaluator.py checks: same results on cases with ties, unknown labels, subsampled and
top-k pairs, up to the 64-attribute limit; fallbacks and errors when the kernel cannot be used."""

import logging

import numpy as np
import pytest
import torch

from torchreid_attrimeter.decomposition import Decomposition
from torchreid_attrimeter.evaluation import ExplanationEvaluator, native_metrics

pytestmark = pytest.mark.skipif(native_metrics.load_kernel() is None,
                                reason="no C compiler: the evaluator's kernel cannot be built here")


def make_data(num_attributes, size, seed, num_ids=12, dim=6, known_rate=0.8, scale=1.0):
    generator = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, num_ids, (size,), generator=generator)
    # Embeddings on a coarse grid: many exactly equal components, so ties between shares are common.
    attribute_embeddings = torch.randint(-2, 3, (size, num_attributes, dim), generator=generator).float() * scale
    identity_attributes = torch.rand(num_ids, num_attributes, generator=generator) > 0.5
    return {
        "decomposition": Decomposition(attribute_embeddings.mean(1) + 0.05 * torch.randn(size, dim, generator=generator),
                                       attribute_embeddings),
        "pids": pids,
        "camids": torch.randint(0, 3, (size,), generator=generator),
        "attributes": identity_attributes[pids].float(),
        "known": torch.rand(size, num_attributes, generator=generator) < known_rate,
    }


def evaluate(query, gallery, num_attributes, with_labels=True, **options):
    evaluator = ExplanationEvaluator([f"a{index}" for index in range(num_attributes)], progress=False, **options)
    for split, data in (("query", query), ("gallery", gallery)):
        evaluator.process(data["decomposition"], data["pids"], data["camids"],
                          data["attributes"] if with_labels else None, data["known"] if with_labels else None,
                          split=split)
    return evaluator.evaluate()


def assert_same(kernel, torch_path):
    assert kernel.keys() == torch_path.keys()
    for key, value in torch_path.items():
        if key == "per_attribute":
            for name, metrics in value.items():
                for metric, number in metrics.items():
                    # A share on a bin's edge may fall either side when the paths sum in another order.
                    tolerance = 1e-4 if metric == "share_auc" else 1e-6
                    assert kernel[key][name][metric] == pytest.approx(number, abs=tolerance), (name, metric)
        elif isinstance(value, float):
            assert kernel[key] == pytest.approx(value, rel=1e-5, abs=1e-4), key  # float32 sums in another order
        else:
            assert kernel[key] == value, key


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("options", [{}, {"pair_fraction": 0.4, "seed": 5}, {"pairs": "topk", "topk": 7},
                                     {"top_attributes": 40}, {"memory_budget_mb": 0.01}],
                         ids=["all", "subsample", "topk", "top-k-above-M", "small-tiles"])
def test_the_kernel_gives_the_torch_paths_results(metric, options):
    query, gallery = make_data(26, 37, seed=1), make_data(26, 150, seed=2)
    kernel = evaluate(query, gallery, 26, metric=metric, native=True, **options)
    torch_path = evaluate(query, gallery, 26, metric=metric, native=False, **options)
    assert_same(kernel, torch_path)
    assert kernel["X-mAP_e_pairs"] > 0 and kernel["X-mAP_c_pairs"] > 0


@pytest.mark.parametrize("num_attributes", [1, 2, 63, 64])
def test_every_attribute_count_up_to_64(num_attributes):
    query, gallery = make_data(num_attributes, 11, seed=3), make_data(num_attributes, 70, seed=4)
    assert_same(evaluate(query, gallery, num_attributes, native=True),
                evaluate(query, gallery, num_attributes, native=False))


def test_all_labels_known_and_no_labels():
    query, gallery = make_data(9, 20, seed=5, known_rate=1.0), make_data(9, 45, seed=6, known_rate=1.0)
    assert_same(evaluate(query, gallery, 9, native=True), evaluate(query, gallery, 9, native=False))
    without = evaluate(query, gallery, 9, with_labels=False, native=True)
    assert_same(without, evaluate(query, gallery, 9, with_labels=False, native=False))
    assert without["X-mAP_e"] is None and without["explained_pairs"] == 20 * 45


def test_label_masks_put_attribute_m_in_bit_m():
    labels = torch.zeros(3, 64, dtype=torch.bool)
    labels[0, 0] = labels[1, 63] = labels[2, [1, 5]] = True
    masks = native_metrics.label_masks(labels).numpy().view(np.uint64)
    assert masks.tolist() == [1, 1 << 63, (1 << 1) | (1 << 5)]


def test_more_than_64_attributes_use_the_torch_path():
    query, gallery = make_data(65, 8, seed=7), make_data(65, 20, seed=8)
    automatic = evaluate(query, gallery, 65)
    assert_same(automatic, evaluate(query, gallery, 65, native=False))
    with pytest.raises(RuntimeError, match="at most 64"):
        evaluate(query, gallery, 65, native=True)


def test_overflowing_components_are_reported():
    query, gallery = make_data(4, 5, seed=9, scale=1e19), make_data(4, 9, seed=10, scale=1e19)
    for data in (query, gallery):  # finite target distances, overflowing squared attribute norms
        data["decomposition"].embedding = torch.randn(len(data["pids"]), 6)
    for native in (True, False):
        with pytest.raises(ValueError, match="attribute components contain NaN/inf"):
            evaluate(query, gallery, 4, native=native)


def test_native_option_is_checked():
    with pytest.raises(ValueError, match="native"):
        ExplanationEvaluator(["a"], native="yes")


@pytest.fixture
def fresh_kernel_cache():
    native_metrics.load_kernel.cache_clear()
    yield
    native_metrics.load_kernel.cache_clear()


def test_the_kernel_is_compiled_into_the_cache_folder(tmp_path, monkeypatch, fresh_kernel_cache):
    monkeypatch.setenv("ATTRIMETER_NATIVE_CACHE", str(tmp_path))
    assert native_metrics.load_kernel() is not None
    assert [path.suffix for path in tmp_path.iterdir()] == [".so"]  # no half-written files left


def test_without_a_compiler_the_evaluator_falls_back(tmp_path, monkeypatch, caplog, fresh_kernel_cache):
    monkeypatch.setenv("ATTRIMETER_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-here")
    with caplog.at_level(logging.WARNING):
        assert native_metrics.load_kernel() is None
    assert "no-such-compiler-here" in caplog.text
    query, gallery = make_data(3, 4, seed=11), make_data(3, 6, seed=12)
    assert evaluate(query, gallery, 3)["explained_pairs"] == 24


def test_a_failing_compiler_is_reported_and_the_evaluator_falls_back(tmp_path, monkeypatch, caplog,
                                                                      fresh_kernel_cache):
    monkeypatch.setenv("ATTRIMETER_NATIVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # exits with status 1
    with caplog.at_level(logging.WARNING):
        assert native_metrics.load_kernel() is None
    assert "false failed" in caplog.text and list(tmp_path.iterdir()) == []


def test_attrimeter_native_0_switches_the_kernel_off(monkeypatch, fresh_kernel_cache):
    monkeypatch.setenv("ATTRIMETER_NATIVE", "0")
    assert native_metrics.load_kernel() is None
    assert not native_metrics.usable(torch.device("cpu"), 26)


def test_match_bins_count_closer_and_tied_matches():
    generator = torch.Generator().manual_seed(13)
    values = torch.randint(0, 8, (5, 40), generator=generator).float()
    matches = torch.sort(torch.randint(0, 8, (5, 4), generator=generator).float(), dim=1).values
    matches[0, 2:] = float("inf")  # a row with two matches, padded
    matches[1] = 3.0  # four matches at one distance
    counts = native_metrics.match_bins(matches, values)
    expected = torch.zeros(5, 9, dtype=torch.int64)
    for row in range(5):
        for value in values[row]:
            closer = int((matches[row] < value).sum())
            expected[row, 2 * closer + int(bool((matches[row] == value).any()))] += 1
    assert torch.equal(counts, expected)
    # with the matches' gallery columns, a tie goes to the lower column (a stable sort's order)
    columns = torch.randint(0, 40, (5, 4), generator=generator)
    counts = native_metrics.match_bins(matches, values, columns)
    expected = torch.zeros(5, 9, dtype=torch.int64)
    for row in range(5):
        for column, value in enumerate(values[row]):
            closer = (matches[row] < value) | ((matches[row] == value) & (columns[row] < column))
            expected[row, 2 * int(closer.sum())] += 1
    assert torch.equal(counts, expected)
    assert native_metrics.match_bins(matches.double(), values.double()) is None  # float64: the torch path
    many = torch.zeros(1, native_metrics.MAX_COUNTED_MATCHES + 1)
    assert native_metrics.match_bins(many, values[:1]) is None  # so many matches: searchsorted is faster


def test_the_kernel_layout_matches_the_ctypes_mirror():
    native_metrics.check_layout(native_metrics.load_kernel())  # raises on any difference


def test_a_mirror_that_drifted_from_the_c_struct_is_refused_at_load(monkeypatch):
    library = native_metrics.load_kernel()
    fields = list(native_metrics._Tile._fields_)
    fields[1], fields[2] = fields[2], fields[1]  # rows and columns swapped: same size, other offsets

    class Drifted(native_metrics._Tile.__base__):
        _fields_ = fields

    monkeypatch.setattr(native_metrics, "_Tile", Drifted)
    with pytest.raises(native_metrics.KernelLayoutError, match="field 1: C rows@8, Python columns@8"):
        native_metrics.check_layout(library)

    class Longer(native_metrics._Tile.__base__):
        _fields_ = (*fields, ("extra", native_metrics.ctypes.c_int64))

    monkeypatch.setattr(native_metrics, "_Tile", Longer)
    with pytest.raises(native_metrics.KernelLayoutError, match=rf"C has {len(fields)} fields, Python {len(fields) + 1}.*sizeof\(Tile\)"):
        native_metrics.check_layout(library)


def test_an_enum_that_drifted_is_refused_at_load(monkeypatch):
    monkeypatch.setattr(native_metrics, "COUNT_NAMES", native_metrics.COUNT_NAMES[:-1])
    with pytest.raises(native_metrics.KernelLayoutError, match="NUM_COUNTS: C 5, Python 4"):
        native_metrics.check_layout(native_metrics.load_kernel())
