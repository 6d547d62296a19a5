"""The whole AttriMeter path on CPU, from nothing (what ``make demo`` runs): the ``attrimeter-demo``
tool as a script. The code is in torchreid_attrimeter/cli/demo.py.
"""

import sys

from torchreid_attrimeter.cli.demo import cli

if __name__ == "__main__":
    sys.exit(cli())
