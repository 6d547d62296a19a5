"""The command-line tools: the console scripts setup.py declares, ``--help`` of every tool run as
``python -m torchreid_attrimeter.cli.<module>`` and as ``python tools/<name>.py``, and the one error
handler they share (cli/errors.py): exit status 2 and one ``error:`` line for bad input, 1 for a
failure of the system, tracebacks for bugs."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from importlib import metadata

import pytest

from torchreid_attrimeter.attributes import SchemaError, get_schema
from torchreid_attrimeter.cli import make_synthetic_dataset, visualize
from torchreid_attrimeter.cli.errors import run_tool
from torchreid_attrimeter.config import ConfigError
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.report import ReportFolderError, ReportWriteError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# console script -> (entry point, cli module, script in tools/)
TOOLS = {
    "attrimeter-train": ("torchreid_attrimeter.cli.train:cli", "train", "train.py"),
    "attrimeter-visualize": ("torchreid_attrimeter.cli.visualize:main", "visualize", "visualize_decomposition.py"),
    "attrimeter-demo": ("torchreid_attrimeter.cli.demo:cli", "demo", "demo.py"),
    "attrimeter-inspect-attributes": ("torchreid_attrimeter.cli.inspect_attributes:main", "inspect_attributes",
                                      "inspect_attributes.py"),
    "attrimeter-make-synthetic-dataset": ("torchreid_attrimeter.cli.make_synthetic_dataset:main",
                                          "make_synthetic_dataset", "make_synthetic_dataset.py"),
    "attrimeter-audit": ("torchreid_attrimeter.cli.audit:main", "audit", "audit_model.py"),
}

# Runs in a child process: every tool's --help both ways, as `python -m` and `python tools/x.py` run
# them (runpy is what `-m` uses), so the package is imported once rather than ten times.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys, warnings
warnings.simplefilter("ignore")
results = {}
for kind, target in json.loads(sys.argv[1]):
    sys.argv = [target, "--help"]
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            if kind == "module":
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(target, run_name="__main__")
        code = "no exit"
    except SystemExit as done:
        code = done.code
    results[target] = {"code": code, "out": out.getvalue()}
print(json.dumps(results))
"""


def test_the_console_scripts_are_declared_and_installed():
    # Every copy of the metadata on the path: a stale torchreid_attrimeter.egg-info left in the checkout by
    # an older install can come first and hold none.
    entry_points = {entry.name: entry for distribution in metadata.distributions()
                    if distribution.metadata["Name"] == "torchreid-attrimeter"
                    for entry in distribution.entry_points if entry.group == "console_scripts"}
    assert {name: entry.value for name, entry in entry_points.items()} == {
        name: value for name, (value, _, _) in TOOLS.items()}
    for entry in entry_points.values():
        assert callable(entry.load())
    scripts = os.path.dirname(sys.executable)  # pip puts them next to the environment's python
    if any(name.startswith("attrimeter-") for name in os.listdir(scripts)):
        assert all(os.path.isfile(os.path.join(scripts, name)) for name in TOOLS)
    with open(os.path.join(REPO, "setup.py"), encoding="utf-8") as handle:
        declared = handle.read()
    assert all(f'"{name} = {value}"' in declared for name, (value, _, _) in TOOLS.items())


def test_every_tool_answers_help_as_a_module_and_as_a_script():
    runs = [("module", f"torchreid_attrimeter.cli.{module}") for _, module, _ in TOOLS.values()]
    runs += [("script", os.path.join(REPO, "tools", script)) for _, _, script in TOOLS.values()]
    completed = subprocess.run([sys.executable, "-c", HELP_RUNNER, json.dumps(runs)], capture_output=True,
                               text=True, timeout=300, cwd=REPO, check=False,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads(completed.stdout.splitlines()[-1])
    for _, target in runs:
        assert results[target]["code"] == 0, (target, results[target])
        assert results[target]["out"].startswith("usage:"), (target, results[target]["out"][:200])


def test_the_tools_scripts_are_thin_and_edit_no_import_path():
    for _, module, script in TOOLS.values():
        with open(os.path.join(REPO, "tools", script), encoding="utf-8") as handle:
            text = handle.read()
        assert f"from torchreid_attrimeter.cli.{module} import" in text and len(text.splitlines()) < 20
    for name in os.listdir(os.path.join(REPO, "tools")):
        if name.endswith(".py"):
            with open(os.path.join(REPO, "tools", name), encoding="utf-8") as handle:
                assert "sys" + ".path" not in handle.read(), name


# --- the error handler --------------------------------------------------------------------------------


class _PackageError(AttriMeterError, ValueError):
    pass


@pytest.mark.parametrize("error, status, line", [
    (_PackageError("config key 'x' is wrong"), 2, "error: config key 'x' is wrong"),
    (FileNotFoundError("image file not found: 'a.jpg'"), 2, "error: image file not found: 'a.jpg'"),
    (FileExistsError("'log' holds another run"), 2, "error: 'log' holds another run"),
    (ReportFolderError("the output folder 'r' already holds a report"), 2,
     "error: the output folder 'r' already holds a report"),
    (SystemExit("out was made with other settings"), 2, "error: out was made with other settings"),
    # an errno given for callers: the user reads the message alone
    (OSError(errno.ENOSPC, "could not write 'results.json'"), 1, "error: could not write 'results.json'"),
    # a package error that is a write failure is the system's failure, not the user's
    (ReportWriteError("cannot write the report file 'r/index.html': No space left on device"), 1,
     "error: cannot write the report file 'r/index.html': No space left on device"),
])
def test_the_handler_gives_one_line_and_the_exit_status(error, status, line, capsys):
    def failing(argv):
        raise error

    assert run_tool(failing, []) == status
    assert capsys.readouterr().err.splitlines() == [line]


def test_the_handler_passes_success_argparse_exits_and_bugs_through(capsys):
    assert run_tool(lambda argv: {"a": "record"}, []) == 0
    with pytest.raises(SystemExit) as raised:
        run_tool(make_synthetic_dataset.main, ["--help"])  # the handler inside main lets it pass
    assert raised.value.code == 0
    with pytest.raises(SystemExit) as raised:
        run_tool(make_synthetic_dataset.parse_args, ["--no-such-option"])
    assert raised.value.code == 2
    capsys.readouterr()

    def bug(argv):
        raise ValueError("a plain ValueError is a bug: it keeps its traceback")

    with pytest.raises(ValueError, match="keeps its traceback"):
        run_tool(bug, [])
    assert capsys.readouterr().err == ""


# --- what a user types wrong is exit 2 ----------------------------------------------------------------


def test_options_a_schema_cannot_take_are_bad_input():
    with pytest.raises(SchemaError, match="include_age"):
        get_schema("dukemtmc", include_age=True)
    assert issubclass(SchemaError, AttriMeterError) and issubclass(SchemaError, ValueError)


@pytest.mark.parametrize("arguments", [["--num-ids", "2"], ["--num-cameras", "9"]])
def test_synthetic_parameters_the_generator_cannot_honour_are_exit_2(arguments, tmp_path, capsys):
    assert make_synthetic_dataset.main(["--root", str(tmp_path), *arguments]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: ") and ("at least 3" in line or "num_cameras" in line)
    assert os.listdir(tmp_path) == []


def test_visualize_refuses_a_negative_average_map_count_and_an_unknown_dataset(tmp_path, capsys):
    arguments = ["--checkpoint", "none.pth", "--dataset", "synthetic_attr", "--root", str(tmp_path),
                 "--average-maps-images", "-1", "--output", str(tmp_path / "report")]
    assert visualize.main(arguments) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: --average-maps-images is -1: give 0 (no average maps) or more"]
    with pytest.raises(ConfigError, match="unknown dataset 'no_such_dataset'.*synthetic_attr"):
        visualize.load_dataset("no_such_dataset", str(tmp_path))
