"""Print what an attribute file holds, per split: identities, attribute names in schema order,
positive counts, and every irregularity the reader's unknown-label policy handled.

    attrimeter-inspect-attributes FILE [--schema market1501|dukemtmc] [--include-age] [--json]

(``python tools/inspect_attributes.py`` and ``python -m torchreid_attrimeter.cli.inspect_attributes``
are the same tool.) A file it cannot read ends with one 'error: ...' line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings

from torchreid_attrimeter.attributes import (
    AttributeIrregularityWarning,
    AttributeTable,
    detect_schema_name,
    get_schema,
    read_attribute_file,
)
from torchreid_attrimeter.cli.errors import run_tool


def summarise(table: AttributeTable) -> dict:
    """A JSON-safe summary of ``table``."""
    splits = {}
    for name, split in table.splits.items():
        positives = split.positive_counts()
        unknown = (~split.known).sum(axis=0)
        splits[name] = {
            "num_identities": len(split.identities),
            "attributes": list(table.schema.attributes),
            "positive_counts": {a: int(positives[i]) for i, a in enumerate(table.schema.attributes)},
            "unknown_counts": {a: int(unknown[i]) for i, a in enumerate(table.schema.attributes) if unknown[i]},
            "irregularities": [
                {"kind": item.kind, "attribute": item.attribute, "identities": list(item.identities),
                 "detail": item.detail}
                for item in table.irregularities if item.split == name
            ],
        }
    return {"file": table.path, "schema": table.schema.name, "num_attributes": table.schema.num_attributes,
            "groups": {g: list(n) for g, n in table.schema.groups.items()}, "splits": splits}


def print_summary(table: AttributeTable) -> None:
    schema = table.schema
    print(f"{table.path}\nschema '{schema.name}', {schema.num_attributes} attributes")
    for name, split in table.splits.items():
        positives = split.positive_counts()
        unknown = (~split.known).sum(axis=0)
        print(f"\n[{name}] {len(split.identities)} identities")
        width = max(len(a) for a in schema.attributes)
        for group, names in schema.groups.items():
            print(f"  {group}:")
            for attribute in names:
                i = schema.index(attribute)
                note = f"  ({unknown[i]} unknown)" if unknown[i] else ""
                print(f"    {attribute:<{width}}  {positives[i]:5d} positive{note}")
        found = [item for item in table.irregularities if item.split == name]
        print(f"  irregularities: {len(found) or 'none'}")
        for item in found:
            print(f"    - {item.kind}: {item}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", help="market_attribute.mat or duke_attribute.mat")
    parser.add_argument("--schema", choices=["market1501", "dukemtmc"], help="default: from the file's variable")
    parser.add_argument("--include-age", action="store_true", help="Market: add age as 4 one-hot attributes")
    parser.add_argument("--json", action="store_true", help="print a JSON summary instead of a table")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Print the file's summary. An unreadable file, or an option that does not fit it (--include-age
    on a DukeMTMC file: a SchemaError), raises an AttriMeterError (reported by ``main``)."""
    schema_name = args.schema or detect_schema_name(args.file)
    schema = get_schema(schema_name, include_age=args.include_age)
    with warnings.catch_warnings():
        # irregularities are printed below, in full; the warnings would repeat them
        warnings.simplefilter("ignore", AttributeIrregularityWarning)
        table = read_attribute_file(args.file, schema)
    if args.json:
        print(json.dumps(summarise(table), indent=2))
    else:
        print_summary(table)


def main(argv: list[str] | None = None) -> int:
    """The tool: its exit status, and one ``error:`` line when it fails (cli/errors.py)."""
    return run_tool(lambda arguments: run(parse_args(arguments)), argv)


if __name__ == "__main__":
    sys.exit(main())
