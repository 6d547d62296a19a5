"""Where the real material for measuring lives: ``../shared`` beside the repository (where the real-data
configs point), or wherever ``ATTRIMETER_SHARED`` says (a CI clone may live elsewhere on the machine)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BESIDE_REPO = REPO.parent / "shared"
SHARED = Path(os.environ.get("ATTRIMETER_SHARED") or BESIDE_REPO)
DUKE_DEV_ROOT = SHARED / "data" / "dukemtmc-reid-dev"
DUKE_ATTRIBUTE_FILE = DUKE_DEV_ROOT / "dukemtmc-reid" / "DukeMTMC-reID" / "duke_attribute.mat"
