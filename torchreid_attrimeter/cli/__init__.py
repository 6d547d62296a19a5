"""The command-line tools, one module per tool; ``tools/<name>.py`` and the ``attrimeter-*`` console
scripts (setup.py) only call them.

    attrimeter-train                    cli/train.py                 (tools/train.py)
    attrimeter-visualize                cli/visualize.py             (tools/visualize_decomposition.py)
    attrimeter-demo                     cli/demo.py                  (tools/demo.py)
    attrimeter-inspect-attributes       cli/inspect_attributes.py    (tools/inspect_attributes.py)
    attrimeter-make-synthetic-dataset   cli/make_synthetic_dataset.py (tools/make_synthetic_dataset.py)
    attrimeter-audit                    cli/audit.py                 (tools/audit_model.py)

cli/benchmarks.py is not a tool: it holds what the benchmark scripts on random features share
(tools/benchmark_evaluator.py, tools/benchmark_audit.py).

Each module can also be run as ``python -m torchreid_attrimeter.cli.<module>``. Every tool ends the
same way (cli/errors.py): exit status 0 when done, 2 with one ``error: ...`` line for input it
cannot use, 1 with one ``error: ...`` line when the system fails it (a full disk).

``main`` is what Python callers use. Where it returns the run's record (train, demo), ``cli`` is the
entry point that turns it into an exit status; elsewhere ``main`` returns the exit status itself.
"""
