"""Draw AttriMeter explanations of ranked lists (PNG figures, JSON, one self-contained index.html): the
``attrimeter-visualize`` tool as a script. The code is in torchreid_attrimeter/cli/visualize.py.
"""

import sys

from torchreid_attrimeter.cli.visualize import main

if __name__ == "__main__":
    sys.exit(main())
