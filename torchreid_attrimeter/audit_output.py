"""Writing a model audit (``audit.AuditRun``): the JSON (schema in docs/audit.md), PNG charts
(numbers only, never an image of a person), a self-contained HTML page whose audit section can be
embedded in other reports, and the terminal summary.

The output folder must not exist (or be empty): everything is written into a hidden folder next to
it and renamed into place when complete, so nothing of the user's is ever overwritten and a failed
run leaves nothing behind. ``new_folder`` picks the next free ``<folder>-N`` instead of refusing.
"""

from __future__ import annotations

import html
import os
import shutil
from dataclasses import dataclass, field

import numpy as np

from torchreid_attrimeter.audit import (
    COMPARED_MEASURES,
    RELIANCE_MEASURES,
    SPLIT_MEASURES,
    AuditRun,
    ModelAudit,
)
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.report import ReportWriteError, _staging_folder, _write_file, data_uri, write_json
from torchreid_attrimeter.visualize import (
    GROUP_COLOURS,
    EmptyFigureError,
    draw_average_maps,
    figure_png_bytes,
    new_figure,
)

AUDIT_JSON = "audit.json"
AUDIT_HTML = "index.html"
AUDIT_SUMMARY = "summary.txt"
AUDIT_MARKDOWN = "summary.md"
MEASURE_LABELS = {"true_matches": "true matches", "all_pairs": "all pairs", "rank1_errors": "rank-1 errors",
                  "same_camera": "same camera", "different_camera": "different camera"}
MEASURE_COLOURS = {"true_matches": "#1a9850", "all_pairs": "#4e79a7", "rank1_errors": "#d73027",
                   "same_camera": "#f28e2b", "different_camera": "#76b7b2"}


class AuditFolderError(AttriMeterError, FileExistsError):
    """The audit's output folder exists and is not empty: the audit never writes into it."""


def prepare_audit_folder(path: str | os.PathLike, new_folder: bool = False) -> str:
    """The folder the audit will be written to, checked before any work: a missing or empty folder
    is used; anything else is refused, or with ``new_folder`` the next free ``<path>-N`` is taken."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return path
    if new_folder:
        number = 1
        while os.path.lexists(f"{path}-{number}"):
            number += 1
        return f"{path}-{number}"
    raise AuditFolderError(f"the output folder '{path}' already exists: the audit never overwrites; choose a new "
                           f"--output, or pass --new-folder to write to the next free '{os.path.basename(path)}-N'")


# --- charts ------------------------------------------------------------------------------------------------


def _ordered(audit: ModelAudit) -> list[tuple[str, str]]:
    """(group, attribute) in schema order, grouped by kind (the groups' own order)."""
    position = {name: index for index, name in enumerate(audit.attribute_names)}
    pairs = [(group, name) for group, names in audit.attribute_groups.items() for name in names]
    return sorted(pairs, key=lambda pair: (min(position[name] for name in audit.attribute_groups[pair[0]]),
                                           position[pair[1]]))


def _attribute_axis(axis, audit: ModelAudit, ordered, marked=()) -> None:
    groups = list(dict.fromkeys(group for group, _ in ordered))
    colours = {group: GROUP_COLOURS[index % len(GROUP_COLOURS)] for index, group in enumerate(groups)}
    axis.set_xticks(range(len(ordered)))
    axis.set_xticklabels([name + (" !" if name in marked else "") for _, name in ordered], rotation=60,
                         ha="right", fontsize=7)
    for label, (_, name) in zip(axis.get_xticklabels(), ordered):
        if name in marked:
            label.set_color("#b00000")
            label.set_fontweight("bold")
    start = 0
    for group in groups:
        size = sum(1 for other, _ in ordered if other == group)
        if start:
            axis.axvline(start - 0.5, color="#cccccc", linewidth=0.8)
        axis.text(start + size / 2 - 0.5, 1.0, group, transform=axis.get_xaxis_transform(), ha="center",
                  va="bottom", fontsize=7, color=colours[group])
        start += size
    axis.set_xlim(-0.6, len(ordered) - 0.4)


def draw_reliance(audit: ModelAudit):
    """Top: the mean share of every attribute over true matches, all pairs and rank-1 errors; bottom:
    same camera against different camera. Dashed: the even share 1/M. Blind spots are marked '!'."""
    ordered = _ordered(audit)
    index = {name: m for m, name in enumerate(audit.attribute_names)}
    blind = audit.blind_spots()
    marked = set(blind.get("attributes", ())) if blind.get("available") else set()
    figure = new_figure(max(7.0, 0.36 * len(ordered) + 1.5), 6.4)
    axes = figure.subplots(2, 1, gridspec_kw={"hspace": 0.95})
    for axis, measures, title in ((axes[0], [key for key, _ in RELIANCE_MEASURES], "reliance"),
                                  (axes[1], [key for key, _ in SPLIT_MEASURES], "by camera")):
        width = 0.8 / len(measures)
        drawn = False
        for offset, measure in enumerate(measures):
            values, count = audit.reliance(measure)
            if count == 0:
                continue
            heights = [float(values[index[name]]) * 100 for _, name in ordered]
            axis.bar(np.arange(len(ordered)) + (offset - (len(measures) - 1) / 2) * width, heights, width,
                     color=MEASURE_COLOURS[measure], label=f"{MEASURE_LABELS[measure]} ({count} queries)")
            drawn = True
        axis.axhline(audit.even_share * 100, color="black", linestyle="--", linewidth=0.8,
                     label=f"even share 1/{audit.num_attributes}")
        axis.set_ylabel("mean share of the distance (%)", fontsize=8)
        axis.tick_params(axis="y", labelsize=7)
        _attribute_axis(axis, audit, ordered, marked if title == "reliance" else ())
        if drawn:
            axis.legend(fontsize=7, loc="upper right", ncol=4, frameon=False, bbox_to_anchor=(1.0, 1.25))
    note = "  ('!': blind spot, below the even share in most rank-1 errors where it differs)" if marked else ""
    figure.suptitle(f"{audit.name}: what the model relies on{note}", fontsize=9)
    return figure


def draw_sensitivity(audits: list[ModelAudit]):
    """Per attribute, the share AUC of every interpreter (0.5: the share does not grow when it differs)."""
    usable = [audit for audit in audits if audit.sensitivity().get("available")]
    if not usable:
        raise EmptyFigureError("no interpreter has a share AUC (the data has no attribute labels)")
    first = usable[0]
    ordered = _ordered(first)
    figure = new_figure(max(7.0, 0.36 * len(ordered) + 1.5), 3.4)
    axis = figure.subplots()
    width = 0.8 / len(usable)
    for offset, audit in enumerate(usable):
        auc = audit.sensitivity()["share_auc"]
        heights = [np.nan if auc[name] is None else auc[name] for _, name in ordered]
        axis.bar(np.arange(len(ordered)) + (offset - (len(usable) - 1) / 2) * width, heights, width,
                 color=GROUP_COLOURS[offset % len(GROUP_COLOURS)], label=audit.name)
    axis.axhline(0.5, color="black", linestyle="--", linewidth=0.8, label="0.5: no better than chance")
    axis.set_ylim(0, 1)
    axis.set_ylabel("share AUC", fontsize=8)
    axis.tick_params(axis="y", labelsize=7)
    _attribute_axis(axis, first, ordered)
    axis.legend(fontsize=7, loc="upper right", ncol=3, frameon=False, bbox_to_anchor=(1.0, 1.3))
    figure.suptitle("sensitivity: does the share grow when the attribute differs?", fontsize=9, y=1.06)
    return figure


def draw_comparison(run: AuditRun):
    """Per measure, each other interpreter's difference of mean share from the reference's with its
    bootstrap interval; filled markers where the interval excludes 0."""
    comparison = run.comparison
    reference = run.audits[0]
    ordered = _ordered(reference)
    figure = new_figure(max(7.0, 0.36 * len(ordered) + 1.5), 2.6 * len(COMPARED_MEASURES) + 0.6)
    axes = figure.subplots(len(COMPARED_MEASURES), 1, gridspec_kw={"hspace": 1.0})
    for axis, measure in zip(np.atleast_1d(axes), COMPARED_MEASURES):
        for offset, other in enumerate(comparison.others):
            entries = [comparison.differences[other][measure][name] for _, name in ordered]
            positions = np.arange(len(ordered)) + (offset - (len(comparison.others) - 1) / 2) * 0.25
            defined = np.array([entry["difference"] is not None and entry["low"] is not None for entry in entries])
            if not defined.any():
                continue
            middle = np.array([entry["difference"] or 0.0 for entry in entries]) * 100
            low = np.array([entry["low"] or 0.0 for entry in entries]) * 100
            high = np.array([entry["high"] or 0.0 for entry in entries]) * 100
            significant = np.array([entry["verdict"] is not None for entry in entries])
            colour = GROUP_COLOURS[(offset + 1) % len(GROUP_COLOURS)]
            axis.errorbar(positions[defined], middle[defined], yerr=[(middle - low)[defined], (high - middle)[defined]],
                          fmt="none", ecolor=colour, elinewidth=1.2)
            axis.scatter(positions[defined & ~significant], middle[defined & ~significant], s=14, facecolors="white",
                         edgecolors=colour, zorder=3)
            axis.scatter(positions[defined & significant], middle[defined & significant], s=14, color=colour, zorder=3,
                         label=f"{other} − {comparison.reference}")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_ylabel("difference (points)", fontsize=7)
        axis.tick_params(axis="y", labelsize=7)
        axis.set_title(MEASURE_LABELS[measure], fontsize=8, loc="left", pad=14)
        _attribute_axis(axis, reference, ordered)
        axis.legend(fontsize=7, loc="upper right", frameon=False, bbox_to_anchor=(1.0, 1.35))
    figure.suptitle(f"differences of mean share with {int(comparison.confidence * 100)} % bootstrap intervals "
                    f"({comparison.resamples} resamples of the queries; filled: the interval excludes 0)",
                    fontsize=9)
    return figure


# --- text ----------------------------------------------------------------------------------------------------


def _percent(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{100 * value:.{digits}f}"


def _signed(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.2f}"


def format_audit(run: AuditRun, data: dict | None = None) -> str:
    """The terminal summary: per interpreter a table of the attributes grouped by kind (shares in %,
    the even share 1/M for reference), the blind spots and worst queries, then the comparison."""
    data = data or run.to_dict()
    dataset = data["dataset"]
    lines = [(f"Model audit of {len(run.audits)} interpreter(s) on {dataset.get('name', 'features')}: "
             f"{run.audits[0].totals.query_pids.numel()} queries x {run.audits[0].totals.gallery_pids.numel()} "
             f"gallery, M = {run.audits[0].num_attributes}, even share {100 * data['even_share']:.2f} %")]
    if dataset.get("labels_missing"):
        lines.append(f"note: {dataset['labels_missing']}")
    for audit, record in zip(run.audits, data["interpreters"]):
        evaluation = record["evaluation"]
        counts = record["counts"]
        lines.append("")
        lines.append(f"== {audit.name} ==  target R1 {_number(evaluation.get('target_rank1'))} / mAP "
                     f"{_number(evaluation.get('target_mAP'))}, ADRE {_number(evaluation.get('ADRE'))} %, "
                     f"rank-1 errors {counts['rank1_errors']} of {counts['valid_queries']} queries")
        columns = [key for key, _ in RELIANCE_MEASURES + SPLIT_MEASURES]
        header = f"{'attribute':<18}" + "".join(f"{MEASURE_LABELS[key][:13]:>14}" for key in columns)
        header += f"{'share AUC':>11}{'blind':>7}"
        lines.append("mean share (%) per attribute, grouped by kind")
        lines.append(header)
        sensitivity = record["sensitivity"]
        blind = record["blind_spots"]
        for group, names in audit.attribute_groups.items():
            lines.append(f"[{group}]")
            for name in names:
                row = f"  {name:<16}" + "".join(f"{_percent(record['reliance'][key][name], 2):>14}" for key in columns)
                auc = sensitivity["share_auc"][name] if sensitivity.get("available") else None
                row += f"{'n/a' if auc is None else f'{auc:.2f}':>11}"
                row += f"{('yes' if blind['per_attribute'][name]['blind_spot'] else '') if blind.get('available') else 'n/a':>7}"
                lines.append(row)
        top = record["reliance_order"]["all_pairs"][:3]
        lines.append(f"relies most on (all pairs): {', '.join(top)}")
        if blind.get("available"):
            lines.append(f"blind spots (differ in rank-1 errors, below the even share in most of them): "
                         f"{', '.join(blind['attributes']) or 'none'}")
        else:
            lines.append(f"sensitivity and blind spots: not available ({blind['reason']})")
        for worst in record["worst_queries"][:3]:
            parts = ", ".join(f"{part['name']} {_percent(part['share'])} %" for part in worst["top_attributes"])
            lines.append(f"worst query {worst['query']} (first true match at rank {worst['first_true_match_rank']}, "
                         f"AP {_percent(worst['average_precision'])}): rank-1 pair explained by {parts}")
    if data.get("comparison"):
        comparison = data["comparison"]
        lines.append("")
        lines.append(f"== comparison against {comparison['reference']} ({comparison['resamples']} bootstrap "
                     f"resamples of the queries, {int(comparison['confidence'] * 100)} % intervals, points of share) ==")
        for other, measures in comparison["differences"].items():
            for measure, entries in measures.items():
                verdicts = [f"{name} {_signed(entry['difference'])} [{_signed(entry['low'])}, {_signed(entry['high'])}]"
                            f" {entry['verdict']}" for name, entry in entries.items() if entry["verdict"]]
                lines.append(f"{other} vs {comparison['reference']}, {MEASURE_LABELS[measure]}: "
                             + ("; ".join(verdicts) if verdicts else "no attribute differs beyond its interval"))
    return "\n".join(lines)


def _number(value) -> str:
    return "n/a" if value is None else f"{value:.2f}"


# --- HTML -----------------------------------------------------------------------------------------------------

_PAGE_CSS = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:12px 24px;background:#263238;color:#fff}header h1{margin:0;font-size:20px}
"""
# The section's own style travels with it, so that it looks the same embedded in another report.
_SECTION_CSS = """
section.audit{margin:12px 24px}.audit h2{font-size:18px;border-bottom:1px solid #ccc}
.audit h3{font-size:15px;margin-top:18px}.audit table{border-collapse:collapse;font-size:12px;margin:6px 0}
.audit td,.audit th{border:1px solid #ddd;padding:2px 6px;text-align:right}
.audit td:first-child,.audit th:first-child{text-align:left}.audit tr.group td{background:#eef;font-weight:bold;text-align:left}
.audit .above{font-weight:bold}.audit .blind{color:#b00;font-weight:bold}.audit .missing{color:#777;font-style:italic}
.audit img{max-width:100%;border:1px solid #ddd;background:#fff}.audit .higher{color:#1a7a3a}.audit .lower{color:#b00}
"""


def _cell(value: float | None, even: float | None = None) -> str:
    css = ' class="above"' if even is not None and value is not None and value > even else ""
    return f"<td{css}>{_percent(value, 2)}</td>"


def _interpreter_html(audit: ModelAudit, record: dict, figures: dict[str, bytes], number: int) -> str:
    even = record["even_share"]
    evaluation, counts = record["evaluation"], record["counts"]
    blind, sensitivity = record["blind_spots"], record["sensitivity"]
    keys = [key for key, _ in RELIANCE_MEASURES + SPLIT_MEASURES]
    rows = []
    for group, names in audit.attribute_groups.items():
        rows.append(f'<tr class="group"><td colspan="{len(keys) + 3}">{html.escape(group)}</td></tr>')
        for name in names:
            auc = sensitivity["share_auc"][name] if sensitivity.get("available") else None
            is_blind = blind.get("available") and blind["per_attribute"][name]["blind_spot"]
            rows.append(
                f'<tr data-attribute="{html.escape(name)}"><td>{html.escape(name)}</td>'
                + "".join(_cell(record["reliance"][key][name], even) for key in keys)
                + f"<td>{'n/a' if auc is None else f'{auc:.2f}'}</td>"
                + ('<td class="blind">yes</td></tr>' if is_blind else "<td></td></tr>"))
    header = "".join(f"<th>{MEASURE_LABELS[key]}</th>" for key in keys)
    table = (f'<table class="reliance"><thead><tr><th>attribute</th>{header}<th>share AUC</th><th>blind spot</th>'
             f'</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    parts = [f'<section class="interpreter" id="interpreter-{number}"><h3>{html.escape(audit.name)}</h3>',
             "<p>", html.escape(
                 f"target R1 {_number(evaluation.get('target_rank1'))} / mAP {_number(evaluation.get('target_mAP'))}; "
                 f"interpreter R1 {_number(evaluation.get('interpreter_rank1'))}; ADRE {_number(evaluation.get('ADRE'))} %; "
                 f"X-mAP_e {_number(evaluation.get('X-mAP_e'))}; {counts['rank1_errors']} rank-1 errors of "
                 f"{counts['valid_queries']} queries. Mean share in % (bold: above the even share "
                 f"{100 * even:.2f} %)."), "</p>", table]
    for key, title in ((f"reliance-{number}", "reliance"), (f"maps-{number}", "where: mean attention maps")):
        if key in figures:
            parts.append(f'<figure><img alt="{html.escape(title)}" src="{data_uri(figures[key])}"></figure>')
    if blind.get("available"):
        items = []
        for name in blind["attributes"]:
            entry = blind["per_attribute"][name]
            examples = "; ".join(
                f"query {example['query']} (pid {example['query_pid']}) vs gallery {example['gallery']} "
                f"(pid {example['gallery_pid']}): {_percent(example['share'], 2)} %" for example in entry.get("examples", []))
            items.append(f"<li><b>{html.escape(name)}</b>: differs in {entry['errors_differing']} rank-1 errors, "
                         f"mean share there {_percent(entry['mean_share_when_differing'], 2)} %, below the even "
                         f"share in {entry['below_even_share']}. Examples: {html.escape(examples)}</li>")
        parts.append(f'<h4>Blind spots</h4><ul class="blind-spots">{"".join(items) or "<li>none</li>"}</ul>')
    else:
        parts.append(f'<p class="missing">Sensitivity and blind spots are missing: {html.escape(blind["reason"])}</p>')
    worst_rows = "".join(
        f"<tr><td>{worst['query']}</td><td>{worst['first_true_match_rank']}</td><td>{_percent(worst['average_precision'])}</td>"
        f"<td>{html.escape(', '.join(part['name'] + ' ' + _percent(part['share']) + ' %' + (' ≠' if part['labels_differ'] else '') for part in worst['top_attributes']))}</td></tr>"
        for worst in record["worst_queries"])
    parts.append('<h4>Worst queries</h4><table class="worst"><thead><tr><th>query</th><th>first true match</th>'
                 f'<th>AP %</th><th>rank-1 pair: top shares (≠ labels differ)</th></tr></thead><tbody>{worst_rows}'
                 "</tbody></table></section>")
    return "".join(parts)


def audit_section_html(run: AuditRun, figures: dict[str, bytes], data: dict | None = None) -> str:
    """The audit as one ``<section id="model-audit">`` (figures embedded), for this page or another report."""
    data = data or run.to_dict()
    dataset = data["dataset"]
    parts = [f'<section class="audit" id="model-audit"><style>{_SECTION_CSS}</style><h2>Model audit</h2>',
             (f"<p>{html.escape(str(dataset.get('name', 'features')))}: {dataset.get('queries')} queries × "
             f"{dataset.get('gallery')} gallery images, {len(data['attributes'])} attributes. Every query × gallery "
             "pair of torchreid's protocol is counted; each measure is a mean over queries of the query's mean "
             "share.</p>")]
    if dataset.get("labels_missing"):
        parts.append(f'<p class="missing">{html.escape(dataset["labels_missing"])}</p>')
    for number, (audit, record) in enumerate(zip(run.audits, data["interpreters"]), 1):
        parts.append(_interpreter_html(audit, record, figures, number))
    if "sensitivity" in figures:
        parts.append(f'<h3>Sensitivity</h3><figure><img alt="sensitivity" src="{data_uri(figures["sensitivity"])}"></figure>')
    if data.get("comparison"):
        comparison = data["comparison"]
        parts.append(f'<section class="comparison"><h3>Comparison against {html.escape(comparison["reference"])}</h3>'
                     f"<p>Differences of mean share in points, {int(comparison['confidence'] * 100)} % bootstrap "
                     f"intervals over {comparison['resamples']} resamples of the queries; a verdict only where the "
                     "interval excludes 0.</p>")
        for other, measures in comparison["differences"].items():
            header = "".join(f"<th>{MEASURE_LABELS[measure]}</th>" for measure in measures)
            rows = []
            for name in data["attributes"]:
                cells = []
                for measure in measures:
                    entry = measures[measure][name]
                    verdict = entry["verdict"]
                    cells.append(f'<td class="{verdict or ""}">{_signed(entry["difference"])} '
                                 f'[{_signed(entry["low"])}, {_signed(entry["high"])}]{" " + verdict if verdict else ""}</td>')
                rows.append(f"<tr><td>{html.escape(name)}</td>{''.join(cells)}</tr>")
            parts.append(f"<h4>{html.escape(other)} − {html.escape(comparison['reference'])}</h4>"
                         f'<table class="comparison"><thead><tr><th>attribute</th>{header}</tr></thead>'
                         f"<tbody>{''.join(rows)}</tbody></table>")
        if "comparison" in figures:
            parts.append(f'<figure><img alt="comparison" src="{data_uri(figures["comparison"])}"></figure>')
        parts.append("</section>")
    parts.append("</section>")
    return "".join(parts)


def build_audit_html(run: AuditRun, figures: dict[str, bytes], data: dict | None = None,
                     title: str = "AttriMeter model audit") -> str:
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<link rel=\"icon\" href=\"data:,\"><title>{html.escape(title)}</title><style>{_PAGE_CSS}</style></head>"
            f"<body><header><h1>{html.escape(title)}</h1></header><main>{audit_section_html(run, figures, data)}"
            "</main></body></html>\n")


# --- writing -------------------------------------------------------------------------------------------------


@dataclass
class AuditFiles:
    folder: str
    json: str
    html: str
    summary: str
    pngs: list[str] = field(default_factory=list)


def audit_figures(run: AuditRun, dpi: int = 90) -> dict[str, bytes]:
    """Every chart as PNG bytes, by name (reliance-N, maps-N, sensitivity, comparison)."""
    figures = {}
    for number, audit in enumerate(run.audits, 1):
        figures[f"reliance-{number}"] = figure_png_bytes(draw_reliance(audit), dpi)
        if audit.maps is not None:
            try:
                figures[f"maps-{number}"] = figure_png_bytes(draw_average_maps(audit.maps), dpi)
            except EmptyFigureError:
                pass
    if any(audit.sensitivity().get("available") for audit in run.audits):
        figures["sensitivity"] = figure_png_bytes(draw_sensitivity(run.audits), dpi)
    if run.comparison is not None:
        figures["comparison"] = figure_png_bytes(draw_comparison(run), dpi)
    return figures


def write_audit(run: AuditRun, folder: str | os.PathLike, dpi: int = 90) -> AuditFiles:
    """Write audit.json, summary.txt, summary.md, the charts and index.html into ``folder``, which must not exist or be
    empty (``prepare_audit_folder``); built in a hidden sibling folder and renamed into place."""
    folder = prepare_audit_folder(folder)
    data = run.to_dict()
    figures = audit_figures(run, dpi)
    staged = _staging_folder(folder)
    files = AuditFiles(folder, os.path.join(folder, AUDIT_JSON), os.path.join(folder, AUDIT_HTML),
                       os.path.join(folder, AUDIT_SUMMARY))
    try:
        data["figures"] = {name: f"{name}.png" for name in figures}
        write_json(os.path.join(staged, AUDIT_JSON), data, shown_as=files.json)
        _write_file(os.path.join(staged, AUDIT_SUMMARY), format_audit(run, data) + "\n", shown_as=files.summary)
        _write_file(os.path.join(staged, AUDIT_MARKDOWN), markdown_table(data) + "\n",
                    shown_as=os.path.join(folder, AUDIT_MARKDOWN))
        for name, png in figures.items():
            _write_file(os.path.join(staged, f"{name}.png"), png, shown_as=os.path.join(folder, f"{name}.png"))
            files.pngs.append(os.path.join(folder, f"{name}.png"))
        _write_file(os.path.join(staged, AUDIT_HTML), build_audit_html(run, figures, data), shown_as=files.html)
        prepare_audit_folder(folder)  # the run may have taken long: check again before the rename
        try:
            if os.path.isdir(folder):
                os.rmdir(folder)  # empty (checked): the rename needs the name free
            os.rename(staged, folder)
        except OSError as error:
            raise ReportWriteError(f"cannot move the finished audit to '{folder}': {error.strerror or error}") from error
    except BaseException:  # also Ctrl-C: never leave a half-written audit behind
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return files



def markdown_table(data: dict) -> str:
    """The per-attribute summary of an audit JSON as a Markdown table (numbers only): mean share over
    all pairs and over rank-1 errors (%), the share AUC and blind spots of every interpreter, and, in a
    comparison, each other interpreter's difference over all pairs with its interval and verdict."""
    records = data["interpreters"]
    comparison = data.get("comparison")
    names = [record["name"] for record in records]
    joined = " / ".join(names)
    header = ["attribute", f"all pairs, % ({joined})", f"rank-1 errors, % ({joined})", f"share AUC ({joined})",
              "blind spot"]
    if comparison:
        header += [f"{other} − {comparison['reference']}, all pairs (points, {int(100 * comparison['confidence'])} % CI)"
                   for other in comparison["others"]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def number(value, scale=100.0, digits=2):
        return "n/a" if value is None else f"{scale * value:.{digits}f}"

    for group, members in data["groups"].items():
        for name in members:
            blind = [record["name"] for record in records
                     if record["blind_spots"].get("available") and record["blind_spots"]["per_attribute"][name]["blind_spot"]]
            cells = [f"{name} ({group})",
                     " / ".join(number(record["reliance"]["all_pairs"][name]) for record in records),
                     " / ".join(number(record["reliance"]["rank1_errors"][name]) for record in records),
                     " / ".join(number(record["sensitivity"]["share_auc"][name], 1.0)
                                if record["sensitivity"].get("available") else "n/a" for record in records),
                     ", ".join(blind) or "–"]
            if comparison:
                for other in comparison["others"]:
                    entry = comparison["differences"][other]["all_pairs"][name]
                    cells.append(f"{_signed(entry['difference'])} [{_signed(entry['low'])}, {_signed(entry['high'])}]"
                                 + (f" **{entry['verdict']}**" if entry["verdict"] else ""))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
