"""torchreid-attrimeter: AttriMeter for torchreid. Importing the package registers its attribute
datasets with torchreid."""

from torchreid_attrimeter.compat import TORCHREID_FLAVOUR, load_checkpoint, load_state_dict_file
from torchreid_attrimeter.decomposition import (
    Decomposition,
    PairwiseDistances,
    pairwise_components,
    pairwise_distance,
)

# -- data (attributes, datasets) --

# -- model and losses --

# -- evaluation --

# -- engine and config --

# -- explanations --

__version__ = "0.1.0"
