"""Explanations of single distances: how much each attribute contributes to the target's distance
between two images, and where (docs/method.md §2 and §8). This module computes; drawing lives in
``torchreid_attrimeter.visualize`` and takes what it returns.

Every number comes from ``decomposition.pairwise_components``, the implementation the losses and
the evaluator use, so an explanation of a pair equals the evaluator's numbers for that pair.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Union

import numpy as np
import torch
from PIL import Image

from torchreid_attrimeter import compat
from torchreid_attrimeter.attributes import NamedAttributes
from torchreid_attrimeter.checkpoints import load_attrimeter_checkpoint
from torchreid_attrimeter.decomposition import Decomposition, check_metric, pairwise_components
from torchreid_attrimeter.errors import AttriMeterError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ImageInput = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]


class ExplainError(AttriMeterError, ValueError):
    """An input the explainer cannot use (image, checkpoint or identities), named in the message."""


# --- images ------------------------------------------------------------------------------------------


def describe_source(image: ImageInput) -> str:
    """A short human-readable name for an image input (its path, or its type and size)."""
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if isinstance(image, Image.Image):
        return f"PIL image {image.width}x{image.height}"
    if isinstance(image, (np.ndarray, torch.Tensor)):
        return f"{type(image).__name__} {tuple(image.shape)}"
    return type(image).__name__


def to_pil_image(image: ImageInput) -> Image.Image:
    """Any accepted image input as an RGB PIL image; anything else is an ExplainError naming it.

    Paths are opened (missing or undecodable files raise an error naming the file). Arrays are
    (H, W, 3) or (H, W) pixels (an alpha channel (H, W, 4) is dropped) and tensors (3, H, W),
    (1, H, W) or (1, 3, H, W) images; their values follow one rule by dtype:

    - uint8: pixels 0-255, used as they are;
    - uint16: 16-bit pixels 0-65535, scaled to 0-255 (value / 257, rounded), never clipped;
    - float: [0, 1] as ``ToTensor`` returns it (value * 255, rounded). Floats outside [0, 1], NaN or
      infinite are refused, not guessed at: 0-255 floats are ambiguous with dark [0, 1] images, so
      divide them by 255 first; normalised model inputs must be un-normalised first.
    - any other dtype (bool, signed or wider integers) is refused.

    PIL images and files: 16-bit greyscale (modes I;16, I;16L, I;16B, I;16N) is scaled the same way;
    mode I (32-bit integers, how some Pillow versions open 16-bit files) is read as 16-bit when its
    values lie in 0-65535 and refused otherwise; mode F follows the float rule; every other mode is
    converted by PIL. Images with no pixels (a zero height or width) are refused.
    """
    if isinstance(image, (str, os.PathLike)):
        picture = _read_image_file(os.fspath(image))
    elif isinstance(image, Image.Image):
        picture = _rgb_from_pil(image, describe_source(image))
    elif isinstance(image, torch.Tensor):
        tensor = image.detach().cpu()
        if tensor.dim() == 4 and tensor.shape[0] == 1:
            tensor = tensor[0]
        if tensor.dim() != 3 or tensor.shape[0] not in (1, 3):
            raise ExplainError(
                f"an image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}; pass one "
                f"image at a time, channels first"
            )
        pixels = tensor.permute(1, 2, 0).numpy()
        picture = _array_to_pil(pixels[..., 0] if tensor.shape[0] == 1 else pixels, describe_source(image))
    elif isinstance(image, np.ndarray):
        picture = _array_to_pil(image, describe_source(image))
    else:
        raise ExplainError(
            f"cannot read an image from a {type(image).__name__}: pass a file path, a PIL image, a numpy "
            f"array (H, W, 3) or a tensor (3, H, W)"
        )
    if picture.width == 0 or picture.height == 0:
        raise ExplainError(f"the image {describe_source(image)} is empty ({picture.width}x{picture.height} pixels)")
    return picture


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _read_image_file(path: str) -> Image.Image:
    """A file's image as RGB, 16-bit files scaled (see to_pil_image); a missing or undecodable file
    raises ``read_image_checked``'s error naming it."""
    from torchreid_attrimeter.data import read_image_checked

    try:
        opened = Image.open(path)
        opened.load()
    except (OSError, ValueError, SyntaxError):
        read_image_checked(path)  # raises the error naming the file (not found / cannot decode)
        raise
    with opened:
        return _rgb_from_pil(opened, path)


def _rgb_from_pil(image: Image.Image, source: str) -> Image.Image:
    """An RGB copy of a PIL image; high-bit-depth modes are scaled, not clipped (see to_pil_image)."""
    if image.width == 0 or image.height == 0:
        raise ExplainError(f"the image {source} is empty ({image.width}x{image.height} pixels)")
    if image.mode in _SIXTEEN_BIT_MODES:
        return _array_to_pil(np.asarray(image).astype(np.uint16), source)
    if image.mode == "I":
        values = np.asarray(image)
        if values.min() < 0 or values.max() > 65535:
            raise ExplainError(
                f"the image {source} has 32-bit integer pixels from {values.min()} to {values.max()}, not "
                f"16-bit (0-65535): save it as 8- or 16-bit, or pass it as a float array in [0, 1]"
            )
        return _array_to_pil(values.astype(np.uint16), source)
    if image.mode == "F":
        return _array_to_pil(np.asarray(image), source)
    try:
        return image.convert("RGB")
    except ValueError as error:
        raise ExplainError(f"the image {source} is in PIL mode {image.mode}, which cannot be converted to "
                           f"RGB ({error}): save it as an 8-bit RGB or greyscale image") from None


def _array_to_pil(array: np.ndarray, source: str = "array") -> Image.Image:
    if array.ndim == 3 and array.shape[-1] == 4:
        array = array[..., :3]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] == 3)):
        raise ExplainError(f"an image array must be (H, W, 3) or (H, W), got shape {array.shape} ({source})")
    if array.size == 0:
        raise ExplainError(f"the image {source} is empty: it has no pixels (height or width 0)")
    if array.dtype == np.uint8:
        pixels = array
    elif array.dtype == np.uint16:
        # 65535 / 257 = 255 exactly: the whole 16-bit range maps onto the 8-bit one.
        pixels = np.round(array.astype(np.float32) / 257.0).astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        if not np.isfinite(array).all():
            raise ExplainError(f"the image {source} contains NaN or infinite values")
        if array.min() < 0.0 or array.max() > 1.0:
            raise ExplainError(
                f"a float image must hold values in [0, 1], the image {source} holds {array.min():.3g} to "
                f"{array.max():.3g}: divide 0-255 pixels by 255, un-normalise model inputs, or pass uint8 pixels"
            )
        pixels = np.round(array * 255.0).astype(np.uint8)
    else:
        raise ExplainError(
            f"image arrays must be uint8 (0-255), uint16 (0-65535) or float in [0, 1], the image {source} has "
            f"dtype {array.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")


class Preprocessor:
    """torchreid's own test transform (resize to H x W, ToTensor, normalise), so the explainer feeds
    the model exactly what torchreid's evaluation does."""

    def __init__(self, image_size: tuple[int, int], norm_mean: Sequence[float] = IMAGENET_MEAN,
                 norm_std: Sequence[float] = IMAGENET_STD):
        height, width = (int(size) for size in image_size)
        # build_transforms prints its steps; an explainer is called in loops and notebooks.
        with contextlib.redirect_stdout(io.StringIO()):
            _, self.transform = compat.build_transforms(height, width, transforms=None,
                                                        norm_mean=list(norm_mean), norm_std=list(norm_std))
        self.resize = self.transform.transforms[0]
        self.image_size = (height, width)

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, np.ndarray]:
        """RGB image -> (model input (3, H, W), the resized picture (H, W, 3) uint8 for drawing)."""
        return self.transform(image), np.asarray(self.resize(image), dtype=np.uint8)


# --- results -----------------------------------------------------------------------------------------


class AttributeShare(NamedTuple):
    """One attribute's part of one distance."""

    name: str
    group: str
    component: float  # d^m
    contribution: float  # d^m / M, these add up to the reconstructed distance
    share: float  # p^m = d^m / sum_k d^k
    differs: bool | None  # predicted to differ between the two images (attribute branch), else None
    labelled_differs: bool | None = None  # differs by the images' labels; None: no labels or one unknown
    times_even: float = 1.0  # share / (1/M): above 1, the attribute takes more than an even share


@dataclass
class Explanation(NamedAttributes):
    """Why the target puts two images at its distance: per-attribute components and their maps.

    attribute_components, shares: (M,) in schema order (``attribute_names``).
    maps_a, maps_b: (M, h, w) attribute-guided attention maps of each image.
    probabilities_a, probabilities_b: (M,) attribute probabilities of the attribute branch, or None.
    image_a, image_b: (H, W, 3) uint8, the images as the model saw them (after resizing).
    labels_a, labels_b: (M,) ground-truth attribute values in {0, 1}, or None when not given;
    labels_known_a, labels_known_b: (M,) bool, which of those values are known.
    """

    attribute_names: tuple[str, ...]
    attribute_groups: dict[str, tuple[str, ...]]
    metric: str
    target_distance: float
    attribute_components: torch.Tensor
    maps_a: torch.Tensor
    maps_b: torch.Tensor
    image_a: np.ndarray
    image_b: np.ndarray
    source_a: str = "image a"
    source_b: str = "image b"
    probabilities_a: torch.Tensor | None = None
    probabilities_b: torch.Tensor | None = None
    labels_a: torch.Tensor | None = None
    labels_b: torch.Tensor | None = None
    labels_known_a: torch.Tensor | None = None
    labels_known_b: torch.Tensor | None = None

    @property
    def reconstructed_distance(self) -> float:
        """The interpreter's distance (1/M) sum_m d^m."""
        return float(self.attribute_components.mean())

    @property
    def relative_error(self) -> float:
        """|d - reconstructed| / d, the pair's term of ADRE (0 when d is 0)."""
        if self.target_distance <= 0:
            return 0.0
        return abs(self.target_distance - self.reconstructed_distance) / self.target_distance

    @property
    def contributions(self) -> torch.Tensor:
        """(M,) d^m / M: they add up to the reconstructed distance."""
        return self.attribute_components / self.num_attributes

    @property
    def shares(self) -> torch.Tensor:
        """(M,) p^m = d^m / sum_k d^k."""
        return self.attribute_components / self.attribute_components.sum().clamp_min(1e-12)

    @property
    def predicted_difference(self) -> torch.Tensor | None:
        """(M,) bool: the attribute branch predicts the attribute present in one image only."""
        if self.probabilities_a is None or self.probabilities_b is None:
            return None
        return (self.probabilities_a > 0.5) != (self.probabilities_b > 0.5)

    @property
    def labels_known(self) -> torch.Tensor | None:
        """(M,) bool: the attribute's label is known in both images; None without labels."""
        if self.labels_a is None or self.labels_b is None:
            return None
        return _known_or_all(self.labels_known_a, self.labels_a) & _known_or_all(self.labels_known_b, self.labels_b)

    @property
    def labelled_difference(self) -> torch.Tensor | None:
        """(M,) bool: the labels of the two images differ (False where either is unknown, see
        ``labels_known``); None without labels."""
        known = self.labels_known
        if known is None:
            return None
        return known & (self.labels_a.round() != self.labels_b.round())

    def group_of(self, name: str) -> str:
        for group, names in self.attribute_groups.items():
            if name in names:
                return group
        return "attributes"

    def attributes(self) -> list[AttributeShare]:
        """Every attribute's part, in schema order."""
        differs, labelled, known = self.predicted_difference, self.labelled_difference, self.labels_known
        components, shares = self.attribute_components.tolist(), self.shares.tolist()
        return [
            AttributeShare(name, self.group_of(name), components[m], components[m] / self.num_attributes,
                           shares[m], None if differs is None else bool(differs[m]),
                           bool(labelled[m]) if labelled is not None and bool(known[m]) else None,
                           shares[m] * self.num_attributes)
            for m, name in enumerate(self.attribute_names)
        ]

    def top(self, k: int = 3) -> list[AttributeShare]:
        """The k attributes with the largest shares, largest first."""
        return sorted(self.attributes(), key=lambda part: part.share, reverse=True)[:max(int(k), 0)]

    def to_dict(self, include_maps: bool = False) -> dict[str, Any]:
        """JSON-safe summary; ``include_maps`` adds both (M, h, w) maps as nested lists."""
        result: dict[str, Any] = {
            "image_a": self.source_a,
            "image_b": self.source_b,
            "metric": self.metric,
            "target_distance": _finite(self.target_distance),
            "reconstructed_distance": _finite(self.reconstructed_distance),
            "relative_error": _finite(self.relative_error),
            "even_share": self.even_share,
            "attributes": [
                {
                    "name": part.name,
                    "group": part.group,
                    "component": _finite(part.component),
                    "contribution": _finite(part.contribution),
                    "share": _finite(part.share),
                    "times_even_share": _finite(part.times_even),
                    "predicted_difference": part.differs,
                    "labelled_difference": part.labelled_differs,
                    **self._probabilities_of(m),
                    **self._labels_of(m),
                }
                for m, part in enumerate(self.attributes())
            ],
            "top": [part.name for part in self.top(3)],
            "map_size": list(self.maps_a.shape[-2:]),
        }
        if include_maps:
            result["maps_a"] = self.maps_a.tolist()
            result["maps_b"] = self.maps_b.tolist()
        return result

    def _probabilities_of(self, m: int) -> dict[str, float]:
        if self.probabilities_a is None or self.probabilities_b is None:
            return {}
        return {"probability_a": float(self.probabilities_a[m]), "probability_b": float(self.probabilities_b[m])}

    def _labels_of(self, m: int) -> dict[str, int | None]:
        """The ground-truth labels of attribute m in both images (None where unknown), if given."""
        if self.labels_a is None or self.labels_b is None:
            return {}
        known_a = _known_or_all(self.labels_known_a, self.labels_a)
        known_b = _known_or_all(self.labels_known_b, self.labels_b)
        return {"label_a": int(self.labels_a[m].round()) if bool(known_a[m]) else None,
                "label_b": int(self.labels_b[m].round()) if bool(known_b[m]) else None}


def _known_or_all(known: torch.Tensor | None, values: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(values, dtype=torch.bool) if known is None else known.bool()


def check_labels(labels: Any, shape: tuple[int, ...], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Ground-truth attribute labels as (values float32, known bool) tensors of ``shape``.

    ``labels`` is either the values (0/1 per attribute, every one known) or a (values, known) pair,
    as ``AttributeImageDataset.labels_of`` returns. Values of known labels must be 0 or 1; values of
    unknown ones are ignored (set to 0). A wrong shape or value is an ExplainError naming ``name``.
    """
    if isinstance(labels, (tuple, list)) and len(labels) == 2 and np.ndim(labels[0]) == len(shape):
        values, known = labels
    else:
        values, known = labels, None
    try:
        values = torch.as_tensor(np.asarray(values, dtype=np.float32))
        known = (torch.ones(values.shape, dtype=torch.bool) if known is None
                 else torch.as_tensor(np.asarray(known, dtype=bool)))
    except (TypeError, ValueError) as error:
        raise ExplainError(f"{name} must be 0/1 values per attribute or a (values, known) pair: {error}") from None
    for tensor, what in ((values, "values"), (known, "known mask")):
        if tuple(tensor.shape) != tuple(shape):
            raise ExplainError(
                f"{name} {what}: shape {tuple(tensor.shape)}, expected {tuple(shape)} (one entry per attribute, "
                f"in the model's attribute order)"
            )
    values = torch.where(known, values, torch.zeros_like(values))
    bad = known & ~((values == 0) | (values == 1))
    if bool(bad.any()):
        position = tuple(int(i) for i in bad.nonzero()[0])
        raise ExplainError(
            f"{name} holds {float(values[position])} at {position}: known labels must be 0 or 1 (mark unknown "
            f"labels in the known mask instead)"
        )
    return values, known


@dataclass
class RankingExplanation:
    """One query against a gallery: the top-k gallery items by target distance, each explained.

    ``matches[i]`` is True/False when identities are known, else None. ``notes`` records what the
    reader should know (identities absent from the gallery, same-camera items removed, ...).
    """

    query_source: str
    query_image: np.ndarray
    explanations: list[Explanation]
    gallery_sources: list[str]
    gallery_indices: list[int]
    matches: list[bool | None]
    query_pid: int | None = None
    gallery_pids: list[int | None] = field(default_factory=list)
    gallery_size: int = 0
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.explanations)

    def to_dict(self) -> dict[str, Any]:
        return {
            "query": self.query_source,
            "query_pid": self.query_pid,
            "gallery_size": self.gallery_size,
            "notes": list(self.notes),
            "ranked": [
                {
                    "rank": rank + 1,
                    "gallery_index": self.gallery_indices[rank],
                    "image": self.gallery_sources[rank],
                    "pid": self.gallery_pids[rank] if self.gallery_pids else None,
                    "match": self.matches[rank],
                    **explanation.to_dict(),
                }
                for rank, explanation in enumerate(self.explanations)
            ],
        }


def _finite(value: float) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


# --- the explainer -------------------------------------------------------------------------------------


def _ranking_candidates(gallery_size: int, query_pid: int | None, gallery_pids: Sequence[int] | None,
                        query_camid: int | None, gallery_camids: Sequence[int] | None
                        ) -> tuple[torch.Tensor, list[str]]:
    """Gallery indices a query may be ranked against, and notes for the reader. With identities and
    cameras, images of the query's identity from the query's camera are left out (torchreid's
    protocol: they would be trivial matches); a query whose identity is absent is noted, since no
    ranked item can then be a match."""
    notes: list[str] = []
    candidates = torch.arange(gallery_size)
    if None not in (query_pid, gallery_pids, query_camid, gallery_camids):
        pids, camids = torch.as_tensor(list(gallery_pids)), torch.as_tensor(list(gallery_camids))
        same_view = (pids == int(query_pid)) & (camids == int(query_camid))
        if bool(same_view.any()):
            notes.append(f"{int(same_view.sum())} gallery image(s) of identity {query_pid} from the "
                         f"query's camera {query_camid} left out (torchreid's protocol)")
        candidates = candidates[~same_view]
    if query_pid is not None and gallery_pids is not None:
        remaining = {int(gallery_pids[int(index)]) for index in candidates}
        if int(query_pid) not in remaining:
            notes.append(f"identity {query_pid} of the query is absent from the gallery: no ranked item "
                         f"can be a true match")
    if len(candidates) == 0:
        raise ExplainError("no gallery image is left after removing the query's own camera view")
    return candidates, notes


class Explainer:
    """Explains the distances of an AttriMeter model's frozen target.

    model: an AttriMeter module (``build_attrimeter``); it is put in eval mode.
    attribute_names: the M attribute names in the model's order.
    metric: the distance the interpreter was trained to split ('euclidean' plain, or 'cosine').
    image_size: (H, W) the images are resized to; default the model's ``target_spec['image_size']``.
    attribute_groups: display groups (group -> names), default the schema's if the names are a known
        schema's, else one group.
    """

    def __init__(self, model: torch.nn.Module, attribute_names: Sequence[str], metric: str = "euclidean",
                 image_size: tuple[int, int] | None = None, *,
                 attribute_groups: Mapping[str, Sequence[str]] | None = None,
                 norm_mean: Sequence[float] = IMAGENET_MEAN, norm_std: Sequence[float] = IMAGENET_STD,
                 device: str | torch.device | None = None, batch_size: int = 32):
        if not hasattr(model, "decompose"):
            raise ExplainError(
                f"Explainer needs an AttriMeter model (build_attrimeter), got {type(model).__name__}"
            )
        self.attribute_names = tuple(str(name) for name in attribute_names)
        num_attributes = getattr(model, "num_attributes", len(self.attribute_names))
        if len(self.attribute_names) != num_attributes:
            raise ExplainError(
                f"{len(self.attribute_names)} attribute names given for a model with {num_attributes} "
                f"attributes: pass the names of the schema the interpreter was trained on"
            )
        self.metric = check_metric(metric)
        if image_size is None:
            image_size = getattr(model, "target_spec", {}).get("image_size")
            if image_size is None:
                raise ExplainError("the model records no image_size: pass image_size=(height, width)")
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.attribute_groups = _groups_for(self.attribute_names, attribute_groups)
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(self.device).eval()
        self.preprocess = Preprocessor(self.image_size, norm_mean, norm_std)
        self.batch_size = int(batch_size)
        self.checkpoint_record: dict[str, Any] = {}

    @classmethod
    def from_checkpoint(cls, path: str | os.PathLike, *, target_weights: str | os.PathLike | None = None,
                        trusted: bool = False, device: str | torch.device | None = None,
                        **kwargs: Any) -> Explainer:
        """An explainer from an interpreter checkpoint written by the AttriMeter engine; the checkpoint
        names its target (weights path and sha256), image size, attributes and metric.
        ``target_weights`` replaces the recorded weights path when the file has moved (its content
        must be the same)."""
        model, record = load_attrimeter_checkpoint(path, target_weights=target_weights, trusted=trusted)
        explainer = cls(model, record["attribute_names"], record["metric"],
                        tuple(record["target"]["image_size"]), device=device, **kwargs)
        explainer.checkpoint_record = record
        return explainer

    # --- computing ---------------------------------------------------------------------------------

    def prepare(self, images: Sequence[ImageInput]) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Images -> (model inputs (B, 3, H, W), resized pictures (H, W, 3) uint8)."""
        inputs, pictures = [], []
        for image in images:
            tensor, picture = self.preprocess(to_pil_image(image))
            inputs.append(tensor)
            pictures.append(picture)
        return torch.stack(inputs), pictures

    @torch.no_grad()
    def decompose(self, images: Sequence[ImageInput], keep_maps: bool = True) -> Decomposition:
        """The model's Decomposition of a list of images, computed in batches on ``self.device``
        and returned on CPU; maps are dropped unless ``keep_maps``."""
        parts = []
        for start in range(0, len(images), self.batch_size):
            inputs, _ = self.prepare(images[start:start + self.batch_size])
            parts.append(self._decompose_tensor(inputs, keep_maps))
        if not parts:
            raise ExplainError("no images to decompose")
        return Decomposition.cat(parts)

    @torch.no_grad()
    def _decompose_tensor(self, inputs: torch.Tensor, keep_maps: bool = True) -> Decomposition:
        decomposition = self.model.decompose(inputs.to(self.device)).detach().to("cpu")
        if not keep_maps:
            decomposition.maps = None
        return decomposition

    def explain(self, image_a: ImageInput, image_b: ImageInput, *, labels_a: Any = None,
                labels_b: Any = None) -> Explanation:
        """Explain the target's distance between two images (paths, PIL images, arrays or tensors).

        ``labels_a`` and ``labels_b`` (optional, both or neither) are the images' ground-truth
        attributes in the model's attribute order: M values in {0, 1}, or a (values, known) pair as
        ``AttributeImageDataset.labels_of`` returns. The explanation then says which attributes differ
        by the labels (``labelled_difference``), and the figures mark them.
        """
        labels = self._pair_labels(labels_a, labels_b)
        inputs, pictures = self.prepare([image_a, image_b])
        decomposition = self._decompose_tensor(inputs)
        return self._explanation(decomposition[0:1], decomposition[1:2], pictures[0], pictures[1],
                                 describe_source(image_a), describe_source(image_b), *labels)

    def _pair_labels(self, labels_a: Any, labels_b: Any) -> tuple:
        """(labels_a, known_a, labels_b, known_b) checked, or four Nones without labels."""
        if labels_a is None and labels_b is None:
            return None, None, None, None
        if labels_a is None or labels_b is None:
            raise ExplainError(
                f"labels were given for image {'b' if labels_a is None else 'a'} only: give labels_a and labels_b "
                f"together (mark unknown attributes in a (values, known) pair)"
            )
        shape = (len(self.attribute_names),)
        return (*check_labels(labels_a, shape, "labels_a"), *check_labels(labels_b, shape, "labels_b"))

    def _explanation(self, first: Decomposition, second: Decomposition, picture_a: np.ndarray,
                     picture_b: np.ndarray, source_a: str, source_b: str,
                     labels_a: torch.Tensor | None = None, known_a: torch.Tensor | None = None,
                     labels_b: torch.Tensor | None = None, known_b: torch.Tensor | None = None) -> Explanation:
        """Explanation of one pair from single-image decompositions (with maps)."""
        distances = pairwise_components(first, second, self.metric)
        probabilities = [None, None]
        if first.attribute_logits is not None and second.attribute_logits is not None:
            probabilities = [torch.sigmoid(first.attribute_logits[0]), torch.sigmoid(second.attribute_logits[0])]
        return Explanation(
            attribute_names=self.attribute_names,
            attribute_groups=self.attribute_groups,
            metric=self.metric,
            target_distance=float(distances.target_distance[0, 0]),
            attribute_components=distances.attribute_components[0, 0].clone(),
            maps_a=first.maps[0].clone(),
            maps_b=second.maps[0].clone(),
            image_a=picture_a,
            image_b=picture_b,
            source_a=source_a,
            source_b=source_b,
            probabilities_a=probabilities[0],
            probabilities_b=probabilities[1],
            labels_a=labels_a,
            labels_b=labels_b,
            labels_known_a=known_a,
            labels_known_b=known_b,
        )

    def explain_ranking(self, query: ImageInput, gallery: Sequence[ImageInput], topk: int = 10, *,
                        query_pid: int | None = None, gallery_pids: Sequence[int] | None = None,
                        query_camid: int | None = None, gallery_camids: Sequence[int] | None = None,
                        gallery_decomposition: Decomposition | None = None, query_labels: Any = None,
                        gallery_labels: Any = None) -> RankingExplanation:
        """Rank ``gallery`` by the target's distance to ``query`` and explain the top-k pairs.

        With identities (``query_pid``, ``gallery_pids``) the ranked items are marked as matches or
        not; with cameras too, gallery items of the query's identity seen by the query's camera are
        left out (torchreid's protocol). ``gallery_decomposition`` (maps may be dropped) reuses a
        decomposition of the whole gallery computed once for many queries. With ground-truth
        attributes (``query_labels``: M values or a (values, known) pair; ``gallery_labels``: (N, M)
        values or a ((N, M) values, (N, M) known) pair) each explanation carries both images' labels.
        """
        query_labels, gallery_labels = self._check_ranking_inputs(gallery, gallery_pids, gallery_camids,
                                                                  query_labels, gallery_labels)
        if gallery_decomposition is None:
            gallery_decomposition = self.decompose(gallery, keep_maps=False)
        elif len(gallery_decomposition) != len(gallery):
            raise ExplainError(
                f"gallery_decomposition holds {len(gallery_decomposition)} images, the gallery {len(gallery)}"
            )
        query_inputs, query_pictures = self.prepare([query])
        query_decomposition = self._decompose_tensor(query_inputs)
        candidates, notes = _ranking_candidates(len(gallery), query_pid, gallery_pids, query_camid,
                                                gallery_camids)

        distances = pairwise_components(query_decomposition, gallery_decomposition[candidates], self.metric)
        order = torch.argsort(distances.target_distance[0], stable=True)[:max(int(topk), 1)]
        chosen = [int(candidates[int(position)]) for position in order]

        explanations = self._ranked_explanations(query, query_decomposition, query_pictures[0], gallery,
                                                 chosen, query_labels, gallery_labels)
        ranked_pids = [int(gallery_pids[index]) for index in chosen] if gallery_pids is not None else []
        matches = ([pid == int(query_pid) for pid in ranked_pids] if query_pid is not None and ranked_pids
                   else [None] * len(chosen))
        return RankingExplanation(
            query_source=describe_source(query),
            query_image=query_pictures[0],
            explanations=explanations,
            gallery_sources=[describe_source(gallery[index]) for index in chosen],
            gallery_indices=chosen,
            matches=matches,
            query_pid=None if query_pid is None else int(query_pid),
            gallery_pids=ranked_pids,
            gallery_size=len(gallery),
            notes=notes,
        )

    def _check_ranking_inputs(self, gallery: Sequence[ImageInput], gallery_pids: Sequence[int] | None,
                              gallery_camids: Sequence[int] | None, query_labels: Any,
                              gallery_labels: Any) -> tuple[Any, Any]:
        """Refuse an empty gallery, labels of one side only, and identities or cameras that do not
        match the gallery's length; returns the labels checked (see ``check_labels``) or two Nones."""
        if len(gallery) == 0:
            raise ExplainError("the gallery is empty: give at least one gallery image")
        if (query_labels is None) != (gallery_labels is None):
            raise ExplainError("give query_labels and gallery_labels together, or neither")
        if query_labels is not None:
            query_labels = check_labels(query_labels, (len(self.attribute_names),), "query_labels")
            gallery_labels = check_labels(gallery_labels, (len(gallery), len(self.attribute_names)),
                                          "gallery_labels")
        if gallery_pids is not None and len(gallery_pids) != len(gallery):
            raise ExplainError(f"{len(gallery_pids)} gallery_pids for {len(gallery)} gallery images")
        if gallery_camids is not None and len(gallery_camids) != len(gallery):
            raise ExplainError(f"{len(gallery_camids)} gallery_camids for {len(gallery)} gallery images")
        return query_labels, gallery_labels

    def _ranked_explanations(self, query: ImageInput, query_decomposition: Decomposition,
                             query_picture: np.ndarray, gallery: Sequence[ImageInput], chosen: list[int],
                             query_labels: Any, gallery_labels: Any) -> list[Explanation]:
        """Explanations of the query with each chosen gallery image, in rank order. Only the chosen
        images are decomposed again, with maps (the ranking needed none)."""
        chosen_inputs, chosen_pictures = self.prepare([gallery[index] for index in chosen])
        chosen_decomposition = self._decompose_tensor(chosen_inputs)
        return [
            self._explanation(query_decomposition, chosen_decomposition[rank:rank + 1], query_picture,
                              chosen_pictures[rank], describe_source(query), describe_source(gallery[index]),
                              *((query_labels[0], query_labels[1], gallery_labels[0][index], gallery_labels[1][index])
                                if query_labels is not None else ()))
            for rank, index in enumerate(chosen)
        ]

    @torch.no_grad()
    def average_maps(self, images: Sequence[ImageInput], attributes: torch.Tensor,
                     known: torch.Tensor | None = None) -> AverageMaps:
        """Per attribute, the mean map over images that have it and over images that don't
        (docs/method.md §8). attributes: (N, M) in {0, 1}; known: (N, M) bool, unknown labels skipped."""
        attributes = torch.as_tensor(attributes, dtype=torch.float32)
        if attributes.shape != (len(images), len(self.attribute_names)):
            raise ExplainError(
                f"attributes must be (N={len(images)}, M={len(self.attribute_names)}), got "
                f"{tuple(attributes.shape)}"
            )
        known = torch.ones_like(attributes, dtype=torch.bool) if known is None else torch.as_tensor(known).bool()
        with_sum = without_sum = None
        with_count = torch.zeros(len(self.attribute_names))
        without_count = torch.zeros(len(self.attribute_names))
        for start in range(0, len(images), self.batch_size):
            maps = self.decompose(images[start:start + self.batch_size]).maps  # (B, M, h, w)
            labels = attributes[start:start + self.batch_size]
            labelled = known[start:start + self.batch_size].float()
            positive, negative = labels * labelled, (1 - labels) * labelled  # (B, M)
            batch_with = (maps * positive[..., None, None]).sum(0)
            batch_without = (maps * negative[..., None, None]).sum(0)
            with_sum = batch_with if with_sum is None else with_sum + batch_with
            without_sum = batch_without if without_sum is None else without_sum + batch_without
            with_count += positive.sum(0)
            without_count += negative.sum(0)
        if with_sum is None:
            raise ExplainError("no images given for the average maps")
        return AverageMaps(
            attribute_names=self.attribute_names,
            with_attribute=with_sum / with_count.clamp_min(1)[:, None, None],
            without_attribute=without_sum / without_count.clamp_min(1)[:, None, None],
            with_count=with_count.long(),
            without_count=without_count.long(),
        )


@dataclass
class AverageMaps:
    """Dataset-level mean maps. with_attribute, without_attribute: (M, h, w); counts (M,) (an
    attribute with count 0 on one side has an all-zero mean there and is drawn as 'no images')."""

    attribute_names: tuple[str, ...]
    with_attribute: torch.Tensor
    without_attribute: torch.Tensor
    with_count: torch.Tensor
    without_count: torch.Tensor

    def to_dict(self) -> dict[str, Any]:
        return {
            "attributes": [
                {"name": name, "images_with": int(self.with_count[m]), "images_without": int(self.without_count[m])}
                for m, name in enumerate(self.attribute_names)
            ],
            "map_size": list(self.with_attribute.shape[-2:]),
        }


def _groups_for(names: tuple[str, ...],
                groups: Mapping[str, Sequence[str]] | None) -> dict[str, tuple[str, ...]]:
    """Display groups for the attribute names: the given ones, else a known schema's, else one group."""
    if groups is None:
        from torchreid_attrimeter.attributes import available_schemas, get_schema

        for schema_name in available_schemas():
            schema = get_schema(schema_name)
            if tuple(schema.attributes) == names:
                groups = schema.groups
                break
    if groups is None:
        return {"attributes": names}
    result = {str(group): tuple(members) for group, members in groups.items()}
    grouped = {name for members in result.values() for name in members}
    ungrouped = tuple(name for name in names if name not in grouped)
    if ungrouped:
        result["other"] = ungrouped
    return result
