"""The model audit (torchreid_attrimeter.audit, audit_output, tools/audit_model.py): the evaluator's
per-query sums (C kernel = torch path = a brute-force reference, the evaluator's own numbers unchanged),
a hand-built target whose reliance is known, blind spots, the bootstrap comparison, bad input, and the
tool end to end on a tiny interpreter checkpoint."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from explain_fixtures import tiny_setup

from torchreid_attrimeter.attributes import get_schema
from torchreid_attrimeter.audit import AuditAccumulator, AuditError, AuditRun, compare_audits
from torchreid_attrimeter.audit_output import (
    AuditFolderError,
    format_audit,
    prepare_audit_folder,
    write_audit,
)
from torchreid_attrimeter.decomposition import Decomposition
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.evaluation import ExplanationEvaluator, definitions, native_metrics

NAMES = get_schema("market1501").attributes
M = len(NAMES)
EVEN = 1.0 / M


def random_split(size, seed, num_attributes=7, num_ids=10, dim=6):
    generator = torch.Generator().manual_seed(seed)
    pids = torch.randint(0, num_ids, (size,), generator=generator)
    attribute_embeddings = torch.randint(-2, 3, (size, num_attributes, dim), generator=generator).float()
    labels = (torch.rand(num_ids, num_attributes, generator=torch.Generator().manual_seed(99)) > 0.5).float()
    return {"decomposition": Decomposition(attribute_embeddings.mean(1) + 0.05 * torch.randn(size, dim, generator=generator),
                                           attribute_embeddings),
            "pids": pids, "camids": torch.randint(0, 3, (size,), generator=generator),
            "attributes": labels[pids], "known": torch.rand(size, num_attributes, generator=generator) < 0.8}


def evaluate(query, gallery, num_attributes=7, per_query=True, **options):
    evaluator = ExplanationEvaluator(per_query=per_query, attribute_names=[f"a{index}" for index in range(num_attributes)], progress=False,
                                     **options)
    for split, data in (("query", query), ("gallery", gallery)):
        evaluator.process(data["decomposition"], data["pids"], data["camids"], data["attributes"], data["known"],
                          split=split)
    return evaluator.evaluate(), evaluator.query_totals


BACKENDS = [pytest.param(True, id="kernel", marks=pytest.mark.skipif(
    native_metrics.load_kernel() is None, reason="no C compiler")), pytest.param(False, id="torch")]


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
@pytest.mark.parametrize("native", BACKENDS)
@pytest.mark.parametrize("budget", [512.0, 0.01])
def test_per_query_sums_follow_the_definitions_in_both_backends(metric, native, budget):
    query, gallery = random_split(37, 1), random_split(83, 2)
    _, totals = evaluate(query, gallery, metric=metric, native=native, memory_budget_mb=budget)
    splits = [definitions.Split(data["decomposition"], data["pids"], data["camids"], data["attributes"], data["known"])
              for data in (query, gallery)]
    expected = definitions.query_totals(*splits, metric=metric)
    assert totals.pair_counts.tolist() == expected["pair_counts"].tolist()
    torch.testing.assert_close(totals.share_sums, torch.from_numpy(expected["share_sums"]), rtol=0, atol=1e-5)
    assert totals.first_index.tolist() == expected["first_index"].tolist()
    first = totals.first_index
    assert torch.equal(totals.first_correct, gallery["pids"][first] == query["pids"])
    torch.testing.assert_close(totals.first_shares.double(), torch.from_numpy(expected["first_shares"]),
                               rtol=0, atol=1e-6)


@pytest.mark.skipif(native_metrics.load_kernel() is None, reason="no C compiler")
def test_kernel_and_torch_path_sums_agree():
    query, gallery = random_split(50, 3, num_attributes=26), random_split(140, 4, num_attributes=26)
    _, kernel = evaluate(query, gallery, 26, native=True)
    _, torch_path = evaluate(query, gallery, 26, native=False, memory_budget_mb=0.02)
    assert torch.equal(kernel.pair_counts, torch_path.pair_counts)
    torch.testing.assert_close(kernel.share_sums, torch_path.share_sums, rtol=0, atol=1e-5)
    for name in ("first_index", "first_correct", "valid", "first_match"):
        assert torch.equal(getattr(kernel, name), getattr(torch_path, name)), name


@pytest.mark.parametrize("native", BACKENDS)
def test_per_query_leaves_the_evaluators_numbers_bit_identical(native):
    query, gallery = random_split(40, 5), random_split(90, 6)
    plain, none = evaluate(query, gallery, native=native, per_query=False)
    audited, totals = evaluate(query, gallery, native=native, per_query=True)
    assert none is None and totals is not None
    assert plain == audited


def test_per_query_needs_every_pair():
    with pytest.raises(ValueError, match="pairs='all'"):
        ExplanationEvaluator(["a"], pairs="topk", per_query=True)
    with pytest.raises(AuditError, match="every pair"):
        AuditAccumulator(["a"], pairs="topk")


# --- a hand-built target whose reliance is known --------------------------------------------------------

SEEN = NAMES.index("upred")


def seeing_only(seen: int, seed: int = 0, num_ids: int = 24, with_labels: bool = True, name: str = "upred-only"):
    """The audit of a target that sees one attribute: its attribute embeddings carry that attribute's
    label (scaled) plus noise, every other attribute only a little noise, so the seen attribute's
    component carries the distance whenever its label differs."""
    generator = torch.Generator().manual_seed(seed)
    labels = (torch.rand(num_ids, M, generator=torch.Generator().manual_seed(7)) > 0.5).float()
    accumulator = AuditAccumulator(NAMES, progress=False)
    for split, size in (("query", 60), ("gallery", 240)):
        pids = torch.randint(0, num_ids, (size,), generator=generator)
        embeddings = 0.05 * torch.randn(size, M, 16, generator=generator)
        embeddings[:, seen] = 3.0 * labels[pids, seen][:, None] + 0.5 * torch.randn(size, 16, generator=generator)
        decomposition = Decomposition(embeddings.mean(1), embeddings)
        accumulator.process(decomposition, pids, torch.randint(0, 3, (size,), generator=generator),
                            labels[pids] if with_labels else None, split=split,
                            paths=[f"{split}/{index}.jpg" for index in range(size)])
    return accumulator.finish(name)


@pytest.fixture(scope="module")
def upred_audit():
    return seeing_only(SEEN)


def test_the_seen_attribute_tops_the_reliance_table_and_the_others_stay_below_the_even_share(upred_audit):
    record = upred_audit.to_dict()
    for measure in ("true_matches", "all_pairs", "rank1_errors", "same_camera", "different_camera"):
        reliance = record["reliance"][measure]
        assert reliance["upred"] > 5 * EVEN, measure
        assert all(value < EVEN for name, value in reliance.items() if name != "upred"), measure
    for measure in ("true_matches", "all_pairs", "rank1_errors"):
        assert record["reliance_order"][measure][0] == "upred"
    assert record["sensitivity"]["share_auc"]["upred"] > 0.95
    # The target confuses people who differ in everything but the red top: those are blind spots.
    blind = record["blind_spots"]
    assert "upred" not in blind["attributes"] and "hat" in blind["attributes"]
    examples = blind["per_attribute"]["hat"]["examples"]
    assert examples and all(example["share"] < EVEN for example in examples)
    assert [example["share"] for example in examples] == sorted(example["share"] for example in examples)
    assert examples[0]["query_path"].startswith("query/") and examples[0]["gallery_path"].startswith("gallery/")


def test_worst_queries_come_first_with_their_rank1_explanation(upred_audit):
    worst = upred_audit.to_dict()["worst_queries"]
    ranks = [entry["first_true_match_rank"] for entry in worst]
    assert ranks == sorted(ranks, reverse=True) and len(worst) == 10
    assert worst[0]["top_attributes"][0]["name"] == "upred"
    assert {"name", "share", "times_even_share", "labels_differ"} <= set(worst[0]["top_attributes"][0])


def test_without_labels_the_share_parts_run_and_the_others_say_why():
    audit = seeing_only(SEEN, with_labels=False)
    record = audit.to_dict()
    assert record["reliance_order"]["all_pairs"][0] == "upred"
    for part in ("sensitivity", "blind_spots"):
        assert record[part]["available"] is False and "no attribute labels" in record[part]["reason"]
    assert "not available" in format_audit(AuditRun([audit], {"name": "unlabelled"}))


def test_comparison_gives_a_verdict_only_where_the_interval_excludes_zero(upred_audit):
    hat = seeing_only(NAMES.index("hat"), name="hat-only")
    comparison = compare_audits([upred_audit, hat], resamples=200, seed=1)
    entries = comparison.differences["hat-only"]["all_pairs"]
    assert entries["upred"]["verdict"] == "lower" and entries["upred"]["high"] < 0
    assert entries["hat"]["verdict"] == "higher" and entries["hat"]["low"] > 0
    for entry in entries.values():
        assert entry["low"] <= entry["difference"] <= entry["high"]
        assert (entry["verdict"] is None) == (entry["low"] <= 0 <= entry["high"])
    again = compare_audits([upred_audit, hat], resamples=200, seed=1)
    assert again.differences == comparison.differences  # seeded
    same = compare_audits([upred_audit, seeing_only(SEEN, name="copy")], resamples=200)
    assert all(entry["verdict"] is None for measure in same.differences["copy"].values() for entry in measure.values())


def test_interpreters_of_different_schemas_or_data_are_not_compared(upred_audit):
    accumulator = AuditAccumulator(NAMES[:-1], progress=False)
    for split in ("query", "gallery"):
        accumulator.process(Decomposition(torch.randn(8, 4), torch.randn(8, M - 1, 4)), torch.arange(8),
                            torch.zeros(8), split=split)
    other = accumulator.finish("duke-like")
    with pytest.raises(AuditError, match="'upred-only' and 'duke-like' explain different attribute schemas") as error:
        compare_audits([upred_audit, other])
    assert isinstance(error.value, AttriMeterError) and isinstance(error.value, ValueError)
    with pytest.raises(AuditError, match="different query sets"):
        compare_audits([upred_audit, seeing_only(SEEN, seed=5, name="other-data")])
    with pytest.raises(AuditError, match="distinct names"):
        compare_audits([upred_audit, upred_audit])


def test_outputs_are_written_once_and_never_over_a_folder(tmp_path, upred_audit):
    hat = seeing_only(NAMES.index("hat"), name="hat-only")
    run = AuditRun([upred_audit, hat], {"name": "hand-built"}, compare_audits([upred_audit, hat], resamples=50))
    files = write_audit(run, tmp_path / "audit")
    data = json.loads(Path(files.json).read_text())
    assert data["format"] == "attrimeter-audit/1" and [entry["name"] for entry in data["interpreters"]] == [
        "upred-only", "hat-only"]
    assert sorted(os.listdir(files.folder)) == sorted(
        ["audit.json", "index.html", "summary.txt", "summary.md", "reliance-1.png", "reliance-2.png", "sensitivity.png",
         "comparison.png"])
    assert os.listdir(tmp_path) == ["audit"]  # no staging folder left behind
    table = (Path(files.folder) / "summary.md").read_text().splitlines()
    assert len(table) == 2 + M and "**lower**" in next(line for line in table if line.startswith("| upred "))
    page = Path(files.html).read_text()
    assert 'id="model-audit"' in page and page.count('<tr data-attribute=') == 2 * M
    with pytest.raises(AuditFolderError, match="never overwrites"):
        write_audit(run, tmp_path / "audit")
    assert prepare_audit_folder(tmp_path / "audit", new_folder=True) == str(tmp_path / "audit-1")
    (tmp_path / "empty").mkdir()
    assert prepare_audit_folder(tmp_path / "empty") == str(tmp_path / "empty")


# --- the tool on a tiny interpreter checkpoint -----------------------------------------------------------


@pytest.fixture(scope="module")
def audit_tool():
    path = Path(__file__).resolve().parent.parent / "tools" / "audit_model.py"
    spec = importlib.util.spec_from_file_location("audit_model", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


def tool_arguments(setup, output, *extra, checkpoints=None):
    return ["--checkpoint", *(checkpoints or [setup.checkpoint]), "--dataset", "synthetic_attr", "--root", setup.root,
            "--output", str(output), "--average-maps-images", "8", "--resamples", "50", "--no-progress",
            "--device", "cpu", *extra]


def test_the_tool_audits_and_compares_interpreters(audit_tool, setup, tmp_path, capsys):
    output = tmp_path / "audit"
    status = audit_tool.main(tool_arguments(setup, output, "--name", "first", "second", "--average-maps-images", "0",
                                            checkpoints=[setup.checkpoint, setup.checkpoint]))
    assert status == 0
    printed = capsys.readouterr().out
    assert "== first ==" in printed and "comparison against first" in printed
    data = json.loads((output / "audit.json").read_text())
    assert data["dataset"]["attribute_labels"] is True and data["dataset"]["queries"] > 0
    first = data["interpreters"][0]
    assert first["where"]["available"] is False and first["sensitivity"]["available"]
    assert abs(sum(value for value in first["reliance"]["all_pairs"].values()) - 1.0) < 1e-4
    # The same checkpoint twice: no attribute differs.
    differences = data["comparison"]["differences"]["second"]
    assert all(entry["verdict"] is None for entries in differences.values() for entry in entries.values())
    assert {"reliance-1.png", "reliance-2.png", "comparison.png", "index.html"} <= set(os.listdir(output))


def test_the_tool_on_data_without_labels(audit_tool, setup, tmp_path, capsys):
    # torchreid's own market1501 reader over the synthetic images: the same pictures, no attribute labels.
    root = tmp_path / "plain"
    root.mkdir()
    os.symlink(os.path.join(setup.root, "synthetic_attr"), root / "market1501")
    arguments = tool_arguments(setup, tmp_path / "audit", "--average-maps-images", "4")
    arguments[arguments.index("synthetic_attr")] = "market1501"
    arguments[arguments.index(setup.root)] = str(root)
    assert audit_tool.main(arguments) == 0
    data = json.loads((tmp_path / "audit" / "audit.json").read_text())
    assert data["dataset"]["attribute_labels"] is False and "no attribute labels" in data["dataset"]["labels_missing"]
    assert data["interpreters"][0]["blind_spots"]["available"] is False
    # Without labels the mean map is over every sampled image (the 'with' side).
    where = data["interpreters"][0]["where"]
    assert where["images"] == 4 and where["attributes"]["hat"]["images_with"] == 4 and len(where["map_size"]) == 2
    assert (tmp_path / "audit" / "maps-1.png").is_file()
    assert "no attribute labels" in capsys.readouterr().out


def test_the_tool_refuses_bad_input_with_one_error_line(audit_tool, setup, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("mine")
    assert audit_tool.main(tool_arguments(setup, taken)) == 2
    assert capsys.readouterr().err.startswith("error: the output folder") and (taken / "notes.txt").read_text() == "mine"

    changed = tmp_path / "changed.pth"
    changed.write_bytes(Path(setup.target_weights).read_bytes() + b"changed")
    assert audit_tool.main(tool_arguments(setup, tmp_path / "a", "--target-weights", str(changed))) == 2
    assert "are not the ones the interpreter" in capsys.readouterr().err

    checkpoint = torch.load(setup.checkpoint, weights_only=False)
    checkpoint["attrimeter"]["attribute_names"] = [f"other_{name}" for name in checkpoint["attrimeter"]["attribute_names"]]
    checkpoint["attrimeter"]["schema"] = "other"
    other = tmp_path / "other" / "model" / "model.pth.tar-1"
    other.parent.mkdir(parents=True)
    torch.save(checkpoint, other)
    assert audit_tool.main(tool_arguments(setup, tmp_path / "b", checkpoints=[setup.checkpoint, str(other)])) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "explain different attribute schemas" in error and str(other) in error
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_tool_takes_the_latest_checkpoint_and_the_dataset_from_a_config(audit_tool, setup, tmp_path):
    from tiny_run import tiny_config

    cfg = tiny_config(setup.root, setup.target_weights, os.path.dirname(os.path.dirname(setup.checkpoint)),
                      name="osnet_x0_25")
    config = tmp_path / "audit.yaml"
    config.write_text(cfg.dump())
    output = tmp_path / "audit"
    assert audit_tool.main(["--config-file", str(config), "--output", str(output), "--average-maps-images", "0",
                            "--no-progress", "--device", "cpu", "--worst-queries", "2"]) == 0
    data = json.loads((output / "audit.json").read_text())
    assert data["interpreters"][0]["source"]["checkpoint"] == os.path.abspath(setup.checkpoint)
    assert data["dataset"]["name"] == "synthetic_attr" and len(data["interpreters"][0]["worst_queries"]) == 2


def test_the_benchmark_runs_and_keeps_the_evaluators_numbers():
    path = Path(__file__).resolve().parent.parent / "tools" / "benchmark_audit.py"
    spec = importlib.util.spec_from_file_location("benchmark_audit", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    report = module.main(["--quick", "--num-query", "60", "--num-gallery", "200", "--repeats", "1"])
    assert report["evaluator_numbers_identical"] and report["audit_over_evaluator"] > 0
