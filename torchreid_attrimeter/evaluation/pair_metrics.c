/* Fused per-pair explanation metrics for one tile of the evaluator (CPU), compiled on first use by
 * native_metrics.py and called through ctypes.
 *
 * It computes, for every query x gallery pair of a tile, exactly what the torch path computes block by
 * block (tile_backends.TorchTiles.finish_block / block_sums and explanation_metrics.pair_explanation_stats):
 * the M attribute components from the inner products, their mean (the interpreter's distance), the
 * relative error against the target distance (ADRE histogram), and, when attribute labels are known,
 * the ranking metrics X-mAP_e, X-mAP_c and the per-attribute top-k / agreement counts.
 *
 * Why it exists: the torch path spends ~45 whole-array passes per block (a few microseconds of
 * dispatch each) and uses one core for the element-wise work. Here each group of W pairs stays in the
 * L1 cache from products to counts, loops run over the W pairs of an attribute so the compiler
 * vectorises them, and the tile's query rows are split over threads (no GIL involved).
 *
 * The definitions (ranking keys, AP formulas, the N = 0 rule) are stated one pair at a time in
 * definitions.py; the Batcher network and histogram bins are explanation_metrics.py's, and the
 * comparators and every constant come from Python.
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 64       /* pairs per group: (M, W) arrays of a few KB */
#define MAX_M 64   /* attribute labels travel as one 64-bit mask per image */
#define UNKNOWN_KEY (-2)
#define NUM_CATEGORIES 4  /* pairs by (same identity, same camera) */

enum { SUM_EXCLUSIVE, SUM_COMMON, SUM_ERROR, SUM_ERROR_MAX, NUM_SUMS };
enum { TALLY_PAIRS, TALLY_EXCLUSIVE, TALLY_COMMON, TALLY_ERRORS, TALLY_SKIPPED, TALLY_NONFINITE, NUM_TALLIES };
enum { COUNT_TOP_K, COUNT_TOP_K_DIFFER, COUNT_DIFFER, COUNT_KNOWN, COUNT_AGREE, NUM_COUNTS };

typedef struct {
    int64_t num_attributes, rows, columns;
    const float *products;       /* (M, rows, columns) */
    const float *query_norms;    /* (M, rows), NULL for cosine */
    const float *gallery_norms;  /* (M, columns), NULL for cosine */
    float squared_floor;
    const float *target;         /* (rows, columns) with row stride target_stride */
    int64_t target_stride;
    float *reconstructed;        /* (rows, columns) with row stride reconstructed_stride, or NULL */
    int64_t reconstructed_stride;
    const uint8_t *pair_mask;    /* (rows, columns) 0/1, or NULL: every pair */
    const uint64_t *query_labels, *query_known;      /* (rows,) bit m = attribute m; NULL: no labels */
    const uint64_t *gallery_labels, *gallery_known;  /* (columns,) */
    int64_t top_k;
    const int32_t *comparators;  /* (num_comparators, 2) descending sorting network over M */
    int64_t num_comparators;
    float adre_min_distance;
    double log_min, log_max;
    int64_t bins;
    int64_t num_threads;
    /* outputs, one slice per thread, zeroed by the caller */
    double *sums;        /* (threads, NUM_SUMS) */
    int64_t *tallies;    /* (threads, NUM_TALLIES) */
    double *histogram;   /* (threads, bins) */
    int64_t *counts;     /* (threads, NUM_COUNTS, M) */
    /* share histogram: bin = (bits of the float32 share >> share_shift) - share_low, clamped */
    int64_t share_shift, share_low, share_bins;
    /* (threads, 1 + 2 * M * share_bins): per thread, a spare counter that takes the entries not counted
     * (unknown attribute or pair not selected), so that every entry is added without a condition, then
     * the histogram (2, M, share_bins): [0] shared, [1] differs. */
    int64_t *share_histogram;
    /* Per-query share sums for the model audit (audit.py), or NULL: each row is one query, owned by one
     * thread, so the rows' sums need no per-thread copies. Pair category = 2 * same identity + same camera. */
    const int64_t *query_pids, *query_camids;      /* (rows,) */
    const int64_t *gallery_pids, *gallery_camids;  /* (columns,) */
    double *query_share_sums;    /* (rows, NUM_CATEGORIES, M): sum over the row's pairs of p^m = d^m / sum_k d^k */
    int64_t *query_pair_counts;  /* (rows, NUM_CATEGORIES): pairs with a positive sum of components */
} Tile;


static inline int32_t float_bits(float value) {
    int32_t bits;
    memcpy(&bits, &value, sizeof bits);
    return bits;
}

static inline float bits_float(int32_t bits) {
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* A known component's ranking key (definitions.rank_key, explanation_metrics.ranking_keys): the bits of
 * the non-negative float, which order like its value, with the lowest bit = differs. */
static inline int32_t ranking_key(float value, int32_t differ) { return (float_bits(value) & ~1) | differ; }

/* Components (M, n) of row `row`, columns [column, column + n). */
static void group_components(const Tile *t, int64_t row, int64_t column, int64_t n, float comp[][W]) {
    const int64_t M = t->num_attributes;
    for (int64_t m = 0; m < M; m++) {
        const float *products = t->products + (m * t->rows + row) * t->columns + column;
        float *out = comp[m];
        /* The next group's products of the row, a cache line at a time: on large tiles they come from
         * memory, in M streams, more than the hardware prefetchers keep up with. */
        for (int64_t k = W; k < 2 * W && column + k < t->columns; k += 64 / sizeof(float))
            __builtin_prefetch(products + k);
        if (t->query_norms == NULL) {
            for (int64_t w = 0; w < n; w++) out[w] = 1.0f - products[w];
        } else {
            const float query_norm = t->query_norms[m * t->rows + row];
            const float *gallery_norms = t->gallery_norms + m * t->columns + column;
            const float floor = t->squared_floor;
            for (int64_t w = 0; w < n; w++) {
                float squared = (query_norm + (-2.0f) * products[w]) + gallery_norms[w];
                out[w] = sqrtf(squared > floor ? squared : floor);
            }
        }
    }
}

/* --- ADRE histogram bins ----------------------------------------------------------------------------
 *
 * A relative error's bin is defined by a double log10 (RelativeErrorHistogram.add: histc of the clamped
 * log10 of the error), written out in reference_bin. That costs ~20 ns a pair, so a table is built once
 * (error_bins_for) holding, found with reference_bin itself, the smallest float of every bin; a pair's
 * bin is then a lookup by the
 * float's exponent and top mantissa bits (its slot) plus a comparison with the next bin's first float.
 * The bins are the reference's by construction; a one-off program compared both for every float. */

#define SLOT_SHIFT 16  /* a slot = sign, exponent and top 7 mantissa bits: at most 1/128 of an octave */
#define INFINITY_BITS 0x7f800000

typedef struct {
    double log_min, log_max;
    int64_t bins;
    int32_t first_slot, num_slots;
    int32_t *slot_bins;  /* (num_slots,) bin of each slot's smallest float */
    int32_t *starts;     /* (bins + 1,) bits of each bin's smallest non-negative float; starts[bins] = INT32_MAX */
} ErrorBins;

/* The bin of a relative error `value` (>= 0, or NaN), by the histogram's definition. */
static int64_t reference_bin(const Tile *t, double value) {
    const double scale = (double)t->bins / (t->log_max - t->log_min);
    const double smallest = pow(10.0, t->log_min);
    double logarithm = log10(value > smallest ? value : smallest);
    if (logarithm > t->log_max) logarithm = t->log_max;
    if (logarithm < t->log_min) logarithm = t->log_min;
    int64_t bin = (int64_t)((logarithm - t->log_min) * scale);
    return bin >= t->bins ? t->bins - 1 : bin;
}

static int64_t bits_bin(const Tile *t, int32_t bits) { return reference_bin(t, (double)bits_float(bits)); }

/* Fills bins (its arrays allocated here: see error_bins_free) from reference_bin. Returns 0, or -1 when
 * out of memory. Each bin's first float is found by stepping from its boundary 10^(log_min + b / scale)
 * rounded to float, which is at most a few floats away. */
static int error_bins_init(ErrorBins *bins, const Tile *t) {
    const int64_t count = t->bins;
    bins->log_min = t->log_min;
    bins->log_max = t->log_max;
    bins->bins = count;
    bins->slot_bins = NULL;
    bins->starts = malloc((size_t)(count + 1) * sizeof(int32_t));
    if (bins->starts == NULL) return -1;
    const double scale = (double)count / (t->log_max - t->log_min);
    bins->starts[0] = 0;
    for (int64_t b = 1; b < count; b++) {
        float guess = (float)pow(10.0, t->log_min + (double)b / scale);
        int32_t bits = isfinite(guess) ? float_bits(guess) : INFINITY_BITS;
        if (bits < bins->starts[b - 1]) bits = bins->starts[b - 1];
        while (bits > bins->starts[b - 1] && bits_bin(t, bits - 1) >= b) bits--;
        while (bits < INFINITY_BITS && bits_bin(t, bits) < b) bits++;
        bins->starts[b] = bits;
    }
    bins->starts[count] = INT32_MAX;
    /* Slots from the one of bin 1's first float to the one of the last bin's: below, bin 0; above, the last. */
    const int32_t first = count > 1 ? bins->starts[1] >> SLOT_SHIFT : 0;
    const int32_t last = count > 1 ? bins->starts[count - 1] >> SLOT_SHIFT : 0;
    bins->first_slot = first;
    bins->num_slots = last - first + 1;
    bins->slot_bins = malloc((size_t)bins->num_slots * sizeof(int32_t));
    if (bins->slot_bins == NULL) {
        free(bins->starts);
        return -1;
    }
    int32_t bin = 0;
    for (int32_t slot = 0; slot < bins->num_slots; slot++) {
        const int32_t bits = (first + slot) << SLOT_SHIFT;
        while (bits >= bins->starts[bin + 1]) bin++;
        bins->slot_bins[slot] = bin;
    }
    return 0;
}

static void error_bins_free(ErrorBins *bins) {
    free(bins->starts);
    free(bins->slot_bins);
}

/* The table depends only on (log_min, log_max, bins), the same for every tile of a run, and takes
 * ~0.2 ms to build: the first one built is kept for the life of the process (and never changed, so
 * calls in other threads can read it without the lock); a call with other parameters builds its own. */
static pthread_mutex_t kept_bins_lock = PTHREAD_MUTEX_INITIALIZER;
static ErrorBins kept_bins;
static int kept_bins_ready;

/* The table for tile t: the kept one, or `own`, filled here (free it with error_bins_free when it is
 * returned); NULL when out of memory. */
static const ErrorBins *error_bins_for(const Tile *t, ErrorBins *own) {
    pthread_mutex_lock(&kept_bins_lock);
    if (!kept_bins_ready && error_bins_init(&kept_bins, t) == 0) kept_bins_ready = 1;
    const int kept = kept_bins_ready && kept_bins.bins == t->bins && kept_bins.log_min == t->log_min &&
                     kept_bins.log_max == t->log_max;
    pthread_mutex_unlock(&kept_bins_lock);
    if (kept) return &kept_bins;
    return error_bins_init(own, t) == 0 ? own : NULL;
}

/* reference_bin(error) for a float error (NaN and negative values land in bin 0, as there). */
static inline int64_t error_bin(const ErrorBins *bins, float error) {
    if (isnan(error)) return 0;
    const int32_t bits = float_bits(error);
    const int32_t slot = (bits >> SLOT_SHIFT) - bins->first_slot;  /* negative floats: slot < 0 */
    if (slot < 0) return 0;
    if (slot >= bins->num_slots) return bins->bins - 1;
    int64_t bin = bins->slot_bins[slot];
    /* A bin (0.005 decade with the histogram's 200 bins a decade) spans more than a slot, so a slot
     * holds at most one bin start: one comparison, then a loop only for finer bins. */
    bin += bits >= bins->starts[bin + 1];
    while (bits >= bins->starts[bin + 1]) bin++;
    return bin;
}

typedef struct {
    const Tile *tile;
    const ErrorBins *error_bins;
    int64_t thread, first_row, last_row;
} Work;

static void relative_errors(const Tile *t, const ErrorBins *bins, int64_t row, int64_t column, int64_t n,
                            const float *mean, const uint8_t *mask, double *sums, int64_t *tallies,
                            double *histogram) {
    const float *target = t->target + row * t->target_stride + column;
    /* The running sum and maximum in registers: kept in sums[], each pair's would wait for the store of
     * the previous one (the histogram, also doubles, might alias them). Same additions, same order. */
    double error_sum = sums[SUM_ERROR], error_max = sums[SUM_ERROR_MAX];
    int64_t errors = 0, skipped = 0;
    for (int64_t w = 0; w < n; w++) {
        if (!mask[w]) continue;
        if (!(target[w] > t->adre_min_distance)) {
            skipped++;
            continue;
        }
        const float error = fabsf(target[w] - mean[w]) / target[w];
        const double value = (double)error;
        error_sum += value;
        if (value > error_max) error_max = value;
        errors++;
        histogram[error_bin(bins, error)] += 1.0;
    }
    sums[SUM_ERROR] = error_sum;
    sums[SUM_ERROR_MAX] = error_max;
    tallies[TALLY_ERRORS] += errors;
    tallies[TALLY_SKIPPED] += skipped;
}

/* Adds each selected pair's shares (comp (M, n) over their sums `sum`) to the lane accumulators of its
 * category, acc[category][m][w]: whole-lane additions, which vectorise (a float reduction over w would
 * not without -ffast-math). The lanes are summed into the row's double totals once per row. */
static void query_shares(const Tile *t, int64_t row, int64_t column, int64_t n, float comp[][W], const float *sum,
                         const uint8_t *mask, float acc[][MAX_M][W], int64_t *pair_counts) {
    const int64_t M = t->num_attributes;
    const int64_t pid = t->query_pids[row], camid = t->query_camids[row];
    float weight[NUM_CATEGORIES][W];
    int present[NUM_CATEGORIES] = {0};
    for (int64_t c = 0; c < NUM_CATEGORIES; c++)
        for (int64_t w = 0; w < n; w++) weight[c][w] = 0.0f;
    for (int64_t w = 0; w < n; w++) {
        if (!mask[w] || !(sum[w] > 0.0f)) continue;  /* a zero distance has no shares */
        const int64_t c = 2 * (t->gallery_pids[column + w] == pid) + (t->gallery_camids[column + w] == camid);
        weight[c][w] = 1.0f / sum[w];
        present[c] = 1;
        pair_counts[c]++;
    }
    for (int64_t c = 0; c < NUM_CATEGORIES; c++) {
        if (!present[c]) continue;
        for (int64_t m = 0; m < M; m++)
            for (int64_t w = 0; w < n; w++) acc[c][m][w] += comp[m][w] * weight[c][w];
    }
}

/* X-mAP_e, X-mAP_c, top-k and agreement of n pairs whose components are comp (M, n). */
static void explanation_metrics(const Tile *t, int64_t row, int64_t column, int64_t n, float comp[][W],
                                const uint8_t *mask, double *sums, int64_t *tallies, int64_t *counts,
                                int64_t *share_histogram) {
    const int64_t M = t->num_attributes;
    int32_t ranked[MAX_M][W];
    float total[W], num_differ[W], num_shared[W], num_known[W], exclusive[W], common[W];
    float differ_seen[W], shared_seen[W];
    int32_t threshold[W];
    uint64_t differ_bits[W], known_bits[W];
    /* Bit m of known_bits / differ_bits, extracted once for the keys, the counts and the share bins:
     * 64-bit shifts are slow in vectors, and the counts then add 32-bit lanes. Bytes: a row of W is
     * then one vector store instead of four. */
    uint8_t known_of[MAX_M][W], differ_of[MAX_M][W];
    const uint64_t query_labels = t->query_labels[row], query_known = t->query_known[row];

    for (int64_t w = n; w < W; w++) {  /* padding: unknown, ranked last */
        known_bits[w] = differ_bits[w] = 0;
        total[w] = 0.0f;
    }
    for (int64_t w = 0; w < n; w++) {
        const uint64_t known = query_known & t->gallery_known[column + w];
        known_bits[w] = known;
        differ_bits[w] = (query_labels ^ t->gallery_labels[column + w]) & known;
        const int differ_count = __builtin_popcountll(differ_bits[w]);
        const int known_count = __builtin_popcountll(known);
        num_differ[w] = (float)differ_count;
        num_known[w] = (float)known_count;
        num_shared[w] = (float)(known_count - differ_count);
        total[w] = 0.0f;
    }
    /* Keys: float bits of the clamped component, lowest bit = differs; UNKNOWN_KEY where unknown. */
    for (int64_t m = 0; m < M; m++) {
        for (int64_t w = 0; w < W; w++) {
            const float value = comp[m][w] > 0.0f ? comp[m][w] : 0.0f;
            const int32_t known = (int32_t)((known_bits[w] >> m) & 1u);
            const int32_t differ = (int32_t)((differ_bits[w] >> m) & 1u);
            known_of[m][w] = (uint8_t)known;
            differ_of[m][w] = (uint8_t)differ;
            comp[m][w] = known ? value : 0.0f;  /* from here on: the known components */
            total[w] += comp[m][w];
            ranked[m][w] = known ? ranking_key(value, differ) : UNKNOWN_KEY;  /* sorted below */
        }
    }
    for (int64_t c = 0; c < t->num_comparators; c++) {
        int32_t *first = ranked[t->comparators[2 * c]], *second = ranked[t->comparators[2 * c + 1]];
        for (int64_t w = 0; w < W; w++) {
            const int32_t a = first[w], b = second[w];
            first[w] = a > b ? a : b;
            second[w] = a > b ? b : a;
        }
    }
    /* AP of the decreasing order (relevant = differs) and of the increasing order (relevant = shared). */
    for (int64_t w = 0; w < n; w++) exclusive[w] = common[w] = differ_seen[w] = shared_seen[w] = 0.0f;
    for (int64_t m = 0; m < M; m++) {
        const float inverse_position = 1.0f / (float)(m + 1);
        for (int64_t w = 0; w < n; w++) {
            const float differ = (float)(ranked[m][w] & 1);
            const float shared = (ranked[m][w] >= 0 ? 1.0f : 0.0f) - differ;
            differ_seen[w] += differ;
            shared_seen[w] += shared;
            exclusive[w] += inverse_position * differ * differ_seen[w];
            float increasing_position = num_known[w] - (float)m;
            if (increasing_position < 1.0f) increasing_position = 1.0f;
            common[w] += shared * (num_shared[w] + 1.0f - shared_seen[w]) / increasing_position;
        }
    }
    for (int64_t w = 0; w < n; w++) {
        if (num_differ[w] == 0.0f && num_known[w] > 0.0f) {
            /* N = 0: decreasing shares, relevant = shares <= 2 / M_known. */
            float small_seen = 0.0f, sum = 0.0f;
            for (int64_t m = 0; m < M; m++) {
                const int32_t key = ranked[m][w];
                const float small = (key >= 0 && bits_float(key & ~1) * num_known[w] <= 2.0f * total[w]) ? 1.0f
                                                                                                        : 0.0f;
                small_seen += small;
                sum += small * small_seen / (float)(m + 1);
            }
            common[w] = sum / (small_seen > 1.0f ? small_seen : 1.0f);
        } else {
            common[w] /= num_shared[w] > 1.0f ? num_shared[w] : 1.0f;
        }
        exclusive[w] /= num_differ[w] > 1.0f ? num_differ[w] : 1.0f;
        const int64_t depth = t->top_k < M ? t->top_k : M;
        int64_t kth = ((int64_t)num_known[w] < depth ? (int64_t)num_known[w] : depth) - 1;
        if (kth < 0) kth = 0;
        threshold[w] = num_known[w] == 0.0f ? INT32_MAX : ranked[kth][w];
        if (!mask[w]) continue;
        tallies[TALLY_PAIRS]++;
        if (num_differ[w] >= 1.0f) {
            sums[SUM_EXCLUSIVE] += (double)exclusive[w];
            tallies[TALLY_EXCLUSIVE]++;
        }
        if (num_shared[w] >= 1.0f) {
            sums[SUM_COMMON] += (double)common[w];
            tallies[TALLY_COMMON]++;
        }
    }
    /* Per attribute: in the top k, differs, known, and agreement [share > 1 / M_known] == differs. */
    for (int64_t m = 0; m < M; m++) {
        int32_t top_k = 0, top_k_differ = 0, differ_count = 0, known_count = 0, agree = 0;  /* at most W */
        for (int64_t w = 0; w < n; w++) {
            const int32_t use = mask[w];
            const int32_t known = known_of[m][w] & use;
            const int32_t differ = differ_of[m][w] & use;
            /* An unknown component is never in the top k. */
            const int32_t in_top_k = (ranking_key(comp[m][w], differ_of[m][w]) >= threshold[w]) & known;
            const int32_t large = comp[m][w] * num_known[w] > total[w];
            top_k += in_top_k;
            top_k_differ += in_top_k & differ;
            differ_count += differ;
            known_count += known;
            agree += known & !(large ^ differ);
        }
        counts[COUNT_TOP_K * M + m] += top_k;
        counts[COUNT_TOP_K_DIFFER * M + m] += top_k_differ;
        counts[COUNT_DIFFER * M + m] += differ_count;
        counts[COUNT_KNOWN * M + m] += known_count;
        counts[COUNT_AGREE * M + m] += agree;
    }
    /* Share histograms of the known attributes. The bins are found in a loop without branches (it
     * vectorises); the scattered increments, which cannot be vectorised, follow in a loop of their own.
     * An entry not counted goes to the spare counter share_histogram[-1]: fewer instructions than
     * adding 0 or 1, and no branch the CPU cannot predict. The increments go pair by pair, attribute by
     * attribute: consecutive ones then hit different attributes' rows, whereas one attribute's pairs
     * often share a bin and would wait on each other's stores. */
    const int32_t bins = (int32_t)t->share_bins, shift = (int32_t)t->share_shift, low = (int32_t)t->share_low;
    int32_t slot[MAX_M][W];  /* index in the histogram, or -1: not counted */
    float safe_total[W];
    for (int64_t w = 0; w < W; w++) safe_total[w] = total[w] == 0.0f ? 1.0f : total[w];
    for (int64_t m = 0; m < M; m++) {
        const int32_t shared_first = (int32_t)m * bins, differs_first = (int32_t)(M + m) * bins;
        for (int64_t w = 0; w < W; w++) {
            const float share = comp[m][w] / safe_total[w];
            int32_t bin = (float_bits(share) >> shift) - low;
            bin = bin < 0 ? 0 : (bin >= bins ? bins - 1 : bin);
            const int32_t index = (differ_of[m][w] ? differs_first : shared_first) + bin;  /* [1] differs */
            slot[m][w] = known_of[m][w] & mask[w] ? index : -1;
        }
    }
    for (int64_t w = 0; w < n; w++)
#pragma GCC unroll 4  /* M is known only at run time: four increments per loop test */
        for (int64_t m = 0; m < M; m++) share_histogram[slot[m][w]]++;
}

/* --- threads -------------------------------------------------------------------------------------- */

#define MAX_THREADS 64

/* Threads for `rows` rows: at least 1, at most one per row and MAX_THREADS. */
static int64_t thread_count(int64_t requested, int64_t rows) {
    int64_t threads = requested < 1 ? 1 : requested;
    if (threads > rows) threads = rows > 0 ? rows : 1;
    return threads > MAX_THREADS ? MAX_THREADS : threads;
}

/* work(item i) for each of `count` items, one thread each; the calling thread takes the last item,
 * and any item whose thread could not be started. */
static void run_parallel(void *(*work)(void *), void *items, size_t item_size, int64_t count) {
    pthread_t handles[MAX_THREADS];
    int launched[MAX_THREADS] = {0};
    for (int64_t index = 0; index < count; index++) {
        void *item = (char *)items + index * item_size;
        if (index < count - 1 && pthread_create(&handles[index], NULL, work, item) == 0) {
            launched[index] = 1;
        } else {
            work(item);
        }
    }
    for (int64_t index = 0; index < count; index++)
        if (launched[index]) pthread_join(handles[index], NULL);
}

static void *run_rows(void *argument) {
    const Work *work = (const Work *)argument;
    const Tile *t = work->tile;
    const int64_t M = t->num_attributes;
    double *sums = t->sums + work->thread * NUM_SUMS;
    int64_t *tallies = t->tallies + work->thread * NUM_TALLIES;
    double *histogram = t->histogram + work->thread * t->bins;
    int64_t *counts = t->counts + work->thread * NUM_COUNTS * M;
    int64_t *share_histogram = t->share_histogram + work->thread * (1 + 2 * M * t->share_bins) + 1;
    float comp[MAX_M][W];  /* 16 KB: thread stacks are megabytes */
    float mean[W], sum[W];
    uint8_t mask[W];
    const int audit = t->query_share_sums != NULL;
    static __thread float acc[NUM_CATEGORIES][MAX_M][W];  /* 64 KB: per thread, not on the stack */
    for (int64_t row = work->first_row; row < work->last_row; row++) {
        if (audit) memset(acc, 0, sizeof acc);
        for (int64_t column = 0; column < t->columns; column += W) {
            const int64_t n = t->columns - column < W ? t->columns - column : W;
            group_components(t, row, column, n, comp);
            for (int64_t w = 0; w < n; w++) mean[w] = 0.0f;
            for (int64_t m = 0; m < M; m++)
                for (int64_t w = 0; w < n; w++) mean[w] += comp[m][w];
            for (int64_t w = 0; w < n; w++) {
                sum[w] = mean[w];
                mean[w] /= (float)M;
                if (!isfinite(mean[w])) tallies[TALLY_NONFINITE]++;
            }
            if (t->reconstructed != NULL)
                memcpy(t->reconstructed + row * t->reconstructed_stride + column, mean, n * sizeof(float));
            int any = 0;
            for (int64_t w = 0; w < W; w++) {
                mask[w] = w < n ? (t->pair_mask == NULL ? 1 : t->pair_mask[row * t->columns + column + w]) : 0;
                any |= mask[w];
            }
            if (!any) continue;
            /* Before explanation_metrics, which zeroes the unknown components in comp. */
            if (audit) query_shares(t, row, column, n, comp, sum, mask, acc,
                                    t->query_pair_counts + row * NUM_CATEGORIES);
            relative_errors(t, work->error_bins, row, column, n, mean, mask, sums, tallies, histogram);
            if (t->query_labels == NULL) {
                for (int64_t w = 0; w < n; w++) tallies[TALLY_PAIRS] += mask[w];
                continue;
            }
            explanation_metrics(t, row, column, n, comp, mask, sums, tallies, counts, share_histogram);
        }
        if (audit) {
            double *row_sums = t->query_share_sums + row * NUM_CATEGORIES * M;
            const int64_t lanes = t->columns < W ? t->columns : W;
            for (int64_t c = 0; c < NUM_CATEGORIES; c++)
                for (int64_t m = 0; m < M; m++) {
                    double total = 0.0;
                    for (int64_t w = 0; w < lanes; w++) total += (double)acc[c][m][w];
                    row_sums[c * M + m] += total;
                }
        }
    }
    return NULL;
}

/* The layout Python's ctypes mirror must match (native_metrics._Tile and the enum orders), checked
 * when the library is loaded: each field's name and offset in declaration order, sizeof(Tile) and the
 * enum sizes. A field added, renamed or moved on one side only makes the check fail loudly instead of
 * the kernel reading the wrong memory. */
typedef struct { const char *name; int64_t offset; } FieldOffset;
#define FIELD(name) {#name, (int64_t)offsetof(Tile, name)}
static const FieldOffset TILE_FIELDS[] = {
    FIELD(num_attributes), FIELD(rows), FIELD(columns),
    FIELD(products), FIELD(query_norms), FIELD(gallery_norms), FIELD(squared_floor),
    FIELD(target), FIELD(target_stride), FIELD(reconstructed), FIELD(reconstructed_stride),
    FIELD(pair_mask), FIELD(query_labels), FIELD(query_known), FIELD(gallery_labels), FIELD(gallery_known),
    FIELD(top_k), FIELD(comparators), FIELD(num_comparators), FIELD(adre_min_distance),
    FIELD(log_min), FIELD(log_max), FIELD(bins), FIELD(num_threads),
    FIELD(sums), FIELD(tallies), FIELD(histogram), FIELD(counts),
    FIELD(share_shift), FIELD(share_low), FIELD(share_bins), FIELD(share_histogram),
    FIELD(query_pids), FIELD(query_camids), FIELD(gallery_pids), FIELD(gallery_camids),
    FIELD(query_share_sums), FIELD(query_pair_counts),
};
#undef FIELD

/* sizes = {sizeof(Tile), NUM_SUMS, NUM_TALLIES, NUM_COUNTS, NUM_CATEGORIES}; names / offsets receive up to `capacity`
 * fields. Returns the number of fields. */
int64_t attrimeter_tile_layout(int64_t *sizes, const char **names, int64_t *offsets, int64_t capacity) {
    const int64_t count = (int64_t)(sizeof TILE_FIELDS / sizeof TILE_FIELDS[0]);
    sizes[0] = (int64_t)sizeof(Tile);
    sizes[1] = NUM_SUMS;
    sizes[2] = NUM_TALLIES;
    sizes[3] = NUM_COUNTS;
    sizes[4] = NUM_CATEGORIES;
    for (int64_t i = 0; i < count && i < capacity; i++) {
        names[i] = TILE_FIELDS[i].name;
        offsets[i] = TILE_FIELDS[i].offset;
    }
    return count;
}

/* Returns 0, -1 when M is out of range, or -2 when out of memory. */
int attrimeter_tile_metrics(const Tile *tile) {
    if (tile->num_attributes < 1 || tile->num_attributes > MAX_M) return -1;
    ErrorBins own_bins;
    const ErrorBins *error_bins = error_bins_for(tile, &own_bins);
    if (error_bins == NULL) return -2;
    const int64_t threads = thread_count(tile->num_threads, tile->rows);
    Work works[MAX_THREADS];
    for (int64_t thread = 0; thread < threads; thread++)
        works[thread] = (Work){tile, error_bins, thread, tile->rows * thread / threads,
                               tile->rows * (thread + 1) / threads};
    run_parallel(run_rows, works, sizeof works[0], threads);
    if (error_bins == &own_bins) error_bins_free(&own_bins);
    return 0;
}

/* --- ranking: where each gallery image falls among a query's valid matches -------------------------
 *
 * counts[r][2i] = values of row r with exactly i of the row's matches strictly closer and none at the
 * same distance; counts[r][2i + 1] = values with i matches strictly closer and at least one at exactly
 * their distance (a tie). This is the histogram ranking.query_rank_stats builds with searchsorted
 * over the boundaries (p_1, next float after p_1, p_2, ...) when the matches are distinct, and stays
 * exact when two matches share a distance. With match_columns, ties are settled as a stable sort
 * settles them (the lower gallery column first): a match at the value's distance counts as closer
 * when its column is lower, and no value lands in an odd bin. A row has few matches, so counting them
 * with vectorised comparisons beats a binary search.
 */
typedef struct {
    const float *matches;  /* (rows, num_matches) increasing per row, padded with +inf */
    const int64_t *match_columns;  /* (rows, num_matches) gallery column of each match, or NULL */
    const float *values;   /* (rows, columns) with row stride value_stride */
    int64_t value_stride, rows, columns, num_matches;
    int64_t *counts;       /* (rows, 2 * num_matches + 1), zeroed by the caller */
    int64_t first_row, last_row;
} BinWork;

static void *count_bins(void *argument) {
    const BinWork *work = (const BinWork *)argument;
    const int64_t K = work->num_matches;
    for (int64_t row = work->first_row; row < work->last_row; row++) {
        const float *matches = work->matches + row * K;
        const float *values = work->values + row * work->value_stride;
        int64_t *counts = work->counts + row * (2 * K + 1);
        if (work->match_columns != NULL) {
            const int64_t *match_columns = work->match_columns + row * K;
            for (int64_t column = 0; column < work->columns; column++) {
                const float value = values[column];
                int64_t closer = 0;
                for (int64_t k = 0; k < K; k++)
                    closer += (matches[k] < value) | ((matches[k] == value) & (match_columns[k] < column));
                counts[2 * closer]++;
            }
            continue;
        }
        for (int64_t column = 0; column < work->columns; column++) {
            const float value = values[column];
            int32_t closer = 0, tied = 0;
            for (int64_t k = 0; k < K; k++) {
                closer += matches[k] < value;
                tied |= matches[k] == value;
            }
            counts[2 * closer + tied]++;
        }
    }
    return NULL;
}

int attrimeter_match_bins(const float *matches, const int64_t *match_columns, const float *values,
                          int64_t value_stride, int64_t rows, int64_t columns, int64_t num_matches, int64_t *counts,
                          int64_t num_threads) {
    const int64_t threads = thread_count(num_threads, rows);
    BinWork works[MAX_THREADS];
    for (int64_t thread = 0; thread < threads; thread++)
        works[thread] = (BinWork){matches, match_columns, values, value_stride, rows, columns, num_matches, counts,
                                  rows * thread / threads, rows * (thread + 1) / threads};
    run_parallel(count_bins, works, sizeof works[0], threads);
    return 0;
}
