// CPU kernels for the gathered rank segments of the fused MSAE loss (see nested_topk.py).
//
// Shapes: z (B, D) activations, W (D, d) decoder, idx (B, K) int32 feature of each entry, with
// the rank segments as column ranges bounds = [0, k_1, ..., K], H (B, S, d) the segments'
// upstream gradients, S = len(bounds) - 1, ends (B,) int32 or None: row b's entries at columns
// >= ends[b] hold no activation (past the row's positives) and are skipped by all three passes.
//
//   forward:   Y[b, s]      = sum_{j in s} z[b, idx[b, j]] W[idx[b, j]]
//   backward:  dz[b, f]    += W[f] . H[b, s]            for f = idx[b, j], j in s
//              dW[f]       += sum z[b, f] H[b, s]       over the entries with idx[b, j] = f
//
// The forward and dz passes walk the decoder a column chunk at a time (CH columns of all D rows,
// D * CH * 4 bytes: 768 KiB for D = 6144, within a core's L2), so a gathered row costs one L2 read
// instead of one trip to L3 or memory, prefetched a few entries ahead; the accumulators of one
// (row, segment) stay in registers. The forward pass splits the chunks between threads (disjoint
// output columns, no races); the dz pass takes one chunk at a time and splits the rows. Both go
// through the rows in blocks of ROWS, so that the indices and activations read once per chunk stay
// in L3 at any batch size. The dW pass would be a random read-modify-write of a decoder row per
// entry that way; it takes each tile of TILE_ROWS rows feature by feature instead (FeatureMajor):
// a feature's terms are summed in registers from the tile's upstream gradients, which stay in
// cache, and the packed chunk of dW is read and written in order, once a tile; threads split the
// chunks. The columns past `ends` are skipped by every pass. An entry before them whose activation
// is zero (none in the fused loss, whose `ends` count the positive ones) adds an exact zero to dW.
// The forward and dz passes pack the decoder chunk by chunk once a call (`pack_decoder`), not
// once a block of rows and chunk.
//
// `segments_chain_forward` / `_backward` are the same passes with the chain of levels over the
// segments folded in (`GatheredChain`): the forward pass adds each segment into its level as it is
// summed and writes the levels P (B, S, d) with their squared errors, instead of the segments; the
// backward passes compute each row's suffix sums of the levels' gradients from P, x and the
// gradients of P and E where they read them, instead of reading a (B, S, d) H.
//
// Also here: `nested_select` (the rank segments of each row, without a sort) and `count_positive`
// (each row's positive entries and a NaN flag, which decide the fused loss's layout).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t CH = 32;        // decoder columns per chunk
constexpr int64_t ROWS = 512;     // rows per block: a block's indices and activations (ROWS * K * 8 bytes,
                                  // 8 MiB at K = 2048) are read once per chunk and stay in L3
constexpr int64_t TILE_ROWS = 64;    // the dW pass: rows per tile (FeatureMajor)
constexpr int64_t TILE_BLOCK = 1024; // and rows per block of tiles grouped at once (TILE_BLOCK * K * 8 bytes)

struct Shape {
  int64_t B, D, d, K, S;
};

Shape check(const torch::Tensor& z, const torch::Tensor& W, const torch::Tensor& idx,
            const std::vector<int64_t>& bounds) {
  TORCH_CHECK(z.device().is_cpu() && W.device().is_cpu() && idx.device().is_cpu(),
              "nested_segments: CPU tensors expected");
  TORCH_CHECK(z.scalar_type() == torch::kFloat && W.scalar_type() == torch::kFloat,
              "nested_segments: float32 z and W expected, got ", z.scalar_type(), " and ", W.scalar_type());
  TORCH_CHECK(idx.scalar_type() == torch::kInt, "nested_segments: int32 indices expected");
  TORCH_CHECK(z.dim() == 2 && W.dim() == 2 && idx.dim() == 2, "nested_segments: 2-d z, W and idx expected");
  TORCH_CHECK(z.is_contiguous() && W.is_contiguous() && idx.is_contiguous(),
              "nested_segments: contiguous z, W and idx expected");
  TORCH_CHECK(z.size(1) == W.size(0), "nested_segments: z has ", z.size(1), " latents, W has ", W.size(0), " rows");
  TORCH_CHECK(idx.size(0) == z.size(0), "nested_segments: idx has ", idx.size(0), " rows, z has ", z.size(0));
  TORCH_CHECK(bounds.size() >= 2 && bounds.front() == 0 && bounds.back() == idx.size(1),
              "nested_segments: bounds must run from 0 to the number of index columns");
  for (size_t s = 1; s < bounds.size(); ++s) {
    TORCH_CHECK(bounds[s] >= bounds[s - 1], "nested_segments: bounds must not decrease");
  }
  return {z.size(0), z.size(1), W.size(1), idx.size(1), static_cast<int64_t>(bounds.size()) - 1};
}

// ends[b], clamped to [0, K]: a row's entries at columns >= ends[b] are skipped (all K without ends)
std::vector<int64_t> row_ends(const c10::optional<torch::Tensor>& ends, const Shape& n) {
  std::vector<int64_t> e(n.B, n.K);
  if (!ends.has_value() || !ends->defined()) return e;
  TORCH_CHECK(ends->device().is_cpu() && ends->scalar_type() == torch::kInt && ends->dim() == 1 &&
                  ends->size(0) == n.B && ends->is_contiguous(),
              "nested_segments: ends must be a contiguous int32 CPU tensor with one entry per row");
  const int32_t* p = ends->data_ptr<int32_t>();
  for (int64_t b = 0; b < n.B; ++b) e[b] = std::min<int64_t>(std::max<int32_t>(p[b], 0), n.K);
  return e;
}

// segment s of a row that ends at column `end`: columns [lo, hi)
inline int64_t seg_lo(const std::vector<int64_t>& bounds, int64_t s, int64_t end) { return std::min(bounds[s], end); }
inline int64_t seg_hi(const std::vector<int64_t>& bounds, int64_t s, int64_t end) { return std::min(bounds[s + 1], end); }

// Rows of CH floats (a packed decoder chunk, its gradient, a tile of upstream gradients) in memory
// aligned to a cache line, so that a row's loads never straddle two lines. A std::vector's large
// blocks are 16-byte aligned: two of a row's four 8-float loads were then split loads, which cost
// the forward pass about a fifth of its time.
class PackedRows {
 public:
  explicit PackedRows(int64_t rows)
      : size_(rows * CH), data_(static_cast<float*>(std::aligned_alloc(64, std::max<int64_t>(size_, 16) * 4))) {
    TORCH_CHECK(data_ != nullptr, "nested_segments: could not allocate ", size_ * 4, " bytes of packed rows");
  }
  ~PackedRows() { std::free(data_); }
  PackedRows(const PackedRows&) = delete;
  PackedRows& operator=(const PackedRows&) = delete;
  PackedRows(PackedRows&& o) noexcept : size_(o.size_), data_(o.data_) { o.data_ = nullptr; }
  float* data() { return data_; }
  const float* data() const { return data_; }
  void zero() { std::fill_n(data_, size_, 0.f); }

 private:
  int64_t size_;
  float* data_;
};

// A work array whose elements start uninitialised: a std::vector zeroes its elements first, a serial
// pass (and the first touch of every page) over tens of MiB that the parallel loops then overwrite.
// `reserve` keeps the array when it is large enough; otherwise it replaces it (the contents go).
template <typename T>
class Scratch {
 public:
  explicit Scratch(int64_t n = 0) { reserve(n); }
  void reserve(int64_t n) {
    if (n > capacity_) data_.reset(new T[n]), capacity_ = n;
  }
  T* data() { return data_.get(); }
  const T* data() const { return data_.get(); }

 private:
  std::unique_ptr<T[]> data_;
  int64_t capacity_ = 0;
};

// c[b - r0, j] = z[b, idx[b, j]] for the rows [r0, r1) of a block
void gather_activations(const float* z, const int32_t* idx, const Shape& n, int64_t r0, int64_t r1, float* c) {
  at::parallel_for(r0, r1, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const float* zb = z + b * n.D;
      const int32_t* ib = idx + b * n.K;
      float* cb = c + (b - r0) * n.K;
      for (int64_t j = 0; j < n.K; ++j) cb[j] = zb[ib[j]];
    }
  });
}

// One column chunk t of the decoder (D, d), packed: out[f][k] = A[f, t * CH + k], zero past d.
// A packed chunk is contiguous: the decoder's own row stride (d floats, a multiple of 256 bytes
// for the usual widths) would map a chunk's D rows onto a few L2 sets, evicting them before reuse.
inline void pack_chunk(const float* A, int64_t D, int64_t d, int64_t t, int64_t f0, int64_t f1, float* out) {
  const int64_t lo = t * CH, w = std::min(CH, d - lo);
  for (int64_t f = f0; f < f1; ++f) {
    std::copy_n(A + f * d + lo, w, out + f * CH);
    std::fill(out + f * CH + w, out + (f + 1) * CH, 0.f);
  }
}

// The decoder (D, d) packed chunk by chunk (chunk t at data() + t * D * CH, as pack_chunk lays it out):
// packed once a pass instead of once per block of rows and chunk.
PackedRows pack_decoder(const float* W, int64_t D, int64_t d) {
  const int64_t chunks = (d + CH - 1) / CH;
  PackedRows out(chunks * D);
  at::parallel_for(0, D, 256, [&](int64_t f0, int64_t f1) {
    for (int64_t t = 0; t < chunks; ++t) pack_chunk(W, D, d, t, f0, f1, out.data() + t * D * CH);
  });
  return out;
}

// h[0:CH] = src[0:w], zero past w
inline void load_chunk(float* h, const float* src, int64_t w) {
  for (int64_t k = 0; k < CH; ++k) h[k] = k < w ? src[k] : 0.f;
}

// The two per-chunk loops over the entries j0 <= j < j1 of a run, on a packed chunk Pt (rows of CH floats):
//   sum_chunk:     out[0:CH]     = sum_j a[j] Pt[f_j]    (forward: one (row, segment), Pt the decoder)
//   add_sum_chunk: out[0:CH]    += sum_j a[j] Pt[f_j]    (dW: one feature of a tile, Pt the tile's gradients)
//   dots_chunk:    e[j]         += Pt[f_j] . h          (dz: one (row, segment), Pt the decoder)
#if defined(__AVX2__) && defined(__FMA__)
constexpr int64_t AHEAD = 8;  // entries between a row's prefetch and its use: the reads are random within L2

// prefetch the packed row of entry min(j + AHEAD, j1 - 1) (two cache lines)
inline void prefetch_entry(const float* Pt, const int32_t* f, int64_t j, int64_t j1) {
  const float* p = Pt + static_cast<int64_t>(f[std::min(j + AHEAD, j1 - 1)]) * CH;
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
  _mm_prefetch(reinterpret_cast<const char*>(p + 16), _MM_HINT_T0);
}

// the lane sums of eight 8-float vectors, as one vector
inline __m256 lane_sums(__m256 v0, __m256 v1, __m256 v2, __m256 v3, __m256 v4, __m256 v5, __m256 v6, __m256 v7) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v0, v1), _mm256_hadd_ps(v2, v3));  // halves' sums of v0..v3
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v4, v5), _mm256_hadd_ps(v6, v7));  // and of v4..v7
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

#endif

#if defined(__AVX512F__) && defined(__AVX512DQ__)
static_assert(CH == 32, "the AVX-512 loops hold a chunk as two 16-float vectors");

// No software prefetch here: with two 16-float loads an entry, the out-of-order core keeps enough of
// the random L2 reads in flight, and the prefetches' extra loads made the forward pass about 5% and
// the dz pass about 10% slower (session 13, 2 cores, 768 -> 6144, batch 4096).
constexpr bool PREFETCH_DECODER = false;

// out[0:CH] = (or, with Add, +=) sum_j a[j] Pt[f_j]. Two accumulator pairs (even and odd entries)
// overlap consecutive entries' FMA latency; each column sums in the same order as the AVX2 loop.
template <bool Prefetch, bool Add>
inline void weighted_sum(const float* Pt, const float* a, const int32_t* f, int64_t j0, int64_t j1, float* out) {
  static_assert(!Prefetch, "the AVX-512 loops do not prefetch");
  __m512 x0 = _mm512_setzero_ps(), x1 = _mm512_setzero_ps(), y0 = _mm512_setzero_ps(), y1 = _mm512_setzero_ps();
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    const float* p = Pt + static_cast<int64_t>(f[j]) * CH;
    const float* q = Pt + static_cast<int64_t>(f[j + 1]) * CH;
    const __m512 ap = _mm512_set1_ps(a[j]), aq = _mm512_set1_ps(a[j + 1]);
    x0 = _mm512_fmadd_ps(ap, _mm512_loadu_ps(p), x0);
    x1 = _mm512_fmadd_ps(ap, _mm512_loadu_ps(p + 16), x1);
    y0 = _mm512_fmadd_ps(aq, _mm512_loadu_ps(q), y0);
    y1 = _mm512_fmadd_ps(aq, _mm512_loadu_ps(q + 16), y1);
  }
  if (j < j1) {
    const float* p = Pt + static_cast<int64_t>(f[j]) * CH;
    const __m512 ap = _mm512_set1_ps(a[j]);
    x0 = _mm512_fmadd_ps(ap, _mm512_loadu_ps(p), x0);
    x1 = _mm512_fmadd_ps(ap, _mm512_loadu_ps(p + 16), x1);
  }
  __m512 s0 = _mm512_add_ps(x0, y0), s1 = _mm512_add_ps(x1, y1);
  if (Add) {
    s0 = _mm512_add_ps(_mm512_loadu_ps(out), s0);
    s1 = _mm512_add_ps(_mm512_loadu_ps(out + 16), s1);
  }
  _mm512_storeu_ps(out, s0);
  _mm512_storeu_ps(out + 16, s1);
}

// the chunk h of the dz pass, held in registers
struct HeldChunk {
  __m512 v[2];
  explicit HeldChunk(const float* hp) : v{_mm512_loadu_ps(hp), _mm512_loadu_ps(hp + 16)} {}
};

// one entry's products with the chunk h, folded into eight lanes
inline __m256 chunk_products(const float* p, const HeldChunk& h) {
  const __m512 v = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16), h.v[1], _mm512_mul_ps(_mm512_loadu_ps(p), h.v[0]));
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
}
#elif defined(__AVX2__) && defined(__FMA__)
static_assert(CH == 32, "the AVX2 loops hold a chunk as four 8-float vectors");

constexpr bool PREFETCH_DECODER = true;

// out[0:CH] = (or, with Add, +=) sum_j a[j] Pt[f_j]; with Prefetch, each row is prefetched AHEAD
// entries before its use (for the decoder chunk, read at random from L2; the dW pass's tile of
// gradients, tens of KiB read over and over, goes without)
template <bool Prefetch, bool Add>
inline void weighted_sum(const float* Pt, const float* a, const int32_t* f, int64_t j0, int64_t j1, float* out) {
  __m256 x[4] = {}, y[4] = {};  // two accumulator sets: consecutive entries overlap their FMA latency
  int64_t j = j0;
  for (; j + 2 <= j1; j += 2) {
    if (Prefetch) {
      prefetch_entry(Pt, f, j, j1);
      prefetch_entry(Pt, f, j + 1, j1);
    }
    const float* p = Pt + static_cast<int64_t>(f[j]) * CH;
    const float* q = Pt + static_cast<int64_t>(f[j + 1]) * CH;
    const __m256 ap = _mm256_set1_ps(a[j]), aq = _mm256_set1_ps(a[j + 1]);
    for (int v = 0; v < 4; ++v) {
      x[v] = _mm256_fmadd_ps(ap, _mm256_loadu_ps(p + 8 * v), x[v]);
      y[v] = _mm256_fmadd_ps(aq, _mm256_loadu_ps(q + 8 * v), y[v]);
    }
  }
  if (j < j1) {
    const float* p = Pt + static_cast<int64_t>(f[j]) * CH;
    const __m256 ap = _mm256_set1_ps(a[j]);
    for (int v = 0; v < 4; ++v) x[v] = _mm256_fmadd_ps(ap, _mm256_loadu_ps(p + 8 * v), x[v]);
  }
  for (int v = 0; v < 4; ++v) {
    const __m256 sum = _mm256_add_ps(x[v], y[v]);
    _mm256_storeu_ps(out + 8 * v, Add ? _mm256_add_ps(_mm256_loadu_ps(out + 8 * v), sum) : sum);
  }
}

// the chunk h of the dz pass, held in registers
struct HeldChunk {
  __m256 v[4];
  explicit HeldChunk(const float* hp)
      : v{_mm256_loadu_ps(hp), _mm256_loadu_ps(hp + 8), _mm256_loadu_ps(hp + 16), _mm256_loadu_ps(hp + 24)} {}
};

// one entry's products with the chunk h, folded into eight lanes
inline __m256 chunk_products(const float* p, const HeldChunk& h) {
  __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(p), h.v[0]);
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + 8), h.v[1], acc);
  acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + 16), h.v[2], acc);
  return _mm256_fmadd_ps(_mm256_loadu_ps(p + 24), h.v[3], acc);
}
#else  // portable loops (the compiler vectorises over the chunk)
constexpr bool PREFETCH_DECODER = false;

template <bool Prefetch, bool Add>
inline void weighted_sum(const float* Pt, const float* a, const int32_t* f, int64_t j0, int64_t j1, float* out) {
  float acc[CH] = {};
  for (int64_t j = j0; j < j1; ++j) {
    const float* p = Pt + static_cast<int64_t>(f[j]) * CH;
    for (int64_t k = 0; k < CH; ++k) acc[k] += a[j] * p[k];
  }
  for (int64_t k = 0; k < CH; ++k) out[k] = Add ? out[k] + acc[k] : acc[k];
}

inline void dots_chunk(const float* Pt, const int32_t* f, int64_t j0, int64_t j1, const float* h, float* e) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* p = Pt + static_cast<int64_t>(f[j]) * CH;
    float sum = 0.f;
    for (int64_t k = 0; k < CH; ++k) sum += p[k] * h[k];
    e[j] += sum;
  }
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// eight entries at a time: each entry's products folded into one vector, eight reduced together
// (HeldChunk and chunk_products: the AVX-512 or the AVX2 ones above)
inline void dots_chunk(const float* Pt, const int32_t* f, int64_t j0, int64_t j1, const float* hp, float* e) {
  const HeldChunk h(hp);
  auto row = [&](int64_t j) { return Pt + static_cast<int64_t>(f[j]) * CH; };
  int64_t j = j0;
  for (; j + 8 <= j1; j += 8) {
    if (PREFETCH_DECODER)
      for (int64_t i = 0; i < 8; ++i) prefetch_entry(Pt, f, j + i, j1);
    const __m256 r = lane_sums(chunk_products(row(j), h), chunk_products(row(j + 1), h),
                               chunk_products(row(j + 2), h), chunk_products(row(j + 3), h),
                               chunk_products(row(j + 4), h), chunk_products(row(j + 5), h),
                               chunk_products(row(j + 6), h), chunk_products(row(j + 7), h));
    _mm256_storeu_ps(e + j, _mm256_add_ps(_mm256_loadu_ps(e + j), r));
  }
  for (; j < j1; ++j) {
    alignas(32) float v[8];
    _mm256_store_ps(v, chunk_products(row(j), h));
    e[j] += ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
  }
}
#endif

// the forward pass: one (row, segment) from the decoder chunk in L2
inline void sum_chunk(const float* Pt, const float* a, const int32_t* f, int64_t j0, int64_t j1, float* out) {
  weighted_sum<PREFETCH_DECODER, false>(Pt, a, f, j0, j1, out);
}

// the dW pass: one feature of a tile, added to its row of dW's packed chunk, from the tile's packed gradients
inline void add_sum_chunk(const float* Pt, const float* a, const int32_t* f, int64_t j0, int64_t j1, float* out) {
  weighted_sum<false, true>(Pt, a, f, j0, j1, out);
}

int64_t n_chunks(int64_t d) { return (d + CH - 1) / CH; }

// The entries of a block of rows [r0, r1), a tile of TILE_ROWS rows at a time, grouped by feature
// (a counting sort): tile q's entries of feature f are [starts[q][f], starts[q][f + 1]) after base[q],
// each with its activation c and code = (row in the tile) * S + segment, its row of the tile's
// packed upstream gradient. The counts read only the indices: z is read once, where it is placed.
// The dW pass walks a tile's features in order: feature f's terms are summed in registers from a
// tile of gradients that stays in cache, and the decoder gradient is read and written once per
// tile in order, instead of a random read-modify-write of a decoder row per entry.
struct FeatureMajor {
  Scratch<float> c;
  Scratch<int32_t> code;
  std::vector<int32_t> starts;  // tiles x (D + 1)
  std::vector<int64_t> base;    // tiles + 1
  int64_t r0 = 0, r1 = 0, tiles = 0;

  // tile q's rows: [first, end)
  int64_t tile_first(int64_t q) const { return r0 + q * TILE_ROWS; }
  int64_t tile_end(int64_t q) const { return std::min(r1, r0 + (q + 1) * TILE_ROWS); }

  void build(const float* z, const int32_t* idx, const std::vector<int64_t>& bounds, const std::vector<int64_t>& end,
             const Shape& n, int64_t row0, int64_t row1) {
    r0 = row0, r1 = row1, tiles = (r1 - r0 + TILE_ROWS - 1) / TILE_ROWS;
    base.assign(tiles + 1, 0);
    starts.resize(tiles * (n.D + 1));
    at::parallel_for(0, tiles, 1, [&](int64_t q0, int64_t q1) {  // count each tile's entries a feature
      for (int64_t q = q0; q < q1; ++q) {
        int32_t* st = starts.data() + q * (n.D + 1);
        std::fill(st, st + n.D + 1, 0);
        for (int64_t b = tile_first(q); b < tile_end(q); ++b) {
          const int32_t* ib = idx + b * n.K;
          for (int64_t j = 0; j < end[b]; ++j) ++st[ib[j] + 1];
        }
        for (int64_t f = 0; f < n.D; ++f) st[f + 1] += st[f];
        base[q + 1] = st[n.D];
      }
    });
    for (int64_t q = 0; q < tiles; ++q) base[q + 1] += base[q];
    c.reserve(base[tiles]);
    code.reserve(base[tiles]);
    at::parallel_for(0, tiles, 1, [&](int64_t q0, int64_t q1) {  // place them
      std::vector<int32_t> next(n.D);
      for (int64_t q = q0; q < q1; ++q) {
        std::copy_n(starts.data() + q * (n.D + 1), n.D, next.begin());
        float* cq = c.data() + base[q];
        int32_t* hq = code.data() + base[q];
        const int64_t b0 = tile_first(q);
        for (int64_t b = b0; b < tile_end(q); ++b) {
          const int32_t* ib = idx + b * n.K;
          const float* zb = z + b * n.D;
          for (int64_t s = 0; s < n.S; ++s) {
            const int32_t h = static_cast<int32_t>((b - b0) * n.S + s);
            for (int64_t j = seg_lo(bounds, s, end[b]); j < seg_hi(bounds, s, end[b]); ++j) {
              const int32_t f = ib[j];
              const int32_t at = next[f]++;
              cq[at] = zb[f];
              hq[at] = h;
            }
          }
        }
      }
    });
  }
};


// The chain of levels over the segments, when the kernels compute it: base (d), x (B, d), and
// (backward) the levels' reconstructions P (B, S, d), their gradient dP (B, S, d) or none, and the
// gradient dE (B, S) of their squared errors E[b, s] = |P[b, s] - x[b]|^2.
struct Chain {
  const float* base = nullptr;
  const float* x = nullptr;
  const float* P = nullptr;
  const float* dP = nullptr;
  const float* dE = nullptr;
};

void check_chain_operand(const torch::Tensor& t, std::vector<int64_t> shape, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat && t.is_contiguous() &&
                  t.sizes() == c10::IntArrayRef(shape),
              "segments_chain: ", what, " must be a contiguous float32 CPU tensor of shape ", c10::IntArrayRef(shape),
              ", got ", t.sizes(), " (", t.scalar_type(), ")");
}

// One level's chunk in the chain's forward pass: acc += out (the segment's sum), y = acc (the
// level's first w columns); returns the chunk's part of |y - x|^2. Full (w == CH: every chunk but a
// last, partial one) has loops of a fixed count, which compile to straight-line vector code instead
// of bounds-checked lanes and a copy call; the chain's forward pass ran 1.04x faster for it (batch
// 4096, 768 -> 6144, 7 segments, 0.5 active).
template <bool Full>
inline float add_level_chunk(float* acc, const float* out, const float* xb, int64_t w, float* y) {
  float lane[8] = {};  // eight partial sums: the reduction vectorises without reassociation flags
  for (int64_t k0 = 0; k0 < CH; k0 += 8) {
    for (int l = 0; l < 8; ++l) {
      const int64_t k = k0 + l;
      acc[k] += out[k];
      const float r = Full ? acc[k] - xb[k] : (k < w ? acc[k] - xb[std::min(k, w - 1)] : 0.f);
      lane[l] += r * r;
    }
  }
  std::copy_n(acc, Full ? CH : w, y);
  return ((lane[0] + lane[1]) + (lane[2] + lane[3])) + ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

// The forward pass. Without a chain: Y[b, s] (B, S, d), the segments' sums. With one: Y[b, s] is
// P[b, s] = base + Y_0 + ... + Y_s (the same additions, in the same order, as the chain of levels),
// and err (chunks, B, S) gets each chunk's part of |P[b, s] - x[b]|^2.
void forward_pass(const torch::Tensor& z, const torch::Tensor& W, const torch::Tensor& idx,
                  const std::vector<int64_t>& bounds, const std::vector<int64_t>& end, const Shape& n,
                  const Chain* chain, float* Yp, float* err) {
  const int32_t* ip = idx.data_ptr<int32_t>();
  // the block's activations, gathered once a block: a block's worth (ROWS * K floats), not the batch's
  Scratch<float> c(std::min(n.B, ROWS) * n.K);
  const PackedRows Wc = pack_decoder(W.data_ptr<float>(), n.D, n.d);
  for (int64_t r0 = 0; r0 < n.B; r0 += ROWS) {
    const int64_t r1 = std::min(n.B, r0 + ROWS);
    gather_activations(z.data_ptr<float>(), ip, n, r0, r1, c.data());
    at::parallel_for(0, n_chunks(n.d), 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {  // threads take disjoint column chunks of Y
        const int64_t lo = t * CH, w = std::min(CH, n.d - lo);
        const float* Pt = Wc.data() + t * n.D * CH;
        for (int64_t b = r0; b < r1; ++b) {
          alignas(64) float acc[CH] = {};  // the chain's level, this chunk of it
          if (chain) std::copy_n(chain->base + lo, w, acc);
          for (int64_t s = 0; s < n.S; ++s) {
            alignas(64) float out[CH];
            sum_chunk(Pt, c.data() + (b - r0) * n.K, ip + b * n.K, seg_lo(bounds, s, end[b]), seg_hi(bounds, s, end[b]),
                      out);
            float* y = Yp + (b * n.S + s) * n.d + lo;
            if (!chain) {
              std::copy_n(out, w, y);
              continue;
            }
            const float* xb = chain->x + b * n.d + lo;
            err[(t * n.B + b) * n.S + s] =
                w == CH ? add_level_chunk<true>(acc, out, xb, w, y) : add_level_chunk<false>(acc, out, xb, w, y);
          }
        }
      }
    });
  }
}

// Row b's upstream gradients at columns [lo, lo + w): h[s * CH + k], zero past w. Without a chain,
// the rows of H (B, S, d); with one, the suffix sums of the levels' gradients
//   g[b, s] = dP[b, s] + 2 dE[b, s] (P[b, s] - x[b]),   h[s] = sum_{s' >= s} g[b, s']
// (the chain's backward, the same operations in the same order), computed where they are used
// instead of stored as a (B, S, d) tensor.
inline void upstream_rows(const float* H, const Chain* chain, const Shape& n, int64_t b, int64_t lo, int64_t w,
                          float* h) {
  if (!chain) {
    for (int64_t s = 0; s < n.S; ++s) load_chunk(h + s * CH, H + (b * n.S + s) * n.d + lo, w);
    return;
  }
  alignas(64) float acc[CH] = {};
  const float* xb = chain->x + b * n.d + lo;
  for (int64_t s = n.S - 1; s >= 0; --s) {
    const float c = 2.f * chain->dE[b * n.S + s];
    const float* p = chain->P + (b * n.S + s) * n.d + lo;
    float* hs = h + s * CH;
    if (chain->dP) {
      const float* g = chain->dP + (b * n.S + s) * n.d + lo;
      for (int64_t k = 0; k < w; ++k) acc[k] += c * (p[k] - xb[k]) + g[k];
    } else {
      for (int64_t k = 0; k < w; ++k) acc[k] += c * (p[k] - xb[k]);
    }
    std::copy_n(acc, CH, hs);
  }
}

// The backward passes: the segments' terms added into dz (B, D) and dW (D, d), either may be null,
// from the upstream gradients of `upstream_rows`; with `d_base` (a chain only), also
// d_base = sum_b h[b, 0], summed over the rows in order, a column chunk per thread.
void backward_pass(const torch::Tensor& z, const torch::Tensor& W, const torch::Tensor& idx,
                   const std::vector<int64_t>& bounds, const std::vector<int64_t>& end, const Shape& n,
                   const float* Hp, const Chain* chain, float* dz, float* dW, float* d_base, bool overwrite_dz) {
  const int32_t* ip = idx.data_ptr<int32_t>();
  const int64_t chunks = n_chunks(n.d);
  if (dW) {
    FeatureMajor fm;
    for (int64_t r0 = 0; r0 < n.B; r0 += TILE_BLOCK) {
      fm.build(z.data_ptr<float>(), ip, bounds, end, n, r0, std::min(n.B, r0 + TILE_BLOCK));
      at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
        PackedRows G(n.D);                 // one chunk of dW's segment terms, packed like the decoder
        PackedRows Ht(TILE_ROWS * n.S);   // one tile's upstream gradients, the same chunk, packed
        for (int64_t t = t0; t < t1; ++t) {  // threads take disjoint column chunks of dW
          const int64_t lo = t * CH, w = std::min(CH, n.d - lo);
          G.zero();
          for (int64_t q = 0; q < fm.tiles; ++q) {
            const int64_t b0 = fm.tile_first(q), b1 = fm.tile_end(q);
            for (int64_t b = b0; b < b1; ++b) {
              float* h = Ht.data() + (b - b0) * n.S * CH;
              upstream_rows(Hp, chain, n, b, lo, w, h);
              if (d_base)
                for (int64_t k = 0; k < w; ++k) d_base[lo + k] += h[k];
            }
            const int32_t* st = fm.starts.data() + q * (n.D + 1);
            const float* cq = fm.c.data() + fm.base[q];
            const int32_t* hq = fm.code.data() + fm.base[q];
            for (int64_t f = 0; f < n.D; ++f) {
              // feature f's terms in this tile, summed in registers
              if (st[f] != st[f + 1]) add_sum_chunk(Ht.data(), cq, hq, st[f], st[f + 1], G.data() + f * CH);
            }
          }
          for (int64_t f = 0; f < n.D; ++f)
            for (int64_t k = 0; k < w; ++k) dW[f * n.d + lo + k] += G.data()[f * CH + k];
        }
      });
    }
  } else if (d_base) {  // no dW pass to sum it along: a pass of its own, a column chunk per thread
    at::parallel_for(0, chunks, 1, [&](int64_t t0, int64_t t1) {
      std::vector<float> h(n.S * CH);
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t lo = t * CH, w = std::min(CH, n.d - lo);
        for (int64_t b = 0; b < n.B; ++b) {
          upstream_rows(Hp, chain, n, b, lo, w, h.data());
          for (int64_t k = 0; k < w; ++k) d_base[lo + k] += h[k];
        }
      }
    });
  }
  if (dz) {
    const PackedRows Wc = pack_decoder(W.data_ptr<float>(), n.D, n.d);
    std::vector<float> E(std::min(n.B, ROWS) * n.K);  // a block's per-entry dot products, over the chunks
    for (int64_t r0 = 0; r0 < n.B; r0 += ROWS) {
      const int64_t r1 = std::min(n.B, r0 + ROWS);
      std::fill(E.begin(), E.end(), 0.f);
      for (int64_t t = 0; t < chunks; ++t) {  // chunk by chunk: each stays in L2 for all the block's rows
        const int64_t lo = t * CH, w = std::min(CH, n.d - lo);
        const float* Pt = Wc.data() + t * n.D * CH;
        at::parallel_for(r0, r1, 16, [&](int64_t b0, int64_t b1) {  // threads take disjoint rows
          std::vector<float> h(n.S * CH);
          for (int64_t b = b0; b < b1; ++b) {
            upstream_rows(Hp, chain, n, b, lo, w, h.data());
            for (int64_t s = 0; s < n.S; ++s)
              dots_chunk(Pt, ip + b * n.K, seg_lo(bounds, s, end[b]), seg_hi(bounds, s, end[b]),
                         h.data() + s * CH, E.data() + (b - r0) * n.K);
          }
        });
      }
      at::parallel_for(r0, r1, 16, [&](int64_t b0, int64_t b1) {
        for (int64_t b = b0; b < b1; ++b) {  // indices are unique within a row: no collisions
          const int32_t* ib = ip + b * n.K;
          const float* eb = E.data() + (b - r0) * n.K;
          float* gb = dz + b * n.D;
          if (overwrite_dz) std::fill_n(gb, n.D, 0.f);
          for (int64_t j = 0; j < end[b]; ++j) gb[ib[j]] += eb[j];
        }
      });
    }
  }
}

// an optional gradient to add into: a contiguous float32 tensor shaped like its operand, or null
float* optional_out(const c10::optional<torch::Tensor>& t, const torch::Tensor& like, const char* what,
                    const char* like_name) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->sizes() == like.sizes() && t->is_contiguous() && t->scalar_type() == torch::kFloat,
              "nested_segments: ", what, " must be a contiguous float32 tensor shaped like ", like_name);
  return t->data_ptr<float>();
}

// an output the caller gave (`out`: contiguous, of this shape and dtype, on the CPU; its contents are
// overwritten), or a new tensor
torch::Tensor output_tensor(const c10::optional<torch::Tensor>& out, c10::IntArrayRef shape, const torch::TensorOptions& opts,
                            const char* what) {
  if (!out.has_value() || !out->defined()) return torch::empty(shape, opts);
  TORCH_CHECK(out->device().is_cpu() && out->scalar_type() == opts.dtype().toScalarType() && out->is_contiguous() &&
                  out->sizes() == shape,
              "nested_segments: ", what, " must be a contiguous ", opts.dtype().name(), " CPU tensor of shape ", shape,
              ", got ", out->sizes(), " (", out->scalar_type(), ")");
  return *out;
}

}  // namespace

torch::Tensor segments_forward(const torch::Tensor& z, const torch::Tensor& W, const torch::Tensor& idx,
                               const std::vector<int64_t>& bounds, const c10::optional<torch::Tensor>& ends) {
  const Shape n = check(z, W, idx, bounds);
  auto Y = torch::empty({n.B, n.S, n.d}, z.options());
  forward_pass(z, W, idx, bounds, row_ends(ends, n), n, nullptr, Y.data_ptr<float>(), nullptr);
  return Y;
}

// The segments and the chain of levels over them in one pass (`GatheredChain`):
//   P[b, s] = base + sum_{s' <= s} Y[b, s'],   E[b, s] = |P[b, s] - x[b]|^2
// without the (B, S, d) tensor of the segments themselves. P is written into `out` when one is given.
std::tuple<torch::Tensor, torch::Tensor> segments_chain_forward(
    const torch::Tensor& z, const torch::Tensor& W, const torch::Tensor& idx, const std::vector<int64_t>& bounds,
    const c10::optional<torch::Tensor>& ends, const torch::Tensor& base, const torch::Tensor& x,
    const c10::optional<torch::Tensor>& out) {
  const Shape n = check(z, W, idx, bounds);
  check_chain_operand(base, {n.d}, "base");
  check_chain_operand(x, {n.B, n.d}, "x");
  Chain chain;
  chain.base = base.data_ptr<float>();
  chain.x = x.data_ptr<float>();
  auto P = output_tensor(out, {n.B, n.S, n.d}, z.options(), "out (P)");
  const int64_t chunks = n_chunks(n.d);
  std::vector<float> err(chunks * n.B * n.S);
  forward_pass(z, W, idx, bounds, row_ends(ends, n), n, &chain, P.data_ptr<float>(), err.data());
  auto E = torch::empty({n.B, n.S}, z.options());
  float* ep = E.data_ptr<float>();
  at::parallel_for(0, n.B * n.S, 1024, [&](int64_t i0, int64_t i1) {  // the chunks' parts, in order
    for (int64_t i = i0; i < i1; ++i) {
      float e = 0.f;
      for (int64_t t = 0; t < chunks; ++t) e += err[t * n.B * n.S + i];
      ep[i] = e;
    }
  });
  return {P, E};
}

// Adds the segments' terms into dz (B, D) and dW (D, d) in place; either may be None. With
// `overwrite_dz`, dz's prior contents are ignored: each row is written whole, zero outside its
// entries (one pass over dz instead of a zero fill and then the scatter).
void segments_backward(const torch::Tensor& z, const torch::Tensor& W, const torch::Tensor& idx,
                       const std::vector<int64_t>& bounds, const torch::Tensor& H,
                       const c10::optional<torch::Tensor>& dz, const c10::optional<torch::Tensor>& dW,
                       const c10::optional<torch::Tensor>& ends, bool overwrite_dz) {
  const Shape n = check(z, W, idx, bounds);
  TORCH_CHECK(H.scalar_type() == torch::kFloat && H.is_contiguous() && H.dim() == 3 && H.size(0) == n.B &&
                  H.size(1) == n.S && H.size(2) == n.d,
              "nested_segments: contiguous float32 upstream gradient of shape (B, segments, d) expected");
  backward_pass(z, W, idx, bounds, row_ends(ends, n), n, H.data_ptr<float>(), nullptr, optional_out(dz, z, "dz", "z"),
                optional_out(dW, W, "dW", "W"), nullptr, overwrite_dz);
}

// The backward of `segments_chain_forward`, given the gradients dP (or None) and dE of its outputs:
// the segments' terms added into dz and dW as `segments_backward` does, from the suffix sums of the
// levels' gradients computed where they are used; returns d_base (d,).
torch::Tensor segments_chain_backward(const torch::Tensor& z, const torch::Tensor& W, const torch::Tensor& idx,
                                      const std::vector<int64_t>& bounds, const torch::Tensor& P,
                                      const torch::Tensor& x, const c10::optional<torch::Tensor>& dP,
                                      const torch::Tensor& dE, const c10::optional<torch::Tensor>& dz,
                                      const c10::optional<torch::Tensor>& dW, const c10::optional<torch::Tensor>& ends,
                                      bool overwrite_dz) {
  const Shape n = check(z, W, idx, bounds);
  check_chain_operand(P, {n.B, n.S, n.d}, "P");
  check_chain_operand(x, {n.B, n.d}, "x");
  check_chain_operand(dE, {n.B, n.S}, "dE");
  Chain chain;
  chain.x = x.data_ptr<float>();
  chain.P = P.data_ptr<float>();
  chain.dE = dE.data_ptr<float>();
  if (dP.has_value() && dP->defined()) {
    check_chain_operand(*dP, {n.B, n.S, n.d}, "dP");
    chain.dP = dP->data_ptr<float>();
  }
  auto d_base = torch::zeros({n.d}, z.options());
  backward_pass(z, W, idx, bounds, row_ends(ends, n), n, nullptr, &chain, optional_out(dz, z, "dz", "z"),
                optional_out(dW, W, "dW", "W"), d_base.data_ptr<float>(), overwrite_dz);
  return d_base;
}

// key of feature f with value bits u: the value's order-preserving bits, inverted (descending),
// above the feature (ascending). Ascending keys are the order of a stable descending sort; -0 ranks
// just below +0 (a zero carries no activation: which zeros are picked does not matter).
inline uint64_t rank_key(uint32_t u, int64_t f) {
  u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return (static_cast<uint64_t>(~u) << 32) | static_cast<uint64_t>(f);
}

inline int64_t key_feature(uint64_t key) { return static_cast<int64_t>(key & 0xffffffffu); }

inline uint32_t float_bits(const float* p) {  // a memcpy, which compiles to a plain load
  uint32_t u;
  std::memcpy(&u, p, 4);
  return u;
}

// (n_pos, has_nan): each row's number of positive entries of pre (B, D) as (B,) int32, and whether
// any entry is NaN. One pass, without the (B, D) bool tensor that `(pre > 0).sum(-1)` builds.
std::tuple<torch::Tensor, bool> count_positive(const torch::Tensor& pre) {
  TORCH_CHECK(pre.device().is_cpu() && pre.scalar_type() == torch::kFloat && pre.dim() == 2 && pre.is_contiguous(),
              "count_positive: a contiguous 2-d float32 CPU tensor expected");
  const int64_t B = pre.size(0), D = pre.size(1);
  TORCH_CHECK(D < (int64_t(1) << 31), "count_positive: at most 2^31 - 1 latents");
  auto n_pos = torch::empty({B}, pre.options().dtype(torch::kInt));
  const float* pp = pre.data_ptr<float>();
  int32_t* np = n_pos.data_ptr<int32_t>();
  std::atomic<bool> nan{false};
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    uint32_t any = 0;
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = pp + b * D;
      int32_t count = 0;
      uint32_t row_nan = 0;
      for (int64_t f = 0; f < D; ++f) {  // branch-free, so that it vectorises
        count += row[f] > 0.f;
        row_nan |= (float_bits(row + f) & 0x7fffffffu) > 0x7f800000u;
      }
      np[b] = count;
      any |= row_nan;
    }
    if (any) nan = true;
  });
  return {n_pos, nan.load()};
}

// (D,) int32: how many rows of acts (B, D) are positive at each feature (the trainer's firing
// counts), without the (B, D) bool tensor and strided reduction of `(acts > 0).sum(0)`. Threads
// count blocks of rows into counts of their own, added up at the end; NaN counts as not positive.
torch::Tensor count_positive_per_feature(const torch::Tensor& acts) {
  TORCH_CHECK(acts.device().is_cpu() && acts.scalar_type() == torch::kFloat && acts.dim() == 2 && acts.is_contiguous(),
              "count_positive_per_feature: a contiguous 2-d float32 CPU tensor expected");
  const int64_t B = acts.size(0), D = acts.size(1);
  TORCH_CHECK(B < (int64_t(1) << 31), "count_positive_per_feature: at most 2^31 - 1 rows");
  const float* ap = acts.data_ptr<float>();
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), B));
  std::vector<int32_t> partial(parts * D, 0);
  at::parallel_for(0, parts, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      int32_t* counts = partial.data() + p * D;
      for (int64_t b = p * B / parts; b < (p + 1) * B / parts; ++b) {
        const float* row = ap + b * D;
        for (int64_t f = 0; f < D; ++f) counts[f] += row[f] > 0.f;  // branch-free: it vectorises
      }
    }
  });
  auto out = torch::empty({D}, acts.options().dtype(torch::kInt));
  int32_t* op = out.data_ptr<int32_t>();
  std::copy_n(partial.data(), D, op);
  for (int64_t p = 1; p < parts; ++p)
    for (int64_t f = 0; f < D; ++f) op[f] += partial[p * D + f];
  return out;
}

constexpr int64_t SELECT_BUCKETS = 2048;

// A row's positive entries, in feature order: their bits and features (bits[0:n], feat[0:n]), the
// smallest and largest of those bits (as unsigned: for positive floats, their order), and whether
// the row has a NaN (then the rest is not used). One pass without data-dependent branches (a branch
// on the sign would mispredict for half the entries); with AVX-512, sixteen entries a step, the
// positive ones compressed to the front of a vector stored whole (bits and feat have room for 16
// past the row). Without NaN, positive as a float is positive as an int32.
struct PositiveEntries {
  int64_t n = 0;
  uint32_t lo = 0xffffffffu, hi = 0;
  bool nan = false;
};

inline PositiveEntries positive_entries(const float* row, int64_t D, uint32_t* bits, int32_t* feat) {
  PositiveEntries pe;
  uint32_t nan = 0;
  int64_t f = 0;
#if defined(__AVX512F__)
  const __m512i zero = _mm512_setzero_si512(), abs_mask = _mm512_set1_epi32(0x7fffffff);
  const __m512i inf = _mm512_set1_epi32(0x7f800000);
  __m512i lo = _mm512_set1_epi32(-1), hi = zero, ids = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12,
                                                                          13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 any_nan = 0;
  for (; f + 16 <= D; f += 16) {
    const __m512i v = _mm512_loadu_si512(row + f);
    const __mmask16 pos = _mm512_cmpgt_epi32_mask(v, zero);
    any_nan |= _mm512_cmpgt_epu32_mask(_mm512_and_si512(v, abs_mask), inf);
    lo = _mm512_mask_min_epu32(lo, pos, lo, v);
    hi = _mm512_mask_max_epu32(hi, pos, hi, v);
    _mm512_storeu_si512(bits + pe.n, _mm512_maskz_compress_epi32(pos, v));
    _mm512_storeu_si512(feat + pe.n, _mm512_maskz_compress_epi32(pos, ids));
    pe.n += __builtin_popcount(pos);
    ids = _mm512_add_epi32(ids, step);
  }
  nan = any_nan != 0;
  pe.lo = _mm512_reduce_min_epu32(lo);
  pe.hi = _mm512_reduce_max_epu32(hi);
#endif
  for (; f < D; ++f) {
    const uint32_t u = float_bits(row + f);
    nan |= (u & 0x7fffffffu) > 0x7f800000u;
    bits[pe.n] = u;
    feat[pe.n] = static_cast<int32_t>(f);
    const bool pos = static_cast<int32_t>(u) > 0;
    pe.lo = pos ? std::min(pe.lo, u) : pe.lo;
    pe.hi = pos ? std::max(pe.hi, u) : pe.hi;
    pe.n += pos;
  }
  pe.nan = nan != 0;
  return pe;
}

// Rank segments of each row of pre (B, D): idx[b, bounds[s]:bounds[s+1]] holds the features of ranks
// bounds[s] .. bounds[s+1]-1 (in no particular order within a segment), ranked by value descending and, between
// equal values, by feature ascending (the order of a stable descending sort). Selects only, no sort. In a row
// without NaN that has n positive entries, columns [0, n) hold exactly those (the kernels' `ends`).
//
// A row without NaN (the usual case) is bucketed: a positive float's bits order it, so a histogram of
// (bits - lowest) >> shift over SELECT_BUCKETS buckets places every positive entry whose bucket holds no
// boundary without comparing it; the few buckets that straddle a boundary are split with exact keys. A row
// with fewer than K positives fills the rest with its non-positive features in feature order (ranks past the
// positives carry no activation, so which of them are listed does not matter). A row with a NaN, which ranks
// first as in a sort, takes a cascade of nth_element over exact keys. O(D) a row either way.
// The ranking is written into `out` (int32, (B, K)) when one is given.
torch::Tensor nested_select(const torch::Tensor& pre, const std::vector<int64_t>& bounds,
                            const c10::optional<torch::Tensor>& out) {
  TORCH_CHECK(pre.device().is_cpu() && pre.scalar_type() == torch::kFloat && pre.dim() == 2 && pre.is_contiguous(),
              "nested_select: a contiguous 2-d float32 CPU tensor expected");
  const int64_t B = pre.size(0), D = pre.size(1);
  TORCH_CHECK(D < (int64_t(1) << 31), "nested_select: at most 2^31 - 1 latents");
  TORCH_CHECK(bounds.size() >= 2 && bounds.front() == 0 && bounds.back() <= D,
              "nested_select: bounds must run from 0 to at most the number of latents");
  for (size_t s = 1; s < bounds.size(); ++s)
    TORCH_CHECK(bounds[s] > bounds[s - 1], "nested_select: bounds must increase");
  const int64_t K = bounds.back();
  auto idx = output_tensor(out, {B, K}, pre.options().dtype(torch::kInt), "out (the ranking)");
  const float* pp = pre.data_ptr<float>();
  int32_t* ip = idx.data_ptr<int32_t>();
  at::parallel_for(0, B, 8, [&](int64_t b0, int64_t b1) {
    std::vector<uint64_t> key(D);
    std::vector<uint32_t> bits(D + 16);  // 16 past the row: the vector loop stores whole vectors
    std::vector<int32_t> feat(D + 16), count(SELECT_BUCKETS), start(SELECT_BUCKETS);
    for (int64_t b = b0; b < b1; ++b) {
      const float* row = pp + b * D;
      int32_t* out = ip + b * K;
      const PositiveEntries pe = positive_entries(row, D, bits.data(), feat.data());
      const int64_t n = pe.n;
      if (!pe.nan) {  // bucketed
        const int64_t take = std::min(n, K);  // ranks held by positive entries
        if (take > 0) {
          const uint32_t lo = pe.lo, hi = pe.hi;
          int shift = 0;
          while (((hi - lo) >> shift) >= static_cast<uint32_t>(SELECT_BUCKETS)) ++shift;
          const int64_t nb = ((hi - lo) >> shift) + 1;
          std::fill_n(count.begin(), nb, 0);
          for (int64_t i = 0; i < n; ++i) ++count[(bits[i] - lo) >> shift];
          int64_t pos = 0, cut = -1;  // buckets from the top; cut: the one that reaches rank `take`
          for (int64_t q = nb - 1; q >= 0; --q) {
            start[q] = static_cast<int32_t>(pos);
            pos += count[q];
            if (cut < 0 && pos >= take) cut = q;
          }
          for (int64_t i = 0; i < n; ++i)  // a counting sort by bucket, descending
            key[start[(bits[i] - lo) >> shift]++] = rank_key(bits[i], feat[i]);
          // split the buckets that straddle a boundary, with exact keys: buckets in rank order (from
          // the top), boundaries merged along, up to the last one that falls among the positives
          // (K itself when there are at least K)
          const int64_t last = take == K ? K : take - 1;
          size_t s = 1;
          for (int64_t q = nb - 1; q >= cut; --q) {
            const int64_t e = start[q], a = e - count[q];  // start[q] has moved to the bucket's end
            while (s < bounds.size() && bounds[s] <= a) ++s;
            if (s == bounds.size() || bounds[s] > last) break;
            int inside = 0;
            int64_t at = 0;
            for (size_t t = s; t < bounds.size() && bounds[t] < e; ++t) ++inside, at = bounds[t];
            if (inside == 1)
              std::nth_element(key.begin() + a, key.begin() + at, key.begin() + e);
            else if (inside > 1)
              std::sort(key.begin() + a, key.begin() + e);
          }
          for (int64_t j = 0; j < take; ++j) out[j] = static_cast<int32_t>(key_feature(key[j]));
        }
        if (take < K) {  // too few positives: non-positive features after them, found 64 features
          int64_t m = 0;   // at a time until there are enough (feat is free again)
          for (int64_t f0 = 0; f0 < D && m < K - take; f0 += 64) {
            for (int64_t f = f0; f < std::min(f0 + 64, D); ++f) {
              feat[m] = static_cast<int32_t>(f);
              m += static_cast<int32_t>(float_bits(row + f)) <= 0;
            }
          }
          std::copy_n(feat.begin(), K - take, out + take);
        }
        continue;
      }
      int64_t m = 0;  // a row with NaN. Candidates: positive or NaN entries (NaN ranks first), or the whole row if too few
      for (int64_t f = 0; f < D; ++f) {
        key[m] = rank_key(float_bits(row + f), f);
        m += !(row[f] <= 0.f);
      }
      if (m < K) {
        for (int64_t f = 0; f < D; ++f) key[f] = rank_key(float_bits(row + f), f);
        m = D;
      }
      if (m > K) std::nth_element(key.begin(), key.begin() + K - 1, key.begin() + m);
      for (size_t s = bounds.size() - 1; s >= 2; --s)  // split the top bounds[s] at bounds[s - 1]
        std::nth_element(key.begin(), key.begin() + bounds[s - 1] - 1, key.begin() + bounds[s]);
      for (int64_t j = 0; j < K; ++j) out[j] = static_cast<int32_t>(key_feature(key[j]));
    }
  });
  return idx;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("nested_select", &nested_select, "rank segments of each row", py::arg("pre"), py::arg("bounds"),
        py::arg("out") = py::none());
  m.def("segments_forward", &segments_forward, "Y[b, s] = sum over segment s of z[b, f] W[f]", py::arg("z"),
        py::arg("W"), py::arg("idx"), py::arg("bounds"), py::arg("ends") = py::none());
  m.def("segments_backward", &segments_backward, "add the segments' terms to dz and dW in place", py::arg("z"),
        py::arg("W"), py::arg("idx"), py::arg("bounds"), py::arg("H"), py::arg("dz"), py::arg("dW"),
        py::arg("ends") = py::none(), py::arg("overwrite_dz") = false);
  m.def("segments_chain_forward", &segments_chain_forward,
        "the levels' reconstructions P[b, s] = base + sum_{s' <= s} Y[b, s'] and their squared errors",
        py::arg("z"), py::arg("W"), py::arg("idx"), py::arg("bounds"), py::arg("ends"), py::arg("base"), py::arg("x"),
        py::arg("out") = py::none());
  m.def("segments_chain_backward", &segments_chain_backward,
        "add the chain's segment terms to dz and dW in place; returns the gradient of base", py::arg("z"),
        py::arg("W"), py::arg("idx"), py::arg("bounds"), py::arg("P"), py::arg("x"), py::arg("dP"), py::arg("dE"),
        py::arg("dz"), py::arg("dW"), py::arg("ends") = py::none(), py::arg("overwrite_dz") = false);
  m.def("count_positive", &count_positive, "each row's number of positive entries, and whether any is NaN");
  m.def("count_positive_per_feature", &count_positive_per_feature, "each feature's number of positive rows");
}
