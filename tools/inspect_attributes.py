"""Print what an attribute file holds, per split: the ``attrimeter-inspect-attributes`` tool as a
script. The code is in torchreid_attrimeter/cli/inspect_attributes.py.
"""

import sys

from torchreid_attrimeter.cli.inspect_attributes import main

if __name__ == "__main__":
    sys.exit(main())
