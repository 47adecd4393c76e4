// Windowed attention that computes only the kept query-key pairs (torch.ops.litevar.interval_attention).
//
// Each query keeps a few runs of consecutive keys (one band per key scale in raster geometry, one run per window
// row in 2-D geometry). Per (batch row, head) the keys are transposed once (fp32, or bf16 channel pairs where
// the CPU has AVX512-BF16), so that 16 consecutive keys of a run are one vector, and the values converted to
// fp32. Tiles of TQ queries compute scores over the union of their runs, an exact softmax over each query's own
// runs, and the weighted values, all accumulated in fp32: keys outside the union are never read, keys inside it
// that a query does not keep get weight exactly 0. Vectors are GCC/Clang vector extensions: the build's -march
// picks the instruction set.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <limits>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__AVX512BF16__)
#include <immintrin.h>
#define LITEVAR_BF16_DOT 1  // bf16 q.k in pairs of channels with fp32 accumulation (vdpbf16ps)
#else
#define LITEVAR_BF16_DOT 0
#endif

namespace {

constexpr int64_t LANES = 16;
constexpr int TQ = 4;  // queries per tile
typedef float vec __attribute__((vector_size(LANES * sizeof(float))));
typedef int32_t ivec __attribute__((vector_size(LANES * sizeof(int32_t))));

inline vec load(const float* p) {
  vec v;
  std::memcpy(&v, p, sizeof(vec));
  return v;
}

inline void store(float* p, vec v) { std::memcpy(p, &v, sizeof(vec)); }

inline vec splat(float x) { return vec{} + x; }

typedef uint16_t hvec __attribute__((vector_size(LANES * sizeof(uint16_t))));
typedef uint32_t uvec __attribute__((vector_size(LANES * sizeof(uint32_t))));

// 16 consecutive values as fp32, and back (bf16: round to nearest even, NaN kept NaN).
inline vec load16(const float* p) { return load(p); }

inline vec load16(const c10::BFloat16* p) {
  hvec h;
  std::memcpy(&h, p, sizeof(hvec));
  const uvec bits = __builtin_convertvector(h, uvec) << 16;
  vec v;
  std::memcpy(&v, &bits, sizeof(vec));
  return v;
}

inline void store16(float* p, vec v) { store(p, v); }

inline void store16(c10::BFloat16* p, vec v) {
  uvec bits;
  std::memcpy(&bits, &v, sizeof(uvec));
  uvec rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  rounded = v != v ? uvec{} + 0x7FC0u : rounded;
  const hvec h = __builtin_convertvector(rounded, hvec);
  std::memcpy(p, &h, sizeof(hvec));
}

// In-place transpose of a 16 x 16 block held as 16 row vectors: swap the off-diagonal half blocks at sizes
// 8, 4, 2, 1 (64 two-source shuffles instead of 256 scalar scatters).
template <int B>
inline void swap_blocks(vec* r) {
  ivec low, high;  // lanes of (r[i], r[i + B]) forming the new rows i and i + B
  for (int x = 0; x < LANES; ++x) {
    low[x] = (x & B) ? LANES + x - B : x;
    high[x] = (x & B) ? LANES + x : x + B;
  }
  for (int i = 0; i < LANES; ++i) {
    if (i & B) continue;
    const vec a = r[i], b = r[i + B];
    r[i] = __builtin_shuffle(a, b, low);
    r[i + B] = __builtin_shuffle(a, b, high);
  }
}

inline void transpose16(vec* r) {
  swap_blocks<8>(r);
  swap_blocks<4>(r);
  swap_blocks<2>(r);
  swap_blocks<1>(r);
}

// exp(x) for x <= 0 (scores minus their maximum): 2^n * p(r) with r = x - n ln2 in [-ln2/2, ln2/2] and p the
// degree-7 Taylor polynomial (relative error ~1e-7). Inputs below -87 are clamped: their weight is < 1e-37.
inline vec exp_nonpositive(vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;
  const ivec n = __builtin_convertvector(x * 1.44269504088896341f - 0.5f, ivec);  // round to nearest for x <= 0
  const vec nf = __builtin_convertvector(n, vec);
  const vec r = x - nf * 0.693359375f + nf * 2.12194440e-4f;  // ln2 split in two for an exact product
  vec p = splat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const ivec bits = (n + 127) << 23;
  vec two_n;
  std::memcpy(&two_n, &bits, sizeof(vec));
  return p * two_n;
}

struct Strides {
  int64_t b, h, l;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

// One (batch row, head) at a time; ND = head_dim / 16 vectors per row. Queries go in tiles of TQ consecutive
// positions, so every key vector loaded feeds TQ queries (one query at a time streamed K and V from L2 for every
// pair and ran at a third of the FMA rate).
template <typename T, int ND>
class HeadWorker {
 public:
  static constexpr int64_t D = ND * LANES;

  HeadWorker(int64_t L, int64_t max_lanes)
      : L_(L), Lp_(L + LANES), kt_(D * (L + LANES), 0.0f), vf_(L * D),
        scores_(TQ * (max_lanes + LANES), 0.0f), mask_(max_lanes + LANES, 0.0f), stride_(max_lanes + LANES) {}

  // Keys transposed to [KT_ROWS][Lp] (padding columns hold finite copies, so a vector past a run's end is
  // harmless), values to fp32 [L][D].
  void load_kv(const T* k, int64_t k_row, const T* v, int64_t v_row) {
    vec block[LANES];
    for (int64_t j0 = 0; j0 < L_; j0 += LANES) {
      for (int64_t c0 = 0; c0 < KT_ROWS; c0 += LANES) {
        for (int64_t j = 0; j < LANES; ++j) {
          const T* row = k + std::min(j0 + j, L_ - 1) * k_row;
          if constexpr (PAIRS) {
            std::memcpy(&block[j], row + 2 * c0, sizeof(vec));  // 16 channel pairs, bits as they are
          } else {
            block[j] = load16(row + c0);
          }
        }
        transpose16(block);  // keys past L repeat the last one: finite, and never weighted
        for (int64_t c = 0; c < LANES; ++c) store(kt_.data() + (c0 + c) * Lp_ + j0, block[c]);
      }
    }
    for (int64_t j = 0; j < L_; ++j) {
      for (int64_t c = 0; c < D; c += LANES) store(vf_.data() + j * D + c, load16(v + j * v_row + c));
    }
  }

  // One tile: queries q[t] (t < TQ), the union intervals [u0, u1) of `unions`, and per query its kept lane ranges
  // [r_first[t], r_last[t]) of `ranges` (lanes counted along the union intervals). Writes out[t] for t < rows.
  void attend(const T* const* q, float scale, const int32_t* unions, int64_t u0, int64_t u1,
              const int32_t* ranges, const int64_t* r_first, const int64_t* r_last, T* const* out, int rows) {
    float qf[TQ][D];
    if constexpr (PAIRS) {
      for (int t = 0; t < TQ; ++t) std::memcpy(qf[t], q[t], D * sizeof(T));  // D/2 channel pairs
    } else {
      for (int t = 0; t < TQ; ++t)
        for (int64_t c = 0; c < D; c += LANES) store(qf[t] + c, load16(q[t] + c) * scale);
    }
    int64_t n = 0;
    for (int64_t w = u0; w < u1; ++w) {
      const int64_t s = unions[2 * w], e = unions[2 * w + 1];
      for (int64_t j0 = s; j0 < e; j0 += LANES) {
        vec a[TQ];
        scores_chunk(qf, kt_.data() + j0, scale, a);
        for (int t = 0; t < TQ; ++t) store(scores_.data() + t * stride_ + n, a[t]);  // tail lanes overwritten next
        n += std::min(LANES, e - j0);
      }
    }
    float inv[TQ];
    for (int t = 0; t < TQ; ++t) inv[t] = softmax_row(scores_.data() + t * stride_, n, ranges, r_first[t], r_last[t]);
    vec acc[TQ][ND] = {};
    int64_t p = 0;
    for (int64_t w = u0; w < u1; ++w) {
      const int64_t s = unions[2 * w], e = unions[2 * w + 1];
      for (int64_t j = s; j < e; ++j, ++p) {
        const float* row = vf_.data() + j * D;
        vec weight[TQ];
        for (int t = 0; t < TQ; ++t) weight[t] = splat(scores_[t * stride_ + p]);
        for (int u = 0; u < ND; ++u) {
          const vec vu = load(row + u * LANES);
          for (int t = 0; t < TQ; ++t) acc[t][u] += weight[t] * vu;
        }
      }
    }
    for (int t = 0; t < rows; ++t) {
      for (int u = 0; u < ND; ++u) store16(out[t] + u * LANES, acc[t][u] * inv[t]);
    }
  }

 private:
  static constexpr bool PAIRS = LITEVAR_BF16_DOT && std::is_same_v<T, c10::BFloat16> && D >= 2 * LANES;
  static constexpr int64_t KT_ROWS = PAIRS ? D / 2 : D;  // rows of the transposed keys: channels or pairs

  // Scores of TQ queries against 16 consecutive keys starting at column `col` of the transposed keys.
  void scores_chunk(const float (*qf)[D], const float* col, float scale, vec* a) const {
#if LITEVAR_BF16_DOT
    if constexpr (PAIRS) {
      __m512 acc[TQ];
      for (int t = 0; t < TQ; ++t) acc[t] = _mm512_setzero_ps();
      for (int64_t c = 0; c < KT_ROWS; ++c) {
        const __m512bh kc = (__m512bh)_mm512_loadu_si512(col + c * Lp_);
        for (int t = 0; t < TQ; ++t) {
          int32_t pair;
          std::memcpy(&pair, &qf[t][c], sizeof(pair));
          acc[t] = _mm512_dpbf16_ps(acc[t], kc, (__m512bh)_mm512_set1_epi32(pair));
        }
      }
      for (int t = 0; t < TQ; ++t) a[t] = (vec)acc[t] * scale;
      return;
    }
#endif
    for (int t = 0; t < TQ; ++t) a[t] = vec{};
    for (int64_t c = 0; c < D; ++c) {
      const vec kc = load(col + c * Lp_);
      for (int t = 0; t < TQ; ++t) a[t] += splat(qf[t][c]) * kc;
    }
    (void)scale;
  }

  // Row of n scores -> unnormalised weights: exp(score - max) on the kept ranges, 0 elsewhere; returns 1 / sum.
  // Whole vectors with a 0/1 lane mask: the ranges are short (a band per key scale), scalar tails cost more.
  float softmax_row(float* row, int64_t n, const int32_t* ranges, int64_t first, int64_t last) {
    float* keep = mask_.data();
    std::fill(keep, keep + (n + LANES - 1) / LANES * LANES, 0.0f);
    for (int64_t r = first; r < last; ++r) std::fill(keep + ranges[2 * r], keep + ranges[2 * r + 1], 1.0f);
    const vec lowest = splat(-std::numeric_limits<float>::infinity());
    vec m = lowest;
    for (int64_t j = 0; j < n; j += LANES) {
      const vec x = load(keep + j) > 0.0f ? load(row + j) : lowest;
      m = m > x ? m : x;
    }
    float mx = m[0];
    for (int64_t u = 1; u < LANES; ++u) mx = std::max(mx, m[u]);
    vec total{};
    for (int64_t j = 0; j < n; j += LANES) {
      const vec kept = load(keep + j);  // lanes not kept may score above the max: never exponentiate them
      const vec p = exp_nonpositive(kept > 0.0f ? load(row + j) - mx : splat(-100.0f)) * kept;
      store(row + j, p);
      total += p;
    }
    float sum = 0.0f;
    for (int64_t u = 0; u < LANES; ++u) sum += total[u];
    return 1.0f / sum;
  }

  int64_t L_, Lp_;
  std::vector<float> kt_, vf_, scores_, mask_;
  int64_t stride_;
};

template <typename T, int ND>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tile_offsets,
         const at::Tensor& unions, const at::Tensor& query_offsets, const at::Tensor& ranges, double scale,
         int64_t max_lanes, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), l = q.size(2), L = k.size(2);
  const int64_t tiles = (l + TQ - 1) / TQ;
  const Strides qs = strides_of(q), ks = strides_of(k), vs = strides_of(v), os = strides_of(out);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t* toff = tile_offsets.data_ptr<int64_t>();
  const int64_t* qoff = query_offsets.data_ptr<int64_t>();
  const int32_t* un = unions.data_ptr<int32_t>();
  const int32_t* rg = ranges.data_ptr<int32_t>();
  const int64_t tasks = B * H;
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), tasks));
  std::atomic<int64_t> next{0};
  auto work = [&]() {
    HeadWorker<T, ND> head(L, max_lanes);
    const T* qrow[TQ];
    T* orow[TQ];
    int64_t r_first[TQ], r_last[TQ];
    for (int64_t task = next++; task < tasks; task = next++) {
      const int64_t b = task / H, h = task % H;
      head.load_kv(kp + b * ks.b + h * ks.h, ks.l, vp + b * vs.b + h * vs.h, vs.l);
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int rows = static_cast<int>(std::min<int64_t>(TQ, l - tile * TQ));
        for (int t = 0; t < TQ; ++t) {
          const int64_t i = tile * TQ + std::min(t, rows - 1);  // a short last tile repeats its last query
          qrow[t] = qp + b * qs.b + h * qs.h + i * qs.l;
          orow[t] = op + b * os.b + h * os.h + i * os.l;
          r_first[t] = qoff[h * l + i];
          r_last[t] = qoff[h * l + i + 1];
        }
        head.attend(qrow, static_cast<float>(scale), un, toff[h * tiles + tile], toff[h * tiles + tile + 1], rg,
                    r_first, r_last, orow, rows);
      }
    }
  };
  // std::thread rather than at::parallel_for: an extension built with its own OpenMP runtime would not share
  // PyTorch's; the thread count still follows torch.set_num_threads.
  std::vector<std::thread> threads;
  for (int64_t w = 1; w < workers; ++w) threads.emplace_back(work);
  work();
  for (auto& t : threads) t.join();
}

template <typename T>
void dispatch_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tile_offsets,
                  const at::Tensor& unions, const at::Tensor& query_offsets, const at::Tensor& ranges, double scale,
                  int64_t max_lanes, at::Tensor& out) {
  switch (q.size(3)) {
    case 16: return run<T, 1>(q, k, v, tile_offsets, unions, query_offsets, ranges, scale, max_lanes, out);
    case 32: return run<T, 2>(q, k, v, tile_offsets, unions, query_offsets, ranges, scale, max_lanes, out);
    case 64: return run<T, 4>(q, k, v, tile_offsets, unions, query_offsets, ranges, scale, max_lanes, out);
    case 128: return run<T, 8>(q, k, v, tile_offsets, unions, query_offsets, ranges, scale, max_lanes, out);
    default: TORCH_CHECK(false, "interval_attention: head_dim must be 16, 32, 64 or 128, got ", q.size(3));
  }
}

void check_index(const at::Tensor& t, at::ScalarType dtype, int64_t numel, const char* what) {
  TORCH_CHECK(t.scalar_type() == dtype && t.is_contiguous() && t.device().is_cpu() && (numel < 0 || t.numel() == numel),
              "interval_attention: bad layout tensor ", what);
}

at::Tensor interval_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                              const at::Tensor& tile_offsets, const at::Tensor& unions,
                              const at::Tensor& query_offsets, const at::Tensor& ranges, double scale,
                              int64_t max_lanes, int64_t flops_per_row) {
  (void)flops_per_row;  // read by the FLOP counter, not by the kernel
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "interval_attention: q, k, v must be [B, H, L, d]");
  TORCH_CHECK(q.device().is_cpu(), "interval_attention runs on CPU tensors");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "interval_attention: q, k, v must share a dtype");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "interval_attention: k and v must be [B, H, L, d] matching q");
  TORCH_CHECK(q.stride(3) == 1 && k.stride(3) == 1 && v.stride(3) == 1,
              "interval_attention: the last dim of q, k, v must be contiguous");
  const int64_t H = q.size(1), l = q.size(2);
  check_index(tile_offsets, at::kLong, H * ((l + TQ - 1) / TQ) + 1, "tile_offsets");
  check_index(query_offsets, at::kLong, H * l + 1, "query_offsets");
  check_index(unions, at::kInt, -1, "unions");
  check_index(ranges, at::kInt, -1, "ranges");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kFloat) {
    dispatch_dim<float>(q, k, v, tile_offsets, unions, query_offsets, ranges, scale, max_lanes, out);
  } else if (q.scalar_type() == at::kBFloat16) {
    dispatch_dim<c10::BFloat16>(q, k, v, tile_offsets, unions, query_offsets, ranges, scale, max_lanes, out);
  } else {
    TORCH_CHECK(false, "interval_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(litevar, m) {
  m.def("interval_attention(Tensor q, Tensor k, Tensor v, Tensor tile_offsets, Tensor unions, "
        "Tensor query_offsets, Tensor ranges, float scale, int max_lanes, int flops_per_row) -> Tensor");
}

TORCH_LIBRARY_IMPL(litevar, CPU, m) { m.impl("interval_attention", &interval_attention); }
