"""Interpreter checkpoints: where they go, how they are written, and how they are read back.

A checkpoint is torchreid's ``<save_dir>/model/model.pth.tar-<epoch>`` holding the interpreter's
weights only (never the frozen target's) and an ``attrimeter`` record naming what the interpreter
was trained on: the target (torchreid name, weights path and the sha256 of their content, image
size), the attribute names and schema, and the distance metric. Two readers use the record: the
engine, to resume training (``AttriMeterEngine.resume``), and the explainer, to rebuild the model
(``load_attrimeter_checkpoint``). Both refuse a checkpoint whose target weights are not the ones it
was trained for, since its maps would then explain another model.

The engine adds the training state (optimizer, scheduler, random-number state) to the file; this
module knows only what every reader needs.
"""

from __future__ import annotations

import contextlib
import glob
import os
import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import IO, Any

import torch

from torchreid_attrimeter import compat
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.models import build_attrimeter
from torchreid_attrimeter.models.attrimeter import file_sha256

# The record's version: a reader refuses any other, so a later layout change cannot be misread.
CHECKPOINT_FORMAT = "torchreid-attrimeter/1"
# torchreid's names: its tools, and ours, find the checkpoints of a run by them.
CHECKPOINT_PREFIX = "model.pth.tar-"
CHECKPOINT_PATTERN = re.compile(rf"^{re.escape(CHECKPOINT_PREFIX)}(\d+)$")
BEST_CHECKPOINT = "model-best.pth.tar"


class ResumeError(AttriMeterError, RuntimeError):
    """A checkpoint that does not belong to the configured target, attributes or interpreter."""


# --- layout ------------------------------------------------------------------------------------------


def checkpoint_dir(save_dir: str) -> str:
    """Where checkpoints go: ``<save_dir>/model`` (torchreid's Engine names it after the model)."""
    return os.path.join(save_dir, "model")


def checkpoint_path(save_dir: str, epoch: int) -> str:
    """``<save_dir>/model/model.pth.tar-<epoch>``, the checkpoint written after ``epoch`` epochs."""
    return os.path.join(checkpoint_dir(save_dir), f"{CHECKPOINT_PREFIX}{epoch}")


def list_checkpoints(save_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of every ``model.pth.tar-<epoch>`` in ``<save_dir>/model``, by epoch."""
    found = []
    for path in glob.glob(os.path.join(checkpoint_dir(save_dir), f"{CHECKPOINT_PREFIX}*")):
        match = CHECKPOINT_PATTERN.match(os.path.basename(path))
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(save_dir: str) -> str | None:
    """The checkpoint with the highest epoch in ``<save_dir>/model``; a training run refuses a folder
    holding another run's checkpoints, so this is the latest of the one run the folder holds."""
    checkpoints = list_checkpoints(save_dir)
    return checkpoints[-1][1] if checkpoints else None


# --- writing files that survive interruptions ----------------------------------------------------


def _fsync_directory(directory: str) -> None:
    """Make a rename in ``directory`` durable (POSIX); not possible on every OS, hence best effort."""
    try:
        descriptor = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_file_safely(path: str, write: Callable[[IO[bytes]], None], overwrite: bool = True) -> None:
    """Write ``path`` so that it ends up holding everything ``write(stream)`` produced, or is left as
    it was: the bytes go to a hidden temporary file in the same folder (never named like a
    checkpoint or results file), are fsync'd, then renamed over ``path``; with ``overwrite=False``
    the file is linked to ``path`` instead, which fails with FileExistsError if ``path`` exists.
    Whatever stops the write (an error, a full disk, Ctrl-C) removes the temporary file."""
    directory = os.path.dirname(os.path.abspath(path))
    partial = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex[:12]}.partial")
    # os.open rather than tempfile: the file gets the umask's permissions, not tempfile's 0600.
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(descriptor, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        if overwrite:
            os.replace(partial, path)
        else:
            try:
                os.link(partial, path)  # atomic, and refuses an existing path
            except FileExistsError:
                raise
            except OSError:  # a file system without hard links: check, then rename
                if os.path.exists(path):
                    raise FileExistsError(f"'{path}' exists") from None
                os.replace(partial, path)
            else:
                os.remove(partial)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    _fsync_directory(directory)


# --- one training run's checkpoints ------------------------------------------------------------------


class CheckpointWriter:
    """The checkpoints one training run writes into ``<save_dir>/model``, under torchreid's names.

    One folder holds one run: a fresh run refuses a folder with checkpoints, a resumed one a folder
    that is not the one it resumed from or that holds checkpoints later than where it starts, because
    ``--evaluate`` and ``--resume auto`` take the folder's latest checkpoint. A file this run did not
    write is never replaced. A checkpoint written after an epoch without evaluation ("rolling") is
    removed when the next one is written; evaluated ones stay.
    """

    def __init__(self) -> None:
        self.written: set[str] = set()
        self.rolling: str | None = None

    def check_folder(self, save_dir: str, start_epoch: int, resumed_from: str | None) -> None:
        """Raise FileExistsError, naming the folder and the fix, when ``save_dir`` holds checkpoints of
        another run, or of this run later than ``start_epoch``."""
        found = list_checkpoints(save_dir)
        if not found:
            return
        directory = checkpoint_dir(save_dir)
        names = [os.path.basename(path) for _, path in found]
        shown = ", ".join(names) if len(names) <= 3 else f"{len(names)} checkpoints, {names[0]} to {names[-1]}"
        resumed_here = resumed_from is not None and os.path.samefile(
            os.path.dirname(os.path.abspath(resumed_from)), directory)
        if not resumed_here:
            started = f"resumed from '{resumed_from}', outside that folder," if resumed_from else "fresh"
            raise FileExistsError(
                f"data.save_dir '{save_dir}' holds the checkpoints of another run in '{directory}' "
                f"({shown}); this {started} run would mix its checkpoints and results with them, and "
                f"--evaluate / --resume auto would pick up the other run's latest. Set another "
                f"data.save_dir for a new run, or continue that run with --resume auto (model.resume auto)."
            )
        later = [name for (epoch, _), name in zip(found, names) if epoch > start_epoch]
        if later:
            raise FileExistsError(
                f"'{directory}' already holds checkpoints of a run that got further than epoch "
                f"{start_epoch} ({', '.join(later)}); training from '{resumed_from}' would branch off "
                f"it and overwrite them. Resume the latest one (model.resume auto, or --resume PATH), or "
                f"set another data.save_dir."
            )

    def save(self, save_dir: str, epoch: int, state: dict, *, rolling: bool, is_best: bool = False) -> str:
        """Write ``state`` as ``<save_dir>/model/model.pth.tar-<epoch>`` (and as the best checkpoint
        when ``is_best``) through a temporary file, so an interruption leaves no broken checkpoint;
        returns the path. A failed write raises OSError naming the file."""
        directory = checkpoint_dir(save_dir)
        os.makedirs(directory, exist_ok=True)
        path = checkpoint_path(save_dir, epoch)
        if os.path.exists(path) and path not in self.written:
            raise FileExistsError(
                f"'{path}' exists and was not written by this run; refusing to overwrite it. Move it away "
                f"or set another data.save_dir."
            )
        _write_checkpoint(path, state)
        self.written.add(path)
        print(f'Checkpoint saved to "{path}"')

        previous = self.rolling
        if (previous is not None and previous != path and os.path.dirname(previous) == directory
                and os.path.exists(previous)):
            os.remove(previous)
        self.rolling = path if rolling else None
        if is_best:
            _write_checkpoint(os.path.join(directory, BEST_CHECKPOINT), state)
        return path


def _write_checkpoint(path: str, state: dict) -> None:
    try:
        write_file_safely(path, lambda stream: torch.save(state, stream))
    except (OSError, RuntimeError) as error:  # torch reports a full disk as a RuntimeError
        raise OSError(
            f"could not write the checkpoint '{path}' ({str(error).strip().splitlines()[0]}); the "
            f"checkpoints written before are untouched. Free disk space or fix the folder's "
            f"permissions, then continue with --resume auto"
        ) from error


# --- the record ----------------------------------------------------------------------------------------


def attrimeter_record(target_spec: Mapping[str, Any], attribute_names: Sequence[str], schema: str,
                      metric: str) -> dict[str, Any]:
    """The ``attrimeter`` entry of a checkpoint: what the interpreter was trained on."""
    return {
        "format": CHECKPOINT_FORMAT,
        "target": dict(target_spec),
        "attribute_names": list(attribute_names),
        "schema": schema,
        "metric": metric,
    }


def read_checkpoint(path: str, *, error: type[Exception], fix: str,
                    trusted: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """(checkpoint, its ``attrimeter`` record) of an interpreter checkpoint.

    A file without a record of this version (a target's own weights, a torchreid checkpoint) raises
    ``error`` naming the file, followed by ``fix``: each reader says what the user should give it
    instead. An unreadable file raises ``compat.UnreadableCheckpointError``.
    """
    checkpoint = compat.load_checkpoint(path, trusted=trusted)
    record = checkpoint.get("attrimeter") if isinstance(checkpoint, dict) else None
    if not isinstance(record, dict):
        raise error(f"'{path}' is not an AttriMeter interpreter checkpoint (no 'attrimeter' record of format "
                    f"{CHECKPOINT_FORMAT}): {fix}")
    if record.get("format") != CHECKPOINT_FORMAT:
        raise error(f"'{path}' is not an AttriMeter interpreter checkpoint this version reads: its 'attrimeter' "
                    f"record has format {record.get('format')!r}, not {CHECKPOINT_FORMAT}: {fix}")
    return checkpoint, record


def _short(digest: str | None) -> str:
    return digest[:12] if digest else "none (no weights file)"


def verify_target(path: str, target: Mapping[str, Any], weights: str | os.PathLike | None, *,
                  name: str | None, error: type[Exception], fix: str,
                  weights_sha256: str | None = None) -> None:
    """Refuse to use the checkpoint ``path`` with target weights other than those it was trained for.

    target: the record's target (its torchreid ``name``, ``weights`` and ``weights_sha256``).
    weights, name: the weights file and torchreid name (None for a model object) of the target as it
    is built now; ``weights_sha256`` the file's hash when already known (an AttriMeter records it
    when built), so that the file is not read again.
    Raises ``error`` naming the names, or both files and hashes, followed by ``fix``.
    """
    if name != target.get("name"):
        raise error(f"'{path}' explains the target '{target.get('name')}', not '{name}': {fix}")
    if weights_sha256 is None and weights is not None:
        weights_sha256 = file_sha256(weights)
    recorded = target.get("weights_sha256")
    if weights_sha256 != recorded:
        raise error(
            f"the target weights '{None if weights is None else os.fspath(weights)}' (sha256 "
            f"{_short(weights_sha256)}) are not the ones the interpreter '{path}' was trained for "
            f"('{target.get('weights')}', sha256 {_short(recorded)}): the target changed since, so the "
            f"interpreter would explain another model: {fix}"
        )


# --- the explainer's way in ------------------------------------------------------------------------------


def load_attrimeter_checkpoint(path: str | os.PathLike, *, target_weights: str | os.PathLike | None = None,
                               trusted: bool = False) -> tuple[torch.nn.Module, dict[str, Any]]:
    """Re-create the AttriMeter model of an interpreter checkpoint written by ``AttriMeterEngine``.

    The target is rebuilt from the recorded weights file (or ``target_weights`` if it moved), whose
    sha256 must match the record. Returns (model in eval mode, the record). Errors are
    ``ExplainError`` (``FileNotFoundError`` for missing weights), as ``Explainer.from_checkpoint``
    documents.
    """
    from torchreid_attrimeter.explain import ExplainError  # explain imports this module

    path = os.fspath(path)
    checkpoint, record = read_checkpoint(path, trusted=trusted, error=ExplainError,
                                         fix="give a model.pth.tar-N written by the AttriMeter engine (attrimeter-train)")
    target = dict(record["target"])
    if not target.get("name"):
        raise ExplainError(
            f"'{path}' explains a target built from a model object ({target.get('model_class')}), not a "
            f"torchreid model name, so it cannot be rebuilt from the checkpoint: build the AttriMeter "
            f"yourself and use Explainer(model, attribute_names, metric, image_size)"
        )
    weights = os.fspath(target_weights) if target_weights is not None else target.get("weights")
    if weights is None:
        raise ExplainError(
            f"'{path}' records no target weights file (its target '{target['name']}' was built without "
            f"trained weights), so the target cannot be rebuilt: build the AttriMeter yourself and use "
            f"Explainer(model, attribute_names, metric, image_size)"
        )
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            f"the target weights '{weights}' of the interpreter checkpoint '{path}' are gone (target "
            f"'{target['name']}', sha256 {_short(target.get('weights_sha256'))}): pass the moved file as "
            f"target_weights= (tool: --target-weights PATH)"
        )
    verify_target(path, target, weights, name=target["name"], error=ExplainError,
                  fix="use the original weights file (target_weights=, tool: --target-weights PATH)")
    state_dict = compat.extract_state_dict(checkpoint, source=f"'{path}'")
    if "head.hidden.weight" not in state_dict:
        raise ExplainError(f"'{path}' holds no decomposition head weights ('head.hidden.weight')")
    model = build_attrimeter(
        target["name"],
        len(record["attribute_names"]),
        target_weights=weights,
        variant="trunk" if any(key.startswith("interpreter_trunk.") for key in state_dict) else "head",
        hidden_channels=int(state_dict["head.hidden.weight"].shape[0]),
        attribute_branch=any(key.startswith("attribute_branch.") for key in state_dict),
        image_size=tuple(target["image_size"]),
        trusted=trusted,
    )
    model.load_interpreter_state_dict(state_dict)
    return model.eval(), record
