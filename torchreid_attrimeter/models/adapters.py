"""Target adapters: split a torchreid model into a frozen shared stem, a trunk (the late layers that
produce the last feature map F) and a tail (whatever turns F into the eval embedding), per model
family, and check the split against the model's own eval forward (docs/method.md §2-3).

Per-family knowledge is keyed on the torchreid module that defines the model class (``resnet``,
``osnet``, ``mlfn``, ...), so it works for models built by name and for models the user built.
A model of an unknown family is split generically through ``featuremaps()`` + global pooling + fc
(head-only variant); anything else is refused with an error that says what is missing.

Two families carry *context*: parts of the embedding that no single spatial feature map produces.
MLFN adds a projection of its factor-selection vectors, HACNN concatenates a local branch computed on
spatial-transformer crops. The context is computed once per image and passed unchanged to every
attribute embedding, so those parts contribute equally to every attribute component.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn import functional

from torchreid_attrimeter.errors import AttriMeterError

# tail(trunk(stem(x))) must reproduce target.eval()(x) within this tolerance, relative to the
# largest embedding entry. The split runs the very same modules in the same order, so the
# difference is zero or rounding (einsum vs pooling kernels), far below this.
EQUIVALENCE_RTOL = 1e-4
EQUIVALENCE_ATOL = 1e-5


class TargetSplitError(AttriMeterError, ValueError):
    """A torchreid model cannot be split into stem / trunk / tail, or the split does not reproduce
    the model's own embedding."""


def family_of(model: nn.Module) -> str:
    """The torchreid module that defines the model's class, e.g. 'osnet_ain' or 'resnet'."""
    return type(model).__module__.rsplit(".", 1)[-1]


@dataclass
class TargetSplit:
    """A frozen target seen as stem -> trunk -> tail.

    stem: images (B, 3, H, W) -> state (a tensor or a tuple of tensors), shared and frozen.
    trunk: state -> (F (B, C, h, w), context); the target's late layers.
    interpreter_trunk: the module the interpreter copies (state -> its own feature map), built from
        the target's late layers so the copy starts from the target's weights.
    pool: a *linear* per-channel spatial pooling (average pools), or None when the tail reads the
        whole map (MuDeep flattens it into an fc layer).
    neck: (pooled (N, C, oh, ow), context (N, ...) or None) -> embedding (N, D).
    """

    name: str
    target: nn.Module
    stem: Callable[[torch.Tensor], Any]
    trunk: Callable[[Any], tuple]
    interpreter_trunk: nn.Module | None
    pool: nn.Module | None
    neck: Callable[[torch.Tensor, Any], torch.Tensor]
    supports_trunk_variant: bool = True
    _pool_matrices: dict = field(default_factory=dict, repr=False)

    def features(self, images: torch.Tensor) -> tuple[Any, torch.Tensor, Any]:
        """(stem state, F (B, C, h, w), context) for a batch of images."""
        state = self.stem(images)
        feature_map, context = self.trunk(state)
        return state, feature_map, context

    def tail(self, feature_map: torch.Tensor, context: Any = None) -> torch.Tensor:
        """The target's own path F (N, C, h, w) -> embedding (N, D)."""
        pooled = feature_map if self.pool is None else self.pool(feature_map)
        return self.neck(pooled, context)

    def tail_of_products(self, feature_map: torch.Tensor, maps: torch.Tensor, context: Any = None) -> torch.Tensor:
        """tail(F ⊙ A^m) for every map: F (B, C, h, w), maps (B, M, h, w) -> (B, M, D).

        All B*M products go through the neck as one batched call. For a linear pooling the pooled
        products are one einsum (sum_s F[c,s] A[m,s] W[s,o]) instead of a (B*M, C, h, w) tensor:
        the same numbers for a fraction of the memory and time.
        """
        batch, num_maps = maps.shape[:2]
        channels, height, width = feature_map.shape[1:]
        if self.pool is None:
            products = (feature_map.unsqueeze(1) * maps.unsqueeze(2)).reshape(
                batch * num_maps, channels, height, width)
            pooled = products
        else:
            weights = self.pool_matrix(height, width, feature_map)  # (h*w, oh, ow)
            out_shape = weights.shape[1:]
            weights = weights.reshape(height * width, -1).to(maps.dtype)
            weighted_maps = torch.einsum("bms,so->bmso", maps.flatten(2), weights)  # (B, M, s, o)
            pooled = torch.einsum("bcs,bmso->bmco", feature_map.flatten(2).to(maps.dtype), weighted_maps)
            pooled = pooled.reshape(batch * num_maps, channels, *out_shape)
        embeddings = self.neck(pooled, repeat_context(context, num_maps))
        return embeddings.reshape(batch, num_maps, -1)

    def tail_of_products_materialised(self, feature_map: torch.Tensor, maps: torch.Tensor,
                                      context: Any = None) -> torch.Tensor:
        """Reference path of ``tail_of_products``: builds the (B*M, C, h, w) products and runs the
        target's tail on them literally. Used to check the fast path."""
        batch, num_maps = maps.shape[:2]
        products = (feature_map.unsqueeze(1) * maps.unsqueeze(2)).reshape(batch * num_maps, *feature_map.shape[1:])
        return self.tail(products, repeat_context(context, num_maps)).reshape(batch, num_maps, -1)

    def pool_matrix(self, height: int, width: int, like: torch.Tensor) -> torch.Tensor:
        """(h*w, oh, ow): how much each input position feeds each pooled output, found by pooling
        the identity basis (exact for any linear pooling)."""
        key = (height, width, like.device, like.dtype)
        if key not in self._pool_matrices:
            basis = torch.eye(height * width, device=like.device, dtype=torch.float32)
            with torch.no_grad():
                pooled = self.pool(basis.reshape(height * width, 1, height, width))
            self._pool_matrices[key] = pooled[:, 0].to(like.dtype)
        return self._pool_matrices[key]


def repeat_context(context: Any, times: int) -> Any:
    """Context of B images -> context of B*times rows, each image's rows consecutive."""
    if context is None:
        return None
    if torch.is_tensor(context):
        return context.repeat_interleave(times, dim=0)
    return type(context)(repeat_context(part, times) for part in context)


# --- helpers shared by the families --------------------------------------------------------------


def _modules(model: nn.Module, names: Sequence) -> nn.Sequential:
    """An nn.Sequential of the model's own submodules (shared, not copied) and extra modules."""
    return nn.Sequential(*(getattr(model, name) if isinstance(name, str) else name for name in names))


def _no_context(sequential: nn.Sequential) -> Callable[[Any], tuple]:
    return lambda state: (sequential(state), None)


def _flatten_fc_neck(fc: nn.Module | None) -> Callable[[torch.Tensor, Any], torch.Tensor]:
    def neck(pooled: torch.Tensor, context: Any) -> torch.Tensor:
        vector = pooled.reshape(pooled.size(0), -1)
        return vector if fc is None else fc(vector)
    return neck


def _pool_module(model: nn.Module) -> nn.Module:
    for name in ("global_avgpool", "avgpool"):
        if isinstance(getattr(model, name, None), nn.Module):
            return getattr(model, name)
    raise TargetSplitError(f"{type(model).__name__} has no global_avgpool / avgpool module")


def _sequential_split(name: str, model: nn.Module, stem_names: Sequence, trunk_names: Sequence,
                      pool: nn.Module | None = None, fc: Any = "auto") -> TargetSplit:
    """The common case: stem and trunk are chains of submodules, tail = average pool + optional fc."""
    stem = _modules(model, stem_names)
    trunk = _modules(model, trunk_names)
    return TargetSplit(
        name=name, target=model, stem=stem, trunk=_no_context(trunk), interpreter_trunk=trunk,
        pool=_pool_module(model) if pool is None else pool,
        neck=_flatten_fc_neck(getattr(model, "fc", None) if fc == "auto" else fc),
    )


_RESNET_STEM = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2")
_RESNET_TRUNK = ("layer3", "layer4")


def _split_resnet(name: str, model: nn.Module) -> TargetSplit:
    return _sequential_split(name, model, _RESNET_STEM, _RESNET_TRUNK)


def _split_senet(name: str, model: nn.Module) -> TargetSplit:
    return _sequential_split(name, model, ("layer0", "layer1", "layer2"), _RESNET_TRUNK)


def _split_osnet(name: str, model: nn.Module) -> TargetSplit:
    # the eval path after featuremaps (which ends at conv5) is global_avgpool -> view -> fc
    return _sequential_split(name, model, ("conv1", "maxpool", "conv2", "conv3"), ("conv4", "conv5"))


def _split_osnet_ain(name: str, model: nn.Module) -> TargetSplit:
    return _sequential_split(name, model, ("conv1", "maxpool", "conv2", "pool2", "conv3", "pool3"),
                             ("conv4", "conv5"))


def _split_mobilenetv2(name: str, model: nn.Module) -> TargetSplit:
    return _sequential_split(name, model, [f"conv{i}" for i in range(1, 7)], ("conv7", "conv8", "conv9"))


def _split_shufflenetv2(name: str, model: nn.Module) -> TargetSplit:
    return _sequential_split(name, model, ("conv1", "maxpool", "stage2", "stage3"), ("stage4", "conv5"))


def _split_shufflenet(name: str, model: nn.Module) -> TargetSplit:
    # forward: stage4 -> F.avg_pool2d over the whole map -> view, no fc
    return _sequential_split(name, model, ("conv1", "stage2", "stage3"), ("stage4",),
                             pool=nn.AdaptiveAvgPool2d(1), fc=None)


def _split_xception(name: str, model: nn.Module) -> TargetSplit:
    stem = ["conv1", "bn1", nn.ReLU(), "conv2", "bn2", nn.ReLU()] + [f"block{i}" for i in range(1, 12)]
    trunk = ["block12", "conv3", "bn3", nn.ReLU(), "conv4", "bn4", nn.ReLU()]
    return _sequential_split(name, model, stem, trunk)


def _split_inceptionresnetv2(name: str, model: nn.Module) -> TargetSplit:
    stem = ("conv2d_1a", "conv2d_2a", "conv2d_2b", "maxpool_3a", "conv2d_3b", "conv2d_4a", "maxpool_5a",
            "mixed_5b", "repeat", "mixed_6a", "repeat_1")
    return _sequential_split(name, model, stem, ("mixed_7a", "repeat_2", "block8", "conv2d_7b"), fc=None)


def _split_features_sequential(name: str, model: nn.Module, trunk_start: int, relu_after: bool = False,
                               fc: Any = "auto") -> TargetSplit:
    """Models whose convolutional part is one nn.Sequential ``features`` (DenseNet, SqueezeNet,
    InceptionV4): the trunk is its last children from ``trunk_start`` on."""
    children = list(model.features.children())
    trunk_modules = children[trunk_start:] + ([nn.ReLU()] if relu_after else [])
    return _sequential_split(name, model, children[:trunk_start], trunk_modules, fc=fc)


def _split_densenet(name: str, model: nn.Module) -> TargetSplit:
    names = [child_name for child_name, _ in model.features.named_children()]
    # densenet's forward applies ReLU to features(x) before pooling: F is that ReLU's output
    return _split_features_sequential(name, model, names.index("denseblock4"), relu_after=True)


def _split_squeezenet(name: str, model: nn.Module) -> TargetSplit:
    children = list(model.features.children())
    last_pool = max(index for index, child in enumerate(children) if isinstance(child, nn.MaxPool2d))
    return _split_features_sequential(name, model, last_pool)


def _split_inceptionv4(name: str, model: nn.Module) -> TargetSplit:
    children = list(model.features.children())
    last_reduction = max(index for index, child in enumerate(children)
                         if type(child).__name__.startswith("Reduction"))
    return _split_features_sequential(name, model, last_reduction, fc=None)


def _split_pcb(name: str, model: nn.Module) -> TargetSplit:
    split = _sequential_split(name, model, _RESNET_STEM, _RESNET_TRUNK, pool=model.parts_avgpool, fc=None)

    def neck(pooled: torch.Tensor, context: Any) -> torch.Tensor:
        # PCB eval: parts_avgpool -> L2-normalise each part over channels -> flatten
        return functional.normalize(pooled, p=2, dim=1).reshape(pooled.size(0), -1)

    split.neck = neck
    return split


class _ResNetMidTrunk(nn.Module):
    """layer3 and layer4 of ResNetMid; F stacks the outputs of the three layer4 blocks on channels."""

    def __init__(self, layer3: nn.Module, layer4: nn.Module):
        super().__init__()
        self.layer3, self.layer4 = layer3, layer4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x4a = self.layer4[0](self.layer3(x))
        x4b = self.layer4[1](x4a)
        x4c = self.layer4[2](x4b)
        return torch.cat([x4a, x4b, x4c], dim=1)


def _split_resnetmid(name: str, model: nn.Module) -> TargetSplit:
    trunk = _ResNetMidTrunk(model.layer3, model.layer4)
    block_channels = model.layer4[2].bn3.num_features

    def neck(pooled: torch.Tensor, context: Any) -> torch.Tensor:
        v4a, v4b, v4c = pooled.reshape(pooled.size(0), -1).split(block_channels, dim=1)
        v4ab = model.fc_fusion(torch.cat([v4a, v4b], dim=1))
        return torch.cat([v4ab, v4c], dim=1)

    return TargetSplit(name=name, target=model, stem=_modules(model, _RESNET_STEM), trunk=_no_context(trunk),
                       # the interpreter only needs the last block's map, not the stack of three
                       interpreter_trunk=nn.Sequential(model.layer3, model.layer4),
                       pool=model.global_avgpool, neck=neck)


class _MLFNBlocks(nn.Module):
    """A run of MLFN blocks: (x, factor selections so far) -> (x, all factor selections)."""

    def __init__(self, blocks: Sequence[nn.Module], prefix: nn.Module | None = None):
        super().__init__()
        self.prefix = prefix
        self.blocks = nn.ModuleList(blocks)

    def forward(self, state: Any) -> tuple:
        if self.prefix is not None:
            x, selections = self.prefix(state), []
        else:
            x, selections = state
            selections = list(selections)
        for block in self.blocks:
            x, selection = block(x)
            selections.append(selection)
        return x, selections


class _MLFNInterpreterTrunk(nn.Module):
    def __init__(self, late_blocks: _MLFNBlocks):
        super().__init__()
        self.late_blocks = late_blocks

    def forward(self, state: Any) -> torch.Tensor:
        return self.late_blocks(state)[0]


def _split_mlfn(name: str, model: nn.Module) -> TargetSplit:
    num_late = 3  # the last stage: the three 2048-channel blocks
    blocks = list(model.feature)
    prefix = nn.Sequential(model.conv1, model.bn1, nn.ReLU(), model.maxpool)
    stem = _MLFNBlocks(blocks[:-num_late], prefix=prefix)
    late = _MLFNBlocks(blocks[-num_late:])

    def trunk(state: Any) -> tuple:
        x, selections = late(state)
        # the factor-selection projection does not depend on F: it is per-image context
        return x, model.fc_s(torch.cat(selections, dim=1))

    def neck(pooled: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        vector = (model.fc_x(pooled) + context) * 0.5
        return vector.reshape(vector.size(0), -1)

    return TargetSplit(name=name, target=model, stem=stem, trunk=trunk,
                       interpreter_trunk=_MLFNInterpreterTrunk(late), pool=model.global_avgpool, neck=neck)


class _HarmoniousBlock(nn.Module):
    """HACNN's third global block: inception3 then its soft attention."""

    def __init__(self, inception: nn.Module, attention: nn.Module):
        super().__init__()
        self.inception, self.attention = inception, attention

    def forward(self, state: Any) -> torch.Tensor:
        return self.forward_with_theta(state)[0]

    def forward_with_theta(self, state: Any) -> tuple:
        x3 = self.inception(state[0])
        soft_attention, theta = self.attention(x3)
        return x3 * soft_attention, theta


def _hacnn_local_regions(model: nn.Module, source: torch.Tensor, theta: torch.Tensor, size: tuple,
                         previous: list | None, local_conv: nn.Module) -> list:
    regions = []
    for region_index in range(4):
        region_theta = model.transform_theta(theta[:, region_index, :], region_index).to(source.device)
        crop = model.stn(source, region_theta)
        crop = functional.interpolate(crop, size, mode="bilinear", align_corners=True)
        if previous is not None:
            crop = crop + previous[region_index]
        regions.append(local_conv(crop))
    return regions


def _split_hacnn(name: str, model: nn.Module) -> TargetSplit:
    if not model.learn_region:
        raise TargetSplitError(f"{name}: HACNN without its local branch (learn_region=False) is not supported")

    def stem(images: torch.Tensor) -> tuple:
        x = model.conv(images)
        x1 = model.inception1(x)
        attention1, theta1 = model.ha1(x1)
        x1_out = x1 * attention1
        local1 = _hacnn_local_regions(model, x, theta1, (24, 28), None, model.local_conv1)
        x2 = model.inception2(x1_out)
        attention2, theta2 = model.ha2(x2)
        x2_out = x2 * attention2
        local2 = _hacnn_local_regions(model, x1_out, theta2, (12, 14), local1, model.local_conv2)
        return x2_out, local2

    block3 = _HarmoniousBlock(model.inception3, model.ha3)

    def trunk(state: tuple) -> tuple:
        x3_out, theta3 = block3.forward_with_theta(state)
        local3 = _hacnn_local_regions(model, state[0], theta3, (6, 7), state[1], model.local_conv3)
        local = torch.cat([functional.adaptive_avg_pool2d(region, 1).flatten(1) for region in local3], dim=1)
        local = model.fc_local(local)
        # the local branch reads spatial-transformer crops, not F: it is per-image context
        return x3_out, local / local.norm(p=2, dim=1, keepdim=True)

    def neck(pooled: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        global_vector = model.fc_global(pooled.reshape(pooled.size(0), -1))
        global_vector = global_vector / global_vector.norm(p=2, dim=1, keepdim=True)
        return torch.cat([global_vector, context], dim=1)

    return TargetSplit(name=name, target=model, stem=stem, trunk=trunk, interpreter_trunk=block3,
                       pool=nn.AdaptiveAvgPool2d(1), neck=neck)


class _NASNetLateCells(nn.Module):
    """NASNet-A Mobile from its second reduction cell on: (cell_9, cell_8) -> ReLU(cell_15)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.reduction_cell_1 = model.reduction_cell_1
        self.cells = nn.ModuleList([model.cell_12, model.cell_13, model.cell_14, model.cell_15])
        self.relu = nn.ReLU()

    def forward(self, state: tuple) -> torch.Tensor:
        current, previous = state
        current, previous = self.reduction_cell_1(current, previous), current
        for cell in self.cells:
            current, previous = cell(current, previous), current
        return self.relu(current)


def _split_nasnet(name: str, model: nn.Module) -> TargetSplit:
    def stem(images: torch.Tensor) -> tuple:
        x_conv0 = model.conv0(images)
        x_stem_0 = model.cell_stem_0(x_conv0)
        x_stem_1 = model.cell_stem_1(x_conv0, x_stem_0)
        current, previous = model.cell_0(x_stem_1, x_stem_0), x_stem_1
        for cell in (model.cell_1, model.cell_2, model.cell_3, model.reduction_cell_0,
                     model.cell_6, model.cell_7, model.cell_8, model.cell_9):
            current, previous = cell(current, previous), current
        return current, previous

    late = _NASNetLateCells(model)
    return TargetSplit(name=name, target=model, stem=stem, trunk=lambda state: (late(state), None),
                       interpreter_trunk=late, pool=nn.AdaptiveAvgPool2d(1), neck=_flatten_fc_neck(None))


class _MuDeepTrunk(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.block4, self.block5 = model.block4, model.block5

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block5(*self.block4(x))


def _split_mudeep(name: str, model: nn.Module) -> TargetSplit:
    trunk = _MuDeepTrunk(model)
    # MuDeep flattens the whole (256, 16, 8) map into an fc layer: no pooling
    return TargetSplit(name=name, target=model, stem=_modules(model, ("block1", "block2", "block3")),
                       trunk=_no_context(trunk), interpreter_trunk=trunk, pool=None,
                       neck=_flatten_fc_neck(model.fc))


_FAMILY_SPLITTERS: dict[str, Callable[[str, nn.Module], TargetSplit]] = {
    "resnet": _split_resnet,
    "resnet_ibn_a": _split_resnet,
    "resnet_ibn_b": _split_resnet,
    "resnetmid": _split_resnetmid,
    "pcb": _split_pcb,
    "senet": _split_senet,
    "osnet": _split_osnet,
    "osnet_ain": _split_osnet_ain,
    "mobilenetv2": _split_mobilenetv2,
    "shufflenetv2": _split_shufflenetv2,
    "shufflenet": _split_shufflenet,
    "xception": _split_xception,
    "inceptionresnetv2": _split_inceptionresnetv2,
    "inceptionv4": _split_inceptionv4,
    "densenet": _split_densenet,
    "squeezenet": _split_squeezenet,
    "mlfn": _split_mlfn,
    "hacnn": _split_hacnn,
    "nasnet": _split_nasnet,
    "mudeep": _split_mudeep,
}

SUPPORTED_FAMILIES = tuple(sorted(_FAMILY_SPLITTERS))


def _split_generic(name: str, model: nn.Module) -> TargetSplit:
    """Unknown family: featuremaps() -> global pooling -> optional fc, head-only (no known trunk)."""
    missing = [attribute for attribute in ("featuremaps",) if not callable(getattr(model, attribute, None))]
    if not any(isinstance(getattr(model, pool, None), nn.Module) for pool in ("global_avgpool", "avgpool")):
        missing.append("a global_avgpool / avgpool module")
    if missing:
        raise TargetSplitError(
            f"cannot split the model '{name}' ({type(model).__module__}.{type(model).__name__}) into "
            f"stem / trunk / tail: it has no {' and no '.join(missing)}. Supported torchreid families: "
            f"{', '.join(SUPPORTED_FAMILIES)}; other models need featuremaps() and a global average pool."
        )
    featuremaps = model.featuremaps
    return TargetSplit(name=name, target=model, stem=featuremaps, trunk=lambda state: (state, None),
                       interpreter_trunk=None, pool=_pool_module(model),
                       neck=_flatten_fc_neck(getattr(model, "fc", None)), supports_trunk_variant=False)


def split_target(model: nn.Module, name: str | None = None) -> TargetSplit:
    """The stem / trunk / tail split of a torchreid model (not yet checked: see ``check_split``)."""
    name = name or type(model).__name__
    splitter = _FAMILY_SPLITTERS.get(family_of(model))
    if splitter is None:
        return _split_generic(name, model)
    try:
        return splitter(name, model)
    except (AttributeError, ValueError, IndexError) as error:
        raise TargetSplitError(
            f"cannot split the model '{name}' as a torchreid '{family_of(model)}' model: {error}"
        ) from None


def make_interpreter_trunk(split: TargetSplit) -> nn.Module:
    """A trainable copy of the target's late layers, initialised from the target's weights."""
    if not split.supports_trunk_variant or split.interpreter_trunk is None:
        raise TargetSplitError(
            f"the model '{split.name}' has no known stem / trunk split (no per-family knowledge for "
            f"'{family_of(split.target)}'), so its late layers cannot be copied: use variant='head'"
        )
    trunk_copy = copy.deepcopy(split.interpreter_trunk)
    for parameter in trunk_copy.parameters():
        parameter.requires_grad_(True)
    return trunk_copy


def _assert_close(name: str, what: str, reference: torch.Tensor, found: torch.Tensor) -> None:
    if reference.shape != found.shape:
        raise TargetSplitError(
            f"{name}: {what} has shape {tuple(found.shape)}, the model's own output {tuple(reference.shape)}"
        )
    scale = max(1.0, float(reference.abs().max()))
    error = float((reference - found).abs().max())
    if not error <= EQUIVALENCE_ATOL * scale + EQUIVALENCE_RTOL * scale:
        raise TargetSplitError(
            f"{name}: {what} differs from the model's own eval embedding by {error:.3g} (scale {scale:.3g}); "
            f"the model's eval forward is not stem -> trunk -> tail as its family's adapter assumes, "
            f"so AttriMeter would explain a different model than yours"
        )


def check_split(split: TargetSplit, image_size: tuple[int, int], batch_size: int = 2,
                interpreter_trunk: nn.Module | None = None, seed: int = 0) -> dict[str, int]:
    """Check on a random batch that tail(trunk(stem(x))) reproduces ``target.eval()(x)``, that the
    batched attribute path with all-ones maps gives the same embedding, and that the interpreter's
    trunk copy (if given) reproduces F. Returns the sizes found: embedding_dim (D),
    feature_map_channels (C) and interpreter_channels (what the decomposition head reads).

    The target must already be in eval mode. Raises TargetSplitError on any mismatch and ValueError
    when the image size is too small for the model.
    """
    height, width = image_size
    parameter = next(split.target.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, height, width, generator=generator).to(device)
    with torch.no_grad():
        try:
            reference = split.target(images)
        except (RuntimeError, AssertionError, ValueError) as error:
            raise ValueError(
                f"the model '{split.name}' cannot run on {height}x{width} images ({str(error).splitlines()[0]}): "
                f"the image size is too small or not the size this model needs (hacnn needs exactly "
                f"160x64, mudeep 256x128). Use a larger image size."
            ) from None
        if not torch.is_tensor(reference) or reference.dim() != 2:
            raise TargetSplitError(f"{split.name}: eval forward does not return a (B, D) embedding tensor")
        state = split.stem(images)
        interpreter_state = clone_state(state)
        feature_map, context = split.trunk(state)
        if feature_map.dim() != 4:
            raise TargetSplitError(f"{split.name}: the trunk output is not a (B, C, h, w) feature map")
        _assert_close(split.name, "tail(trunk(stem(x)))", reference, split.tail(feature_map, context))
        ones = torch.ones(batch_size, 1, *feature_map.shape[2:], device=device, dtype=feature_map.dtype)
        _assert_close(split.name, "the batched attribute tail with all-ones maps", reference,
                      split.tail_of_products(feature_map, ones, context)[:, 0])
        if interpreter_trunk is not None:
            was_training = interpreter_trunk.training
            interpreter_trunk.eval()
            copied = interpreter_trunk(interpreter_state)
            interpreter_trunk.train(was_training)
            if copied.shape[2:] != feature_map.shape[2:]:
                raise TargetSplitError(f"{split.name}: the interpreter trunk's map {tuple(copied.shape[2:])} "
                                       f"does not match F {tuple(feature_map.shape[2:])}")
            if copied.shape == feature_map.shape:
                _assert_close(split.name, "the interpreter's copy of the trunk", feature_map, copied)
    return {
        "embedding_dim": reference.shape[1],
        "feature_map_channels": feature_map.shape[1],
        "interpreter_channels": feature_map.shape[1] if interpreter_trunk is None else copied.shape[1],
    }


def clone_state(state: Any) -> Any:
    """A copy of the stem state: some torchreid blocks (Xception's) apply ReLU in place to their
    input, so the interpreter's trunk must not share the tensor the target's trunk reads."""
    if torch.is_tensor(state):
        return state.clone()
    if isinstance(state, (tuple, list)):
        return type(state)(clone_state(part) for part in state)
    return state
