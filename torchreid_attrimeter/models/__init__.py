"""Target adapters, the interpreter's layers and the AttriMeter module."""

from torchreid_attrimeter.models.adapters import (
    SUPPORTED_FAMILIES,
    TargetSplit,
    TargetSplitError,
    check_split,
    split_target,
)
from torchreid_attrimeter.models.attrimeter import VARIANTS, AttriMeter, build_attrimeter, describe
from torchreid_attrimeter.models.head import (
    AttributeDecompositionHead,
    AttributeRecognitionBranch,
    positive_map,
)

__all__ = [
    "SUPPORTED_FAMILIES",
    "VARIANTS",
    "AttriMeter",
    "AttributeDecompositionHead",
    "AttributeRecognitionBranch",
    "TargetSplit",
    "TargetSplitError",
    "build_attrimeter",
    "check_split",
    "describe",
    "positive_map",
    "split_target",
]
