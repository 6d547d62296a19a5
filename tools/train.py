"""Train or evaluate an AttriMeter interpreter from a torchreid YAML config: the ``attrimeter-train``
tool as a script, for ``python tools/train.py`` and ``torchrun ... tools/train.py``. The code is in
torchreid_attrimeter/cli/train.py.
"""

import sys

from torchreid_attrimeter.cli.train import cli

if __name__ == "__main__":
    sys.exit(cli())
