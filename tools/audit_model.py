"""Audit what one or more trained interpreters' models rely on over a whole dataset, and compare them:
the ``attrimeter-audit`` tool as a script. The code is in torchreid_attrimeter/cli/audit.py.
"""

import sys

from torchreid_attrimeter.cli.audit import main

if __name__ == "__main__":
    sys.exit(main())
