// CPU kernels of the per-sample ops: the selective masks, the bool-masked squared norm and the
// loss head; included once per instruction set by sample_ops_cpu_generic.cpp /
// sample_ops_cpu_avx2.cpp, which define JSIGR_SAMPLE_ISA (the namespace) and, for AVX2, the at::vec
// capability macros. No include guard.
//
// Structure. Every op sees N rows of D features. A mask is "compute the saliency M of a tile of
// a row, then apply the rule": for beta, compare the tile with beta and write one byte per
// feature; for a quantile, materialise the row's M in a per-thread scratch row, find the k-th
// smallest value with std::nth_element (NaN last, as torch.kthvalue), then recompute the tiles
// and compare with that threshold. M itself is never written to memory.
//
// Exactness. M is computed with the rounding of the reference expressions (jsigr_fast.saliency):
// |g| / peak is one IEEE division in the data's dtype (bfloat16 / half: divided in float and
// rounded to the dtype, as ATen does), and beta is rounded to the dtype before the comparison,
// as ``M <= beta`` does for a Python float. The gradient-saliency and threshold masks are
// therefore bit-identical to the reference's; the adaptor's (a 1x1 convolution and tanh) agrees
// except where its value lies within rounding of the threshold (see csrc/README.md).
//
// Parallelism. Reductions and elementwise passes run over (row, chunk) tasks of at most kChunk
// features (at::parallel_for); per-chunk partial results are combined in chunk order, so results
// do not depend on the number of threads. Quantile rows are one task each.
#include <ATen/cpu/vec/vec.h>

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "sample_ops_cpu.h"

namespace jsigr_fast::sample_cpu::JSIGR_SAMPLE_ISA {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTile = 512;     // elements per float partial sum / conversion tile
constexpr int64_t kChunk = 32768;  // features per parallel task (a multiple of kTile)

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename scalar_t>
constexpr bool kConvert = !std::is_same_v<scalar_t, acc_type<scalar_t>>;

// The value rounded to scalar_t's precision (identity for float and double).
template <typename scalar_t, typename acc_t>
inline acc_t round_to(acc_t v) {
  if constexpr (kConvert<scalar_t>) {
    return static_cast<acc_t>(static_cast<scalar_t>(v));
  } else {
    return v;
  }
}

// [p, p + n) as acc_t: the data itself, or a converted copy in buf.
template <typename scalar_t>
inline const acc_type<scalar_t>* load_tile(const scalar_t* p, int64_t n, acc_type<scalar_t>* buf) {
  if constexpr (kConvert<scalar_t>) {
    at::vec::convert(p, buf, n);
    return buf;
  } else {
    return p;
  }
}

// m ? v : +0, without a branch: the bits of v ANDed with all-ones or zero. A random mask makes
// `m ? v : 0` a mispredicted branch per feature (the bool-masked norm ran at ~10 % of copy bandwidth,
// bench/results/mask_cpu_float32.md); this form vectorises. Exact, NaN-safe: a masked-out NaN is +0.
template <typename T>
inline T select_bits(bool m, T v) {
  using U = std::conditional_t<sizeof(T) == 4, uint32_t, uint64_t>;
  static_assert(sizeof(T) == sizeof(U), "float or double");
  U u;
  std::memcpy(&u, &v, sizeof(T));
  u &= U(0) - static_cast<U>(m);
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

template <typename T>
inline T nan_max(T a, T b) {  // NaN wins, like torch.amax
  return (a != a || a > b) ? a : b;
}

template <typename acc_t>
inline double lane_sum(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// sum of squares of one loaded tile: fmadd over the vector lanes, the remainder in double
template <typename acc_t>
inline double tile_sq_sum(const acc_t* q, int64_t len) {
  using Vec = Vectorized<acc_t>;
  Vec acc(acc_t(0));
  double tail = 0;
  int64_t d = 0;
  for (; d + Vec::size() <= len; d += Vec::size()) {
    const Vec v = Vec::loadu(q + d);
    acc = at::vec::fmadd(v, v, acc);
  }
  for (; d < len; ++d) tail += static_cast<double>(q[d]) * q[d];
  return lane_sum(acc) + tail;
}

template <typename acc_t>
inline acc_t lane_max(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  acc_t m = lanes[0];
  for (int64_t i = 1; i < Vectorized<acc_t>::size(); ++i) m = nan_max(lanes[i], m);
  return m;
}

// body(n, chunk, begin, end) over every (row, chunk) of features, in parallel; small rows are
// grouped so a task holds about kChunk features.
template <typename Body>
void for_each_chunk(const Rows& r, const Body& body) {
  if (r.N == 0 || r.D == 0) return;
  const int64_t chunks = (r.D + kChunk - 1) / kChunk;
  const int64_t grain = std::max<int64_t>(1, kChunk / r.D);
  at::parallel_for(0, r.N * chunks, grain, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) {
      const int64_t n = t / chunks, c = t % chunks;
      body(n, c, c * kChunk, std::min(r.D, (c + 1) * kChunk));
    }
  });
}

inline int64_t num_chunks(const Rows& r) { return r.D == 0 ? 0 : (r.D + kChunk - 1) / kChunk; }

// ---------------------------------------------------------------------------------------------
// the rule: beta or quantile, given m_range(n, begin, len, out) writing M[n, begin + i] (rounded
// to the data's dtype) for i < len <= kTile
// ---------------------------------------------------------------------------------------------
template <typename acc_t>
struct NanLastLess {
  bool operator()(acc_t a, acc_t b) const { return a < b || (b != b && a == a); }
};

template <typename scalar_t, typename MRange>
void apply_rule(const Rows& r, const Rule& rule, bool* mask, const MRange& m_range) {
  using acc_t = acc_type<scalar_t>;
  if (r.N == 0 || r.D == 0) return;
  if (rule.quantile < 0) {
    const acc_t beta = static_cast<acc_t>(static_cast<scalar_t>(rule.beta));  // as `M <= beta` rounds it
    for_each_chunk(r, [&](int64_t n, int64_t, int64_t b, int64_t e) {
      acc_t buf[kTile];
      for (int64_t t0 = b; t0 < e; t0 += kTile) {
        const int64_t len = std::min(kTile, e - t0);
        m_range(n, t0, len, buf);
        bool* out = mask + n * r.D + t0;
        for (int64_t i = 0; i < len; ++i) out[i] = buf[i] <= beta;
      }
    });
    return;
  }
  // k features penalised per row: all but the quantile_kept(q, D) most salient (csrc/quantile_rule.h,
  // not floor(q D), which float rounding of q * D can leave one short)
  const int64_t k = r.D - quantile_kept(rule.quantile, r.D);
  if (k <= 0 || k >= r.D) {
    std::fill(mask, mask + r.N * r.D, k > 0);
    return;
  }
  at::parallel_for(0, r.N, 1, [&](int64_t b, int64_t e) {
    std::vector<acc_t> row(static_cast<size_t>(r.D));
    for (int64_t n = b; n < e; ++n) {
      for (int64_t t0 = 0; t0 < r.D; t0 += kTile) m_range(n, t0, std::min(kTile, r.D - t0), row.data() + t0);
      std::nth_element(row.begin(), row.begin() + (k - 1), row.end(), NanLastLess<acc_t>{});
      const acc_t thresh = row[k - 1];
      acc_t buf[kTile];
      for (int64_t t0 = 0; t0 < r.D; t0 += kTile) {
        const int64_t len = std::min(kTile, r.D - t0);
        m_range(n, t0, len, buf);
        bool* out = mask + n * r.D + t0;
        for (int64_t i = 0; i < len; ++i) out[i] = buf[i] <= thresh;
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------
// gradient saliency: M = |g| / max(max_d |g|, tiny)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
acc_type<scalar_t> range_max_abs(const scalar_t* p, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  acc_t buf[kTile];
  Vec vmax(acc_t(0));
  acc_t smax = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t len = std::min(kTile, n - t0);
    const acc_t* q = load_tile(p + t0, len, buf);
    int64_t d = 0;
    for (; d + Vec::size() <= len; d += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(q + d).abs());
    for (; d < len; ++d) smax = nan_max(std::abs(q[d]), smax);
  }
  return nan_max(lane_max(vmax), smax);
}

template <typename scalar_t>
void gradient_mask_impl(const Rows& r, const void* gv, bool* mask, const Rule& rule) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto* g = static_cast<const scalar_t*>(gv);
  const int64_t chunks = num_chunks(r);
  std::vector<acc_t> part(static_cast<size_t>(r.N * chunks));
  for_each_chunk(r, [&](int64_t n, int64_t c, int64_t b, int64_t e) {
    part[n * chunks + c] = range_max_abs<scalar_t>(g + n * r.D + b, e - b);
  });
  // peak = amax(|g|).clamp_min(tiny) in the dtype (NaN stays NaN, as clamp_min keeps it)
  const acc_t tiny = static_cast<acc_t>(std::numeric_limits<scalar_t>::min());
  std::vector<acc_t> peak(static_cast<size_t>(r.N));
  for (int64_t n = 0; n < r.N; ++n) {
    acc_t m = 0;
    for (int64_t c = 0; c < chunks; ++c) m = nan_max(part[n * chunks + c], m);
    peak[n] = m != m ? m : std::max(m, tiny);
  }
  apply_rule<scalar_t>(r, rule, mask, [&](int64_t n, int64_t t0, int64_t len, acc_t* out) {
    acc_t buf[kTile];
    const acc_t* q = load_tile(g + n * r.D + t0, len, buf);
    const Vec vp(peak[n]);
    int64_t d = 0;
    for (; d + Vec::size() <= len; d += Vec::size()) (Vec::loadu(q + d).abs() / vp).store(out + d);
    for (; d < len; ++d) out[d] = std::abs(q[d]) / peak[n];
    if constexpr (kConvert<scalar_t>) {
      for (int64_t i = 0; i < len; ++i) out[i] = round_to<scalar_t>(out[i]);
    }
  });
}

template <typename scalar_t>
void threshold_mask_impl(const Rows& r, const void* mv, bool* mask, const Rule& rule) {
  using acc_t = acc_type<scalar_t>;
  const auto* M = static_cast<const scalar_t*>(mv);
  apply_rule<scalar_t>(r, rule, mask, [&](int64_t n, int64_t t0, int64_t len, acc_t* out) {
    const scalar_t* p = M + n * r.D + t0;
    for (int64_t i = 0; i < len; ++i) out[i] = static_cast<acc_t>(p[i]);
  });
}

// ---------------------------------------------------------------------------------------------
// adaptor saliency: M[o, s] = tanh(b[o] + sum_c W[o, c] * (g[c, s] / rms)), rms = sqrt(mean(g^2) + tiny)
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
double range_sum_sq(const scalar_t* p, int64_t n) {
  using acc_t = acc_type<scalar_t>;
  acc_t buf[kTile];
  double total = 0;
  for (int64_t t0 = 0; t0 < n; t0 += kTile) {
    const int64_t len = std::min(kTile, n - t0);
    total += tile_sq_sum(load_tile(p + t0, len, buf), len);
  }
  return total;
}

template <typename scalar_t>
void adaptor_mask_impl(const Rows& r, const void* gv, bool* mask, const AdaptorArgs& a, const Rule& rule) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto* g = static_cast<const scalar_t*>(gv);
  const auto* W = static_cast<const acc_t*>(a.weight);
  const auto* bias = static_cast<const acc_t*>(a.bias);
  const int64_t C = a.C, S = a.S;
  std::vector<acc_t> rms(static_cast<size_t>(r.N), acc_t(1));
  if (a.normalize) {
    const int64_t chunks = num_chunks(r);
    std::vector<double> part(static_cast<size_t>(r.N * chunks));
    for_each_chunk(r, [&](int64_t n, int64_t c, int64_t b, int64_t e) {
      part[n * chunks + c] = range_sum_sq<scalar_t>(g + n * r.D + b, e - b);
    });
    const acc_t tiny = static_cast<acc_t>(std::numeric_limits<scalar_t>::min());
    for (int64_t n = 0; n < r.N; ++n) {
      double s = 0;
      for (int64_t c = 0; c < chunks; ++c) s += part[n * chunks + c];
      const acc_t ms = round_to<scalar_t>(static_cast<acc_t>(s / static_cast<double>(r.D)));
      rms[n] = round_to<scalar_t>(static_cast<acc_t>(std::sqrt(round_to<scalar_t>(ms + tiny))));
    }
  }
  apply_rule<scalar_t>(r, rule, mask, [&](int64_t n, int64_t t0, int64_t len, acc_t* out) {
    thread_local std::vector<acc_t> xs;  // [C][kTile]: the normalised inputs of the tile's positions
    xs.resize(static_cast<size_t>(C * kTile));
    const scalar_t* row = g + n * r.D;
    int64_t pos = t0;
    const int64_t end = t0 + len;
    while (pos < end) {  // one output channel o at a time
      const int64_t o = pos / S, s0 = pos % S, l = std::min(end - pos, S - s0);
      for (int64_t c = 0; c < C; ++c) {
        acc_t* x = xs.data() + c * kTile;
        const scalar_t* src = row + c * S + s0;
        for (int64_t i = 0; i < l; ++i) x[i] = round_to<scalar_t>(static_cast<acc_t>(src[i]) / rms[n]);
      }
      acc_t* dst = out + (pos - t0);
      int64_t i = 0;
      for (; i + Vec::size() <= l; i += Vec::size()) {
        Vec v(bias[o]);
        for (int64_t c = 0; c < C; ++c) v = at::vec::fmadd(Vec(W[o * C + c]), Vec::loadu(xs.data() + c * kTile + i), v);
        v.tanh().store(dst + i);
      }
      for (; i < l; ++i) {
        acc_t v = bias[o];
        for (int64_t c = 0; c < C; ++c) v += W[o * C + c] * xs[c * kTile + i];
        dst[i] = std::tanh(v);
      }
      if constexpr (kConvert<scalar_t>) {
        for (int64_t j = 0; j < l; ++j) dst[j] = round_to<scalar_t>(dst[j]);
      }
      pos += l;
    }
  });
}

// ---------------------------------------------------------------------------------------------
// bool-masked squared norm and its backward
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void sq_norm_impl(const Rows& r, const void* gv, const bool* mask, void* outv) {
  using acc_t = acc_type<scalar_t>;
  const auto* g = static_cast<const scalar_t*>(gv);
  auto* out = static_cast<scalar_t*>(outv);
  const int64_t chunks = num_chunks(r);
  std::vector<double> part(static_cast<size_t>(r.N * chunks), 0.0);
  for_each_chunk(r, [&](int64_t n, int64_t c, int64_t b, int64_t e) {
    acc_t buf[kTile];
    acc_t sel[kTile];
    double total = 0;
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t len = std::min(kTile, e - t0);
      const acc_t* q = load_tile(g + n * r.D + t0, len, buf);
      if (mask) {  // m ? g : 0 (exact), then the same sum as without a mask
        const bool* m = mask + n * r.D + t0;
        for (int64_t i = 0; i < len; ++i) sel[i] = select_bits(m[i], q[i]);
        q = sel;
      }
      total += tile_sq_sum(q, len);
    }
    part[n * chunks + c] = total;
  });
  for (int64_t n = 0; n < r.N; ++n) {
    double s = 0;
    for (int64_t c = 0; c < chunks; ++c) s += part[n * chunks + c];
    out[n] = static_cast<scalar_t>(s);
  }
}

template <typename scalar_t>
void sq_norm_backward_impl(const Rows& r, const void* gov, const void* gv, const bool* mask, void* outv) {
  using acc_t = acc_type<scalar_t>;
  const auto* go = static_cast<const scalar_t*>(gov);
  const auto* g = static_cast<const scalar_t*>(gv);
  auto* out = static_cast<scalar_t*>(outv);
  for_each_chunk(r, [&](int64_t n, int64_t, int64_t b, int64_t e) {
    const acc_t scale = acc_t(2) * static_cast<acc_t>(go[n]);
    acc_t buf[kTile];
    acc_t res[kTile];
    for (int64_t t0 = b; t0 < e; t0 += kTile) {
      const int64_t len = std::min(kTile, e - t0);
      const acc_t* q = load_tile(g + n * r.D + t0, len, buf);
      acc_t* dst;
      if constexpr (kConvert<scalar_t>) {
        dst = res;
      } else {
        dst = out + n * r.D + t0;
      }
      if (mask) {
        const bool* m = mask + n * r.D + t0;
        for (int64_t i = 0; i < len; ++i) dst[i] = select_bits(m[i], scale * q[i]);
      } else {
        for (int64_t i = 0; i < len; ++i) dst[i] = scale * q[i];
      }
      if constexpr (kConvert<scalar_t>) at::vec::convert(res, out + n * r.D + t0, len);
    }
  });
}


// ---------------------------------------------------------------------------------------------
// loss head: per-sample cross-entropy and its cotangent softmax - onehot, and the backward
// ---------------------------------------------------------------------------------------------
// m = max z (NaN wins), s = sum exp(z - m): logsumexp = m + log s. z is the row in acc_t.
// The two parts are kept apart: rounding m + log s at the logits' magnitude (|z| ~ 1e3 gives an
// ulp of 6e-5 in float) would cost that much absolute accuracy in the loss and in every p_k, while
// z_k - m is exact (Sterbenz) for the logits that matter and log s is in [0, log K].
template <typename acc_t>
struct RowLse {
  acc_t m, log_s;
};

template <typename acc_t>
RowLse<acc_t> row_logsumexp(const acc_t* z, int64_t K) {
  using Vec = Vectorized<acc_t>;
  // the max in vector lanes (at::vec::maximum propagates NaN): a scalar loop carried the running max
  // through memory and was 5 ns per logit, 6x the whole softmax of ATen at K = 1000
  acc_t m = z[0];
  int64_t k = 0;
  if (K >= Vec::size()) {
    Vec vmax = Vec::loadu(z);
    for (k = Vec::size(); k + Vec::size() <= K; k += Vec::size()) vmax = at::vec::maximum(vmax, Vec::loadu(z + k));
    m = lane_max(vmax);
  }
  for (; k < K; ++k) m = nan_max(z[k], m);
  const Vec vm(m);
  Vec acc(acc_t(0));
  acc_t tail = 0;
  k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) acc = acc + (Vec::loadu(z + k) - vm).exp();
  for (; k < K; ++k) tail += std::exp(z[k] - m);
  return {m, std::log(static_cast<acc_t>(lane_sum(acc)) + tail)};
}

// p = exp((z - m) - log s) into out
template <typename acc_t>
void row_softmax(const acc_t* z, int64_t K, const RowLse<acc_t>& lse, acc_t* out) {
  using Vec = Vectorized<acc_t>;
  const Vec vm(lse.m), vl(lse.log_s);
  int64_t k = 0;
  for (; k + Vec::size() <= K; k += Vec::size()) ((Vec::loadu(z + k) - vm) - vl).exp().store(out + k);
  for (; k < K; ++k) out[k] = std::exp((z[k] - lse.m) - lse.log_s);
}

template <typename scalar_t>
void ce_forward_impl(const Rows& r, const void* zv, const int64_t* y, void* lossv, void* cotv) {
  using acc_t = acc_type<scalar_t>;
  const auto* z = static_cast<const scalar_t*>(zv);
  auto* loss = static_cast<scalar_t*>(lossv);
  auto* cot = static_cast<scalar_t*>(cotv);
  const int64_t K = r.D;
  at::parallel_for(0, r.N, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    std::vector<acc_t> zb(kConvert<scalar_t> ? static_cast<size_t>(K) : 0), pb(static_cast<size_t>(K));
    for (int64_t n = b; n < e; ++n) {
      const acc_t* row = load_tile(z + n * K, K, zb.data());
      const RowLse<acc_t> lse = row_logsumexp(row, K);
      loss[n] = static_cast<scalar_t>(lse.log_s - (row[y[n]] - lse.m));
      row_softmax(row, K, lse, pb.data());
      pb[y[n]] -= acc_t(1);
      if constexpr (kConvert<scalar_t>) {
        at::vec::convert(pb.data(), cot + n * K, K);
      } else {
        std::copy(pb.begin(), pb.end(), cot + n * K);
      }
    }
  });
}

template <typename scalar_t>
void ce_backward_impl(const Rows& r, const void* gav, const void* gbv, const void* zv, const int64_t* y, void* outv) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const auto* ga = static_cast<const scalar_t*>(gav);
  const auto* gb = static_cast<const scalar_t*>(gbv);
  const auto* z = static_cast<const scalar_t*>(zv);
  auto* out = static_cast<scalar_t*>(outv);
  const int64_t K = r.D;
  at::parallel_for(0, r.N, std::max<int64_t>(1, 4096 / std::max<int64_t>(K, 1)), [&](int64_t b, int64_t e) {
    std::vector<acc_t> zb(kConvert<scalar_t> ? static_cast<size_t>(K) : 0), bb(kConvert<scalar_t> ? static_cast<size_t>(K) : 0);
    std::vector<acc_t> pb(static_cast<size_t>(K)), res(static_cast<size_t>(K));
    for (int64_t n = b; n < e; ++n) {
      const acc_t* row = load_tile(z + n * K, K, zb.data());
      row_softmax(row, K, row_logsumexp(row, K), pb.data());
      const acc_t a = ga ? static_cast<acc_t>(ga[n]) : acc_t(0);
      // grad = p (a + b - <p, b>) - a onehot
      acc_t c = a;
      const acc_t* brow = nullptr;
      if (gb) {
        brow = load_tile(gb + n * K, K, bb.data());
        Vec acc(acc_t(0));
        acc_t tail = 0;
        int64_t k = 0;
        for (; k + Vec::size() <= K; k += Vec::size()) acc = at::vec::fmadd(Vec::loadu(pb.data() + k), Vec::loadu(brow + k), acc);
        for (; k < K; ++k) tail += pb[k] * brow[k];
        c = a - (static_cast<acc_t>(lane_sum(acc)) + tail);
      }
      for (int64_t k = 0; k < K; ++k) res[k] = pb[k] * (c + (brow ? brow[k] : acc_t(0)));
      res[y[n]] -= a;
      if constexpr (kConvert<scalar_t>) {
        at::vec::convert(res.data(), out + n * K, K);
      } else {
        std::copy(res.begin(), res.end(), out + n * K);
      }
    }
  });
}

#define JSIGR_SAMPLE_DISPATCH(t, name, ...)                                              \
  switch (t) {                                                                         \
    case c10::ScalarType::Double: name<double>(__VA_ARGS__); break;                    \
    case c10::ScalarType::Float: name<float>(__VA_ARGS__); break;                      \
    case c10::ScalarType::BFloat16: name<c10::BFloat16>(__VA_ARGS__); break;           \
    case c10::ScalarType::Half: name<c10::Half>(__VA_ARGS__); break;                   \
    default: TORCH_CHECK(false, "jsigr_fast per-sample kernels: unsupported dtype ", t);     \
  }

void gradient_mask(c10::ScalarType t, const Rows& r, const void* g, bool* mask, const Rule& rule) {
  JSIGR_SAMPLE_DISPATCH(t, gradient_mask_impl, r, g, mask, rule)
}
void threshold_mask(c10::ScalarType t, const Rows& r, const void* M, bool* mask, const Rule& rule) {
  JSIGR_SAMPLE_DISPATCH(t, threshold_mask_impl, r, M, mask, rule)
}
void adaptor_mask(c10::ScalarType t, const Rows& r, const void* g, bool* mask, const AdaptorArgs& a,
                  const Rule& rule) {
  JSIGR_SAMPLE_DISPATCH(t, adaptor_mask_impl, r, g, mask, a, rule)
}
void sq_norm(c10::ScalarType t, const Rows& r, const void* g, const bool* mask, void* out) {
  JSIGR_SAMPLE_DISPATCH(t, sq_norm_impl, r, g, mask, out)
}
void sq_norm_backward(c10::ScalarType t, const Rows& r, const void* go, const void* g, const bool* mask,
                      void* out) {
  JSIGR_SAMPLE_DISPATCH(t, sq_norm_backward_impl, r, go, g, mask, out)
}
void ce_forward(c10::ScalarType t, const Rows& r, const void* z, const int64_t* y, void* loss, void* cot) {
  JSIGR_SAMPLE_DISPATCH(t, ce_forward_impl, r, z, y, loss, cot)
}
void ce_backward(c10::ScalarType t, const Rows& r, const void* ga, const void* gb, const void* z, const int64_t* y,
                 void* out) {
  JSIGR_SAMPLE_DISPATCH(t, ce_backward_impl, r, ga, gb, z, y, out)
}
#undef JSIGR_SAMPLE_DISPATCH

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&gradient_mask, &threshold_mask, &adaptor_mask, &sq_norm,
                         &sq_norm_backward, &ce_forward, &ce_backward};
  return k;
}

}  // namespace jsigr_fast::sample_cpu::JSIGR_SAMPLE_ISA
