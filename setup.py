"""Installable package for torchreid-attrimeter, an AttriMeter plugin for torchreid."""

from pathlib import Path

from setuptools import find_packages, setup

# torchreid (PyPI 0.2.5 repack and the official source install alike) declares no dependencies,
# so everything it imports at `import torchreid` time is declared here.
TORCHREID_RUNTIME = [
    "scipy",
    "opencv-python-headless",
    "gdown",
    "tensorboard",
    "Pillow",
    "numpy",
    "yacs",
    "matplotlib",
    "tqdm",
    "h5py",
    "six",
    "future",
]

setup(
    name="torchreid-attrimeter",
    version="0.1.0",
    description="AttriMeter for torchreid: split a ReID model's distance into per-attribute components",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["torchreid_attrimeter", "torchreid_attrimeter.*"]),
    include_package_data=True,
    # the evaluator's C kernel is compiled from this source on first use (evaluation/native_metrics.py)
    # the demo's shipped target weights (cli/demo.py says how they are made)
    package_data={"torchreid_attrimeter.evaluation": ["pair_metrics.c"],
                  "torchreid_attrimeter.data": ["synthetic_demo_target.pth"]},
    # Lower bounds only: an upper bound or an exact pin would make pip replace an installed
    # (multi-GB) torch build.
    install_requires=["torch>=1.13", "torchvision>=0.14", "torchreid>=0.2.5", *TORCHREID_RUNTIME],
    extras_require={"test": ["pytest>=7", "pytest-timeout", "ruff", "playwright"]},
    # One console script per tool in torchreid_attrimeter/cli/ (tools/<name>.py run the same code).
    entry_points={
        "console_scripts": [
            "attrimeter-train = torchreid_attrimeter.cli.train:cli",
            "attrimeter-visualize = torchreid_attrimeter.cli.visualize:main",
            "attrimeter-audit = torchreid_attrimeter.cli.audit:main",
            "attrimeter-demo = torchreid_attrimeter.cli.demo:cli",
            "attrimeter-inspect-attributes = torchreid_attrimeter.cli.inspect_attributes:main",
            "attrimeter-make-synthetic-dataset = torchreid_attrimeter.cli.make_synthetic_dataset:main",
        ]
    },
)
