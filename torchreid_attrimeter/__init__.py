"""torchreid-attrimeter: AttriMeter for torchreid. Importing the package registers its attribute
datasets with torchreid."""

from torchreid_attrimeter.compat import TORCHREID_FLAVOUR, load_checkpoint, load_state_dict_file
from torchreid_attrimeter.errors import AttriMeterError
from torchreid_attrimeter.decomposition import (
    Decomposition,
    PairwiseDistances,
    pairwise_components,
    pairwise_distance,
)

# -- data (attributes, datasets) --
from torchreid_attrimeter.attributes import AttributeSchema, get_schema, read_attribute_file
from torchreid_attrimeter.data import (
    attribute_positive_ratios,
    attribute_schema_of,
    set_attribute_file,
)
from torchreid_attrimeter.data.synthetic import generate_synthetic_dataset, render_counterfactual

# -- model and losses --
from torchreid_attrimeter.losses import AttributePriorLoss, DistanceDistillationLoss, WeightedAttributeBCE
from torchreid_attrimeter.models import AttriMeter, TargetSplitError, build_attrimeter

# -- evaluation --
from torchreid_attrimeter.evaluation import (
    ExplanationEvaluator,
    evaluate_model,
    evaluate_rank,
    extract_decompositions,
    format_table,
)

# -- engine and config --
from torchreid_attrimeter.config import get_default_config
from torchreid_attrimeter.engine import AttriMeterEngine, build_engine

# -- explanations --
from torchreid_attrimeter.explain import Explainer, Explanation

# -- faithfulness --
from torchreid_attrimeter.faithfulness import build_counterfactual_pairs, counterfactual_benchmark, deletion_test

__version__ = "0.1.0"
