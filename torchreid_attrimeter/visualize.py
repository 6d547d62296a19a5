"""Drawing explanations with matplotlib (Agg canvas, no pyplot, so no global backend is changed):
a pair figure, a ranked-list figure and dataset-level average maps. Computing happens in
``torchreid_attrimeter.explain``; these functions only take its results."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from torchreid_attrimeter.explain import AverageMaps, Explanation, RankingExplanation

MATCH_COLOURS = {True: "#1a9850", False: "#d73027", None: "#9e9e9e"}
GROUP_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#bab0ac")
MAP_COLORMAP = "jet"


class EmptyFigureError(ValueError):
    """Nothing meaningful to draw (non-finite numbers or no items): refused instead of a blank figure."""


# --- helpers ---------------------------------------------------------------------------------------------


def new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike, dpi: int = 100) -> str:
    """Write the figure as PNG (folders created) and return the path. The PNG is written next to
    ``path`` and renamed onto it when complete, so a failed write (full disk, ...) leaves no partial
    file and any previous file as it was; the error names ``path``."""
    path = os.fspath(path)
    png = figure_png_bytes(figure, dpi)
    partial = f"{path}.partial-{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(partial, "wb") as handle:
            handle.write(png)
        os.replace(partial, path)
    except OSError as error:
        if os.path.lexists(partial):
            os.remove(partial)
        raise OSError(error.errno, f"cannot write the figure '{path}': {error.strerror or error}") from error
    return path


def figure_png_bytes(figure: Figure, dpi: int = 100) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight", dpi=dpi)
    return buffer.getvalue()


def upsample_map(attention_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """(h, w) map -> (H, W) bilinear upsampling, as a float numpy array."""
    upsampled = torch.nn.functional.interpolate(attention_map[None, None].float(), size=size, mode="bilinear",
                                                align_corners=False)
    return upsampled[0, 0].numpy()


def overlay_map(image: np.ndarray, attention_map: np.ndarray, low: float, high: float,
                alpha: float = 0.5) -> np.ndarray:
    """Blend a map (H, W), scaled from [low, high] to the colormap, over an image (H, W, 3) uint8."""
    scaled = np.clip((attention_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    coloured = colormaps[MAP_COLORMAP](scaled)[..., :3]
    return np.clip((1 - alpha) * image / 255.0 + alpha * coloured, 0.0, 1.0)


def group_colours(groups: Sequence[str]) -> dict[str, str]:
    return {group: GROUP_COLOURS[index % len(GROUP_COLOURS)] for index, group in enumerate(groups)}


def _check_drawable(explanation: Explanation) -> None:
    values = torch.cat([explanation.attribute_components.flatten(), explanation.maps_a.flatten(),
                        explanation.maps_b.flatten(), torch.tensor([explanation.target_distance])])
    if not bool(torch.isfinite(values).all()):
        raise EmptyFigureError(
            f"the explanation of '{explanation.source_a}' vs '{explanation.source_b}' holds NaN or infinite "
            f"values (broken checkpoint or inputs?): nothing meaningful to draw"
        )


def _hide_axes(axis) -> None:
    axis.set_xticks([])
    axis.set_yticks([])


# --- pair figure ---------------------------------------------------------------------------------------------


def draw_pair(explanation: Explanation, k: int = 3, title: str | None = None) -> Figure:
    """Both images, the top-k attributes' maps upsampled over both, and a bar chart of all shares
    grouped by attribute group, with the target and reconstructed distances."""
    _check_drawable(explanation)
    k = max(1, min(int(k), explanation.num_attributes))
    top = explanation.top(k)
    columns = 2 + 2 * k
    height, width = explanation.image_a.shape[:2]
    # Size the image row to the pictures' aspect ratio, so no empty band separates it from the bars.
    figure_width = max(9.0, 1.25 * columns)
    image_row = 0.775 * figure_width / columns * height / max(width, 1)
    bar_row = 2.6
    figure = new_figure(figure_width, image_row + bar_row + 2.2)
    grid = figure.add_gridspec(2, columns, height_ratios=(image_row, bar_row), hspace=0.12, wspace=0.08)

    for column, (image, label) in enumerate(((explanation.image_a, "image A"), (explanation.image_b, "image B"))):
        axis = figure.add_subplot(grid[0, column])
        axis.imshow(image)
        axis.set_title(label, fontsize=9)
        _hide_axes(axis)

    for rank, part in enumerate(top):
        index = explanation.attribute_names.index(part.name)
        map_a = upsample_map(explanation.maps_a[index], (height, width))
        map_b = upsample_map(explanation.maps_b[index], (height, width))
        # One scale for both images, so a hotter region means more attention in either image.
        low, high = float(min(map_a.min(), map_b.min())), float(max(map_a.max(), map_b.max()))
        for side, (image, attention) in enumerate(((explanation.image_a, map_a), (explanation.image_b, map_b))):
            axis = figure.add_subplot(grid[0, 2 + 2 * rank + side])
            axis.imshow(overlay_map(image, attention, low, high))
            _hide_axes(axis)
            if side == 0:
                mark = " *" if part.differs else ""
                axis.set_title(f"#{rank + 1} {part.name}{mark}\n{part.share:.1%}", fontsize=9, loc="left")

    _draw_share_bars(figure.add_subplot(grid[1, :]), explanation)
    heading = title or f"{os.path.basename(explanation.source_a)} vs {os.path.basename(explanation.source_b)}"
    figure.suptitle(
        f"{heading}\n{explanation.metric} distance {explanation.target_distance:.4f}  (interpreter "
        f"{explanation.reconstructed_distance:.4f}, relative error {explanation.relative_error:.1%})",
        fontsize=10,
    )
    return figure


def _draw_share_bars(axis, explanation: Explanation) -> None:
    """All shares in schema-group order, one colour per group; * marks predicted differences."""
    parts = {part.name: part for part in explanation.attributes()}
    colours = group_colours(list(explanation.attribute_groups))
    names, shares, bar_colours = [], [], []
    for group, members in explanation.attribute_groups.items():
        for name in members:
            if name in parts:
                names.append(name + (" *" if parts[name].differs else ""))
                shares.append(parts[name].share * 100.0)
                bar_colours.append(colours[group])
    positions = np.arange(len(names))
    axis.bar(positions, shares, color=bar_colours)
    axis.axhline(100.0 / explanation.num_attributes, color="#555555", linewidth=0.8, linestyle="--")
    axis.set_xticks(positions)
    axis.set_xticklabels(names, rotation=70, ha="right", fontsize=7)
    axis.set_xlim(-0.6, len(names) - 0.4)
    # Head room above the tallest bar for the legend.
    axis.set_ylim(0.0, max(max(shares), 100.0 / explanation.num_attributes) * 1.4)
    axis.set_ylabel("share of distance (%)", fontsize=8)
    axis.tick_params(axis="y", labelsize=7)
    legend = [Patch(color=colours[group], label=group) for group in explanation.attribute_groups]
    legend.append(Patch(facecolor="none", edgecolor="none", label="-- uniform 1/M" +
                        ("   * predicted to differ" if explanation.predicted_difference is not None else "")))
    axis.legend(handles=legend, fontsize=7, ncol=min(len(legend), 4), loc="upper right", frameon=False)


# --- ranked-list figure ---------------------------------------------------------------------------------------


def draw_ranking(ranking: RankingExplanation, attributes_per_item: int = 3, title: str | None = None) -> Figure:
    """The query and its top-k gallery items (green/red borders for true/false matches when
    identities are known), each with its distance and its top attributes."""
    if len(ranking) == 0:
        raise EmptyFigureError(f"the ranking of '{ranking.query_source}' has no gallery items to draw")
    for explanation in ranking.explanations:
        _check_drawable(explanation)
    columns = 1 + len(ranking)
    height, width = ranking.query_image.shape[:2]
    figure_width = max(4.0, 1.45 * columns)
    image_row = 0.775 * figure_width / columns * height / max(width, 1)
    figure = new_figure(figure_width, image_row + 1.4 + 0.3 * len(ranking.notes))
    grid = figure.add_gridspec(1, columns, wspace=0.12)

    axis = figure.add_subplot(grid[0, 0])
    axis.imshow(ranking.query_image)
    _hide_axes(axis)
    query_label = "query" + (f"\nid {ranking.query_pid}" if ranking.query_pid is not None else "")
    axis.set_title(query_label, fontsize=9)
    for spine in axis.spines.values():
        spine.set_edgecolor("#000000")
        spine.set_linewidth(2)

    for rank, explanation in enumerate(ranking.explanations):
        axis = figure.add_subplot(grid[0, rank + 1])
        axis.imshow(explanation.image_b)
        _hide_axes(axis)
        colour = MATCH_COLOURS[ranking.matches[rank]]
        for spine in axis.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(4)
        axis.set_title(f"#{rank + 1}  d={explanation.target_distance:.3f}", fontsize=8, color=colour)
        lines = [f"{part.name} {part.share:.0%}" for part in explanation.top(attributes_per_item)]
        axis.text(0.5, -0.04, "\n".join(lines), transform=axis.transAxes, ha="center", va="top", fontsize=7)

    heading = title or os.path.basename(ranking.query_source)
    notes = ("\n" + "; ".join(ranking.notes)) if ranking.notes else ""
    figure.suptitle(f"{heading}: top-{len(ranking)} of {ranking.gallery_size} by target distance{notes}",
                    fontsize=9)
    return figure


# --- dataset-level average maps ---------------------------------------------------------------------------------


def draw_average_maps(average: AverageMaps, attributes_per_row: int = 7) -> Figure:
    """Per attribute, the mean map over images with the attribute next to the mean over images
    without it, on one colour scale per attribute."""
    if not bool(torch.isfinite(average.with_attribute).all() and torch.isfinite(average.without_attribute).all()):
        raise EmptyFigureError("the average maps hold NaN or infinite values: nothing meaningful to draw")
    if int(average.with_count.sum() + average.without_count.sum()) == 0:
        raise EmptyFigureError("no image has a known label for any attribute: no average maps to draw")
    count = len(average.attribute_names)
    per_row = max(1, min(attributes_per_row, count))
    rows = math.ceil(count / per_row)
    map_height, map_width = average.with_attribute.shape[-2:]
    panel_width = 0.9
    panel_height = panel_width * map_height / max(map_width, 1)
    figure = new_figure(max(6.0, 2 * per_row * panel_width * 1.15), rows * (panel_height + 0.75) + 0.6)
    grid = figure.add_gridspec(rows, 2 * per_row, wspace=0.05, hspace=0.55)
    for m, name in enumerate(average.attribute_names):
        row, column = divmod(m, per_row)
        sides = ((average.with_attribute[m], int(average.with_count[m]), "with"),
                 (average.without_attribute[m], int(average.without_count[m]), "without"))
        present = [values for values, images, _ in sides if images > 0]
        low = min(float(values.min()) for values in present) if present else 0.0
        high = max(float(values.max()) for values in present) if present else 1.0
        for side, (values, images, label) in enumerate(sides):
            axis = figure.add_subplot(grid[row, 2 * column + side])
            _hide_axes(axis)
            if images == 0:
                axis.text(0.5, 0.5, "no\nimages", ha="center", va="center", fontsize=6, transform=axis.transAxes)
            else:
                axis.imshow(values.numpy(), cmap=MAP_COLORMAP, vmin=low, vmax=max(high, low + 1e-12),
                            interpolation="bilinear")
            axis.set_xlabel(f"{label} ({images})", fontsize=6)
            if side == 0:
                axis.set_title(name, fontsize=8, loc="left")
    figure.suptitle("average attention maps: images with vs without each attribute", fontsize=10)
    return figure
