"""Attribute schemas (names, order, groups, encodings) and the reader for the identity-level
attribute files of Market-1501 (``market_attribute.mat``) and DukeMTMC-reID (``duke_attribute.mat``).

The real files are MATLAB structs ``<variable>.<split>.<field>`` with 1xN uint8 rows (1 = no / first
option, 2 = yes / second option) and a sorted ``image_index`` cell of identity strings. Neither the
split order nor the field order is fixed, so everything is indexed by name and the attribute order
is the schema's.

Unknown-label policy (the real files are not clean):

- a value outside the field's encoding (e.g. 0 = not annotated) makes that attribute *unknown* for
  that identity: ``known`` is False there and the entry is masked out of losses and metrics;
- colour groups that are not one-hot (no colour, or several colours) are kept as annotated (a person
  can wear a colour the list lacks, or two colours) and reported;
- an attribute with no positive (or no negative) in a split is kept and reported;
- an identity listed in several splits is reported, and looked up in the first split that holds it.

Every irregularity is returned in ``AttributeTable.irregularities`` and emitted once as an
``AttributeIrregularityWarning`` naming the attribute, the split and the identities.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache, lru_cache

import numpy as np

from torchreid_attrimeter.errors import AttriMeterError

__all__ = [
    "ATTRIBUTE_PLACES",
    "AttributeFileError",
    "AttributeIrregularityWarning",
    "AttributeSchema",
    "AttributeTable",
    "Irregularity",
    "NamedAttributes",
    "SplitLabels",
    "attribute_places",
    "available_schemas",
    "detect_schema_name",
    "get_schema",
    "read_attribute_file",
]

# Where an attribute is in an upright pedestrian crop, as (top, bottom) fractions of the crop's height:
# a weak spatial prior for the interpreter's maps (attrimeter.weight_place). Only attributes whose
# place does not vary: never the carried things (bags), nor gender or the colours.
ATTRIBUTE_PLACES = {
    "hat": (0.0, 0.3),
    "hair": (0.0, 0.45),
    "up": (0.2, 0.65),  # Market: sleeve length, the arms
    "top": (0.2, 0.65),  # Duke: upper-body clothing length
    "down": (0.5, 1.0),  # Market: lower-body clothing length, the legs
    "clothes": (0.45, 1.0),  # Market: dress or pants
    "boots": (0.75, 1.0),
    "shoes": (0.8, 1.0),
}

BINARY_VALUES = (1, 2)
MARKET_AGE_VALUES = (1, 2, 3, 4)


class AttributeFileError(AttriMeterError, ValueError):
    """An attribute file that cannot be read, or does not match the schema it was read with."""


class SchemaError(AttriMeterError, ValueError):
    """Schema options that do not go together (``include_age`` with a schema that has no age)."""


class AttributeIrregularityWarning(UserWarning):
    """The attribute file holds entries that the unknown-label policy had to handle."""


@dataclass(frozen=True)
class AttributeSchema:
    """A fixed, documented attribute order for one dataset's attribute file.

    ``attributes``: names in model order (index m of every (..., M) tensor is ``attributes[m]``).
    ``groups``: display groups, group name -> attribute names (every attribute in exactly one group).
    ``sources``: attribute name -> (file field, value meaning "positive", values the field may take).
    ``exclusive_groups``: groups expected to be one-hot (colours); violations are reported.
    ``descriptions``: attribute name -> (meaning of 0, meaning of 1).
    ``mat_variable``: the top-level variable of the real ``.mat`` file.
    """

    name: str
    attributes: tuple[str, ...]
    groups: Mapping[str, tuple[str, ...]] = field(compare=False, hash=False)
    sources: Mapping[str, tuple[str, int, tuple[int, ...]]] = field(compare=False, hash=False)
    exclusive_groups: tuple[str, ...] = ()
    descriptions: Mapping[str, tuple[str, str]] = field(default_factory=dict, compare=False, hash=False)
    mat_variable: str = ""
    file_name: str = ""

    def __post_init__(self) -> None:
        grouped = [name for names in self.groups.values() for name in names]
        if sorted(grouped) != sorted(self.attributes):
            raise ValueError(f"schema '{self.name}': groups must cover every attribute exactly once")
        missing = [name for name in self.attributes if name not in self.sources]
        if missing:
            raise ValueError(f"schema '{self.name}': no file field for {missing}")

    @property
    def num_attributes(self) -> int:
        return len(self.attributes)

    def index(self, attribute: str) -> int:
        """Position of ``attribute`` in the schema order."""
        try:
            return self.attributes.index(attribute)
        except ValueError:
            raise KeyError(
                f"'{attribute}' is not an attribute of schema '{self.name}' (has: {', '.join(self.attributes)})"
            ) from None

    def group_of(self, attribute: str) -> str:
        for group, names in self.groups.items():
            if attribute in names:
                return group
        raise KeyError(f"'{attribute}' is not an attribute of schema '{self.name}'")

    @property
    def file_fields(self) -> tuple[str, ...]:
        """The ``.mat`` fields this schema reads, in first-use order."""
        return tuple(dict.fromkeys(self.sources[name][0] for name in self.attributes))


class NamedAttributes:
    """What a result over the M attributes ``attribute_names`` (in schema order) derives from them: the
    base of the dataclasses that carry such names (``explain.Explanation``, ``audit.ModelAudit``)."""

    attribute_names: tuple[str, ...]

    @property
    def num_attributes(self) -> int:
        return len(self.attribute_names)

    @property
    def even_share(self) -> float:
        """1/M, the share of every attribute if the distance were split evenly."""
        return 1.0 / self.num_attributes


def _binary_sources(names: Iterable[str]) -> dict[str, tuple[str, int, tuple[int, ...]]]:
    return {name: (name, 2, BINARY_VALUES) for name in names}


_MARKET_UPPER = ("upblack", "upwhite", "upred", "uppurple", "upyellow", "upgray", "upblue", "upgreen")
_MARKET_LOWER = ("downblack", "downwhite", "downpink", "downpurple", "downyellow", "downgray",
                 "downblue", "downgreen", "downbrown")
_MARKET_AGES = ("age_young", "age_teenager", "age_adult", "age_old")
_DUKE_UPPER = ("upblack", "upwhite", "upred", "uppurple", "upgray", "upblue", "upgreen", "upbrown")
_DUKE_LOWER = ("downblack", "downwhite", "downred", "downgray", "downblue", "downgreen", "downbrown")
_CARRIED = ("backpack", "bag", "handbag")


def _colour_descriptions(names: Iterable[str], prefix: str) -> dict[str, tuple[str, str]]:
    return {name: (f"no {name[len(prefix):]}", name[len(prefix):]) for name in names}


def _market_schema(include_age: bool) -> AttributeSchema:
    person = ("gender", "hair") + (_MARKET_AGES if include_age else ())
    attributes = person + ("up", "down", "clothes", "hat") + _CARRIED + _MARKET_UPPER + _MARKET_LOWER
    sources = _binary_sources(n for n in attributes if not n.startswith("age_"))
    if include_age:
        sources.update({name: ("age", value, MARKET_AGE_VALUES) for value, name in enumerate(_MARKET_AGES, 1)})
    descriptions = {
        "gender": ("male", "female"), "hair": ("short hair", "long hair"),
        "up": ("long sleeves", "short sleeves"), "down": ("long lower-body clothing", "short lower-body clothing"),
        "clothes": ("dress", "pants"), "hat": ("no hat", "hat"), "backpack": ("no backpack", "backpack"),
        "bag": ("no bag", "bag"), "handbag": ("no handbag", "handbag"),
        **{name: (f"not {name[4:]}", name[4:]) for name in _MARKET_AGES},
        **_colour_descriptions(_MARKET_UPPER, "up"), **_colour_descriptions(_MARKET_LOWER, "down"),
    }
    groups = {
        "person": person,
        "clothing": ("up", "down", "clothes"),
        "headwear": ("hat",),
        "carried items": _CARRIED,
        "upper colour": _MARKET_UPPER,
        "lower colour": _MARKET_LOWER,
    }
    exclusive = ("upper colour", "lower colour")
    if include_age:
        groups = {"person": ("gender", "hair"), "age": _MARKET_AGES, **{k: v for k, v in groups.items() if k != "person"}}
        exclusive = exclusive + ("age",)
    return AttributeSchema(
        name="market1501-with-age" if include_age else "market1501",
        attributes=attributes, groups=groups, sources=sources, exclusive_groups=exclusive,
        descriptions=descriptions, mat_variable="market_attribute", file_name="market_attribute.mat",
    )


def _duke_schema() -> AttributeSchema:
    attributes = ("gender", "top", "boots", "shoes", "hat") + _CARRIED + _DUKE_UPPER + _DUKE_LOWER
    descriptions = {
        "gender": ("male", "female"), "top": ("short upper-body clothing", "long upper-body clothing"),
        "boots": ("no boots", "boots"), "shoes": ("dark shoes", "light shoes"), "hat": ("no hat", "hat"),
        "backpack": ("no backpack", "backpack"), "bag": ("no bag", "bag"), "handbag": ("no handbag", "handbag"),
        **_colour_descriptions(_DUKE_UPPER, "up"), **_colour_descriptions(_DUKE_LOWER, "down"),
    }
    return AttributeSchema(
        name="dukemtmc", attributes=attributes,
        groups={
            "person": ("gender",),
            "clothing": ("top", "boots", "shoes"),
            "headwear": ("hat",),
            "carried items": _CARRIED,
            "upper colour": _DUKE_UPPER,
            "lower colour": _DUKE_LOWER,
        },
        sources=_binary_sources(attributes), exclusive_groups=("upper colour", "lower colour"),
        descriptions=descriptions, mat_variable="duke_attribute", file_name="duke_attribute.mat",
    )


_SCHEMA_ALIASES = {
    "market1501": "market1501", "market": "market1501", "market-1501": "market1501",
    "dukemtmc": "dukemtmc", "dukemtmcreid": "dukemtmc", "duke": "dukemtmc", "dukemtmc-reid": "dukemtmc",
}


def attribute_places(names: Iterable[str]) -> list[tuple[float, float] | None]:
    """The (top, bottom) place of each attribute in ``ATTRIBUTE_PLACES``, None where it has none."""
    return [ATTRIBUTE_PLACES.get(name) for name in names]


def available_schemas() -> tuple[str, ...]:
    return ("market1501", "dukemtmc")


def get_schema(name: str, include_age: bool = False) -> AttributeSchema:
    """The schema ``'market1501'`` (26 binary attributes; ``include_age=True`` adds the 4-way age as
    one-hot ``age_young .. age_old``, 30 in all) or ``'dukemtmc'`` (23). Aliases: ``market``,
    ``dukemtmcreid``, ``duke``. The same object is returned for the same schema."""
    key = _SCHEMA_ALIASES.get(str(name).lower())
    if key is None:
        raise KeyError(f"unknown attribute schema '{name}'; available: {', '.join(available_schemas())}")
    return _build_schema(key, bool(include_age))


@cache
def _build_schema(key: str, include_age: bool) -> AttributeSchema:
    if key == "market1501":
        return _market_schema(include_age)
    if include_age:
        raise SchemaError("include_age applies to the 'market1501' schema only (DukeMTMC has no age)")
    return _duke_schema()


# --- reading ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Irregularity:
    """One kind of irregular entry found in one split, for one attribute or group."""

    kind: str  # 'invalid_value' | 'no_colour' | 'several_colours' | 'no_positive' | 'no_negative'
    #             | 'identity_in_several_splits'
    split: str
    attribute: str  # attribute, file field or group name
    identities: tuple[int, ...]
    detail: str

    def __str__(self) -> str:
        shown = ", ".join(f"{pid:04d}" for pid in self.identities[:12])
        more = f" and {len(self.identities) - 12} more" if len(self.identities) > 12 else ""
        who = f" (identities: {shown}{more})" if self.identities else ""
        return f"[{self.split}] {self.attribute}: {self.detail}{who}"


@dataclass
class SplitLabels:
    """The labels of one split of the file.

    ``identities`` (N,) int64 pids; ``values`` (N, M) float32 in {0, 1} (0 where unknown);
    ``known`` (N, M) bool, False where the file has no usable label.
    """

    name: str
    identities: np.ndarray
    values: np.ndarray
    known: np.ndarray

    def positive_counts(self) -> np.ndarray:
        """(M,) number of identities with a known positive label."""
        return ((self.values > 0.5) & self.known).sum(axis=0)


@dataclass
class AttributeTable:
    """The contents of an attribute file, indexed by split name and identity."""

    path: str
    schema: AttributeSchema
    splits: dict[str, SplitLabels]
    irregularities: list[Irregularity]
    _rows: dict[int, tuple[str, int]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for split in self.splits.values():
            for row, pid in enumerate(split.identities.tolist()):
                self._rows.setdefault(int(pid), (split.name, row))

    def __contains__(self, pid: int) -> bool:
        return int(pid) in self._rows

    @property
    def identities(self) -> set[int]:
        return set(self._rows)

    def split_of(self, pid: int) -> str:
        return self._rows[int(pid)][0]

    def lookup(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        """(values (M,) float32, known (M,) bool) of identity ``pid``, from whichever split holds it."""
        try:
            split_name, row = self._rows[int(pid)]
        except KeyError:
            raise KeyError(f"identity {int(pid):04d} is not in attribute file '{self.path}'") from None
        split = self.splits[split_name]
        return split.values[row], split.known[row]


def _field_names(struct: np.ndarray) -> tuple[str, ...]:
    return tuple(struct.dtype.names or ())


def _unwrap_struct(value: object, where: str, path: str) -> np.ndarray:
    """A 1x1 MATLAB struct as the numpy record that holds its fields."""
    if not isinstance(value, np.ndarray) or value.dtype.names is None or value.size != 1:
        raise AttributeFileError(
            f"'{path}': {where} is not a 1x1 MATLAB struct (found {type(value).__name__} "
            f"{getattr(value, 'shape', '')}); the file does not have the attribute-file layout"
        )
    return value.reshape(-1)[0]


def _parse_identity(raw: object, split: str, path: str) -> int:
    text = raw
    while isinstance(text, np.ndarray):
        if text.size != 1:
            raise AttributeFileError(f"'{path}': split '{split}' has an image_index entry that is not one string")
        text = text.reshape(-1)[0]
    try:
        return int(str(text).strip())
    except ValueError:
        raise AttributeFileError(
            f"'{path}': split '{split}' has an identity '{text}' in image_index that is not a number"
        ) from None


def _load_mat(path: str, schema: AttributeSchema) -> np.ndarray:
    import scipy.io

    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute file not found: '{path}'")
    try:
        mat = scipy.io.loadmat(path)
    except Exception as error:  # noqa: BLE001 - scipy raises many types for a bad file; all mean "unreadable"
        raise AttributeFileError(
            f"'{path}' is not a readable MATLAB attribute file (corrupt or truncated?): "
            f"{type(error).__name__}: {error}"
        ) from None
    variables = [key for key in mat if not key.startswith("__")]
    if schema.mat_variable not in variables:
        other = {"market_attribute": "Market-1501", "duke_attribute": "DukeMTMC-reID"}
        hint = "; ".join(f"'{v}' is the {other[v]} file" for v in variables if v in other)
        raise AttributeFileError(
            f"'{path}' has no variable '{schema.mat_variable}' (the {schema.name} attribute file); it holds "
            f"{variables or 'nothing'}{'. ' + hint if hint else ''}. Is this the attribute file of another dataset?"
        )
    return _unwrap_struct(mat[schema.mat_variable], f"variable '{schema.mat_variable}'", path)


def _read_split(record: np.ndarray, split: str, schema: AttributeSchema, path: str
                ) -> tuple[SplitLabels, list[Irregularity]]:
    """One split's labels, in the schema's attribute order, and what is odd about them. The file's
    layout is refused when wrong (AttributeFileError); odd annotations are kept and reported."""
    identities = _split_identities(record, split, schema, path)
    raw_fields = _split_fields(record, split, schema, path, len(identities))
    values, known = _encode_attributes(raw_fields, schema, len(identities))
    irregularities = [
        *_invalid_values(raw_fields, split, schema, identities),
        *_one_sided_attributes(values, known, split, schema),
        *_one_of_group_problems(values, known, split, schema, identities),
    ]
    return SplitLabels(split, identities, values, known), irregularities


def _split_identities(record: np.ndarray, split: str, schema: AttributeSchema, path: str) -> np.ndarray:
    """The split's identities (its image_index), after checking that it has the schema's fields and
    lists no identity twice (a label lookup by identity would be ambiguous)."""
    fields = _field_names(record)
    missing = [name for name in (*schema.file_fields, "image_index") if name not in fields]
    if missing:
        raise AttributeFileError(
            f"'{path}': split '{split}' lacks the field(s) {missing} of schema '{schema.name}' "
            f"(it has {list(fields)}). Is this the attribute file of another dataset?"
        )
    index_cell = np.asarray(record["image_index"]).reshape(-1)
    identities = np.array([_parse_identity(raw, split, path) for raw in index_cell], dtype=np.int64)
    if len(set(identities.tolist())) != len(identities):
        repeated = sorted({pid for pid in identities.tolist() if (identities == pid).sum() > 1})
        raise AttributeFileError(f"'{path}': split '{split}' lists identities {repeated[:10]} more than once")
    return identities


def _split_fields(record: np.ndarray, split: str, schema: AttributeSchema, path: str,
                  count: int) -> dict[str, np.ndarray]:
    """The schema's file fields of the split as (count,) int64, each checked to hold one number per
    identity."""
    raw_fields: dict[str, np.ndarray] = {}
    for name in schema.file_fields:
        raw = np.asarray(record[name]).reshape(-1)
        if raw.size != count or not np.issubdtype(raw.dtype, np.number):
            raise AttributeFileError(
                f"'{path}': field '{split}.{name}' has {raw.size} {raw.dtype} values for {count} identities "
                f"in image_index; expected one number per identity"
            )
        raw_fields[name] = raw.astype(np.int64)
    return raw_fields


def _encode_attributes(raw_fields: dict[str, np.ndarray], schema: AttributeSchema,
                       count: int) -> tuple[np.ndarray, np.ndarray]:
    """(count, M) values in {0, 1} and (count, M) known: a column is known where its file field holds
    a value of its encoding, and positive where that value is the attribute's."""
    size = schema.num_attributes
    values = np.zeros((count, size), dtype=np.float32)
    known = np.zeros((count, size), dtype=bool)
    for column, attribute in enumerate(schema.attributes):
        name, positive, encoding = schema.sources[attribute]
        raw = raw_fields[name]
        known[:, column] = np.isin(raw, encoding)
        values[:, column] = ((raw == positive) & known[:, column]).astype(np.float32)
    return values, known


def _invalid_values(raw_fields: dict[str, np.ndarray], split: str, schema: AttributeSchema,
                    identities: np.ndarray) -> list[Irregularity]:
    """File values outside their field's encoding (``_encode_attributes`` treats them as unknown)."""
    irregularities: list[Irregularity] = []
    for name, raw in raw_fields.items():
        encoding = next(src[2] for src in schema.sources.values() if src[0] == name)
        invalid = ~np.isin(raw, encoding)
        if invalid.any():
            found = sorted(set(raw[invalid].tolist()))
            irregularities.append(Irregularity(
                "invalid_value", split, name, tuple(identities[invalid].tolist()),
                f"value(s) {found} outside the encoding {list(encoding)}: treated as unknown"))
    return irregularities


def _one_sided_attributes(values: np.ndarray, known: np.ndarray, split: str,
                          schema: AttributeSchema) -> list[Irregularity]:
    """Attributes that no identity, or every identity, of the split has where known."""
    irregularities: list[Irregularity] = []
    for column, attribute in enumerate(schema.attributes):
        if schema.sources[attribute][0] == "age":
            continue  # age's one-hot columns come from one file field, not from yes/no fields of their own
        known_column = known[:, column]
        if known_column.any():
            if not (values[known_column, column] > 0.5).any():
                irregularities.append(Irregularity(
                    "no_positive", split, attribute, (), "no identity is positive (kept as annotated)"))
            elif (values[known_column, column] > 0.5).all():
                irregularities.append(Irregularity(
                    "no_negative", split, attribute, (), "every identity is positive (kept as annotated)"))
    return irregularities


def _one_of_group_problems(values: np.ndarray, known: np.ndarray, split: str, schema: AttributeSchema,
                           identities: np.ndarray) -> list[Irregularity]:
    """Identities with no positive, or several, in a one-of group (such as the upper-body colours)
    whose columns are all known."""
    irregularities: list[Irregularity] = []
    for group in schema.exclusive_groups:
        if group == "age":
            continue  # age is one file field: exactly one of its columns is positive when known
        columns = [schema.index(name) for name in schema.groups[group]]
        all_known = known[:, columns].all(axis=1)
        positives = values[:, columns].sum(axis=1)
        for kind, mask, detail in (
            ("no_colour", all_known & (positives == 0), "no positive in this one-of group (kept as annotated)"),
            ("several_colours", all_known & (positives > 1),
             "several positives in this one-of group (kept as annotated)"),
        ):
            if mask.any():
                irregularities.append(Irregularity(kind, split, group, tuple(identities[mask].tolist()), detail))
    return irregularities


def _split_order(names: Iterable[str]) -> list[str]:
    # Lookups prefer 'train' then 'test' when an identity were in both; other names keep file order.
    names = list(names)
    preferred = [name for name in ("train", "test") if name in names]
    return preferred + [name for name in names if name not in preferred]


@lru_cache(maxsize=16)
def _read_cached(path: str, mtime_ns: int, size: int, schema: AttributeSchema) -> AttributeTable:
    top = _load_mat(path, schema)
    split_names = _field_names(top)
    if not split_names:
        raise AttributeFileError(f"'{path}': variable '{schema.mat_variable}' has no split fields")
    splits: dict[str, SplitLabels] = {}
    irregularities: list[Irregularity] = []
    for split in _split_order(split_names):
        record = _unwrap_struct(top[split], f"split '{split}'", path)
        labels, found = _read_split(record, split, schema, path)
        splits[split] = labels
        irregularities.extend(found)
    seen: dict[int, str] = {}
    shared: dict[str, list[int]] = {}
    for split in splits.values():
        for pid in split.identities.tolist():
            if pid in seen:
                shared.setdefault(split.name, []).append(pid)
            else:
                seen[pid] = split.name
    for split_name, pids in shared.items():
        irregularities.append(Irregularity(
            "identity_in_several_splits", split_name, "image_index", tuple(pids),
            "also listed in an earlier split; labels are taken from the first split that lists them"))
    table = AttributeTable(path=path, schema=schema, splits=splits, irregularities=irregularities)
    for item in irregularities:
        warnings.warn(f"attribute file '{path}': {item}", AttributeIrregularityWarning, stacklevel=4)
    return table


def detect_schema_name(path: str | os.PathLike) -> str:
    """The schema name of an attribute file, from its top-level variable name."""
    import scipy.io

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute file not found: '{path}'")
    try:
        variables = [name for name, _, _ in scipy.io.whosmat(path)]
    except Exception as error:  # noqa: BLE001 - any failure means an unreadable file
        raise AttributeFileError(
            f"'{path}' is not a readable MATLAB attribute file (corrupt or truncated?): {type(error).__name__}: {error}"
        ) from None
    for name in available_schemas():
        if get_schema(name).mat_variable in variables:
            return name
    raise AttributeFileError(
        f"'{path}' holds the variable(s) {variables}, none of which is a known attribute file variable "
        f"({', '.join(get_schema(n).mat_variable for n in available_schemas())})"
    )


def read_attribute_file(path: str | os.PathLike, schema: AttributeSchema | str) -> AttributeTable:
    """Read a Market-1501 / DukeMTMC attribute ``.mat`` file (the real layout) with ``schema``.

    Returns an :class:`AttributeTable`: per split, identities (N,), values (N, M) in {0, 1} (file
    values 1/2 mapped to 0/1) and known (N, M). Irregularities are applied per the module's
    unknown-label policy, listed in ``table.irregularities`` and warned about (once per file
    version: the parsed file is cached by path and modification time).

    Raises ``FileNotFoundError`` for a missing file and :class:`AttributeFileError` for a corrupt or
    truncated file, a file of another dataset, or a layout that does not match the schema.
    """
    if isinstance(schema, str):
        schema = get_schema(schema)
    path = os.path.abspath(os.fspath(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"attribute file not found: '{path}'")
    stat = os.stat(path)
    return _read_cached(path, stat.st_mtime_ns, stat.st_size, schema)
