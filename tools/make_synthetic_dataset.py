"""Generate the synthetic attribute-person dataset under ROOT/synthetic_attr/: the
``attrimeter-make-synthetic-dataset`` tool as a script. The code is in
torchreid_attrimeter/cli/make_synthetic_dataset.py.
"""

import sys

from torchreid_attrimeter.cli.make_synthetic_dataset import main

if __name__ == "__main__":
    sys.exit(main())
