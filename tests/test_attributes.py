"""Attribute schemas, the .mat reader and its unknown-label policy, and tools/inspect_attributes.py,
on attribute files written here in the real layout."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
import scipy.io
from real_material import DUKE_ATTRIBUTE_FILE  # tests/ helper, not a package

from torchreid_attrimeter.attributes import (
    AttributeFileError,
    AttributeIrregularityWarning,
    detect_schema_name,
    get_schema,
    read_attribute_file,
)

pytestmark = pytest.mark.filterwarnings("ignore::torchreid_attrimeter.attributes.AttributeIrregularityWarning")

REAL_DUKE_FILE = str(DUKE_ATTRIBUTE_FILE)

MARKET_FIELDS = ("age", "backpack", "bag", "handbag", "downblack", "downblue", "downbrown", "downgray",
                 "downgreen", "downpink", "downpurple", "downwhite", "downyellow", "upblack", "upblue",
                 "upgreen", "upgray", "uppurple", "upred", "upwhite", "upyellow", "clothes", "down", "up",
                 "hair", "hat", "gender")


def write_mat(path, variable: str, splits: dict) -> None:
    """Write an attribute file in the real layout. ``splits``: split -> (pids, {field: values}); the
    field order of each split is the dict's order (the real files differ per split)."""
    content = {}
    for split, (pids, fields) in splits.items():
        record = {name: np.array([values], dtype=np.uint8) for name, values in fields.items()}
        index = np.empty((1, len(pids)), dtype=object)
        for column, pid in enumerate(pids):
            index[0, column] = f"{pid:04d}"
        record["image_index"] = index
        content[split] = record
    scipy.io.savemat(str(path), {variable: content})


def market_fields(count: int, order=MARKET_FIELDS, **overrides) -> dict:
    """Clean Market fields for ``count`` identities: everything 'no' (1), one upper and one lower colour."""
    fields = {name: [1] * count for name in order}
    fields["age"] = [3] * count
    fields["upblack"] = [2] * count
    fields["downblue"] = [2] * count
    fields.update({name: list(values) for name, values in overrides.items()})
    return {name: fields[name] for name in order}


@pytest.fixture
def market_file(tmp_path):
    """Train and test with different split order and field order, plus every irregularity."""
    path = tmp_path / "market_attribute.mat"
    reversed_order = tuple(reversed(MARKET_FIELDS))
    write_mat(path, "market_attribute", {
        "test": ([5, 6, 7], market_fields(
            3, reversed_order, gender=[2, 1, 2], hat=[1, 1, 2],
            upblack=[1, 2, 2], upred=[1, 1, 2],  # 0005: no upper colour; 0007: two upper colours
        )),
        "train": ([1, 2, 3, 4], market_fields(
            4, gender=[1, 2, 2, 1], hair=[2, 0, 1, 3],  # 0002 and 0004: outside the encoding
            backpack=[2, 2, 1, 1], age=[1, 2, 3, 0],
        )),
    })
    return path


def test_market_schema_has_the_26_binary_attributes_in_a_fixed_order_without_age():
    schema = get_schema("market1501")
    assert schema.num_attributes == 26
    assert "age" not in schema.attributes
    assert schema.attributes[:9] == ("gender", "hair", "up", "down", "clothes", "hat", "backpack", "bag",
                                     "handbag")
    assert schema.groups["upper colour"][0] == "upblack" and len(schema.groups["upper colour"]) == 8
    assert len(schema.groups["lower colour"]) == 9
    assert sorted(n for names in schema.groups.values() for n in names) == sorted(schema.attributes)


def test_market_schema_with_age_adds_four_one_hot_age_attributes():
    schema = get_schema("market1501", include_age=True)
    assert schema.num_attributes == 30
    assert schema.groups["age"] == ("age_young", "age_teenager", "age_adult", "age_old")


def test_duke_schema_has_23_attributes_and_accepts_aliases():
    schema = get_schema("dukemtmc")
    assert schema.num_attributes == 23
    assert get_schema("dukemtmcreid") is schema
    assert schema.groups["carried items"] == ("backpack", "bag", "handbag")


def test_unknown_schema_name_lists_the_available_ones():
    with pytest.raises(KeyError, match="market1501"):
        get_schema("cuhk03")


def test_reader_indexes_splits_and_fields_by_name_and_maps_1_2_to_0_1(market_file):
    with pytest.warns(AttributeIrregularityWarning):
        table = read_attribute_file(market_file, "market1501")
    schema = table.schema
    assert set(table.splits) == {"train", "test"}
    assert table.splits["train"].identities.tolist() == [1, 2, 3, 4]
    values, known = table.lookup(2)
    assert values[schema.index("gender")] == 1.0 and values[schema.index("backpack")] == 1.0
    assert values[schema.index("upblack")] == 1.0 and values[schema.index("upred")] == 0.0
    values, _ = table.lookup(6)  # a test identity, split with the reversed field order
    assert values[schema.index("gender")] == 0.0 and values[schema.index("upblack")] == 1.0
    assert table.split_of(6) == "test"
    assert values.dtype == np.float32 and known.dtype == bool


def test_values_outside_the_encoding_are_unknown_and_reported_with_split_and_identities(market_file):
    with pytest.warns(AttributeIrregularityWarning, match=r"\[train\] hair.*0002, 0004"):
        table = read_attribute_file(market_file, "market1501")
    hair = table.schema.index("hair")
    assert table.lookup(2)[1][hair] == False
    assert table.lookup(4)[1][hair] == False
    assert table.lookup(1)[1][hair] and table.lookup(1)[0][hair] == 1.0
    assert table.lookup(4)[1].sum() == 25  # only hair is unknown
    invalid = [i for i in table.irregularities if i.kind == "invalid_value"]
    # age is not part of the default schema, so its 0 is not read (nor reported)
    assert {(i.split, i.attribute, i.identities) for i in invalid} == {("train", "hair", (2, 4))}


def test_colour_groups_that_are_not_one_hot_are_kept_and_reported(market_file):
    with pytest.warns(AttributeIrregularityWarning, match="upper colour"):
        table = read_attribute_file(market_file, "market1501")
    found = {(i.kind, i.split, i.attribute): i.identities for i in table.irregularities}
    assert found[("no_colour", "test", "upper colour")] == (5,)
    assert found[("several_colours", "test", "upper colour")] == (7,)
    values, known = table.lookup(7)
    assert known.all() and values[table.schema.index("upred")] == 1.0


def test_attributes_without_positive_or_negative_in_a_split_are_reported(market_file):
    with pytest.warns(AttributeIrregularityWarning, match=r"\[train\] hat: no identity is positive"):
        table = read_attribute_file(market_file, "market1501")
    kinds = {(i.kind, i.split, i.attribute) for i in table.irregularities}
    assert ("no_positive", "train", "hat") in kinds
    assert ("no_negative", "train", "upblack") in kinds
    assert ("no_positive", "test", "hat") not in kinds


def test_age_is_read_as_one_hot_and_unknown_when_outside_the_encoding(market_file):
    with pytest.warns(AttributeIrregularityWarning):
        table = read_attribute_file(market_file, get_schema("market1501", include_age=True))
    ages = [table.schema.index(n) for n in ("age_young", "age_teenager", "age_adult", "age_old")]
    assert table.lookup(2)[0][ages].tolist() == [0, 1, 0, 0]
    assert not table.lookup(4)[1][ages].any()
    assert any(i.kind == "invalid_value" and i.attribute == "age" and i.identities == (4,)
               for i in table.irregularities)


def test_identity_listed_in_two_splits_is_reported_and_taken_from_train(tmp_path):
    path = tmp_path / "two_splits.mat"
    write_mat(path, "market_attribute", {
        "test": ([1, 9], market_fields(2, gender=[1, 1])),
        "train": ([1], market_fields(1, gender=[2])),
    })
    with pytest.warns(AttributeIrregularityWarning, match="identity_in_several_splits|earlier split"):
        table = read_attribute_file(path, "market1501")
    assert table.split_of(1) == "train" and table.lookup(1)[0][0] == 1.0


def test_truncated_file_raises_an_error_naming_it(tmp_path, market_file):
    broken = tmp_path / "broken.mat"
    broken.write_bytes(market_file.read_bytes()[:300])
    with pytest.raises(AttributeFileError, match="broken.mat.*corrupt or truncated"):
        read_attribute_file(broken, "market1501")


def test_file_of_the_other_dataset_is_refused_with_a_hint(tmp_path):
    path = tmp_path / "duke_attribute.mat"
    fields = {name: [1, 2] for name in get_schema("dukemtmc").attributes}
    write_mat(path, "duke_attribute", {"train": ([1, 2], fields), "test": ([3, 4], fields)})
    with pytest.raises(AttributeFileError, match="DukeMTMC-reID file"):
        read_attribute_file(path, "market1501")
    assert detect_schema_name(path) == "dukemtmc"
    table = read_attribute_file(path, "dukemtmc")
    assert table.splits["test"].positive_counts().tolist() == [1] * 23


def test_missing_field_names_the_split_and_field(tmp_path):
    path = tmp_path / "market_attribute.mat"
    fields = market_fields(2)
    del fields["handbag"]
    write_mat(path, "market_attribute", {"train": ([1, 2], fields), "test": ([3], market_fields(1))})
    with pytest.raises(AttributeFileError, match=r"split 'train' lacks the field\(s\) \['handbag'\]"):
        read_attribute_file(path, "market1501")


def test_missing_file_is_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.mat"):
        read_attribute_file(tmp_path / "nothing.mat", "market1501")


def test_inspect_tool_prints_json_with_counts_and_irregularities(market_file, capsys):
    from torchreid_attrimeter.cli import inspect_attributes

    assert inspect_attributes.main([str(market_file), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["schema"] == "market1501"
    train = summary["splits"]["train"]
    assert train["num_identities"] == 4
    assert train["attributes"] == list(get_schema("market1501").attributes)
    assert train["positive_counts"]["gender"] == 2 and train["positive_counts"]["hair"] == 1
    assert train["unknown_counts"] == {"hair": 2}
    assert {"kind": "invalid_value", "attribute": "hair", "identities": [2, 4],
            "detail": "value(s) [0, 3] outside the encoding [1, 2]: treated as unknown"} in train["irregularities"]


def test_inspect_tool_prints_a_table_and_fails_cleanly_on_a_bad_file(market_file, tmp_path, capsys):
    from torchreid_attrimeter.cli import inspect_attributes

    assert inspect_attributes.main([str(market_file)]) == 0
    out = capsys.readouterr().out
    assert "[test] 3 identities" in out and "several_colours" in out
    bad = tmp_path / "bad.mat"
    bad.write_bytes(b"not a mat file at all")
    assert inspect_attributes.main([str(bad)]) == 2
    assert "bad.mat" in capsys.readouterr().err


@pytest.mark.real_data
@pytest.mark.skipif(not os.path.isfile(REAL_DUKE_FILE), reason="real DukeMTMC attribute file not present")
def test_real_duke_file_reads_with_its_known_irregularities():
    table = read_attribute_file(REAL_DUKE_FILE, "dukemtmc")
    assert len(table.splits["train"].identities) == 702
    invalid = [i for i in table.irregularities if i.kind == "invalid_value"]
    assert [(i.split, i.attribute, len(i.identities)) for i in invalid] == [("train", "top", 2)]
    assert any(i.kind in ("no_colour", "several_colours") for i in table.irregularities)
    assert not (set(table.splits["train"].identities.tolist()) & set(table.splits["test"].identities.tolist()))


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
