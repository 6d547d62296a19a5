"""The pair stream of an evaluation run: which query x gallery pairs are explained, in which pieces.

Queries are taken in chunks, sized so that a chunk's (q, G) arrays fit half of ``memory_budget_mb``.
For each chunk the stream computes the target distances to the whole gallery and ranks them at once
(``QueryChunk``), then cuts the gallery columns whose pairs are explained into tiles whose (M, q, g)
attribute products fill the other half (``Tile``). A tile carries everything a tile backend needs to
finish its pairs (``tile_backends``): the products, the distance terms, the target distances, which
pairs count (top-k selection and subsample) and where the interpreter's distances go. Nothing of size
Q x G x M is ever held.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from torchreid_attrimeter.decomposition import distance_terms, distances_from_products, pairwise_distance
from torchreid_attrimeter.evaluation.query_totals import QueryTotals
from torchreid_attrimeter.evaluation.ranking import GalleryIdentities, QueryRankStats, query_rank_stats
from torchreid_attrimeter.evaluation.run_options import RunOptions

# The memory budget is split evenly between a query chunk's (q, G) arrays (target and interpreter
# distances and the ranking's temporaries, about 32 bytes per pair at their peak) and a tile's
# (M, q, g) float32 inner products. Everything else is computed per block of pairs (some 50 MB).
_BYTES_PER_CHUNK_PAIR = 32
_BYTES_PER_PAIR_ATTRIBUTE = 4
_HASH_PRIME = 2_147_483_647  # 2^31 - 1: (index * multiplier) mod prime stays inside int64

NOT_FINITE = "{name} contain NaN/inf: check the model's embeddings (e.g. evaluate with amp=False)"


def check_finite(values: torch.Tensor, name: str) -> None:
    if not bool(torch.isfinite(values.sum())) and not bool(torch.isfinite(values).all()):
        raise ValueError(NOT_FINITE.format(name=name))


@dataclass
class QueryChunk:
    """The queries ``rows`` (global) against the whole gallery.

    pids, camids: (q,); attributes (M, q, D) and norms (M, q) or None (cosine): the queries'
    ``distance_terms``; target (q, G) distances and target_stats their ranking. columns: the gallery
    columns whose pairs are explained (all of them, or the union of the queries' top-k); selected
    (q, len(columns)) bool, the top-k pairs among them, or None (all); reconstructed: (q, G) interpreter
    distances, filled by the tiles ('all' mode), else None.
    """

    rows: slice
    pids: torch.Tensor
    camids: torch.Tensor
    attributes: torch.Tensor
    norms: torch.Tensor | None
    target: torch.Tensor
    target_stats: QueryRankStats
    columns: torch.Tensor
    selected: torch.Tensor | None
    reconstructed: torch.Tensor | None

    def __len__(self) -> int:
        return self.rows.stop - self.rows.start


@dataclass
class Tile:
    """A chunk's query rows ``rows`` (global) x the gallery images ``gallery_index`` (a slice in 'all'
    mode, else a tensor of indices): q x g pairs whose attribute products are computed.

    products: (M, q, g) inner products (a view of the stream's reused buffer: finish the tile before
    asking for the next); query_norms (M, q) / gallery_norms (M, g) or None (cosine); target: (q, g)
    target distances; pair_mask: (q, g) bool, the pairs that count, or None (all); reconstructed: the
    (q, g) view of the chunk's interpreter distances that the backend fills, or None.
    """

    rows: slice
    gallery_index: slice | torch.Tensor
    products: torch.Tensor
    query_norms: torch.Tensor | None
    gallery_norms: torch.Tensor | None
    target: torch.Tensor
    pair_mask: torch.Tensor | None
    reconstructed: torch.Tensor | None


class PairStream:
    """Query chunks and their tiles over the stored query and gallery embeddings (dicts of
    ``ExplanationEvaluator._collect``). With ``query_totals`` it records each query's rank-1 pair there."""

    def __init__(self, query: dict, gallery: dict, device: torch.device, options: RunOptions,
                 query_totals: QueryTotals | None = None):
        self.query, self.gallery, self.device = query, gallery, device
        self.metric, self.pairs, self.topk = options.metric, options.pairs, options.topk
        self.pair_fraction, self.memory_budget_mb = options.pair_fraction, options.memory_budget_mb
        self.query_totals = query_totals
        self.num_query, self.num_gallery = len(query["pids"]), len(gallery["pids"])
        self.num_attributes = query["attribute_embeddings"].shape[0]
        self.gallery_embedding = gallery["embedding"].to(device)
        self.gallery_identities = GalleryIdentities(gallery["pids"].to(device), gallery["camids"].to(device))
        self.multiplier = int(torch.randint(1, _HASH_PRIME - 1, (1,),
                                            generator=torch.Generator().manual_seed(options.seed)))
        self.products_buffer = torch.empty(0, device=device)
        self.gallery_norms = self.all_gallery_norms()

    # -- sizes ---------------------------------------------------------------------------------------

    def chunk_rows(self) -> int:
        """Queries per chunk: their (q, G) arrays fill half the memory budget."""
        half_budget = self.memory_budget_mb * 2 ** 20 / 2
        return max(1, min(self.num_query, int(half_budget / (_BYTES_PER_CHUNK_PAIR * self.num_gallery))))

    def tile_columns(self, rows: int, columns: int) -> int:
        """Gallery columns per tile of ``rows`` queries: the tile's products fill the other half."""
        half_budget = self.memory_budget_mb * 2 ** 20 / 2
        pairs = int(half_budget / (_BYTES_PER_PAIR_ATTRIBUTE * max(self.num_attributes, 1)))
        return max(1, min(columns, pairs // rows))

    # -- the stream ----------------------------------------------------------------------------------

    def chunks(self) -> Iterator[QueryChunk]:
        """The query chunks in order; the tile buffer is released after the last one."""
        query_chunk = self.chunk_rows()
        for start in range(0, self.num_query, query_chunk):
            yield self.query_chunk(slice(start, min(start + query_chunk, self.num_query)))
        self.products_buffer = torch.empty(0, device=self.device)

    def query_chunk(self, rows: slice) -> QueryChunk:
        query_attributes, query_norms = distance_terms(
            self.query["attribute_embeddings"][:, rows].to(self.device), self.metric)  # (M, q, D), (M, q)
        q_pids = self.query["pids"][rows].to(self.device)
        q_camids = self.query["camids"][rows].to(self.device)
        target = pairwise_distance(self.query["embedding"][rows].to(self.device), self.gallery_embedding,
                                   self.metric)
        check_finite(target, "target distances")
        target_stats = query_rank_stats(target, q_pids, q_camids, self.gallery_identities)
        if self.query_totals is not None:
            self.record_first_pairs(rows, target, target_stats, query_attributes, query_norms)

        if self.pairs == "all":
            columns = torch.arange(self.num_gallery, device=self.device)
            selected = None
            reconstructed = torch.empty_like(target)
        else:
            nearest = torch.topk(target, min(self.topk, self.num_gallery), dim=1, largest=False).indices
            columns = torch.unique(nearest)
            # selected[q, j]: gallery image columns[j] is among query q's top-k.
            selected = torch.zeros(len(q_pids), len(columns), dtype=torch.bool, device=self.device)
            selected.scatter_(1, torch.searchsorted(columns, nearest), True)
            reconstructed = None
        return QueryChunk(rows=rows, pids=q_pids, camids=q_camids, attributes=query_attributes, norms=query_norms,
                          target=target, target_stats=target_stats, columns=columns, selected=selected,
                          reconstructed=reconstructed)

    def tiles(self, chunk: QueryChunk) -> Iterator[Tile]:
        """The chunk's tiles in column order; each reuses the products buffer of the one before."""
        tile_columns = self.tile_columns(len(chunk), len(chunk.columns))
        for first in range(0, len(chunk.columns), tile_columns):
            columns = chunk.columns[first:first + tile_columns]
            # Every gallery image in 'all' mode: a contiguous slice, read without a copy.
            gallery_index = slice(int(columns[0]), int(columns[-1]) + 1) if chunk.selected is None else columns
            gallery_attributes, gallery_norms = self.gallery_terms(gallery_index)
            selected = None if chunk.selected is None else chunk.selected[:, first:first + len(columns)]
            yield Tile(
                rows=chunk.rows, gallery_index=gallery_index,
                products=self.products(chunk.attributes, gallery_attributes), query_norms=chunk.norms,
                gallery_norms=gallery_norms, target=chunk.target[:, gallery_index],
                pair_mask=self.subsample(chunk.rows, columns, selected),
                reconstructed=(None if chunk.reconstructed is None
                               else chunk.reconstructed[:, first:first + len(columns)]))

    def interpreter_stats(self, chunk: QueryChunk) -> QueryRankStats | None:
        """The ranking of the chunk's interpreter distances, once its tiles are done (None: 'topk' mode,
        which does not compute them for every pair)."""
        if chunk.reconstructed is None:
            return None
        return query_rank_stats(chunk.reconstructed, chunk.pids, chunk.camids, self.gallery_identities)

    # -- pieces of a tile ----------------------------------------------------------------------------

    def all_gallery_norms(self) -> torch.Tensor | None:
        """(M, G) squared norms of the gallery's attribute embeddings ('euclidean'), computed once per
        run rather than once per tile of every query chunk; None for 'cosine'."""
        if self.metric == "cosine":
            return None
        embeddings = self.gallery["attribute_embeddings"]
        step = 4096  # gallery rows at a time: the squares are a temporary copy
        return torch.cat([distance_terms(embeddings[:, start:start + step].to(self.device), "euclidean")[1]
                          for start in range(0, embeddings.shape[1], step)], dim=1)

    def gallery_terms(self, index: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``distance_terms`` of the gallery images ``index`` (a slice, or a tensor of indices)."""
        rows = index if isinstance(index, slice) else index.cpu()
        embeddings = self.gallery["attribute_embeddings"][:, rows].to(self.device)
        if self.gallery_norms is None:
            return distance_terms(embeddings, self.metric)
        return embeddings, self.gallery_norms[:, index].contiguous()

    def products(self, query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        """(M, q, g) inner products of (M, q, D) and (M, g, D) rows, in the reused tile buffer."""
        shape = (query.shape[0], query.shape[1], gallery.shape[1])
        if self.products_buffer.numel() < math.prod(shape):
            self.products_buffer = torch.empty(math.prod(shape), device=self.device)
        return torch.bmm(query, gallery.transpose(1, 2), out=self.products_buffer[:math.prod(shape)].view(shape))

    def subsample(self, rows: slice, columns: torch.Tensor, pair_mask: torch.Tensor | None) -> torch.Tensor | None:
        """pair_mask restricted to the deterministic subsample, for query rows ``rows`` (global) x gallery
        ``columns``."""
        if self.pair_fraction is None or self.pair_fraction >= 1.0:
            return pair_mask
        # A fixed hash of the pair's global index: the same pairs whatever the tiling.
        query_index = torch.arange(rows.start, rows.stop, device=self.device)
        pair_index = query_index[:, None] * self.num_gallery + columns[None, :]
        hashed = (pair_index % _HASH_PRIME) * self.multiplier % _HASH_PRIME
        keep = hashed < int(self.pair_fraction * _HASH_PRIME)
        return keep if pair_mask is None else pair_mask & keep

    # -- per-query totals of the model audit -------------------------------------------------------

    def record_first_pairs(self, rows: slice, target: torch.Tensor, target_stats: QueryRankStats,
                           query_attributes: torch.Tensor, query_norms: torch.Tensor | None) -> None:
        """The target's rank-1 gallery image of each query of the chunk (torchreid's protocol: the
        query's identity seen by its own camera is left out; ties go to the lower column, as a stable
        sort settles them), its components' shares, and the queries' rank statistics."""
        totals = self.query_totals
        ranked = target.clone()
        same_rows, same_columns, junk = self.gallery_identities.same_identity_pairs(
            self.query["pids"][rows].to(self.device), self.query["camids"][rows].to(self.device))
        ranked[same_rows[junk], same_columns[junk]] = float("inf")
        best = ranked.min(1)
        first = best.indices.cpu()
        available = torch.isfinite(best.values).cpu()
        # The rank-1 pairs' components, from the same distance terms as the tiles' (one pair per query).
        gallery_attributes, gallery_norms = self.gallery_terms(first.to(self.device))
        # Aligned pairs as (M, q) batches of 1 x 1 products, so the tiles' distances_from_products applies.
        products = (query_attributes * gallery_attributes).sum(-1)[..., None, None]  # (M, q, 1, 1)
        components = distances_from_products(
            products, None if query_norms is None else query_norms[..., None],
            None if gallery_norms is None else gallery_norms[..., None], self.metric)[..., 0, 0]
        components = components.t().float().cpu()  # (q, M)
        total = components.sum(1, keepdim=True)
        shares = torch.where(total > 0, components / total.clamp_min(torch.finfo(torch.float32).tiny),
                             torch.full_like(components, float("nan")))
        available &= (total[:, 0] > 0)
        totals.first_index[rows] = torch.where(available, first, -1)
        totals.first_shares[rows] = torch.where(available[:, None], shares, float("nan"))
        totals.first_distance[rows] = torch.where(available, best.values.float().cpu(), float("nan"))
        totals.first_correct[rows] = available & (self.gallery["pids"][first] == self.query["pids"][rows])
        totals.valid[rows] = target_stats.valid.cpu()
        totals.first_match[rows] = target_stats.first_match.cpu()
        totals.average_precision[rows] = target_stats.average_precision.double().cpu()
