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
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.explain import AttributeShare, AverageMaps, Explanation, RankingExplanation

MATCH_COLOURS = {True: "#1a9850", False: "#d73027", None: "#9e9e9e"}
GROUP_COLOURS = ("#4e79a7", "#f28e2b", "#59a14f", "#e15759", "#76b7b2", "#edc948", "#b07aa1", "#ff9da7",
                 "#9c755f", "#bab0ac")
MAP_COLORMAP = "jet"


class EmptyFigureError(AttriMeterError, ValueError):
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

# How a differing attribute is marked: by the images' labels (ground truth) and by the attribute
# branch's prediction. The figure, the ranked list and the HTML report use the same marks.
LABELLED_MARK = "\u2260"  # ≠
PREDICTED_MARK = "*"
LABELLED_EDGE = "#111111"
UNKNOWN_COLOUR = "#9e9e9e"
FADED_ALPHA = 0.35  # bars at or below the even share
SUMMARY_NAMES = 6  # differing attributes named in the figure's heading, largest share first
RATIO_SHOWN = 1.5  # bars at least this many times the even share get their ratio written above them


def attribute_label(part: AttributeShare) -> str:
    """The attribute's name with its marks: '≠' differs by the labels, '*' predicted to differ."""
    marks = (LABELLED_MARK if part.labelled_differs else "") + (PREDICTED_MARK if part.differs else "")
    return f"{part.name} {marks}" if marks else part.name


def times_even_text(part: AttributeShare) -> str:
    return f"{part.times_even:.1f}\u00d7 even"


def draw_pair(explanation: Explanation, k: int = 3, title: str | None = None) -> Figure:
    """Both images, the top-k attributes' maps upsampled over both, and a bar chart of all shares
    grouped by attribute group against the even share 1/M, with the target and reconstructed
    distances. Attributes whose labels differ (when the explanation carries labels) are marked."""
    _check_drawable(explanation)
    k = max(1, min(int(k), explanation.num_attributes))
    top = explanation.top(k)
    columns = 2 + 2 * k
    height, width = explanation.image_a.shape[:2]
    # Size the image row to the pictures' aspect ratio, so no empty band separates it from the bars.
    figure_width = max(9.0, 1.25 * columns)
    image_row = 0.775 * figure_width / columns * height / max(width, 1)
    bar_row = 2.8
    # Fixed room (inches) for the heading and the map titles above the images, for the bars' legend
    # between the rows and for the rotated names below the bars.
    heading_lines = 2 + (explanation.labels_known is not None)
    above, between, below = 0.2 * heading_lines + 0.5, 0.8, 1.0
    figure_height = above + image_row + between + bar_row + below
    figure = new_figure(figure_width, figure_height)
    grid = figure.add_gridspec(2, columns, height_ratios=(image_row, bar_row), wspace=0.08,
                               hspace=between / ((image_row + bar_row) / 2), top=1 - above / figure_height,
                               bottom=below / figure_height)

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
                axis.set_title(f"#{rank + 1} {attribute_label(part)}\n{part.share:.1%}  {times_even_text(part)}",
                               fontsize=9, loc="left", fontweight="bold" if part.labelled_differs else "normal")

    _draw_share_bars(figure.add_subplot(grid[1, :]), explanation)
    heading = title or f"{os.path.basename(explanation.source_a)} vs {os.path.basename(explanation.source_b)}"
    figure.suptitle(
        f"{heading}\n{explanation.metric} distance {explanation.target_distance:.4f}  (interpreter "
        f"{explanation.reconstructed_distance:.4f}, relative error {explanation.relative_error:.1%})"
        f"{_labelled_summary(explanation)}",
        fontsize=10, y=1 - 0.08 / figure_height, va="top",
    )
    return figure


def _labelled_summary(explanation: Explanation) -> str:
    """A line naming the attributes that differ by the labels, largest share first ('' without labels)."""
    known = explanation.labels_known
    if known is None:
        return ""
    differing = [part for part in sorted(explanation.attributes(), key=lambda part: -part.share)
                 if part.labelled_differs]
    shown = SUMMARY_NAMES
    names = ", ".join(f"{part.name} ({part.times_even:.1f}\u00d7)" for part in differing[:shown]) or "none"
    if len(differing) > shown:
        names += f" and {len(differing) - shown} more"
    unknown = explanation.num_attributes - int(known.sum())
    return (f"\nlabels differ ({LABELLED_MARK}): {names}" +
            (f"   [{unknown} of {explanation.num_attributes} unknown]" if unknown else ""))


def _draw_share_bars(axis, explanation: Explanation) -> None:
    """All shares (%) in schema-group order, one colour per group, against the even share 1/M: bars
    above it in full colour with their ratio written above them, the rest faded. A dark edge and a
    bold '≠' name mark attributes whose labels differ; '*' marks predicted differences; names whose
    labels are unknown are grey."""
    parts = {part.name: part for part in explanation.attributes()}
    colours = group_colours(list(explanation.attribute_groups))
    ordered = [(group, parts[name]) for group, members in explanation.attribute_groups.items()
               for name in members if name in parts]
    even = 100.0 * explanation.even_share
    positions = np.arange(len(ordered))
    shares = [part.share * 100.0 for _, part in ordered]
    bars = axis.bar(positions, shares, width=0.78, color=[colours[group] for group, _ in ordered])
    for bar, (_, part) in zip(bars, ordered):
        if part.times_even <= 1.0:
            bar.set_alpha(FADED_ALPHA)
        if part.labelled_differs:
            bar.set_edgecolor(LABELLED_EDGE)
            bar.set_linewidth(1.8)
            bar.set_alpha(None if part.times_even > 1.0 else 0.6)
    highest = max(max(shares), even)
    for position, (_, part) in zip(positions, ordered):
        if part.times_even >= RATIO_SHOWN:
            axis.text(position, part.share * 100.0 + 0.02 * highest, f"{part.times_even:.1f}\u00d7",
                      ha="center", va="bottom", fontsize=6.5,
                      fontweight="bold" if part.labelled_differs else "normal")
    axis.axhline(even, color="#333333", linewidth=1.0, linestyle="--", zorder=3)

    axis.set_xticks(positions)
    axis.set_xticklabels([attribute_label(part) for _, part in ordered], rotation=70, ha="right",
                         rotation_mode="anchor", fontsize=7.5)
    for tick, (_, part) in zip(axis.get_xticklabels(), ordered):
        if part.labelled_differs:
            tick.set_fontweight("bold")
        elif explanation.labels_known is not None and part.labelled_differs is None:
            tick.set_color(UNKNOWN_COLOUR)
    axis.set_xlim(-0.6, len(ordered) - 0.4)
    axis.set_ylim(0.0, highest * 1.15)  # room for the ratios above the tallest bars
    axis.set_ylabel("share of distance (%)", fontsize=8)
    axis.tick_params(axis="y", labelsize=7)
    axis.spines[["top"]].set_visible(False)
    count = explanation.num_attributes
    # The same bars read as multiples of the even share on the right.
    ratio_axis = axis.secondary_yaxis("right", functions=(lambda percent: percent * count / 100.0,
                                                          lambda ratio: ratio * 100.0 / count))
    ratio_axis.set_ylabel("\u00d7 even share", fontsize=8)
    ratio_axis.tick_params(labelsize=7)

    legend = [Patch(color=colours[group], label=group) for group in explanation.attribute_groups]
    legend.append(Line2D([], [], color="#333333", linewidth=1.0, linestyle="--",
                         label=f"even share 1/{count} = {even:.1f} %"))
    if explanation.labels_known is not None:
        legend.append(Patch(facecolor="#dddddd", edgecolor=LABELLED_EDGE, linewidth=1.8,
                            label=f"{LABELLED_MARK} labels differ"))
    if explanation.predicted_difference is not None:
        legend.append(Patch(facecolor="none", edgecolor="none", label=f"{PREDICTED_MARK} predicted to differ"))
    axis.legend(handles=legend, fontsize=7, ncol=min(len(legend), 5), loc="lower center",
                bbox_to_anchor=(0.5, 1.0), frameon=False, handlelength=1.6, columnspacing=1.2)


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
        lines = [f"{attribute_label(part)} {part.share:.0%}" for part in explanation.top(attributes_per_item)]
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
