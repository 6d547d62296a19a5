"""Drawing explanations (pair, ranked list, average maps) and tools/visualize_decomposition.py: PNG,
JSON and HTML files on a tiny synthetic dataset, the output-folder policy, and bad inputs reported
instead of drawn as blank figures."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import torch
from explain_fixtures import tiny_setup
from matplotlib.colors import to_rgb
from PIL import Image

from torchreid_attrimeter.attributes import get_schema
from torchreid_attrimeter.explain import Explainer
from torchreid_attrimeter.report import (
    ImageRecord,
    ReportFolderError,
    build_report_html,
    prepare_output_dir,
    write_report,
)
from torchreid_attrimeter.visualize import (
    LABELLED_EDGE,
    LABELLED_MARK,
    MATCH_COLOURS,
    UNKNOWN_COLOUR,
    EmptyFigureError,
    draw_average_maps,
    draw_pair,
    draw_ranking,
    figure_png_bytes,
)

SCHEMA = get_schema("market1501")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


@pytest.fixture(scope="module")
def explainer(setup):
    return Explainer.from_checkpoint(setup.checkpoint, device="cpu")


@pytest.fixture(scope="module")
def split(setup):
    loaders = setup.engine.datamanager.test_loader["synthetic_attr"]
    return loaders["query"].dataset.data, loaders["gallery"].dataset.data


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def _is_not_blank(png: bytes) -> bool:
    return float(_pixels(png).std()) > 5.0


def test_pair_figure_has_both_images_the_top_maps_on_both_and_grouped_share_bars(explainer, split):
    query, gallery = split
    explanation = explainer.explain(query[0][0], gallery[0][0])
    figure = draw_pair(explanation, k=2)
    image_axes = [axis for axis in figure.axes if axis.images]
    assert len(image_axes) == 2 + 2 * 2
    bars = next(axis for axis in figure.axes if axis.patches and not axis.images)
    labels = [label.get_text().rstrip(" *") for label in bars.get_xticklabels()]
    assert labels == [name for members in SCHEMA.groups.values() for name in members]
    heights = [patch.get_height() for patch in bars.patches]
    shares = {part.name: part.share * 100 for part in explanation.attributes()}
    assert heights == pytest.approx([shares[name] for name in labels], rel=1e-5)
    assert f"{explanation.target_distance:.4f}" in figure._suptitle.get_text()
    top_titles = [axis.get_title(loc="left") for axis in image_axes if axis.get_title(loc="left")]
    assert [title.split()[1] for title in top_titles] == [part.name for part in explanation.top(2)]
    assert _is_not_blank(figure_png_bytes(figure))


def _labelled_pair(explainer, split, known_b=None):
    """An explanation of two test images with labels: gender, hat and upred differ (upred's label
    unknown in image b when ``known_b`` says so)."""
    query, gallery = split
    labels_a = np.zeros(SCHEMA.num_attributes, np.float32)
    labels_b = labels_a.copy()
    labels_b[[SCHEMA.attributes.index(name) for name in ("gender", "hat", "upred")]] = 1.0
    known = np.ones(SCHEMA.num_attributes, bool) if known_b is None else known_b
    return explainer.explain(query[0][0], gallery[0][0], labels_a=labels_a, labels_b=(labels_b, known))


def _bar_axis(figure):
    return next(axis for axis in figure.axes if axis.patches and not axis.images)


def test_pair_figure_marks_the_attributes_whose_labels_differ(explainer, split):
    known_b = np.ones(SCHEMA.num_attributes, bool)
    known_b[SCHEMA.attributes.index("upred")] = False
    explanation = _labelled_pair(explainer, split, known_b)
    figure = draw_pair(explanation, k=3)
    bars = _bar_axis(figure)
    ticks = {label.get_text().split()[0]: label for label in bars.get_xticklabels()}
    marked = sorted(name for name, label in ticks.items() if LABELLED_MARK in label.get_text())
    assert marked == ["gender", "hat"]  # upred differs too, but b's label is unknown
    assert all(ticks[name].get_fontweight() == "bold" for name in marked)
    assert ticks["upred"].get_color() == UNKNOWN_COLOUR and ticks["up"].get_fontweight() == "normal"
    names = [label.get_text().split()[0] for label in bars.get_xticklabels()]
    for name, patch in zip(names, bars.patches):
        edged = patch.get_linewidth() > 1.0 and np.allclose(patch.get_edgecolor()[:3], to_rgb(LABELLED_EDGE))
        assert edged == (name in marked), name
    assert "labels differ" in figure._suptitle.get_text() and "gender" in figure._suptitle.get_text()
    texts = [text.get_text() for axis in figure.axes for text in axis.texts] + [
        axis.get_title(loc="left") for axis in figure.axes]
    top = explanation.top(3)
    for part in top:  # each map panel names its share as a multiple of the even share
        assert any(title.startswith(f"#{top.index(part) + 1} {part.name}") and f"{part.times_even:.1f}\u00d7 even"
                   in title for title in texts)
    json.loads(json.dumps(explanation.to_dict(), allow_nan=False))


def test_pair_figure_draws_shares_against_the_even_share(explainer, split):
    explanation = _labelled_pair(explainer, split)
    figure = draw_pair(explanation)
    bars = _bar_axis(figure)
    even = 100.0 / SCHEMA.num_attributes
    assert any(np.allclose(line.get_ydata(), even) for line in bars.get_lines())
    for patch in bars.patches:
        faded = patch.get_alpha() is not None and patch.get_alpha() < 1.0
        above = patch.get_height() > even * (1 + 1e-6)
        assert faded == (not above)
    ratios = [text.get_text() for text in bars.texts]
    expected = [f"{part.times_even:.1f}\u00d7" for part in explanation.attributes() if part.times_even >= 1.5]
    assert sorted(ratios) == sorted(expected)
    assert any("even share 1/26" in text.get_text() for text in bars.get_legend().get_texts())


def test_pair_figure_without_labels_has_no_label_marks(explainer, split):
    query, gallery = split
    figure = draw_pair(explainer.explain(query[0][0], gallery[0][0]))
    texts = [label.get_text() for label in _bar_axis(figure).get_xticklabels()] + [figure._suptitle.get_text()]
    texts += [text.get_text() for text in _bar_axis(figure).get_legend().get_texts()]
    assert not any(LABELLED_MARK in text for text in texts) and "labels differ" not in " ".join(texts)
    assert all(patch.get_linewidth() <= 1.0 for patch in _bar_axis(figure).patches)


def test_ranked_list_figure_marks_true_and_false_matches(explainer, split):
    query, gallery = split
    query_path, query_pid = query[0][:2]
    ranking = explainer.explain_ranking(query_path, [item[0] for item in gallery], topk=6, query_pid=query_pid,
                                        gallery_pids=[item[1] for item in gallery])
    figure = draw_ranking(ranking)
    gallery_axes = figure.axes[1:]
    assert len(gallery_axes) == 6
    for axis, match in zip(gallery_axes, ranking.matches):
        edge = axis.spines["top"].get_edgecolor()
        assert np.allclose(edge[:3], np.array(Image.new("RGB", (1, 1), MATCH_COLOURS[match]).getpixel((0, 0))) / 255)
    for axis, explanation in zip(gallery_axes, ranking.explanations):
        text = axis.texts[0].get_text()
        assert [line.split()[0] for line in text.splitlines()] == [part.name for part in explanation.top(3)]
        assert f"{explanation.target_distance:.3f}" in axis.get_title()
    assert True in ranking.matches and False in ranking.matches
    assert _is_not_blank(figure_png_bytes(figure))


def test_average_maps_figure_shows_with_and_without_for_every_attribute(explainer, split):
    _, gallery = split
    paths = [item[0] for item in gallery[:6]]
    labels = torch.tensor(np.stack([[1.0] * 13 + [0.0] * 13] * 3 + [[0.0] * 13 + [1.0] * 13] * 3))
    figure = draw_average_maps(explainer.average_maps(paths, labels))
    assert len([axis for axis in figure.axes if axis.images]) == 2 * SCHEMA.num_attributes
    assert _is_not_blank(figure_png_bytes(figure))


def test_explanations_with_non_finite_numbers_are_refused_not_drawn_blank(explainer):
    explanation = explainer.explain(np.zeros((64, 32, 3), np.uint8), np.ones((64, 32, 3), np.uint8))
    explanation.attribute_components = explanation.attribute_components.clone()
    explanation.attribute_components[0] = float("nan")
    with pytest.raises(EmptyFigureError, match="NaN"):
        draw_pair(explanation)


def test_a_figure_that_cannot_be_written_leaves_the_previous_file_and_names_the_path(explainer, tmp_path,
                                                                                    monkeypatch):
    import errno

    from torchreid_attrimeter import visualize

    figure = draw_pair(explainer.explain(np.zeros((64, 32, 3), np.uint8), np.ones((64, 32, 3), np.uint8)))
    path = tmp_path / "figures" / "pair.png"
    assert visualize.save_figure(figure, path) == str(path) and _is_not_blank(path.read_bytes())
    before = path.read_bytes()

    class FullDisk(io.BytesIO):
        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(visualize, "open", lambda *args, **kwargs: FullDisk(), raising=False)  # it only writes
    with pytest.raises(OSError, match="pair.png") as caught:
        visualize.save_figure(figure, path)
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and os.listdir(path.parent) == ["pair.png"]


def test_tool_writes_pngs_jsons_and_one_self_contained_html(report_tool, setup, split, tmp_path, capsys):
    output = tmp_path / "report"
    query = split[0]
    code = report_tool.main(["--checkpoint", setup.checkpoint, "--dataset", "synthetic_attr", "--root", setup.root,
                      "--queries", "0", os.path.basename(query[3][0]), "--topk", "3",
                      "--average-maps-images", "8", "--output", str(output)])
    assert code == 0, capsys.readouterr().err
    names = sorted(os.listdir(output))
    assert {"index.html", "query-001.json", "query-002.json", "query-001_ranking.png", "query-002_rank-03.png",
            "average_maps.png", "average_maps.json"} <= set(names)
    assert len([name for name in names if name.endswith(".png")]) == 2 * (1 + 3) + 1
    for name in names:
        if name.endswith(".png"):
            assert _is_not_blank((output / name).read_bytes()), name
    record = json.loads((output / "query-002.json").read_text())
    assert record["query"] == query[3][0] and len(record["ranked"]) == 3
    assert [entry["name"] for entry in record["ranked"][0]["attributes"]] == list(SCHEMA.attributes)
    # The dataset has labels of the interpreter's schema: both images' labels reach every ranked pair.
    for entry in record["ranked"]:
        for attribute in entry["attributes"]:
            assert isinstance(attribute["labelled_difference"], bool)
            assert attribute["labelled_difference"] == (attribute["label_a"] != attribute["label_b"])
    page = (output / "index.html").read_text()
    differing = sum(attribute["labelled_difference"] for entry in record["ranked"] for attribute in entry["attributes"])
    assert differing > 0 and page.count('data-labelled="differs"') >= differing
    assert 'data-labelled="none"' not in page
    assert page.count('class="query"') == 2 and page.count('class="item pair"') == 6
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    assert page.count("data:image/png;base64,") >= 2 * (1 + 3 + 3) + 2


def test_tool_from_a_config_takes_the_latest_checkpoint_and_random_queries(report_tool, setup, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(
        f"model:\n  name: osnet_x0_25\n  load_weights: {setup.target_weights}\n"
        f"data:\n  root: {setup.root}\n  sources: [synthetic_attr]\n  targets: [synthetic_attr]\n"
        f"  height: 64\n  width: 32\n  save_dir: {os.path.dirname(os.path.dirname(setup.checkpoint))}\n"
    )
    output = tmp_path / "random"
    arguments = ["--config-file", str(config), "--num-queries", "2", "--seed", "7", "--topk", "2",
                 "--average-maps-images", "0", "--output", str(output)]
    assert report_tool.main(arguments) == 0, capsys.readouterr().err
    first = [json.loads((output / f"query-00{n}.json").read_text())["query"] for n in (1, 2)]
    assert not os.path.exists(output / "average_maps.png")
    assert report_tool.main(arguments[:-1] + [str(tmp_path / "again")]) == 0
    again = [json.loads((tmp_path / "again" / f"query-00{n}.json").read_text())["query"] for n in (1, 2)]
    assert first == again  # the seed fixes the random queries


def test_an_existing_report_is_never_overwritten_silently(report_tool, setup, tmp_path, capsys):
    output = tmp_path / "report"
    arguments = ["--checkpoint", setup.checkpoint, "--dataset", "synthetic_attr", "--root", setup.root,
                 "--queries", "1", "--topk", "1", "--average-maps-images", "0", "--output", str(output)]
    assert report_tool.main(arguments) == 0
    before = (output / "index.html").read_bytes()
    assert report_tool.main(arguments) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "index.html").read_bytes() == before
    assert report_tool.main(arguments + ["--new-folder"]) == 0
    assert (tmp_path / "report-1" / "index.html").is_file()
    assert report_tool.main(arguments + ["--overwrite"]) == 0


def test_a_folder_holding_other_files_is_never_emptied(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ReportFolderError, match="holds no report"):
        prepare_output_dir(tmp_path, overwrite=True)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_an_unreadable_query_image_is_reported_not_drawn(explainer, split, tmp_path):
    _, gallery = split
    corrupt = tmp_path / "0001_c1s1_000001_00.jpg"
    corrupt.write_bytes(b"\xff\xd8 truncated")
    queries = [ImageRecord(str(corrupt), 1, 0), ImageRecord(str(tmp_path / "missing.jpg"), 2, 0),
               ImageRecord(gallery[0][0], gallery[0][1], 5)]
    records = [ImageRecord(item[0], item[1], item[2]) for item in gallery]
    folder = prepare_output_dir(tmp_path / "report")
    files = write_report(explainer, queries, records, folder, topk=2)
    assert files.failed_queries == [str(corrupt), str(tmp_path / "missing.jpg")]
    assert "cannot decode image" in json.loads((tmp_path / "report" / "query-001.json").read_text())["error"]
    assert "not found" in json.loads((tmp_path / "report" / "query-002.json").read_text())["error"]
    assert not any(name.startswith(("query-001_", "query-002_")) for name in os.listdir(folder))
    page = (tmp_path / "report" / "index.html").read_text()
    assert page.count("Could not explain this query") == 2 and page.count('class="item pair"') == 2


def test_a_query_identity_absent_from_the_gallery_is_a_note_in_the_report(explainer, split, tmp_path):
    _, gallery = split
    records = [ImageRecord(item[0], item[1], item[2]) for item in gallery]
    query = ImageRecord(gallery[0][0], 4242, 9)
    files = write_report(explainer, [query], records, prepare_output_dir(tmp_path / "report"), topk=2)
    with open(files.jsons[0], encoding="utf-8") as handle:
        record = json.load(handle)
    assert any("4242" in note and "absent" in note for note in record["notes"])
    with open(files.index, encoding="utf-8") as handle:
        assert "identity 4242 of the query is absent" in handle.read()


def test_an_unreadable_gallery_image_stops_the_report_naming_it(explainer, split, tmp_path):
    _, gallery = split
    records = [ImageRecord(item[0], item[1], item[2]) for item in gallery[:3]]
    records.append(ImageRecord(str(tmp_path / "gone.jpg"), 7, 1))
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        write_report(explainer, records[:1], records, prepare_output_dir(tmp_path / "report"), topk=2)


def test_tool_reports_a_checkpoint_whose_target_weights_are_gone(report_tool, setup, tmp_path, capsys):
    from torchreid_attrimeter import compat

    checkpoint = compat.load_checkpoint(setup.checkpoint)
    checkpoint["attrimeter"]["target"]["weights"] = str(tmp_path / "deleted.pth")
    orphan = tmp_path / "orphan.pth.tar"
    torch.save(checkpoint, orphan)
    code = report_tool.main(["--checkpoint", str(orphan), "--dataset", "synthetic_attr", "--root", setup.root,
                      "--output", str(tmp_path / "report")])
    assert code == 2
    error = capsys.readouterr().err
    assert "deleted.pth" in error and "--target-weights" in error


def test_report_html_marks_labelled_differences_and_the_even_share(explainer, split):
    from torchreid_attrimeter.explain import RankingExplanation
    from torchreid_attrimeter.report import QueryEntry

    labelled = _labelled_pair(explainer, split)
    plain = explainer.explain(split[0][0][0], split[1][0][0])
    ranking = RankingExplanation(query_source="q", query_image=labelled.image_a, explanations=[labelled, plain],
                                 gallery_sources=["g0", "g0"], gallery_indices=[0, 0], matches=[None, None])
    page = build_report_html([QueryEntry(name="q", ranking=ranking)])
    labelled_html, plain_html = page.split('class="item pair"')[1:]
    marked = [name for name in ("gender", "hat", "upred")
              if f'<span class="name">{name}</span><span class="marks">{LABELLED_MARK}' in labelled_html]
    assert marked == ["gender", "hat", "upred"]
    assert 'data-labelled="differs"' in labelled_html and 'data-labelled="same"' in labelled_html
    assert "labels differ: " in labelled_html and LABELLED_MARK not in plain_html
    assert 'data-labelled="none"' in plain_html and "labelled-differs" not in plain_html
    assert plain_html.count('class="even"') == SCHEMA.num_attributes + 5
    ratio = f"{plain.attributes()[0].times_even:.1f}\u00d7"
    assert ratio in plain_html


def test_report_html_without_entries_states_zero_queries():
    page = build_report_html([], info={"checkpoint": "x"})
    assert 'data-queries="0"' in page and "<section" not in page
