"""A self-contained HTML report of ranked lists and their explanations: one file with inline CSS and
JS and every picture embedded as a base64 data URI, so it opens offline and can be mailed around.
Also the output-folder policy of the report tools (never overwrite a report silently)."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import secrets
import shutil
import tempfile
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.explain import AttributeShare, Explanation, RankingExplanation
from torchreid_attrimeter.visualize import GROUP_COLOURS, LABELLED_MARK, MATCH_COLOURS, PREDICTED_MARK

REPORT_INDEX = "index.html"
# Every file write_report writes; a report folder holding anything else is not replaced.
REPORT_FILE = re.compile(r"index\.html|query-\d{3,}(\.json|_ranking\.png|_rank-\d{2,}\.png)|average_maps\.(png|json)")
BARS_SHOWN = 5  # attributes whose bars are always visible on a ranked item; the rest fold out


class ReportFolderError(AttriMeterError, FileExistsError):
    """The output folder holds something the report would overwrite."""


class ReportWriteError(AttriMeterError, OSError):
    """A report file could not be written (disk full, no permission, ...); the message names the file."""


def _check_destination(path: str, overwrite: bool) -> None:
    """Refuse a destination the report may not replace: a file, a non-empty folder without a report,
    an existing report without ``overwrite``, or a report folder holding files of someone else's."""
    if not os.path.lexists(path) or (os.path.isdir(path) and not os.listdir(path)):
        return
    if not os.path.isdir(path):
        raise ReportFolderError(f"the output path '{path}' exists and is not a folder: choose another --output")
    if not os.path.isfile(os.path.join(path, REPORT_INDEX)):
        raise ReportFolderError(
            f"the output folder '{path}' is not empty and holds no report ({REPORT_INDEX}): refusing to write "
            f"into it. Choose an empty or new --output folder."
        )
    if not overwrite:
        raise ReportFolderError(
            f"the output folder '{path}' already holds a report: pass --overwrite to replace it, or "
            f"--new-folder to write to the next free '{os.path.basename(path)}-N'"
        )
    foreign = sorted(name for name in os.listdir(path) if not REPORT_FILE.fullmatch(name))
    if foreign:
        raise ReportFolderError(
            f"the report folder '{path}' also holds files the report tool did not write ({', '.join(foreign[:5])}"
            f"{', ...' if len(foreign) > 5 else ''}): replacing the report would delete them. Move them out, "
            f"or use --new-folder."
        )


def prepare_output_dir(path: str | os.PathLike, overwrite: bool = False, new_folder: bool = False) -> str:
    """The folder a report will be written to, checked before any work is done.

    A missing or empty folder is used as is. An existing report may be replaced only with
    ``overwrite``; with ``new_folder`` the next free ``<path>-1``, ``<path>-2``, ... is used instead. A
    non-empty folder that holds no report is never used. Nothing is created or removed here:
    ``write_report`` builds the report in a temporary sibling folder and moves it to this path only
    once it is complete, so a failed run leaves the folder as it was (and makes no new one).
    """
    path = os.path.abspath(os.fspath(path))
    if new_folder and os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        number = 1
        while os.path.lexists(f"{path}-{number}"):
            number += 1
        return f"{path}-{number}"
    _check_destination(path, overwrite)
    return path


def _staging_folder(destination: str) -> str:
    """A new hidden folder next to ``destination`` (same file system, so the final move is a rename)."""
    parent, name = os.path.split(destination)
    try:
        os.makedirs(parent, exist_ok=True)
        # os.mkdir, not tempfile.mkdtemp: the folder becomes the report, with the usual permissions
        staged = os.path.join(parent, f".{name}.partial-{os.getpid()}-{secrets.token_hex(4)}")
        os.mkdir(staged)
        return staged
    except OSError as error:
        raise ReportWriteError(
            f"cannot create a folder next to '{destination}' to write the report in: "
            f"{error.strerror or error}. Choose an --output on a writable disk."
        ) from error


def _move_into_place(staged: str, destination: str, overwrite: bool) -> None:
    """Rename the complete report ``staged`` to ``destination``. What was at ``destination`` (an old
    report, or an empty folder) is first moved aside and deleted only once the new report is in
    place; if a rename fails the old folder is put back as it was."""
    _check_destination(destination, overwrite)  # the run may have taken long: check again
    aside = old = None
    try:
        if os.path.lexists(destination):
            aside = tempfile.mkdtemp(prefix=f".{os.path.basename(destination)}.old-",
                                     dir=os.path.dirname(destination))
            old = os.path.join(aside, "report")
            os.rename(destination, old)
        os.rename(staged, destination)
    except BaseException as error:  # also Ctrl-C between the two renames
        try:
            if old is not None and os.path.lexists(old):
                os.rename(old, destination)
            if aside is not None:
                os.rmdir(aside)
        except OSError:
            raise ReportWriteError(
                f"cannot move the finished report to '{destination}' ({error}) nor put the previous one back: "
                f"it is in '{old}'"
            ) from error
        if not isinstance(error, OSError):
            raise
        raise ReportWriteError(
            f"cannot move the finished report to '{destination}': {error.strerror or error}; "
            f"'{destination}' was left as it was"
        ) from error
    if aside is not None:
        try:
            shutil.rmtree(aside)
        except OSError as error:  # the new report is complete; only disk space is at stake
            warnings.warn(f"the replaced report could not be deleted ({error}): remove '{aside}' yourself",
                          stacklevel=3)


@dataclass
class QueryEntry:
    """What the report shows for one query: its ranking and the PNGs drawn from it, or the error
    that prevented explaining it."""

    name: str
    ranking: RankingExplanation | None = None
    ranking_png: bytes | None = None
    pair_pngs: list[bytes] = field(default_factory=list)
    json_file: str | None = None
    error: str | None = None


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_data_uri(picture) -> str:
    """(H, W, 3) uint8 array -> PNG data URI."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(picture).save(buffer, format="PNG")
    return data_uri(buffer.getvalue())


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:16px 24px;background:#263238;color:#fff}
header h1{margin:0 0 6px 0;font-size:20px}
header dl{display:grid;grid-template-columns:max-content auto;gap:2px 12px;margin:0;font-size:13px}
header dt{opacity:.75}
nav{padding:8px 24px;font-size:13px;border-bottom:1px solid #ddd;background:#fff}
nav a{margin-right:10px}
section.query{margin:16px 24px;padding:12px 16px;background:#fff;border:1px solid #ddd;border-radius:6px}
section.query h2{font-size:16px;margin:0 0 8px 0}
.notes{font-size:13px;color:#8a4b00;margin:4px 0}
.error{font-size:13px;color:#b00020;white-space:pre-wrap}
.ranked{display:flex;gap:10px;overflow-x:auto;align-items:flex-start;padding-bottom:6px}
.item{flex:0 0 236px;font-size:12px}
.item img.thumb{display:block;height:128px;border:4px solid #9e9e9e;border-radius:3px;image-rendering:auto}
.item.query-item img.thumb{border-color:#000}
.dist{margin:4px 0}
.bar{display:grid;grid-template-columns:94px 1fr 36px 34px;align-items:center;gap:4px;margin:1px 0}
.bar .label{display:flex;min-width:0;white-space:nowrap}
.bar .name{overflow:hidden;text-overflow:ellipsis}
.bar .marks{flex:none;margin-left:3px}
.bar .track{position:relative;background:#eee;height:10px;border-radius:2px}
.bar .fill{display:block;height:100%;border-radius:2px;opacity:.35;box-sizing:border-box}
.bar.above-even .fill{opacity:1}
.bar .even{position:absolute;top:-2px;bottom:-2px;width:0;border-left:2px dotted #333}
.bar .value,.bar .ratio{text-align:right;font-variant-numeric:tabular-nums}
.bar .ratio{color:#777}
.bar.above-even .ratio{color:#222;font-weight:600}
.bar.labelled-differs .label{font-weight:700}
.bar.labelled-differs .fill{border:2px solid #111;opacity:1}
.bar[data-labelled="unknown"] .label{color:#9e9e9e}
.labelled-summary{margin:2px 0 4px 0;color:#333}
details{margin-top:4px}
summary{cursor:pointer;color:#1565c0}
.group-name{margin-top:4px;font-weight:600;color:#555}
button.open-maps{margin-top:6px;cursor:pointer;padding:3px 8px;font-size:12px}
figure{margin:10px 0 0 0}
figure img{max-width:100%}
.viewer{position:fixed;inset:0;background:rgba(0,0,0,.72);display:flex;align-items:center;justify-content:center}
.viewer[hidden]{display:none}
.viewer-box{background:#fff;padding:12px;border-radius:6px;max-width:95vw;max-height:95vh;overflow:auto}
.viewer-box img{max-width:90vw}
.viewer-box .close{float:right;font-size:18px;cursor:pointer}
.store{display:none}
"""

_SCRIPT = """
(function () {
  var viewer = document.getElementById('viewer');
  var viewerImage = document.getElementById('viewer-image');
  var viewerCaption = document.getElementById('viewer-caption');
  function openMaps(button) {
    var stored = document.getElementById(button.getAttribute('data-maps'));
    viewerImage.src = stored.getAttribute('src');
    viewerImage.alt = stored.getAttribute('alt');
    viewerCaption.textContent = stored.getAttribute('alt');
    viewer.hidden = false;
    viewer.setAttribute('data-open', button.getAttribute('data-maps'));
  }
  function closeMaps() {
    viewer.hidden = true;
    viewer.removeAttribute('data-open');
  }
  document.querySelectorAll('button.open-maps').forEach(function (button) {
    button.addEventListener('click', function () { openMaps(button); });
  });
  document.getElementById('viewer-close').addEventListener('click', closeMaps);
  viewer.addEventListener('click', function (event) { if (event.target === viewer) { closeMaps(); } });
  document.addEventListener('keydown', function (event) { if (event.key === 'Escape') { closeMaps(); } });
})();
"""


def _bar(part: AttributeShare, colour: str, largest: float, even: float, labelled: bool) -> str:
    """One attribute's share as a bar with a tick at the even share 1/M; lengths are relative to the
    pair's largest share, so small differences between near-uniform shares stay visible (the numbers
    give the absolute share and its multiple of the even share). Bars at or below the even share are
    faded; a bold '≠' name and a dark outline mark attributes whose labels differ ("labelled": the
    explanation carries labels, so an attribute whose label is unknown is said to be)."""
    state = ("differs" if part.labelled_differs else "same" if part.labelled_differs is not None
             else "unknown") if labelled else "none"
    notes = [f"{part.share:.2%} of the distance, {part.times_even:.2f}\u00d7 the even share {even:.2%}"]
    if part.labelled_differs:
        notes.append("the images' labels differ")
    elif state == "same":
        notes.append("the images' labels agree")
    elif state == "unknown":
        notes.append("label unknown in at least one image")
    if part.differs:
        notes.append("predicted to differ")
    classes = ["bar"] + (["above-even"] if part.times_even > 1.0 else []) + \
        (["labelled-differs"] if part.labelled_differs else []) + (["differs"] if part.differs else [])
    marks = (LABELLED_MARK if part.labelled_differs else "") + (PREDICTED_MARK if part.differs else "")
    width = min(max(part.share / largest, 0.0), 1.0) * 100
    return (f'<div class="{" ".join(classes)}" data-labelled="{state}" data-times-even="{part.times_even:.3f}" '
            f'title="{html.escape(part.name + ": " + "; ".join(notes))}"><span class="label"><span class="name">'
            f'{html.escape(part.name)}</span><span class="marks">{marks}</span></span><span class="track"><span class="fill" '
            f'style="width:{width:.1f}%;background:{colour}"></span><span class="even" style="left:'
            f'{min(even / largest, 1.0) * 100:.1f}%"></span></span><span class="value">{part.share:.1%}</span>'
            f'<span class="ratio">{part.times_even:.1f}\u00d7</span></div>')


def _bars(explanation: Explanation) -> str:
    colours = {group: GROUP_COLOURS[index % len(GROUP_COLOURS)]
               for index, group in enumerate(explanation.attribute_groups)}
    parts = {part.name: part for part in explanation.attributes()}
    # The largest share is at least the even share (the mean of the shares), so the tick fits.
    largest = max(max(part.share for part in parts.values()), explanation.even_share)
    labelled = explanation.labels_known is not None

    def bar(part: AttributeShare) -> str:
        return _bar(part, colours[part.group], largest, explanation.even_share, labelled)

    top = "".join(bar(part) for part in explanation.top(BARS_SHOWN))
    grouped = []
    for group, members in explanation.attribute_groups.items():
        rows = "".join(bar(parts[name]) for name in members if name in parts)
        grouped.append(f'<div class="group-name">{html.escape(group)}</div>{rows}')
    differing = [part.name for part in sorted(parts.values(), key=lambda part: -part.share) if part.labelled_differs]
    summary = (f'<div class="labelled-summary">labels differ: {html.escape(", ".join(differing) or "none")}</div>'
               if labelled else "")
    return (f'{summary}<div class="bars">{top}</div><details><summary>all {explanation.num_attributes} '
            f'attributes</summary>{"".join(grouped)}</details>')


def _query_section(number: int, entry: QueryEntry) -> tuple[str, str]:
    """(section HTML, hidden store of pair figures)."""
    anchor = f"q-{number}"
    heading = f"Query {number}: {html.escape(entry.name)}"
    if entry.error is not None or entry.ranking is None:
        message = entry.error or "no ranking was computed"
        return ((f'<section class="query failed" id="{anchor}" data-pairs="0"><h2>{heading}</h2>'
                f'<p class="error">Could not explain this query: {html.escape(message)}</p></section>'), "")
    ranking = entry.ranking
    if ranking.query_pid is not None:
        heading += f" (identity {ranking.query_pid})"
    notes = "".join(f'<p class="notes">{html.escape(note)}</p>' for note in ranking.notes)
    items = [(f'<div class="item query-item"><img class="thumb" alt="query" '
             f'src="{image_data_uri(ranking.query_image)}"><div class="dist">query</div></div>')]
    store = []
    for rank, explanation in enumerate(ranking.explanations):
        match = ranking.matches[rank]
        maps_id = f"maps-{number}-{rank + 1}"
        label = {True: "true match", False: "false match", None: "identity unknown"}[match]
        items.append(
            f'<div class="item pair" data-rank="{rank + 1}" data-match="{str(match).lower()}">'
            f'<img class="thumb" style="border-color:{MATCH_COLOURS[match]}" alt="rank {rank + 1}" '
            f'title="{html.escape(ranking.gallery_sources[rank])} ({label})" '
            f'src="{image_data_uri(explanation.image_b)}">'
            f'<div class="dist">#{rank + 1} d={explanation.target_distance:.4f} '
            f'<span title="interpreter: mean of the attribute components">'
            f'(interp. {explanation.reconstructed_distance:.4f})</span></div>'
            f'{_bars(explanation)}'
            f'<button class="open-maps" type="button" data-maps="{maps_id}">maps</button></div>'
        )
        if rank < len(entry.pair_pngs):
            caption = f"query {number}, rank {rank + 1}: {os.path.basename(ranking.gallery_sources[rank])}"
            store.append(f'<img id="{maps_id}" alt="{html.escape(caption)}" src="{data_uri(entry.pair_pngs[rank])}">')
    figure = (f'<figure><img alt="ranked list of query {number}" src="{data_uri(entry.ranking_png)}"></figure>'
              if entry.ranking_png else "")
    json_link = (f'<p class="notes"><a href="{html.escape(entry.json_file)}">{html.escape(entry.json_file)}</a></p>'
                 if entry.json_file else "")
    section = (f'<section class="query" id="{anchor}" data-pairs="{len(ranking)}"><h2>{heading}</h2>{notes}'
               f'<div class="ranked">{"".join(items)}</div>{figure}{json_link}</section>')
    return section, "".join(store)


def build_report_html(entries: Sequence[QueryEntry], title: str = "AttriMeter explanations",
                      info: Mapping[str, Any] | None = None, extra_figures: Mapping[str, bytes] | None = None,
                      sections: Sequence[str] = ()) -> str:
    """The whole report as one HTML string (no external resources). ``sections``: further self-contained
    HTML sections appended to the page (e.g. ``audit_output.audit_section_html``, the model audit)."""
    extra_sections = list(sections)
    sections, stores = [], []
    for number, entry in enumerate(entries, 1):
        section, store = _query_section(number, entry)
        sections.append(section)
        stores.append(store)
    details = "".join(f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(str(value))}</dd>"
                      for key, value in (info or {}).items())
    navigation = "".join(f'<a href="#q-{number}">{html.escape(entry.name)}</a>'
                         for number, entry in enumerate(entries, 1))
    extras = "".join(f'<section class="dataset"><h2>{html.escape(name)}</h2><figure><img alt="{html.escape(name)}" '
                     f'src="{data_uri(png)}"></figure></section>' for name, png in (extra_figures or {}).items())
    legend = ("Borders: green = same identity as the query, red = another identity, grey = unknown. Bars: "
              "share of the target's distance per attribute; the dotted tick marks the even share 1/M and "
              "N\u00d7 is the share divided by it (faded bars are at or below it). "
              f"{LABELLED_MARK} with a bold name and a dark outline = the images' labels differ (grey name: "
              f"label unknown); {PREDICTED_MARK} = the attribute branch predicts a difference.")
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
        f"<link rel=\"icon\" href=\"data:,\"><title>{html.escape(title)}</title><style>{_CSS}</style></head>"
        f"<body data-queries=\"{len(entries)}\"><header><h1>{html.escape(title)}</h1><dl>{details}</dl></header>"
        f"<nav>{navigation}</nav><main><p class=\"notes\" style=\"margin:12px 24px;color:#444\">{legend}</p>"
        f"{''.join(sections)}{extras}{''.join(extra_sections)}</main>"
        f"<div class=\"store\">{''.join(stores)}</div>"
        "<div id=\"viewer\" class=\"viewer\" hidden><div class=\"viewer-box\">"
        "<button id=\"viewer-close\" class=\"close\" type=\"button\" aria-label=\"close\">&times;</button>"
        "<img id=\"viewer-image\" alt=\"\"><p id=\"viewer-caption\"></p></div></div>"
        f"<script>{_SCRIPT}</script></body></html>\n"
    )


def write_json(path: str, data: Any, shown_as: str | None = None) -> str:
    """Write ``data`` as JSON (non-finite numbers are refused); errors name ``shown_as`` or ``path``."""
    _write_file(path, json.dumps(data, indent=2, allow_nan=False), shown_as)
    return path


def _write_file(path: str, content: bytes | str, shown_as: str | None = None) -> None:
    """Write one file; a failure (full disk, ...) is a ReportWriteError naming ``shown_as`` (the
    file's final path when it is written into a staging folder) or ``path``."""
    try:
        if isinstance(content, bytes):
            with open(path, "wb") as handle:
                handle.write(content)
        else:
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(content)
    except OSError as error:
        raise ReportWriteError(
            f"cannot write the report file '{shown_as or path}': {error.strerror or error}"
        ) from error


# --- writing a whole report ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRecord:
    """One dataset image: its path and, when known, identity, camera and ground-truth attributes
    ((M,) values, (M,) known) in the model's attribute order, as ``AttributeImageDataset.labels_of``
    returns them."""

    path: str
    pid: int | None = None
    camid: int | None = None
    labels: tuple[Any, Any] | None = None


def _labels_or_unknown(record: ImageRecord, num_attributes: int) -> tuple[np.ndarray, np.ndarray]:
    """The record's (values, known), all-unknown when it has none."""
    if record.labels is None:
        return np.zeros(num_attributes, np.float32), np.zeros(num_attributes, bool)
    values, known = record.labels
    return np.asarray(values, np.float32), np.asarray(known, bool)


def _gallery_labels(gallery: Sequence[ImageRecord], num_attributes: int):
    """((N, M) values, (N, M) known) for ``explain_ranking``, or None when no gallery image has labels."""
    if all(record.labels is None for record in gallery):
        return None
    pairs = [_labels_or_unknown(record, num_attributes) for record in gallery]
    return np.stack([values for values, _ in pairs]), np.stack([known for _, known in pairs])


@dataclass
class ReportFiles:
    """What ``write_report`` wrote (absolute paths)."""

    folder: str
    index: str
    pngs: list[str] = field(default_factory=list)
    jsons: list[str] = field(default_factory=list)
    failed_queries: list[str] = field(default_factory=list)


def _query_stem(number: int) -> str:
    return f"query-{number:03d}"


def write_report(explainer, queries: Sequence[ImageRecord], gallery: Sequence[ImageRecord], folder: str, *,
                 topk: int = 10, top_attributes: int = 3, info: Mapping[str, Any] | None = None,
                 average_maps_images: Sequence[ImageRecord] = (), average_maps_labels=None,
                 title: str = "AttriMeter explanations", dpi: int = 80, overwrite: bool = False,
                 sections: Sequence[str] = ()) -> ReportFiles:
    """Explain each query against the gallery and write a report to ``folder`` (see
    ``prepare_output_dir``): per query a ranked-list PNG, a pair PNG per ranked item and a JSON; with
    ``average_maps_images`` and their labels ((N, M) values, (N, M) known) the dataset-level average
    maps; and ``index.html`` with all of it embedded (and ``sections``, further HTML sections such as the
    model audit's ``audit_output.audit_section_html``). ``dpi`` sets the PNGs' resolution (the HTML
    embeds every figure, so its size grows with dpi squared).

    The report is written into a temporary folder next to ``folder`` and renamed to ``folder`` only
    when complete; a report already there is replaced only with ``overwrite``, and only then. On any
    error ``folder`` is left exactly as it was and the temporary folder is removed.

    A query whose image cannot be read is reported in its JSON and in the HTML instead of drawn, but
    when no query at all can be explained nothing is written (ExplainError naming the first one's
    problem). An unreadable gallery image stops the report (every ranking would be wrong), naming the
    file. A file that cannot be written (full disk, ...) is a ReportWriteError naming it.
    """
    from torchreid_attrimeter.explain import ExplainError

    if not queries:
        raise ExplainError("no queries to explain: choose query images (or a number of random ones)")
    folder = os.path.abspath(os.fspath(folder))
    _check_destination(folder, overwrite)
    staged = _staging_folder(folder)
    try:
        files = _write_report_files(explainer, queries, gallery, staged, folder, topk=topk,
                                    top_attributes=top_attributes, info=info,
                                    average_maps_images=average_maps_images,
                                    average_maps_labels=average_maps_labels, title=title, dpi=dpi,
                                    sections=sections)
        _move_into_place(staged, folder, overwrite)
    except BaseException:  # also Ctrl-C: never leave a half-written report behind
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return files


@dataclass
class _StagedFiles:
    """Writes report files into the staging folder while ``files`` records where they will end up:
    errors and the returned paths name the final folder, the one the user asked for."""

    staged: str
    files: ReportFiles

    def _final(self, name: str) -> str:
        return os.path.join(self.files.folder, name)

    def save_png(self, png: bytes, name: str) -> None:
        _write_file(os.path.join(self.staged, name), png, shown_as=self._final(name))
        self.files.pngs.append(self._final(name))

    def save_json(self, data: Any, name: str) -> None:
        write_json(os.path.join(self.staged, name), data, shown_as=self._final(name))
        self.files.jsons.append(self._final(name))


class _RankingGallery:
    """The gallery as every query's ``explain_ranking`` needs it, prepared once: its paths, its
    decomposition (the expensive part, shared by all queries) and the identities, cameras and labels
    passed only when every image (identities, cameras) or any image (labels) has them."""

    def __init__(self, explainer, gallery: Sequence[ImageRecord]):
        self.explainer = explainer
        self.paths = [record.path for record in gallery]
        self.pids = [record.pid for record in gallery]
        self.camids = [record.camid for record in gallery]
        self.identities_known = all(pid is not None for pid in self.pids)
        self.cameras_known = all(camid is not None for camid in self.camids)
        self.decomposition = explainer.decompose(self.paths, keep_maps=False)
        self.num_attributes = len(explainer.attribute_names)
        self.labels = _gallery_labels(gallery, self.num_attributes)
        self.unknown_labels = (np.zeros((len(gallery), self.num_attributes), np.float32),
                               np.zeros((len(gallery), self.num_attributes), bool))

    def explain(self, query: ImageRecord, topk: int) -> RankingExplanation:
        """``explain_ranking`` of ``query`` against the gallery, with what is known of both."""
        # Labels are passed when any image has them (images without count as unknown).
        labelled = self.labels is not None or query.labels is not None
        return self.explainer.explain_ranking(
            query.path, self.paths, topk,
            query_pid=query.pid if self.identities_known else None,
            gallery_pids=self.pids if self.identities_known else None,
            query_camid=query.camid if self.cameras_known else None,
            gallery_camids=self.camids if self.cameras_known else None,
            gallery_decomposition=self.decomposition,
            query_labels=_labels_or_unknown(query, self.num_attributes) if labelled else None,
            gallery_labels=(self.labels if self.labels is not None else self.unknown_labels) if labelled else None,
        )


def _write_report_files(explainer, queries: Sequence[ImageRecord], gallery: Sequence[ImageRecord], staged: str,
                        folder: str, *, topk: int, top_attributes: int, info: Mapping[str, Any] | None,
                        average_maps_images: Sequence[ImageRecord], average_maps_labels, title: str,
                        dpi: int, sections: Sequence[str] = ()) -> ReportFiles:
    """The files of ``write_report``, written into ``staged``; the returned paths are in ``folder``,
    where they will be once the staged folder is renamed."""
    files = ReportFiles(folder=folder, index=os.path.join(folder, REPORT_INDEX))
    out = _StagedFiles(staged, files)
    ranking_gallery = _RankingGallery(explainer, gallery)
    entries = [_explain_query(ranking_gallery, query, number, out, topk=topk,
                              top_attributes=top_attributes, dpi=dpi)
               for number, query in enumerate(queries, 1)]
    _check_some_query_explained(queries, entries, files.failed_queries)
    extra = _write_average_maps(explainer, average_maps_images, average_maps_labels, out, dpi)
    _write_file(os.path.join(staged, REPORT_INDEX),
                build_report_html(entries, title=title, info=info, extra_figures=extra, sections=sections),
                shown_as=files.index)
    return files


def _explain_query(gallery: _RankingGallery, query: ImageRecord, number: int, out: _StagedFiles, *,
                   topk: int, top_attributes: int, dpi: int) -> QueryEntry:
    """Explain query ``number`` and write its figures and JSON. A query whose image cannot be read is
    recorded (its JSON holds the error, ``failed_queries`` its path) rather than raised, so that one
    bad query does not cost the whole report."""
    from torchreid_attrimeter.data import CorruptImageError
    from torchreid_attrimeter.explain import ExplainError

    entry = QueryEntry(name=os.path.basename(query.path), json_file=f"{_query_stem(number)}.json")
    try:
        ranking = gallery.explain(query, topk)
    except (FileNotFoundError, CorruptImageError, ExplainError) as error:
        entry.error = str(error)
        out.files.failed_queries.append(query.path)
        out.save_json({"query": query.path, "error": entry.error}, entry.json_file)
        return entry
    entry.ranking = ranking
    _write_query_figures(entry, number, out, top_attributes=top_attributes, dpi=dpi)
    return entry


def _write_query_figures(entry: QueryEntry, number: int, out: _StagedFiles, *, top_attributes: int,
                         dpi: int) -> None:
    """Draw an explained query's ranked list and one pair figure per ranked item, keep their PNGs in
    ``entry`` (the HTML embeds them) and write them, then its JSON, which names each figure's file."""
    from torchreid_attrimeter.visualize import draw_pair, draw_ranking, figure_png_bytes

    stem, ranking = _query_stem(number), entry.ranking
    figure = draw_ranking(ranking, attributes_per_item=top_attributes, title=f"query {number}")
    entry.ranking_png = figure_png_bytes(figure, dpi)
    out.save_png(entry.ranking_png, f"{stem}_ranking.png")
    record = ranking.to_dict()
    for rank, explanation in enumerate(ranking.explanations, 1):
        png = figure_png_bytes(draw_pair(explanation, k=top_attributes,
                                         title=f"query {number}, rank {rank}"), dpi)
        entry.pair_pngs.append(png)
        out.save_png(png, f"{stem}_rank-{rank:02d}.png")
        record["ranked"][rank - 1]["figure"] = f"{stem}_rank-{rank:02d}.png"
    record["figure"] = f"{stem}_ranking.png"
    out.save_json(record, entry.json_file)


def _check_some_query_explained(queries: Sequence[ImageRecord], entries: Sequence[QueryEntry],
                                failed_queries: Sequence[str]) -> None:
    """Refuse a report in which no query could be explained (it would show nothing), naming the
    first query's problem."""
    from torchreid_attrimeter.explain import ExplainError

    if len(failed_queries) == len(queries):
        first = entries[0]
        raise ExplainError(
            f"all {len(queries)} queries failed, so no report was written; the first, '{queries[0].path}': "
            f"{first.error}"
        )


def _write_average_maps(explainer, images: Sequence[ImageRecord], labels, out: _StagedFiles,
                        dpi: int) -> dict[str, bytes]:
    """The dataset-level average maps of ``images`` with their ``labels`` ((N, M) values, (N, M) known),
    written as PNG and JSON; returned as the report's extra figures (none without images or labels)."""
    from torchreid_attrimeter.visualize import draw_average_maps, figure_png_bytes

    extra = {}
    if images and labels is not None:
        values, known = labels
        average = explainer.average_maps([record.path for record in images], values, known)
        extra["average attention maps"] = figure_png_bytes(draw_average_maps(average), dpi)
        out.save_png(extra["average attention maps"], "average_maps.png")
        out.save_json({**average.to_dict(), "images": len(images)}, "average_maps.json")
    return extra
