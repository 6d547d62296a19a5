"""The one place that touches torchreid's module layout, and a checkpoint loader for torch >= 2.6.

Two torchreid flavours exist: the PyPI repack ``torchreid==0.2.5`` (library under ``torchreid.reid``)
and the official source install (library at ``torchreid``, version 1.4.0). Everything else in this
package reaches torchreid through the names defined here.
"""

from __future__ import annotations

import importlib
import os
import pickle
import pickletools
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from types import ModuleType
from typing import Any

import torch

from torchreid_attrimeter.errors import AttriMeterError

INSTALL_HINT = "pip install torchreid==0.2.5 scipy opencv-python-headless gdown tensorboard h5py"


class TorchreidMissingError(AttriMeterError, ImportError):
    """torchreid, or one of the modules it needs, cannot be imported."""


def _import_torchreid() -> tuple[ModuleType, str]:
    try:
        torchreid = importlib.import_module("torchreid")
    except ModuleNotFoundError as error:
        missing = error.name or str(error)
        if missing == "torchreid":
            raise TorchreidMissingError(
                f"torchreid is not installed. Install it with: {INSTALL_HINT}"
            ) from None
        # torchreid declares no dependencies: `import torchreid` fails on scipy, cv2, gdown, ...
        raise TorchreidMissingError(
            f"torchreid is installed but cannot be imported: it needs the module '{missing}', "
            f"which is missing. Install torchreid's dependencies with: {INSTALL_HINT}"
        ) from None
    library = getattr(torchreid, "reid", None)
    if isinstance(library, ModuleType) and hasattr(library, "models"):
        return library, "pypi-" + getattr(torchreid, "__version__", "unknown")
    return torchreid, "official-" + getattr(torchreid, "__version__", "unknown")


torchreid_library, TORCHREID_FLAVOUR = _import_torchreid()


def _require(path: str) -> Any:
    """Attribute access from the top-level library, with an error naming what is missing."""
    value: Any = torchreid_library
    for part in path.split("."):
        if not hasattr(value, part):
            raise TorchreidMissingError(
                f"the installed torchreid ({TORCHREID_FLAVOUR}) has no 'torchreid.{path}', which "
                f"torchreid_attrimeter needs. Install torchreid 1.4.0 or the PyPI repack with: "
                f"{INSTALL_HINT}"
            )
        value = getattr(value, part)
    return value


models = _require("models")
data = _require("data")
engine = _require("engine")
metrics = _require("metrics")
optim = _require("optim")
utils = _require("utils")

build_model = _require("models.build_model")
show_avai_models = _require("models.show_avai_models")
Engine = _require("engine.Engine")
ImageDataset = _require("data.ImageDataset")
ImageDataManager = _require("data.ImageDataManager")
register_image_dataset = _require("data.register_image_dataset")
build_optimizer = _require("optim.build_optimizer")
build_lr_scheduler = _require("optim.build_lr_scheduler")
torchreid_evaluate_rank = _require("metrics.evaluate_rank")
compute_distance_matrix = _require("metrics.compute_distance_matrix")
save_checkpoint = _require("utils.save_checkpoint")
set_random_seed = _require("utils.set_random_seed")
mkdir_if_missing = _require("utils.mkdir_if_missing")
read_image = _require("utils.read_image")
build_transforms = _require("data.transforms.build_transforms")
Logger = _require("utils.Logger")
ImageSoftmaxEngine = _require("engine.ImageSoftmaxEngine")
ImageTripletEngine = _require("engine.ImageTripletEngine")
TorchreidMarket1501 = _require("data.datasets.Market1501")
TorchreidDukeMTMCreID = _require("data.datasets.DukeMTMCreID")


def torchreid_submodule(relative: str) -> ModuleType:
    """A torchreid submodule by its flavour-independent name, e.g. ``'data.sampler'``."""
    return importlib.import_module(f"{torchreid_library.__name__}.{relative}")


def available_model_names() -> list[str]:
    """Every name ``build_model`` accepts (torchreid prints them but returns nothing)."""
    factory = torchreid_submodule("models")
    return sorted(factory.__model_factory.keys())


# --- checkpoints -------------------------------------------------------------------------------


def _numpy_safe_globals() -> list:
    """numpy objects torchreid's Engine checkpoints hold (``rank1`` is a numpy scalar)."""
    import numpy as np

    found = []
    for module_name in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                found.append(importlib.import_module(module_name).scalar)
        except (ImportError, AttributeError):
            continue
    found.append(np.dtype)
    found.extend(type(np.dtype(name)) for name in ("float64", "float32", "int64", "int32"))
    return found


class CheckpointError(AttriMeterError, RuntimeError):
    """A checkpoint file that cannot be opened or holds no usable weights."""


class UnreadableCheckpointError(CheckpointError):
    """A checkpoint file whose bytes cannot be read back (truncated, corrupt, not a torch file): the
    fix is a new copy of the file, not another model or option."""


def _first_sentence(error: BaseException) -> str:
    """torch's messages run over several sentences of general advice: the first one says what broke."""
    text = str(error).strip()
    return text.splitlines()[0].split(". ")[0] if text else f"{type(error).__name__}, no message"


def _unreadable(path: str, detail: str) -> UnreadableCheckpointError:
    return UnreadableCheckpointError(
        f"'{path}' cannot be read: the file is truncated or corrupt ({detail}). Download it again, or "
        f"save it again from the run or model that produced it"
    )


def _pickle_is_well_formed(path: str) -> bool:
    """Whether the file's (first) pickle parses to its end. ``pickletools.genops`` only reads opcodes
    and never builds objects, so this is safe on untrusted files; it separates a broken file from
    an intact one that merely holds Python objects weights-only loading refuses."""
    try:
        if zipfile.is_zipfile(path):  # torch >= 1.6 format: <archive>/data.pkl holds the structure
            with zipfile.ZipFile(path) as archive:
                names = [name for name in archive.namelist() if name.rsplit("/", 1)[-1] == "data.pkl"]
                if not names:
                    return False
                data = archive.read(names[0])
            for _ in pickletools.genops(data):
                pass
        else:  # legacy format: a sequence of pickles, the first one the magic number
            with open(path, "rb") as handle:
                for _ in pickletools.genops(handle):
                    pass
    except Exception:  # noqa: BLE001 - any failure to parse means the bytes are broken
        return False
    return True


def load_checkpoint(path: str | os.PathLike, trusted: bool = False) -> Any:
    """Open a torchreid checkpoint or model-zoo file on CPU, under any torch version.

    Safe loading (``weights_only``) is tried first, allowing the numpy scalars that torchreid's own
    Engine checkpoints contain. Anything else that needs full unpickling (which can run code) is
    only opened with ``trusted=True``: pass it for files you made or trust.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: '{path}'")
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if not _pickle_is_well_formed(path):
            raise _unreadable(path, "its pickled data does not parse") from None
        if not trusted:
            raise CheckpointError(
                f"'{path}' holds Python objects beyond tensors and numbers, which torch refuses to "
                f"load safely ({str(error).splitlines()[0]}). If you trust this file, load it with "
                f"trusted=True (option attrimeter.trust_checkpoints in configs)."
            ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise _unreadable(path, _first_sentence(error)) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, ValueError, OSError, pickle.UnpicklingError) as error:
        raise _unreadable(path, _first_sentence(error)) from None
    except Exception as error:  # noqa: BLE001 - e.g. a class the pickle names that no longer exists
        raise CheckpointError(f"'{path}' could not be loaded even as a trusted file: {error}") from None


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> OrderedDict[str, torch.Tensor]:
    """The model weights in a torchreid Engine checkpoint, a model-zoo file or a bare state dict,
    with the ``module.`` prefix of ``nn.DataParallel`` / DDP removed."""
    if isinstance(checkpoint, Mapping) and "state_dict" in checkpoint:
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, Mapping) or not checkpoint:
        raise CheckpointError(f"{source} holds no state dict (found {type(checkpoint).__name__})")
    state_dict = OrderedDict()
    for key, value in checkpoint.items():
        if not torch.is_tensor(value):
            raise CheckpointError(
                f"{source} is not a state dict: entry '{key}' is a {type(value).__name__}"
            )
        state_dict[key.removeprefix("module.")] = value
    return state_dict


def load_state_dict_file(path: str | os.PathLike, trusted: bool = False) -> OrderedDict[str, torch.Tensor]:
    """``extract_state_dict(load_checkpoint(path))``."""
    return extract_state_dict(load_checkpoint(path, trusted=trusted), source=f"'{os.fspath(path)}'")


def load_matching_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor],
                          source: str = "weights") -> dict[str, list[str]]:
    """Copy every weight that matches the model in name and shape (a classifier sized for other
    training identities is expected to be skipped). Raises when nothing but the classifier
    matches, since then the file belongs to another architecture."""
    own = model.state_dict()
    loaded, skipped = [], []
    for key, value in state_dict.items():
        if key in own and own[key].shape == value.shape:
            own[key] = value
            loaded.append(key)
        else:
            skipped.append(key)
    loaded_set = set(loaded)
    missing = [key for key in own if key not in loaded_set]
    # A classifier sized for other identities is the only expected gap; most of the network
    # missing means the file was written by a different architecture.
    if len(loaded) < len(own) / 2:
        raise CheckpointError(
            f"only {len(loaded)} of the {len(own)} weights of {type(model).__name__} are in {source}: "
            f"the file is for another architecture (its first keys: {list(state_dict)[:3]}; "
            f"first weights not found: {missing[:3]})"
        )
    model.load_state_dict(own)
    return {"loaded": loaded, "skipped": skipped, "missing": missing}
