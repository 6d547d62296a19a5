"""The evaluator's fused CPU kernel (``pair_metrics.c``): compiled with the system C compiler on first
use, cached, and called through ctypes, so nothing is built at install time and no extra package is
needed. Where it cannot be used (no compiler, a CUDA device, more than 64 attributes, or
``ATTRIMETER_NATIVE=0``) the evaluator runs the same metrics with torch operations, block by block.

Like torchreid's Cython ``evaluate_rank`` with its Python fallback, the two paths compute the same
definitions (written readably, one pair at a time, in definitions.py); the tests hold both to them.
The library reports its struct layout, which is checked against the ctypes mirror when it is loaded.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import torch

from torchreid_attrimeter.evaluation.explanation_metrics import SHARE_BIN_LOW, SHARE_BIN_SHIFT, SHARE_BINS

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("pair_metrics.c")
MAX_ATTRIBUTES = 64  # labels travel as one 64-bit mask per image
# -ffp-contract=off: no fused multiply-adds, so float32 results round like torch's element-wise ops.
# -fno-math-errno: sqrt needs no errno (its argument is clamped positive), so it vectorises (2x faster).
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-math-errno", "-fPIC", "-shared", "-pthread"]
# The orders of the C enums of pair_metrics.c.
SUM_NAMES = ("exclusive_sum", "common_sum", "error_sum", "error_max")
TALLY_NAMES = ("pairs", "exclusive_pairs", "common_pairs", "error_count", "adre_skipped", "nonfinite")
COUNT_NAMES = ("top_k", "top_k_differ", "differ", "known", "agree")
# Pair categories of the per-query share sums (index = 2 * same identity + same camera), as in C.
NUM_CATEGORIES = 4
# match_bins compares every image with each of the row's matches; beyond this many matches a binary
# search (torch's searchsorted) does less work.
MAX_COUNTED_MATCHES = 128


class _Tile(ctypes.Structure):
    """Mirror of ``Tile`` in pair_metrics.c (same field order and types)."""

    _fields_ = [
        ("num_attributes", ctypes.c_int64), ("rows", ctypes.c_int64), ("columns", ctypes.c_int64),
        ("products", ctypes.c_void_p), ("query_norms", ctypes.c_void_p), ("gallery_norms", ctypes.c_void_p),
        ("squared_floor", ctypes.c_float),
        ("target", ctypes.c_void_p), ("target_stride", ctypes.c_int64),
        ("reconstructed", ctypes.c_void_p), ("reconstructed_stride", ctypes.c_int64),
        ("pair_mask", ctypes.c_void_p),
        ("query_labels", ctypes.c_void_p), ("query_known", ctypes.c_void_p),
        ("gallery_labels", ctypes.c_void_p), ("gallery_known", ctypes.c_void_p),
        ("top_k", ctypes.c_int64),
        ("comparators", ctypes.c_void_p), ("num_comparators", ctypes.c_int64),
        ("adre_min_distance", ctypes.c_float),
        ("log_min", ctypes.c_double), ("log_max", ctypes.c_double), ("bins", ctypes.c_int64),
        ("num_threads", ctypes.c_int64),
        ("sums", ctypes.c_void_p), ("tallies", ctypes.c_void_p), ("histogram", ctypes.c_void_p),
        ("counts", ctypes.c_void_p),
        ("share_shift", ctypes.c_int64), ("share_low", ctypes.c_int64), ("share_bins", ctypes.c_int64),
        ("share_histogram", ctypes.c_void_p),
        ("query_pids", ctypes.c_void_p), ("query_camids", ctypes.c_void_p),
        ("gallery_pids", ctypes.c_void_p), ("gallery_camids", ctypes.c_void_p),
        ("query_share_sums", ctypes.c_void_p), ("query_pair_counts", ctypes.c_void_p),
    ]


def _cache_dir() -> Path:
    configured = os.environ.get("ATTRIMETER_NATIVE_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "torchreid_attrimeter"


def _machine_key(compiler: str) -> str:
    """What the compiled library depends on: source, flags, compiler and (for -march=native) the CPU."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(" ".join([compiler, *_FLAGS, platform.machine()]).encode())
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30,
                                 check=False).stdout
        digest.update(version.encode())
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            digest.update(next((line for line in handle if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return digest.hexdigest()[:16]


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    # Compile beside the target and rename: concurrent first uses never load a half-written library.
    handle, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(handle)
    try:
        result = subprocess.run([compiler, *_FLAGS, str(SOURCE), "-o", partial, "-lm"], capture_output=True, check=False,
                                text=True, timeout=300)
        if result.returncode != 0:
            raise OSError(f"{compiler} failed on {SOURCE}: {result.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


@cache
def load_kernel() -> ctypes.CDLL | None:
    """The compiled kernel, or None (the reason is logged once) when it cannot be had."""
    if os.environ.get("ATTRIMETER_NATIVE", "1") == "0":
        logger.info("ATTRIMETER_NATIVE=0: the evaluator uses its torch path")
        return None
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        logger.warning("no C compiler ('%s') found: the evaluator uses its slower torch path on CPU "
                       "(install gcc, or set CC, to get the fused kernel)", compiler)
        return None
    target = _cache_dir() / f"pair_metrics-{_machine_key(compiler)}.so"
    try:
        if not target.exists():
            logger.info("compiling the evaluator's kernel into %s", target)
            _build(compiler, target)
        library = ctypes.CDLL(str(target))
    except OSError as error:
        logger.warning("the evaluator's C kernel is unavailable (%s): using the torch path", error)
        return None
    check_layout(library)
    library.attrimeter_tile_metrics.argtypes = [ctypes.POINTER(_Tile)]
    library.attrimeter_tile_metrics.restype = ctypes.c_int
    library.attrimeter_match_bins.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4 + [
        ctypes.c_void_p, ctypes.c_int64]
    library.attrimeter_match_bins.restype = ctypes.c_int
    return library


class KernelLayoutError(RuntimeError):
    """The compiled kernel's Tile struct or enums differ from the ctypes mirror (a source edit made on
    one side only)."""


def check_layout(library: ctypes.CDLL) -> None:
    """Compare the kernel's data layout (field names and offsets of ``Tile``, its size, the enum sizes)
    with the Python mirror before the first call: a mismatch would otherwise make the kernel read and
    write the wrong memory without any error."""
    library.attrimeter_tile_layout.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64]
    library.attrimeter_tile_layout.restype = ctypes.c_int64
    capacity = len(_Tile._fields_) + 8
    sizes, offsets = (ctypes.c_int64 * 5)(), (ctypes.c_int64 * capacity)()
    names = (ctypes.c_char_p * capacity)()
    count = library.attrimeter_tile_layout(sizes, names, offsets, capacity)
    kernel = [(names[i].decode(), offsets[i]) for i in range(min(count, capacity))]
    mirror = [(name, getattr(_Tile, name).offset) for name, _ in _Tile._fields_]
    problems = [f"field {index}: C {c_name}@{c_offset}, Python {name}@{offset}"
                for index, ((c_name, c_offset), (name, offset)) in enumerate(zip(kernel, mirror))
                if (c_name, c_offset) != (name, offset)]
    if len(kernel) != len(mirror):
        problems.append(f"C has {len(kernel)} fields, Python {len(mirror)}")
    expected_sizes = (("sizeof(Tile)", ctypes.sizeof(_Tile)), ("NUM_SUMS", len(SUM_NAMES)),
                      ("NUM_TALLIES", len(TALLY_NAMES)), ("NUM_COUNTS", len(COUNT_NAMES)),
                      ("NUM_CATEGORIES", NUM_CATEGORIES))
    problems += [f"{name}: C {value}, Python {wanted}"
                 for (name, wanted), value in zip(expected_sizes, sizes) if value != wanted]
    if problems:
        raise KernelLayoutError(
            f"{SOURCE.name} and native_metrics._Tile / the enum name tuples disagree ({'; '.join(problems)}): "
            f"edit both together (TILE_FIELDS in the C file lists the fields in order)")


def usable(device: torch.device, num_attributes: int) -> bool:
    """Whether a tile on ``device`` with ``num_attributes`` components can go through the kernel."""
    return device.type == "cpu" and 1 <= num_attributes <= MAX_ATTRIBUTES and load_kernel() is not None


def match_bins(matches: torch.Tensor, values: torch.Tensor,
               match_columns: torch.Tensor | None = None) -> torch.Tensor | None:
    """(c, 2K + 1) int64 per-row histogram of where the values fall among the row's matches: bin 2i
    holds values with exactly i matches strictly closer and none at their distance, bin 2i + 1 those
    with i strictly closer and a match at exactly their distance (see ``ranking.query_rank_stats``).
    With ``match_columns`` (c, K), the gallery column of each match, ties are settled as a stable sort
    does: a match at the same distance is closer when its column is lower (only even bins are used).

    matches (c, K) increasing per row (padded with +inf) and values (c, G), float32 on CPU; None when
    the kernel cannot take them (other device or dtype, no compiler, K > MAX_COUNTED_MATCHES), for the
    caller's torch path.
    """
    tensors = (matches, values)
    if any(tensor.device.type != "cpu" or tensor.dtype != torch.float32 for tensor in tensors):
        return None
    if matches.shape[1] > MAX_COUNTED_MATCHES:
        return None
    library = load_kernel()
    if library is None:
        return None
    rows, columns = values.shape
    matches = matches.contiguous()
    if match_columns is not None:
        match_columns = match_columns.to(torch.int64).contiguous()
    if values.stride(1) != 1:
        values = values.contiguous()
    counts = torch.zeros(rows, 2 * matches.shape[1] + 1, dtype=torch.int64)
    library.attrimeter_match_bins(matches.data_ptr(), _pointer(match_columns), values.data_ptr(), values.stride(0),
                                  rows, columns, matches.shape[1], counts.data_ptr(), torch.get_num_threads())
    return counts


def label_masks(labels: torch.Tensor) -> torch.Tensor:
    """(N, M) bool or 0/1 labels, M <= 64 -> (N,) int64 whose bit m is label m (uint64 in C)."""
    values = labels.cpu().numpy().astype(np.uint64)
    bits = (values << np.arange(values.shape[1], dtype=np.uint64)).sum(axis=1, dtype=np.uint64)
    return torch.from_numpy(bits.view(np.int64).copy())


@dataclass
class TileTotals:
    """What the kernel adds up over a tile's selected pairs (see ``tile_totals``)."""

    pairs: int
    nonfinite: int
    adre_skipped: int
    error_sum: float
    error_count: int
    error_max: float
    histogram: torch.Tensor  # (bins,) float64
    exclusive_sum: float
    exclusive_pairs: int
    common_sum: float
    common_pairs: int
    counts: dict[str, torch.Tensor]  # COUNT_NAMES -> (M,) int64
    share_histogram: torch.Tensor  # (2, M, SHARE_BINS) int64, as explanation_metrics.share_histogram
    # With ``identities``: per query row, the sums of the pairs' shares (rows, NUM_CATEGORIES, M) float64
    # and the pairs counted (rows, NUM_CATEGORIES) int64, by category 2 * same identity + same camera.
    query_share_sums: torch.Tensor | None = None
    query_pair_counts: torch.Tensor | None = None


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check_tile_tensors(
    products: torch.Tensor,
    query_norms: torch.Tensor | None,
    gallery_norms: torch.Tensor | None,
    target: torch.Tensor,
    reconstructed: torch.Tensor | None,
) -> None:
    """Raise ValueError unless the float tensors have the dtype and memory layout the kernel reads
    (it takes raw pointers, so a wrong layout would give wrong numbers, not an error)."""
    _, rows, columns = products.shape
    for name, tensor in (("products", products), ("query_norms", query_norms), ("gallery_norms", gallery_norms)):
        if tensor is not None and (tensor.dtype != torch.float32 or not tensor.is_contiguous()):
            raise ValueError(f"{name} must be contiguous float32")
    for name, tensor in (("target", target), ("reconstructed", reconstructed)):
        if tensor is not None and (tensor.dtype != torch.float32 or tensor.shape != (rows, columns)
                                   or tensor.stride(1) != 1):
            raise ValueError(f"{name} must be a ({rows}, {columns}) float32 view with unit column stride")


def _identity_parts(
    identities: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None, rows: int, columns: int
) -> list[torch.Tensor | None]:
    """The four identity arrays as contiguous int64 (the kernel reads them as such), checked against the
    tile's size; four Nones without identities."""
    if identities is None:
        return [None] * 4
    parts = [part.to(torch.int64).contiguous() for part in identities]
    if [len(part) for part in parts] != [rows, rows, columns, columns]:
        raise ValueError(f"identities must be (query pids, query camids) of {rows} rows and (gallery pids, "
                         f"gallery camids) of {columns} columns")
    return parts


@dataclass
class _TileOutputs:
    """The zeroed buffers the kernel writes: per-thread partial sums (added up by ``totals``, so the
    threads never share a counter) and, with identities, the per-query share sums."""

    sums: torch.Tensor  # (threads, SUM_NAMES) float64
    tallies: torch.Tensor  # (threads, TALLY_NAMES) int64
    histogram: torch.Tensor  # (threads, bins) float64
    counts: torch.Tensor  # (threads, COUNT_NAMES, M) int64
    # Per thread: a spare counter for the entries not counted (see Tile.share_histogram), then the histogram.
    shares: torch.Tensor  # (threads, 1 + 2 * M * SHARE_BINS) int64
    query_share_sums: torch.Tensor | None
    query_pair_counts: torch.Tensor | None

    @classmethod
    def allocate(cls, threads: int, num_attributes: int, bins: int, rows: int,
                 per_query: bool) -> _TileOutputs:
        query_share_sums = query_pair_counts = None
        if per_query:
            query_share_sums = torch.zeros(rows, NUM_CATEGORIES, num_attributes, dtype=torch.float64)
            query_pair_counts = torch.zeros(rows, NUM_CATEGORIES, dtype=torch.int64)
        return cls(
            sums=torch.zeros(threads, len(SUM_NAMES), dtype=torch.float64),
            tallies=torch.zeros(threads, len(TALLY_NAMES), dtype=torch.int64),
            histogram=torch.zeros(threads, bins, dtype=torch.float64),
            counts=torch.zeros(threads, len(COUNT_NAMES), num_attributes, dtype=torch.int64),
            shares=torch.zeros(threads, 1 + 2 * num_attributes * SHARE_BINS, dtype=torch.int64),
            query_share_sums=query_share_sums, query_pair_counts=query_pair_counts,
        )

    def totals(self) -> TileTotals:
        """The threads' partial results added up (the error maximum is a maximum, not a sum)."""
        sums, counts = self.sums, self.counts
        num_attributes = counts.shape[2]
        summed = {**dict(zip(TALLY_NAMES, self.tallies.sum(0).tolist())),
                  **dict(zip(SUM_NAMES, sums.sum(0).tolist()))}
        summed["error_max"] = float(sums[:, SUM_NAMES.index("error_max")].max())
        return TileTotals(
            **summed, histogram=self.histogram.sum(0),
            counts={name: counts[:, index].sum(0) for index, name in enumerate(COUNT_NAMES)},
            share_histogram=self.shares[:, 1:].sum(0).view(2, num_attributes, SHARE_BINS),
            query_share_sums=self.query_share_sums, query_pair_counts=self.query_pair_counts,
        )


def _run_tile(library: ctypes.CDLL, tile: _Tile) -> None:
    """Call the kernel on a filled ``Tile`` and turn its status code into the matching exception."""
    status = library.attrimeter_tile_metrics(ctypes.byref(tile))
    if status == -2:
        raise MemoryError("the evaluator's C kernel could not allocate its ADRE bin table")
    if status != 0:
        raise ValueError(f"the kernel takes 1 to {MAX_ATTRIBUTES} attributes, got {tile.num_attributes}")


def tile_totals(
    products: torch.Tensor,
    query_norms: torch.Tensor | None,
    gallery_norms: torch.Tensor | None,
    target: torch.Tensor,
    reconstructed: torch.Tensor | None,
    pair_mask: torch.Tensor | None,
    labels: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None,
    *,
    squared_floor: float,
    top_k: int,
    comparators: np.ndarray,
    adre_min_distance: float,
    histogram_range: tuple[float, float, int],
    num_threads: int,
    identities: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> TileTotals:
    """Every per-pair metric of a tile in one multi-threaded pass.

    products (M, q, g) float32 contiguous; query_norms (M, q) / gallery_norms (M, g) float32 contiguous,
    or None for cosine; target (q, g) float32 with unit column stride; reconstructed (q, g) float32
    view with unit column stride to receive the mean component, or None; pair_mask (q, g) bool or None
    (every pair); labels (query labels, query known, gallery labels, gallery known) as ``label_masks``,
    or None; comparators (C, 2) int32, the descending sorting network over M. identities (query pids,
    query camids, gallery pids, gallery camids) int64, or None: with them the per-query share sums of the
    model audit are added up in the same pass (``TileTotals.query_share_sums``).
    """
    library = load_kernel()
    if library is None:
        raise RuntimeError("the evaluator's C kernel is not available")
    num_attributes, rows, columns = products.shape
    _check_tile_tensors(products, query_norms, gallery_norms, target, reconstructed)
    # The converted inputs stay referenced here until the call returns: the Tile holds raw pointers.
    mask = None if pair_mask is None else pair_mask.to(torch.uint8).contiguous()
    label_parts = [None] * 4 if labels is None else [part.contiguous() for part in labels]
    identity_parts = _identity_parts(identities, rows, columns)
    comparators = np.ascontiguousarray(comparators, dtype=np.int32)
    log_min, log_max, bins = histogram_range
    threads = max(1, min(int(num_threads), 64, rows))
    out = _TileOutputs.allocate(threads, num_attributes, bins, rows, per_query=identities is not None)
    tile = _Tile(
        num_attributes, rows, columns, products.data_ptr(), _pointer(query_norms), _pointer(gallery_norms),
        squared_floor, target.data_ptr(), target.stride(0),
        _pointer(reconstructed), 0 if reconstructed is None else reconstructed.stride(0), _pointer(mask),
        *(_pointer(part) for part in label_parts), top_k,
        comparators.ctypes.data, len(comparators), adre_min_distance, log_min, log_max, bins, threads,
        out.sums.data_ptr(), out.tallies.data_ptr(), out.histogram.data_ptr(), out.counts.data_ptr(),
        SHARE_BIN_SHIFT, SHARE_BIN_LOW, SHARE_BINS, out.shares.data_ptr(),
        *(_pointer(part) for part in identity_parts), _pointer(out.query_share_sums),
        _pointer(out.query_pair_counts),
    )
    _run_tile(library, tile)
    return out.totals()
