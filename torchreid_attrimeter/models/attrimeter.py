"""The AttriMeter module: a frozen torchreid target with a trainable interpreter grafted on it, and
``build_attrimeter`` that makes one from a model name or model, plus optional weights."""

from __future__ import annotations

import difflib
import hashlib
import os
import warnings
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from torchreid_attrimeter import compat
from torchreid_attrimeter.decomposition import Decomposition
from torchreid_attrimeter.models.adapters import (
    TargetSplit,
    check_split,
    clone_state,
    make_interpreter_trunk,
    split_target,
)
from torchreid_attrimeter.models.head import AttributeDecompositionHead, AttributeRecognitionBranch

VARIANTS = ("trunk", "head")



class AttriMeter(nn.Module):
    """A frozen target and its interpreter.

    ``eval()`` forward: images (B, 3, H, W) -> the target's own embedding (B, D), exactly what
    ``target.eval()(images)`` returns, so torchreid's feature extraction and ranking work unchanged.
    ``train()`` forward: the Decomposition of the batch (what the losses need).
    The target always stays in eval mode with frozen parameters; only ``interpreter_parameters()``
    learn.
    """

    def __init__(self, split: TargetSplit, num_attributes: int, interpreter_channels: int,
                 interpreter_trunk: nn.Module | None = None, hidden_channels: int = 256,
                 attribute_branch: bool = False, target_spec: dict | None = None):
        super().__init__()
        self.target = split.target
        self._split = split  # a plain object holding references into self.target (no second copy)
        self.variant = "trunk" if interpreter_trunk is not None else "head"
        self.num_attributes = num_attributes
        self.target_spec = dict(target_spec or {})
        self.interpreter_trunk = interpreter_trunk
        self.head = AttributeDecompositionHead(interpreter_channels, num_attributes, hidden_channels)
        self.attribute_branch = (AttributeRecognitionBranch(interpreter_channels, num_attributes)
                                 if attribute_branch else None)
        self.target.eval()

    @property
    def target_split(self) -> TargetSplit:
        """The frozen target's stem / trunk / tail (for callers that run the target's own path, e.g.
        the feature cache and the faithfulness tests)."""
        return self._split

    # --- modes and parameters -------------------------------------------------------------------

    def train(self, mode: bool = True) -> AttriMeter:
        super().train(mode)
        self.target.eval()  # its BN statistics must never update
        return self

    def interpreter_parameters(self) -> list[nn.Parameter]:
        """What the optimizer gets: everything but the target."""
        return [parameter for name, parameter in self.named_parameters() if not name.startswith("target.")]

    def interpreter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable parts only (interpreter trunk, head, attribute branch)."""
        return {key: value for key, value in self.state_dict().items() if not key.startswith("target.")}

    def load_interpreter_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        own = self.interpreter_state_dict()
        missing = sorted(set(own) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(own))
        mismatched = sorted(key for key in set(own) & set(state_dict) if own[key].shape != state_dict[key].shape)
        if missing or unexpected or mismatched:
            raise ValueError(
                f"interpreter weights do not fit this AttriMeter (target {self.target_spec.get('name')}, "
                f"variant '{self.variant}', {self.num_attributes} attributes): missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {mismatched[:5]}. Build the AttriMeter with the "
                f"target, variant, num_attributes and attribute_branch the checkpoint was trained with."
            )
        self.load_state_dict({**self.target.state_dict(prefix="target."), **state_dict}, strict=True)

    # --- forward ---------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor) -> torch.Tensor | Decomposition:
        if self.training:
            return self.decompose(images)
        _check_images(images)
        return self.target(images)

    def decompose(self, images: torch.Tensor) -> Decomposition:
        """images (B, 3, H, W) -> Decomposition: embedding (B, D), attribute_embeddings (B, M, D),
        maps (B, M, h, w), attribute_logits (B, M) or None. Works in train and eval mode."""
        _check_images(images)
        split = self._split
        with torch.no_grad():
            state = split.stem(images)
            interpreter_state = clone_state(state) if self.interpreter_trunk is not None else None
            feature_map, context = split.trunk(state)
        return self.decompose_target_features(feature_map, context, interpreter_state)

    def decompose_target_features(self, feature_map: torch.Tensor, context: Any = None,
                                  stem_state: Any = None) -> Decomposition:
        """``decompose`` after the frozen target's stem and trunk (docs/method.md §2-3): F (B, C, h, w)
        and the trunk's context give the embedding and, through the maps, the attribute embeddings.

        stem_state: the stem output the 'trunk' variant's interpreter trunk starts from (None for the
        'head' variant); it must not be a tensor the target's trunk also reads, since some torchreid
        blocks modify their input in place. The feature cache calls this with stored F and stem
        outputs, so cached and image training run the same computation.
        """
        split = self._split
        with torch.no_grad():
            embedding = split.tail(feature_map, context)
        if self.interpreter_trunk is not None:
            if stem_state is None:
                raise ValueError("a 'trunk' AttriMeter needs the target's stem output (stem_state) to run its "
                                 "interpreter trunk")
            interpreter_features = self.interpreter_trunk(stem_state)
        else:
            interpreter_features = feature_map
        maps = self.head(interpreter_features)
        attribute_embeddings = split.tail_of_products(feature_map, maps, context)
        attribute_logits = None
        if self.attribute_branch is not None:
            attribute_logits = self.attribute_branch(interpreter_features)
        return Decomposition(embedding, attribute_embeddings, maps, attribute_logits)


def _check_images(images: torch.Tensor) -> None:
    if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise ValueError(f"AttriMeter expects images of shape (B, 3, H, W), got {shape}")
    if not torch.isfinite(images).all():
        raise ValueError("the input images contain NaN or infinite values (check the data loading and "
                         "normalisation)")


# --- building --------------------------------------------------------------------------------------


def _classifier_size(state_dict: Mapping[str, torch.Tensor]) -> int | None:
    """Number of training identities the weights' classifier was sized for, if any."""
    for key, value in state_dict.items():
        if key.split(".")[0].startswith("classifier") and key.endswith("weight") and value.dim() == 2:
            return int(value.shape[0])
    return None


def file_sha256(path: str | os.PathLike) -> str:
    """The hex sha256 of a file's content: what ``target_spec['weights_sha256']`` records, and what
    a checkpoint's target weights are verified with."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _freeze(model: nn.Module, tell_user: bool) -> None:
    needs_freezing = model.training or any(parameter.requires_grad for parameter in model.parameters())
    if needs_freezing and tell_user:
        warnings.warn(
            f"the target {type(model).__name__} was in train mode or had trainable parameters: AttriMeter "
            f"puts it in eval mode and freezes it (it never changes during interpreter training)",
            stacklevel=3,
        )
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def build_attrimeter(target: str | nn.Module, num_attributes: int,
                     target_weights: str | os.PathLike | None = None, *, variant: str = "trunk",
                     hidden_channels: int = 256, attribute_branch: bool = False,
                     image_size: tuple[int, int] = (256, 128), trusted: bool = False,
                     pretrained: bool = False) -> AttriMeter:
    """Graft an AttriMeter interpreter onto a torchreid target.

    target: a torchreid model name (``compat.available_model_names()``) or a built torchreid model.
    target_weights: a model-zoo file or torchreid checkpoint; a classifier sized for other
        identities is skipped, weights of another architecture are an error.
    variant: 'trunk' (a trainable copy of the target's late layers feeds the head) or 'head' (the
        head reads the target's feature map directly).
    image_size: (H, W) the model will see; the split is checked on a random batch of that size.
    trusted: allow full unpickling of ``target_weights`` (only for files you trust).
    pretrained: when building from a name, let torchreid load its ImageNet weights (downloads).
    """
    image_size = _check_build_arguments(num_attributes, variant, hidden_channels, image_size)

    state_dict, weights_path = None, None
    if target_weights is not None:
        weights_path = os.fspath(target_weights)
        state_dict = compat.load_state_dict_file(weights_path, trusted=trusted)

    if isinstance(target, str):
        name = target
        available = compat.available_model_names()
        if name not in available:
            close = difflib.get_close_matches(name, available, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ValueError(f"unknown torchreid model '{name}'.{hint} Available: {', '.join(available)}")
        num_classes = (_classifier_size(state_dict) if state_dict is not None else None) or 1
        model = compat.build_model(name, num_classes=num_classes, loss="softmax", pretrained=pretrained,
                                   use_gpu=False)
        tell_user = False
    elif isinstance(target, nn.Module):
        model, name, tell_user = target, type(target).__name__, True
    else:
        raise TypeError(f"target must be a torchreid model name or an nn.Module, got {type(target).__name__}")

    if state_dict is not None:
        compat.load_matching_weights(model, state_dict, source=f"'{weights_path}'")
    _freeze(model, tell_user)

    split = split_target(model, name)
    interpreter_trunk = make_interpreter_trunk(split) if variant == "trunk" else None
    sizes = check_split(split, image_size, interpreter_trunk=interpreter_trunk)
    target_spec = {
        "name": name if isinstance(target, str) else None,
        "model_class": f"{type(model).__module__}.{type(model).__name__}",
        "weights": weights_path,
        "weights_sha256": file_sha256(weights_path) if weights_path else None,
        "image_size": image_size,
        "embedding_dim": sizes["embedding_dim"],
    }
    return AttriMeter(split, num_attributes, interpreter_channels=sizes["interpreter_channels"],
                      interpreter_trunk=interpreter_trunk, hidden_channels=hidden_channels,
                      attribute_branch=attribute_branch, target_spec=target_spec)


def _check_build_arguments(num_attributes, variant, hidden_channels, image_size) -> tuple[int, int]:
    """``build_attrimeter``'s plain arguments, checked before any weights are read; returns image_size
    as (height, width) ints."""
    if isinstance(num_attributes, bool) or not isinstance(num_attributes, int) or num_attributes <= 0:
        raise ValueError(f"num_attributes must be a positive integer, got {num_attributes!r}")
    if variant not in VARIANTS:
        raise ValueError(f"unknown AttriMeter variant '{variant}': use one of {VARIANTS}")
    if isinstance(hidden_channels, bool) or not isinstance(hidden_channels, int) or hidden_channels <= 0:
        raise ValueError(f"hidden_channels must be a positive integer, got {hidden_channels!r}")
    if len(tuple(image_size)) != 2 or min(image_size) <= 0:
        raise ValueError(f"image_size must be (height, width) with positive sizes, got {image_size!r}")
    return int(image_size[0]), int(image_size[1])


def describe(model: AttriMeter) -> dict[str, Any]:
    """Sizes of the parts, for logs."""
    count = sum
    return {
        "target": model.target_spec.get("name") or model.target_spec.get("model_class"),
        "variant": model.variant,
        "num_attributes": model.num_attributes,
        "target_parameters": count(parameter.numel() for parameter in model.target.parameters()),
        "interpreter_parameters": count(parameter.numel() for parameter in model.interpreter_parameters()),
    }
