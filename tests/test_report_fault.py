"""tools/visualize_decomposition.py when things go wrong: a bad checkpoint, an unreadable image, no
explainable query, a full disk or a failed rename. Each ends with one 'error:' line, exit code 2 for
bad input and 1 for a failure of the system (full disk, failed rename: cli/errors.py), and leaves the
--output folder exactly as it was and no new or half-written folder next to it. A report folder
holding the user's own files is never replaced."""

from __future__ import annotations

import builtins
import errno
import os
import shutil

import pytest
from explain_fixtures import tiny_setup

from torchreid_attrimeter import report
from torchreid_attrimeter.report import prepare_output_dir


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    return tiny_setup(tmp_path_factory)


@pytest.fixture()
def old_report(tmp_path):
    """A previous report (its own files only)."""
    folder = tmp_path / "report"
    folder.mkdir()
    (folder / "index.html").write_text("<html>the previous report</html>")
    (folder / "query-001.json").write_text('{"query": "old"}')
    (folder / "query-001_ranking.png").write_bytes(b"\x89PNG old figure")
    return folder


def _snapshot(folder) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in sorted(os.listdir(folder))}


def _arguments(setup, output, *extra, checkpoint=None, root=None, queries=("0",)):
    return ["--checkpoint", checkpoint or setup.checkpoint, "--dataset", "synthetic_attr", "--root",
            root or setup.root, "--queries", *queries, "--topk", "1", "--average-maps-images", "0",
            "--output", str(output), *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _copy_of_dataset(setup, tmp_path, split: str, count: int | None = None) -> str:
    """A copy of the tiny dataset whose first ``count`` images (all by default) of ``split`` are corrupt."""
    root = tmp_path / "data"
    shutil.copytree(setup.root, root)
    folder = root / "synthetic_attr" / split
    for name in sorted(os.listdir(folder))[:count]:
        (folder / name).write_bytes(b"\xff\xd8 not a jpeg")
    return str(root)


def _siblings(tmp_path) -> list[str]:
    return sorted(name for name in os.listdir(tmp_path) if name not in ("data", "junk.pth"))


@pytest.mark.parametrize("problem", ["missing checkpoint", "not a checkpoint", "corrupt gallery image"])
def test_a_failed_overwrite_keeps_the_previous_report(report_tool, setup, tmp_path, old_report,
                                                                          capsys, problem):
    before = _snapshot(old_report)
    checkpoint = root = None
    if problem == "missing checkpoint":
        checkpoint = str(tmp_path / "gone.pth.tar")
    elif problem == "not a checkpoint":
        checkpoint = str(tmp_path / "junk.pth")
        (tmp_path / "junk.pth").write_bytes(b"\x80\x02 this is not a checkpoint")
    else:
        root = _copy_of_dataset(setup, tmp_path, "bounding_box_test", count=1)
    code = report_tool.main(_arguments(setup, old_report, "--overwrite", checkpoint=checkpoint, root=root))
    assert code == 2
    line = _one_error_line(capsys)
    if problem == "corrupt gallery image":  # CorruptImageError, named file (was a traceback, exit 1)
        first = min(os.listdir(os.path.join(root, "synthetic_attr", "bounding_box_test")))
        assert "cannot decode image" in line and first in line
    else:
        assert os.path.basename(checkpoint) in line
    assert _snapshot(old_report) == before
    assert _siblings(tmp_path) == ["report"]  # no staging folder left behind


def test_a_report_folder_holding_the_users_files_is_not_replaced(report_tool, setup, tmp_path, old_report, capsys):
    (old_report / "my notes.txt").write_text("written by hand, not by the tool")
    before = _snapshot(old_report)
    assert report_tool.main(_arguments(setup, old_report, "--overwrite")) == 2
    line = _one_error_line(capsys)
    assert "my notes.txt" in line and "--new-folder" in line
    assert _snapshot(old_report) == before
    assert report_tool.main(_arguments(setup, old_report, "--new-folder")) == 0
    assert _snapshot(old_report) == before and (tmp_path / "report-1" / "index.html").is_file()


@pytest.mark.parametrize("extra", [[], ["--new-folder"], ["--overwrite"]])
def test_no_explainable_query_is_an_error_and_writes_nothing(report_tool, setup, tmp_path, old_report, capsys, extra):
    root = _copy_of_dataset(setup, tmp_path, "query")
    output = old_report if extra else tmp_path / "fresh"
    before = _snapshot(old_report)
    assert report_tool.main(_arguments(setup, output, *extra, root=root, queries=("0", "1"))) == 2
    line = _one_error_line(capsys)
    corrupt = os.listdir(os.path.join(root, "synthetic_attr", "query"))
    assert "all 2 queries failed" in line and "cannot decode image" in line
    assert any(name in line for name in corrupt)
    assert _snapshot(old_report) == before
    assert _siblings(tmp_path) == ["report"]  # neither 'fresh' nor 'report-1' nor a staging folder


def _failing_open(which: str):
    """``open`` whose writes of the report's ``which`` files fail as on a full disk."""

    class FullDisk:
        def __init__(self, path):
            self.path = path

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            return False

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def fake_open(path, mode="r", *args, **kwargs):
        if "w" in mode and str(path).endswith(which):
            return FullDisk(path)
        return builtins.open(path, mode, *args, **kwargs)

    return fake_open


@pytest.mark.parametrize("which", [".png", ".json", "index.html"])
@pytest.mark.parametrize("extra", [["--overwrite"], ["--new-folder"]])
def test_a_full_disk_names_the_file_and_keeps_the_previous_report(report_tool, setup, tmp_path, old_report, capsys,
                                                                  monkeypatch, which, extra):
    before = _snapshot(old_report)
    monkeypatch.setattr(report, "open", _failing_open(which), raising=False)
    assert report_tool.main(_arguments(setup, old_report, *extra)) == 1
    line = _one_error_line(capsys)
    written_to = str(old_report) + ("-1" if extra == ["--new-folder"] else "")
    assert f"'{written_to}{os.sep}" in line and which in line and "No space left on device" in line
    assert _snapshot(old_report) == before
    assert _siblings(tmp_path) == ["report"]


def test_a_failed_rename_puts_the_previous_report_back(report_tool, setup, tmp_path, old_report, capsys, monkeypatch):
    before = _snapshot(old_report)
    renames = []

    def rename(source, destination):
        renames.append((source, destination))
        if ".partial-" in os.path.basename(source):  # the new report moving in
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        os.replace(source, destination)

    monkeypatch.setattr(report.os, "rename", rename)
    assert report_tool.main(_arguments(setup, old_report, "--overwrite")) == 1
    assert str(old_report) in _one_error_line(capsys)
    assert len(renames) == 3  # old aside, new in (fails), old back
    assert _snapshot(old_report) == before
    assert _siblings(tmp_path) == ["report"]


def test_a_successful_overwrite_replaces_the_report_and_leaves_nothing_else(report_tool, setup, tmp_path, old_report):
    assert report_tool.main(_arguments(setup, old_report, "--overwrite")) == 0
    names = set(os.listdir(old_report))
    assert {"index.html", "query-001.json", "query-001_ranking.png", "query-001_rank-01.png"} == names
    assert "the previous report" not in (old_report / "index.html").read_text()
    assert _siblings(tmp_path) == ["report"]
    (tmp_path / "plain").mkdir()  # the report folder gets the usual permissions, not a temp folder's 0700
    assert os.stat(old_report).st_mode == os.stat(tmp_path / "plain").st_mode


def test_checking_the_output_folder_creates_and_removes_nothing(tmp_path, old_report):
    assert prepare_output_dir(tmp_path / "new") == str(tmp_path / "new")
    assert prepare_output_dir(old_report, overwrite=True) == str(old_report)
    assert prepare_output_dir(old_report, new_folder=True) == str(old_report) + "-1"
    assert _siblings(tmp_path) == ["report"] and len(os.listdir(old_report)) == 3
    (old_report / "my notes.txt").write_text("mine")
    with pytest.raises(report.ReportFolderError, match="my notes.txt"):
        prepare_output_dir(old_report, overwrite=True)


@pytest.mark.parametrize("problem", ["checkpoint is a folder", "dataset root missing", "config file missing",
                                     "unknown query"])
def test_bad_input_is_one_error_line_exit_2_and_no_output_folder(report_tool, setup, tmp_path, capsys, problem):
    output = tmp_path / "report"
    if problem == "checkpoint is a folder":
        arguments = _arguments(setup, output, checkpoint=str(tmp_path))
    elif problem == "dataset root missing":
        arguments = _arguments(setup, output, root=str(tmp_path / "no-data"))
    elif problem == "config file missing":
        arguments = ["--config-file", str(tmp_path / "none.yaml"), "--output", str(output)]
    else:
        arguments = _arguments(setup, output, queries=("no_such_image.jpg",))
    assert report_tool.main(arguments) == 2
    line = _one_error_line(capsys)
    assert any(word in line for word in (str(tmp_path), "no_such_image.jpg")), line
    assert not output.exists()
