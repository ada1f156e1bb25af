// CPU kernels of the train-mode batch-norm ops; included once per instruction set by
// batch_norm_cpu_generic.cpp / batch_norm_cpu_avx2.cpp, which define JSIGR_BN_ISA (the namespace)
// and, for AVX2, the at::vec capability macros. No include guard on purpose.
//
// Every op is "reduce, then apply": a few per-channel sums, per-channel coefficients (double), then
// one elementwise pass affine in its inputs. The formulas and their derivation: csrc/README.md.
//
// Layouts. Contiguous NCHW: one channel per task (at::parallel_for over channels); the channel's N
// spans of S elements are reduced and then written while still in cache. Rows (channels-last, or
// S == 1): reductions parallel over rows with per-thread per-channel partial sums, then an
// elementwise pass parallel over rows, vectorized across channels.
//
// Precision. Float data is summed in float vector lanes over at most kTile elements (kRowBlock rows
// in the rows layout) and flushed to double; double data sums in double. bfloat16 / half tiles are
// converted to float on load and rounded once on store.
//
// The lambdas f (reduce) and g (apply) are generic: called with V = Vectorized<acc_t> in the vector
// loop and V = acc_t for tails, as f(const V* in, const V* consts, V* acc) / g(const V* in, const V*
// consts, V* out).
#include <ATen/cpu/vec/vec.h>

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <type_traits>
#include <vector>

#include "batch_norm_cpu.h"

namespace jsigr_fast::bn_cpu::JSIGR_BN_ISA {
namespace {

using at::vec::Vectorized;

constexpr int64_t kTile = 512;     // elements per float partial sum / conversion tile
constexpr int64_t kRowBlock = 64;  // rows per float partial sum in the rows layout

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;

template <typename scalar_t>
constexpr bool kConvert = !std::is_same_v<scalar_t, acc_type<scalar_t>>;

// NI pointers to acc_t data for [p, p + n): the data itself, or a converted copy in buf.
template <int NI, typename scalar_t>
inline std::array<const acc_type<scalar_t>*, NI> load_tile(const std::array<const scalar_t*, NI>& in, int64_t off,
                                                           int64_t n, acc_type<scalar_t> (*buf)[kTile]) {
  std::array<const acc_type<scalar_t>*, NI> p;
  for (int i = 0; i < NI; ++i) {
    if constexpr (kConvert<scalar_t>) {
      at::vec::convert(in[i] + off, buf[i], n);
      p[i] = buf[i];
    } else {
      p[i] = in[i] + off;
    }
  }
  return p;
}

template <typename acc_t>
inline double lane_sum(const Vectorized<acc_t>& v) {
  __at_align__ acc_t lanes[Vectorized<acc_t>::size()];
  v.store(lanes);
  double s = 0;
  for (int64_t i = 0; i < Vectorized<acc_t>::size(); ++i) s += lanes[i];
  return s;
}

// ---------------------------------------------------------------------------------------------
// NCHW: one channel
// ---------------------------------------------------------------------------------------------
// K sums of f over channel c of the NI inputs (each a base pointer of an (N, C, S) tensor).
template <int NI, int NK, int K, typename scalar_t, typename F>
std::array<double, K> channel_reduce(const std::array<const scalar_t*, NI>& in, const Shape& sh, int64_t c,
                                     const std::array<acc_type<scalar_t>, NK>& kc, const F& f) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  std::array<Vec, NK> kv;
  for (int i = 0; i < NK; ++i) kv[i] = Vec(kc[i]);
  std::array<Vec, K> acc;
  std::array<acc_t, K> tail;
  std::array<double, K> total{};
  auto reset = [&] {
    acc.fill(Vec(acc_t(0)));
    tail.fill(acc_t(0));
  };
  auto flush = [&] {
    for (int k = 0; k < K; ++k) total[k] += lane_sum(acc[k]) + static_cast<double>(tail[k]);
    reset();
  };
  reset();
  [[maybe_unused]] acc_t buf[NI][kTile];
  int64_t pending = 0;
  for (int64_t n = 0; n < sh.N; ++n) {
    const int64_t base = (n * sh.C + c) * sh.S;
    for (int64_t t0 = 0; t0 < sh.S; t0 += kTile) {
      const int64_t len = std::min(kTile, sh.S - t0);
      const auto p = load_tile<NI, scalar_t>(in, base + t0, len, buf);
      int64_t d = 0;
      for (; d + Vec::size() <= len; d += Vec::size()) {
        std::array<Vec, NI> v;
        for (int i = 0; i < NI; ++i) v[i] = Vec::loadu(p[i] + d);
        f(v.data(), kv.data(), acc.data());
      }
      for (; d < len; ++d) {
        std::array<acc_t, NI> v;
        for (int i = 0; i < NI; ++i) v[i] = p[i][d];
        f(v.data(), kc.data(), tail.data());
      }
      pending += len;
      if (pending >= kTile) {
        flush();
        pending = 0;
      }
    }
  }
  flush();
  return total;
}

// out[o] = g(in)[o] over channel c.
template <int NI, int NK, int NO, typename scalar_t, typename G>
void channel_apply(const std::array<const scalar_t*, NI>& in, const std::array<scalar_t*, NO>& out, const Shape& sh,
                   int64_t c, const std::array<acc_type<scalar_t>, NK>& kc, const G& g) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  std::array<Vec, NK> kv;
  for (int i = 0; i < NK; ++i) kv[i] = Vec(kc[i]);
  [[maybe_unused]] acc_t ibuf[NI][kTile];
  [[maybe_unused]] acc_t obuf[NO][kTile];
  for (int64_t n = 0; n < sh.N; ++n) {
    const int64_t base = (n * sh.C + c) * sh.S;
    for (int64_t t0 = 0; t0 < sh.S; t0 += kTile) {
      const int64_t len = std::min(kTile, sh.S - t0);
      const auto p = load_tile<NI, scalar_t>(in, base + t0, len, ibuf);
      std::array<acc_t*, NO> q;
      for (int o = 0; o < NO; ++o) {
        if constexpr (kConvert<scalar_t>) {
          q[o] = obuf[o];
        } else {
          q[o] = out[o] + base + t0;
        }
      }
      int64_t d = 0;
      for (; d + Vec::size() <= len; d += Vec::size()) {
        std::array<Vec, NI> v;
        std::array<Vec, NO> r;
        for (int i = 0; i < NI; ++i) v[i] = Vec::loadu(p[i] + d);
        g(v.data(), kv.data(), r.data());
        for (int o = 0; o < NO; ++o) r[o].store(q[o] + d);
      }
      for (; d < len; ++d) {
        std::array<acc_t, NI> v;
        std::array<acc_t, NO> r;
        for (int i = 0; i < NI; ++i) v[i] = p[i][d];
        g(v.data(), kc.data(), r.data());
        for (int o = 0; o < NO; ++o) q[o][d] = r[o];
      }
      if constexpr (kConvert<scalar_t>) {
        for (int o = 0; o < NO; ++o) at::vec::convert(obuf[o], out[o] + base + t0, len);
      }
    }
  }
}

// body(c) for every channel, in parallel.
template <typename Body>
void for_each_channel(const Shape& sh, const Body& body) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(sh.M(), 1));
  at::parallel_for(0, sh.C, grain, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) body(c);
  });
}

// ---------------------------------------------------------------------------------------------
// rows: (R, C) row-major, constants per channel from arrays
// ---------------------------------------------------------------------------------------------
inline int64_t row_grain(int64_t C) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(C, 1)); }

// sums[k * C + c], parallel over rows (per-thread partials, added in thread order).
template <int NI, int NK, int K, typename scalar_t, typename F>
std::vector<double> rows_reduce(const std::array<const scalar_t*, NI>& in, int64_t R, int64_t C,
                                const std::array<const acc_type<scalar_t>*, NK>& kc, const F& f) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const int nthreads = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nthreads) * K * C, 0.0);
  at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    double* out = partial.data() + static_cast<size_t>(at::get_thread_num()) * K * C;
    std::vector<acc_t> accv(static_cast<size_t>(K * C));
    acc_t* accf = accv.data();
    [[maybe_unused]] acc_t buf[NI][kTile];
    for (int64_t rb = r0; rb < r1; rb += kRowBlock) {
      std::fill(accv.begin(), accv.end(), acc_t(0));
      const int64_t re = std::min(rb + kRowBlock, r1);
      for (int64_t r = rb; r < re; ++r) {
        for (int64_t j0 = 0; j0 < C; j0 += kTile) {
          const int64_t n = std::min(kTile, C - j0);
          const auto p = load_tile<NI, scalar_t>(in, r * C + j0, n, buf);
          int64_t j = 0;
          for (; j + Vec::size() <= n; j += Vec::size()) {
            std::array<Vec, NI> v;
            std::array<Vec, NK> k;
            std::array<Vec, K> a;
            for (int i = 0; i < NI; ++i) v[i] = Vec::loadu(p[i] + j);
            for (int i = 0; i < NK; ++i) k[i] = Vec::loadu(kc[i] + j0 + j);
            for (int s = 0; s < K; ++s) a[s] = Vec::loadu(accf + s * C + j0 + j);
            f(v.data(), k.data(), a.data());
            for (int s = 0; s < K; ++s) a[s].store(accf + s * C + j0 + j);
          }
          for (; j < n; ++j) {
            std::array<acc_t, NI> v;
            std::array<acc_t, NK> k;
            std::array<acc_t, K> a;
            for (int i = 0; i < NI; ++i) v[i] = p[i][j];
            for (int i = 0; i < NK; ++i) k[i] = kc[i][j0 + j];
            for (int s = 0; s < K; ++s) a[s] = accf[s * C + j0 + j];
            f(v.data(), k.data(), a.data());
            for (int s = 0; s < K; ++s) accf[s * C + j0 + j] = a[s];
          }
        }
      }
      for (int64_t i = 0; i < K * C; ++i) out[i] += static_cast<double>(accf[i]);
    }
  });
  std::vector<double> sums(static_cast<size_t>(K * C), 0.0);
  for (int t = 0; t < nthreads; ++t)
    for (int64_t i = 0; i < K * C; ++i) sums[i] += partial[static_cast<size_t>(t) * K * C + i];
  return sums;
}

template <int NI, int NK, int NO, typename scalar_t, typename G>
void rows_apply(const std::array<const scalar_t*, NI>& in, const std::array<scalar_t*, NO>& out, int64_t R, int64_t C,
                const std::array<const acc_type<scalar_t>*, NK>& kc, const G& g) {
  using acc_t = acc_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  at::parallel_for(0, R, row_grain(C), [&](int64_t r0, int64_t r1) {
    [[maybe_unused]] acc_t ibuf[NI][kTile];
    [[maybe_unused]] acc_t obuf[NO][kTile];
    for (int64_t r = r0; r < r1; ++r) {
      for (int64_t j0 = 0; j0 < C; j0 += kTile) {
        const int64_t n = std::min(kTile, C - j0);
        const auto p = load_tile<NI, scalar_t>(in, r * C + j0, n, ibuf);
        std::array<acc_t*, NO> q;
        for (int o = 0; o < NO; ++o) {
          if constexpr (kConvert<scalar_t>) {
            q[o] = obuf[o];
          } else {
            q[o] = out[o] + r * C + j0;
          }
        }
        int64_t j = 0;
        for (; j + Vec::size() <= n; j += Vec::size()) {
          std::array<Vec, NI> v;
          std::array<Vec, NK> k;
          std::array<Vec, NO> res;
          for (int i = 0; i < NI; ++i) v[i] = Vec::loadu(p[i] + j);
          for (int i = 0; i < NK; ++i) k[i] = Vec::loadu(kc[i] + j0 + j);
          g(v.data(), k.data(), res.data());
          for (int o = 0; o < NO; ++o) res[o].store(q[o] + j);
        }
        for (; j < n; ++j) {
          std::array<acc_t, NI> v;
          std::array<acc_t, NK> k;
          std::array<acc_t, NO> res;
          for (int i = 0; i < NI; ++i) v[i] = p[i][j];
          for (int i = 0; i < NK; ++i) k[i] = kc[i][j0 + j];
          g(v.data(), k.data(), res.data());
          for (int o = 0; o < NO; ++o) q[o][j] = res[o];
        }
        if constexpr (kConvert<scalar_t>) {
          for (int o = 0; o < NO; ++o) at::vec::convert(obuf[o], out[o] + r * C + j0, n);
        }
      }
    }
  });
}

// Transposes nk per-channel coefficient sets k[c][i] (computed by coef) into arrays kt[i * C + c].
template <int NK, typename acc_t, typename Coef>
std::vector<acc_t> channel_coefficients(int64_t C, const Coef& coef) {
  std::vector<acc_t> kt(static_cast<size_t>(NK * C));
  for (int64_t c = 0; c < C; ++c) {
    const std::array<acc_t, NK> k = coef(c);
    for (int i = 0; i < NK; ++i) kt[i * C + c] = k[i];
  }
  return kt;
}

template <int NK, typename acc_t>
std::array<const acc_t*, NK> columns(const std::vector<acc_t>& kt, int64_t C) {
  std::array<const acc_t*, NK> p;
  for (int i = 0; i < NK; ++i) p[i] = kt.data() + i * C;
  return p;
}

// ---------------------------------------------------------------------------------------------
// forward: mean, invstd (two-pass, shifted by the rounded mean so var is exact), y
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void forward_impl(const Shape& sh, const ForwardArgs& a) {
  using acc_t = acc_type<scalar_t>;
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* y = static_cast<scalar_t*>(a.y);
  auto* mean = static_cast<acc_t*>(a.mean);
  auto* invstd = static_cast<acc_t*>(a.invstd);
  const auto* w = static_cast<const acc_t*>(a.weight);
  const auto* b = static_cast<const acc_t*>(a.bias);
  const double M = static_cast<double>(sh.M());
  auto f_sum = [](const auto* v, const auto*, auto* acc) { acc[0] = acc[0] + v[0]; };
  auto f_dev = [](const auto* v, const auto* k, auto* acc) {
    const auto d = v[0] - k[0];
    acc[0] = acc[0] + d;
    acc[1] = acc[1] + d * d;
  };
  auto g_y = [](const auto* v, const auto* k, auto* o) { o[0] = (v[0] - k[0]) * k[1] + k[2]; };
  // var = mean((x - k)^2) - mean(x - k)^2 is exact for any shift k; k = the rounded mean.
  auto stats = [&](int64_t c, acc_t k, double dev1, double dev2) {
    const double shift = dev1 / M;
    const double var = std::max(dev2 / M - shift * shift, 0.0);
    mean[c] = static_cast<acc_t>(static_cast<double>(k) + shift);
    invstd[c] = static_cast<acc_t>(1.0 / std::sqrt(var + a.eps));
  };
  if (!sh.rows) {
    for_each_channel(sh, [&](int64_t c) {
      const auto s1 = channel_reduce<1, 0, 1, scalar_t>({x}, sh, c, {}, f_sum);
      const acc_t k = static_cast<acc_t>(s1[0] / M);
      const auto dev = channel_reduce<1, 1, 2, scalar_t>({x}, sh, c, {k}, f_dev);
      stats(c, k, dev[0], dev[1]);
      const acc_t scale = w[c] * invstd[c];
      channel_apply<1, 3, 1, scalar_t>({x}, {y}, sh, c, {mean[c], scale, b[c]}, g_y);
    });
  } else {
    const int64_t R = sh.M(), C = sh.C;
    const auto s1 = rows_reduce<1, 0, 1, scalar_t>({x}, R, C, {}, f_sum);
    std::vector<acc_t> k(C);
    for (int64_t c = 0; c < C; ++c) k[c] = static_cast<acc_t>(s1[c] / M);
    const auto dev = rows_reduce<1, 1, 2, scalar_t>({x}, R, C, {k.data()}, f_dev);
    const auto kt = channel_coefficients<3, acc_t>(C, [&](int64_t c) {
      stats(c, k[c], dev[c], dev[C + c]);
      return std::array<acc_t, 3>{mean[c], w[c] * invstd[c], b[c]};
    });
    rows_apply<1, 3, 1, scalar_t>({x}, {y}, R, C, columns<3>(kt, C), g_y);
  }
}

// ---------------------------------------------------------------------------------------------
// backward: grad_x = w s gy + s (x - mean) (-w s B - q s^2) / M + (p - w s A) / M
//           grad_weight = B = s sum gy (x - mean), grad_bias = A = sum gy
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void backward_impl(const Shape& sh, const BackwardArgs& a) {
  using acc_t = acc_type<scalar_t>;
  const auto* gy = static_cast<const scalar_t*>(a.grad_y);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* gx = static_cast<scalar_t*>(a.grad_x);
  auto* gw = static_cast<acc_t*>(a.grad_weight);
  auto* gb = static_cast<acc_t*>(a.grad_bias);
  const auto *w = static_cast<const acc_t*>(a.weight), *mu = static_cast<const acc_t*>(a.mean);
  const auto *is = static_cast<const acc_t*>(a.invstd), *p = static_cast<const acc_t*>(a.grad_mean);
  const auto* q = static_cast<const acc_t*>(a.grad_invstd);
  const double M = static_cast<double>(sh.M());
  const bool has_gy = gy != nullptr;
  // (gy, x), const mean -> A, B1 = sum gy (x - mean)
  auto f = [](const auto* v, const auto* k, auto* acc) {
    acc[0] = acc[0] + v[0];
    acc[1] = acc[1] + v[0] * (v[1] - k[0]);
  };
  // (gy, x), k = (w s, mean, c2, c3): grad_x = k0 gy + (x - k1) k2 + k3
  auto g = [](const auto* v, const auto* k, auto* o) { o[0] = v[0] * k[0] + (v[1] - k[1]) * k[2] + k[3]; };
  // (x), k = (mean, c2, c3): grad_x = (x - k0) k1 + k2
  auto g_nogy = [](const auto* v, const auto* k, auto* o) { o[0] = (v[0] - k[0]) * k[1] + k[2]; };
  auto coef = [&](int64_t c, double A, double B1) {
    const double s = is[c], wc = w[c];
    const double B = s * B1;
    gw[c] = static_cast<acc_t>(B);
    gb[c] = static_cast<acc_t>(A);
    return std::array<acc_t, 4>{static_cast<acc_t>(wc * s), mu[c],
                                static_cast<acc_t>(s * (-wc * s * B - double(q[c]) * s * s) / M),
                                static_cast<acc_t>((double(p[c]) - wc * s * A) / M)};
  };
  if (!sh.rows) {
    for_each_channel(sh, [&](int64_t c) {
      if (has_gy) {
        const auto sums = channel_reduce<2, 1, 2, scalar_t>({gy, x}, sh, c, {mu[c]}, f);
        channel_apply<2, 4, 1, scalar_t>({gy, x}, {gx}, sh, c, coef(c, sums[0], sums[1]), g);
      } else {
        const auto k = coef(c, 0, 0);
        channel_apply<1, 3, 1, scalar_t>({x}, {gx}, sh, c, {k[1], k[2], k[3]}, g_nogy);
      }
    });
  } else {
    const int64_t R = sh.M(), C = sh.C;
    if (has_gy) {
      const auto sums = rows_reduce<2, 1, 2, scalar_t>({gy, x}, R, C, {mu}, f);
      const auto kt = channel_coefficients<4, acc_t>(C, [&](int64_t c) { return coef(c, sums[c], sums[C + c]); });
      rows_apply<2, 4, 1, scalar_t>({gy, x}, {gx}, R, C, columns<4>(kt, C), g);
    } else {
      const auto kt = channel_coefficients<4, acc_t>(C, [&](int64_t c) { return coef(c, 0, 0); });
      const auto cols = columns<4>(kt, C);
      rows_apply<1, 3, 1, scalar_t>({x}, {gx}, R, C, {cols[1], cols[2], cols[3]}, g_nogy);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// double backward from the backward's outputs (batch_norm_double_backward_from_grad_x): grad_y is
// the unique solution of the backward, gy = ra gx + rb (x - mean) + rc with
//   ra = 1 / (w s),  rb = s B / M + q s^2 / (w M),  rc = A / M - p / (w s M),
// A = grad_bias, B = grad_weight (so B1 = B / s). gy enters the double backward (its sums and
// coefficients below) linearly, so it is never formed: Sugy = ra Sugx + rb Sux1 + rc Su, and
// d_x = f1 gy + f2 u becomes f1 ra gx + f2 u + f1 rb (x - mean) + f1 rc. Same passes and traffic as with
// grad_y; the other sums, A and B1, are the backward's own outputs.
// ---------------------------------------------------------------------------------------------
template <typename scalar_t, typename CoefD>
void double_backward_from_grad_x(const Shape& sh, const DoubleBackwardArgs& a, const CoefD& coef_d) {
  using acc_t = acc_type<scalar_t>;
  const auto* u = static_cast<const scalar_t*>(a.gg_x);
  const auto* gx = static_cast<const scalar_t*>(a.grad_y);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* dgy = static_cast<scalar_t*>(a.d_grad_y);
  auto* dx = static_cast<scalar_t*>(a.d_x);
  const auto *w = static_cast<const acc_t*>(a.weight), *mu = static_cast<const acc_t*>(a.mean);
  const auto *is = static_cast<const acc_t*>(a.invstd), *q = static_cast<const acc_t*>(a.grad_invstd);
  const auto* gw = static_cast<const acc_t*>(a.rebuild_grad_weight);
  const auto* gb = static_cast<const acc_t*>(a.rebuild_grad_bias);
  const auto* p = static_cast<const acc_t*>(a.rebuild_grad_mean);
  const double M = static_cast<double>(sh.M());
  const bool has_u = u != nullptr;
  // (u, gx, x), const mean -> Su, Su(x - mean), Sugx
  auto f = [](const auto* v, const auto* k, auto* acc) {
    acc[0] = acc[0] + v[0];
    acc[1] = acc[1] + v[0] * (v[2] - k[0]);
    acc[2] = acc[2] + v[0] * v[1];
  };
  // (u, gx, x), k = (e1, mean, e2, e3, f1 ra, f2, f1 rb, f1 rc)
  auto g = [](const auto* v, const auto* k, auto* o) {
    const auto xc = v[2] - k[1];
    o[0] = v[0] * k[0] + xc * k[2] + k[3];
    o[1] = v[1] * k[4] + v[0] * k[5] + xc * k[6] + k[7];
  };
  // (gx, x), the same k (k0, k5 unused)
  auto g_nou = [](const auto* v, const auto* k, auto* o) {
    const auto xc = v[1] - k[1];
    o[0] = xc * k[2] + k[3];
    o[1] = v[0] * k[4] + xc * k[6] + k[7];
  };
  auto coef = [&](int64_t c, double Su, double Sux1, double Sugx) {
    const double s = is[c], wc = w[c], A = gb[c], B = gw[c];
    const double ra = 1.0 / (wc * s), rb = s * B / M + double(q[c]) * s * s / (wc * M);
    const double rc = A / M - double(p[c]) / (wc * s * M);
    const auto k = coef_d(c, Su, Sux1, ra * Sugx + rb * Sux1 + rc * Su, A, B / s);
    return std::array<acc_t, 8>{static_cast<acc_t>(k[0]),      static_cast<acc_t>(k[1]),
                                static_cast<acc_t>(k[2]),      static_cast<acc_t>(k[3]),
                                static_cast<acc_t>(k[4] * ra), static_cast<acc_t>(k[5]),
                                static_cast<acc_t>(k[4] * rb), static_cast<acc_t>(k[4] * rc)};
  };
  if (!sh.rows) {
    for_each_channel(sh, [&](int64_t c) {
      if (has_u) {
        const auto s = channel_reduce<3, 1, 3, scalar_t>({u, gx, x}, sh, c, {mu[c]}, f);
        channel_apply<3, 8, 2, scalar_t>({u, gx, x}, {dgy, dx}, sh, c, coef(c, s[0], s[1], s[2]), g);
      } else {
        channel_apply<2, 8, 2, scalar_t>({gx, x}, {dgy, dx}, sh, c, coef(c, 0, 0, 0), g_nou);
      }
    });
  } else {
    const int64_t R = sh.M(), C = sh.C;
    std::vector<double> s(static_cast<size_t>(3 * C), 0.0);
    if (has_u) s = rows_reduce<3, 1, 3, scalar_t>({u, gx, x}, R, C, {mu}, f);
    const auto kt =
        channel_coefficients<8, acc_t>(C, [&](int64_t c) { return coef(c, s[c], s[C + c], s[2 * C + c]); });
    if (has_u) {
      rows_apply<3, 8, 2, scalar_t>({u, gx, x}, {dgy, dx}, R, C, columns<8>(kt, C), g);
    } else {
      rows_apply<2, 8, 2, scalar_t>({gx, x}, {dgy, dx}, R, C, columns<8>(kt, C), g_nou);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// double backward (csrc/README.md):
//   Su = sum u, Sux = s sum u (x - mean), Sugy = sum u gy, A = sum gy, B1 = sum gy (x - mean), B = s B1
//   E = Sugy - A Su / M - B Sux / M
//   d_grad_y = w s u + s (alpha - w s Sux / M) (x - mean) + beta - w s Su / M
//   d_x      = (s alpha - w s^2 Sux / M) gy - (w s^2 B + q s^3) / M u
//   d_weight = s E,  d_grad_mean = Su / M,  d_grad_invstd = -s^2 Sux / M
//   d_mean   = -s [alpha A - w s (A Sux + B Su) / M - q s^2 Su / M]
//   d_invstd = w E - 3 q s Sux / M - 2 w B Sux / M + alpha B1
// ---------------------------------------------------------------------------------------------
template <typename scalar_t>
void double_backward_impl(const Shape& sh, const DoubleBackwardArgs& a) {
  using acc_t = acc_type<scalar_t>;
  const auto* u = static_cast<const scalar_t*>(a.gg_x);
  const auto* gy = static_cast<const scalar_t*>(a.grad_y);
  const auto* x = static_cast<const scalar_t*>(a.x);
  auto* dgy = static_cast<scalar_t*>(a.d_grad_y);
  auto* dx = static_cast<scalar_t*>(a.d_x);
  const auto *al = static_cast<const acc_t*>(a.gg_weight), *be = static_cast<const acc_t*>(a.gg_bias);
  const auto *w = static_cast<const acc_t*>(a.weight), *mu = static_cast<const acc_t*>(a.mean);
  const auto *is = static_cast<const acc_t*>(a.invstd), *q = static_cast<const acc_t*>(a.grad_invstd);
  auto *dw = static_cast<acc_t*>(a.d_weight), *dmean = static_cast<acc_t*>(a.d_mean);
  auto *dis = static_cast<acc_t*>(a.d_invstd), *dgm = static_cast<acc_t*>(a.d_grad_mean);
  auto* dgs = static_cast<acc_t*>(a.d_grad_invstd);
  const double M = static_cast<double>(sh.M());
  const bool has_u = u != nullptr;
  // (u, gy, x), const mean -> Su, Su(x - mean), Sugy, A, B1
  auto f_u = [](const auto* v, const auto* k, auto* acc) {
    const auto xc = v[2] - k[0];
    acc[0] = acc[0] + v[0];
    acc[1] = acc[1] + v[0] * xc;
    acc[2] = acc[2] + v[0] * v[1];
    acc[3] = acc[3] + v[1];
    acc[4] = acc[4] + v[1] * xc;
  };
  // (gy, x), const mean -> A, B1
  auto f_nou = [](const auto* v, const auto* k, auto* acc) {
    acc[0] = acc[0] + v[0];
    acc[1] = acc[1] + v[0] * (v[1] - k[0]);
  };
  // (u, gy, x), k = (e1, mean, e2, e3, f1, f2): d_gy = e1 u + e2 (x - mean) + e3, d_x = f1 gy + f2 u
  auto g_u = [](const auto* v, const auto* k, auto* o) {
    o[0] = v[0] * k[0] + (v[2] - k[1]) * k[2] + k[3];
    o[1] = v[1] * k[4] + v[0] * k[5];
  };
  // (gy, x), k = (mean, e2, e3, f1): d_gy = e2 (x - mean) + e3, d_x = f1 gy
  auto g_nou = [](const auto* v, const auto* k, auto* o) {
    o[0] = (v[1] - k[0]) * k[1] + k[2];
    o[1] = v[0] * k[3];
  };
  // the coefficients in double; writes the five [C] outputs
  auto coef_d = [&](int64_t c, double Su, double Sux1, double Sugy, double A, double B1) {
    const double s = is[c], wc = w[c], alc = al[c], bec = be[c], qc = q[c];
    const double Sux = s * Sux1, B = s * B1;
    const double E = Sugy - A * Su / M - B * Sux / M;
    dw[c] = static_cast<acc_t>(s * E);
    dgm[c] = static_cast<acc_t>(Su / M);
    dgs[c] = static_cast<acc_t>(-s * s * Sux / M);
    const double sum_h = alc * A - wc * s * (A * Sux + B * Su) / M - qc * s * s * Su / M;
    dmean[c] = static_cast<acc_t>(-s * sum_h);
    dis[c] = static_cast<acc_t>(wc * E - 3 * qc * s * Sux / M - 2 * wc * B * Sux / M + alc * B1);
    return std::array<double, 6>{wc * s,
                                 static_cast<double>(mu[c]),
                                 s * (alc - wc * s * Sux / M),
                                 bec - wc * s * Su / M,
                                 s * alc - wc * s * s * Sux / M,
                                 -(wc * s * s * B + qc * s * s * s) / M};
  };
  auto coef = [&](int64_t c, double Su, double Sux1, double Sugy, double A, double B1) {
    const auto k = coef_d(c, Su, Sux1, Sugy, A, B1);
    std::array<acc_t, 6> r;
    for (int i = 0; i < 6; ++i) r[i] = static_cast<acc_t>(k[i]);
    return r;
  };
  auto drop_u = [](const std::array<acc_t, 6>& k) { return std::array<acc_t, 4>{k[1], k[2], k[3], k[4]}; };
  if (a.rebuild_grad_weight != nullptr) {
    double_backward_from_grad_x<scalar_t>(sh, a, coef_d);
    return;
  }
  if (!sh.rows) {
    for_each_channel(sh, [&](int64_t c) {
      if (has_u) {
        const auto s = channel_reduce<3, 1, 5, scalar_t>({u, gy, x}, sh, c, {mu[c]}, f_u);
        channel_apply<3, 6, 2, scalar_t>({u, gy, x}, {dgy, dx}, sh, c, coef(c, s[0], s[1], s[2], s[3], s[4]), g_u);
      } else {
        const auto s = channel_reduce<2, 1, 2, scalar_t>({gy, x}, sh, c, {mu[c]}, f_nou);
        channel_apply<2, 4, 2, scalar_t>({gy, x}, {dgy, dx}, sh, c, drop_u(coef(c, 0, 0, 0, s[0], s[1])), g_nou);
      }
    });
  } else {
    const int64_t R = sh.M(), C = sh.C;
    if (has_u) {
      const auto s = rows_reduce<3, 1, 5, scalar_t>({u, gy, x}, R, C, {mu}, f_u);
      const auto kt = channel_coefficients<6, acc_t>(
          C, [&](int64_t c) { return coef(c, s[c], s[C + c], s[2 * C + c], s[3 * C + c], s[4 * C + c]); });
      rows_apply<3, 6, 2, scalar_t>({u, gy, x}, {dgy, dx}, R, C, columns<6>(kt, C), g_u);
    } else {
      const auto s = rows_reduce<2, 1, 2, scalar_t>({gy, x}, R, C, {mu}, f_nou);
      const auto kt = channel_coefficients<4, acc_t>(
          C, [&](int64_t c) { return drop_u(coef(c, 0, 0, 0, s[c], s[C + c])); });
      rows_apply<2, 4, 2, scalar_t>({gy, x}, {dgy, dx}, R, C, columns<4>(kt, C), g_nou);
    }
  }
}

void forward(c10::ScalarType t, const Shape& sh, const ForwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "batch_norm_train_cpu",
                                  [&] { forward_impl<scalar_t>(sh, a); });
}

void backward(c10::ScalarType t, const Shape& sh, const BackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "batch_norm_backward_cpu",
                                  [&] { backward_impl<scalar_t>(sh, a); });
}

void double_backward(c10::ScalarType t, const Shape& sh, const DoubleBackwardArgs& a) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "batch_norm_double_backward_cpu",
                                  [&] { double_backward_impl<scalar_t>(sh, a); });
}

}  // namespace

const Kernels& kernels() {
  static const Kernels k{&forward, &backward, &double_backward};
  return k;
}

}  // namespace jsigr_fast::bn_cpu::JSIGR_BN_ISA
