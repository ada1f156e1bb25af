// CUDA kernels of train-mode batch norm and its first and second derivatives. Same ops, formulas
// and layout rules as the CPU version (csrc/batch_norm.cpp, csrc/batch_norm_kernels.h; derivation
// in csrc/README.md). Every op is three launches:
//
//   1. reduce:   per-channel partial sums, grid (channels or channel tiles) x (splits of the channel),
//                float (double for double data) per thread, double across the block, one partial per
//                block in a [splits, K, C] double workspace (deterministic: no atomics);
//   2. finalize: one thread per channel adds the partials in double, writes the [C] outputs and the
//                per-channel coefficients of the elementwise pass;
//   3. apply:    one elementwise pass over x's elements, affine in its inputs.
//
// The forward needs two reductions (mean, then the variance shifted by the mean: exact whatever the
// magnitude of the mean). Contiguous NCHW tensors are reduced one channel per blockIdx.x; channels-last
// (and (N, C) / spatial 1x1) tensors as rows of C, a warp across 32 channels so loads coalesce.
//
// First run on a GPU (H200) 2026-11-23: exact against the reference (bench/results/
// gpu_session_h200_2026-11-23.md); the double backward 12-15x faster than ATen's, the forward and backward
// mostly slower than ATen's at ResNet-20's sizes (0.5-8 MB, where the three launches per op and the
// workspace dominate; bench/results/bn_cuda_float32.md), hence fused.FIRST_ORDER_ATEN_BN on CUDA.
// CI (no GPU) compiles this file with nvcc and executes its kernels in the CUDA-on-CPU emulator
// (tests/test_cuda_emulated.py); bench/bench_bn.py --device cuda and the `-m gpu` tests of
// tests/test_bn_ops.py are what a GPU session runs first.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10 stream/guard headers rather than ATen/cuda/CUDAContext.h (which pulls in cuBLAS/cuSPARSE).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>
#include <utility>

#include "../memory_format.h"

namespace jsigr_fast {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int kRowsY = 8;  // rows layout: block is 32 channels x kRowsY rows

template <typename scalar_t, int NI>
struct Inputs {
  const scalar_t* p[NI];
};

template <typename scalar_t, int NO>
struct Outputs {
  scalar_t* p[NO];
};

// ---------------------------------------------------------------------------------------------
// per-op functors: reduce terms (f), elementwise outputs (g); acc_t is float or double
// ---------------------------------------------------------------------------------------------
// forward pass 1: sum x
struct SumX {
  static constexpr int NI = 1, NK = 0, K = 1;
  template <typename A>
  __device__ void operator()(const A* v, const A*, A* acc) const { acc[0] += v[0]; }
};
// forward pass 2: sum (x - k), sum (x - k)^2, k = rounded mean
struct DevX {
  static constexpr int NI = 1, NK = 1, K = 2;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* acc) const {
    const A d = v[0] - k[0];
    acc[0] += d;
    acc[1] += d * d;
  }
};
// backward / double backward without u: (gy, x) -> sum gy, sum gy (x - mean)
struct GySums {
  static constexpr int NI = 2, NK = 1, K = 2;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* acc) const {
    acc[0] += v[0];
    acc[1] += v[0] * (v[1] - k[0]);
  }
};
// double backward with u: (u, gy, x) -> Su, Su(x - mean), Sugy, A, B1
struct DbwSums {
  static constexpr int NI = 3, NK = 1, K = 5;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* acc) const {
    const A xc = v[2] - k[0];
    acc[0] += v[0];
    acc[1] += v[0] * xc;
    acc[2] += v[0] * v[1];
    acc[3] += v[1];
    acc[4] += v[1] * xc;
  }
};
// double backward from grad_x with u: (u, gx, x) -> Su, Su(x - mean), Sugx
struct DbwGxSums {
  static constexpr int NI = 3, NK = 1, K = 3;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* acc) const {
    acc[0] += v[0];
    acc[1] += v[0] * (v[2] - k[0]);
    acc[2] += v[0] * v[1];
  }
};

// y = (x - k0) k1 + k2
struct ApplyY {
  static constexpr int NI = 1, NK = 3, NO = 1;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* o) const { o[0] = (v[0] - k[0]) * k[1] + k[2]; }
};
// grad_x = k0 gy + (x - k1) k2 + k3
struct ApplyGx {
  static constexpr int NI = 2, NK = 4, NO = 1;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* o) const { o[0] = v[0] * k[0] + (v[1] - k[1]) * k[2] + k[3]; }
};
// grad_x without grad_y: (x - k1) k2 + k3 (same coefficient layout as ApplyGx)
struct ApplyGxNoGy {
  static constexpr int NI = 1, NK = 4, NO = 1;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* o) const { o[0] = (v[0] - k[1]) * k[2] + k[3]; }
};
// (u, gy, x): d_gy = k0 u + (x - k1) k2 + k3, d_x = k4 gy + k5 u
struct ApplyDbw {
  static constexpr int NI = 3, NK = 6, NO = 2;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* o) const {
    o[0] = v[0] * k[0] + (v[2] - k[1]) * k[2] + k[3];
    o[1] = v[1] * k[4] + v[0] * k[5];
  }
};
// (gy, x): d_gy = (x - k1) k2 + k3, d_x = k4 gy (same coefficient layout as ApplyDbw)
struct ApplyDbwNoU {
  static constexpr int NI = 2, NK = 6, NO = 2;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* o) const {
    o[0] = (v[1] - k[1]) * k[2] + k[3];
    o[1] = v[0] * k[4];
  }
};
// from grad_x (grad_y rebuilt, never formed), (u, gx, x): d_gy = k0 u + (x - k1) k2 + k3,
// d_x = k4 gx + k5 u + (x - k1) k6 + k7
struct ApplyDbwGx {
  static constexpr int NI = 3, NK = 8, NO = 2;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* o) const {
    const A xc = v[2] - k[1];
    o[0] = v[0] * k[0] + xc * k[2] + k[3];
    o[1] = v[1] * k[4] + v[0] * k[5] + xc * k[6] + k[7];
  }
};
// (gx, x): the same without u
struct ApplyDbwGxNoU {
  static constexpr int NI = 2, NK = 8, NO = 2;
  template <typename A>
  __device__ void operator()(const A* v, const A* k, A* o) const {
    const A xc = v[1] - k[1];
    o[0] = xc * k[2] + k[3];
    o[1] = v[0] * k[4] + xc * k[6] + k[7];
  }
};

// ---------------------------------------------------------------------------------------------
// reduce kernels
// ---------------------------------------------------------------------------------------------
// Sum of K doubles across the block (blockDim.x * blockDim.y threads, a multiple of 32); the result
// is valid in thread 0.
template <int K>
__device__ void block_sum(double (&v)[K]) {
  __shared__ double warp_sums[K][32];
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int lane = tid % 32, warp = tid / 32, nwarps = (blockDim.x * blockDim.y) / 32;
#pragma unroll
  for (int k = 0; k < K; ++k) {
    for (int off = 16; off > 0; off >>= 1) v[k] += __shfl_down_sync(0xffffffff, v[k], off);
  }
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) warp_sums[k][warp] = v[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) {
      double s = lane < nwarps ? warp_sums[k][lane] : 0.0;
      for (int off = 16; off > 0; off >>= 1) s += __shfl_down_sync(0xffffffff, s, off);
      v[k] = s;
    }
  }
}

// NCHW: channel c = blockIdx.x, split = blockIdx.y of gridDim.y; partial[split][k][c].
// in: NI tensors (N, C, S) contiguous; kc: [NK][C] acc_t.
template <typename scalar_t, typename F>
__global__ void reduce_nchw_kernel(Inputs<scalar_t, F::NI> in, const at::opmath_type<scalar_t>* __restrict__ kc,
                                   double* __restrict__ partial, int64_t N, int64_t C, int64_t S, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t c = blockIdx.x;
  acc_t k[F::NK > 0 ? F::NK : 1];
#pragma unroll
  for (int i = 0; i < F::NK; ++i) k[i] = kc[i * C + c];
  acc_t acc[F::K];
#pragma unroll
  for (int s = 0; s < F::K; ++s) acc[s] = acc_t(0);
  const int64_t M = N * S;
  for (int64_t m = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; m < M; m += int64_t(gridDim.y) * blockDim.x) {
    const int64_t n = m / S, s = m - n * S;
    const int64_t off = (n * C + c) * S + s;
    acc_t v[F::NI];
#pragma unroll
    for (int i = 0; i < F::NI; ++i) v[i] = static_cast<acc_t>(in.p[i][off]);
    f(v, k, acc);
  }
  double d[F::K];
#pragma unroll
  for (int s = 0; s < F::K; ++s) d[s] = static_cast<double>(acc[s]);
  block_sum<F::K>(d);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int s = 0; s < F::K; ++s) partial[(int64_t(blockIdx.y) * F::K + s) * C + c] = d[s];
  }
}

// rows (R, C): channels c = blockIdx.x * 32 + threadIdx.x, rows strided by gridDim.y * kRowsY.
template <typename scalar_t, typename F>
__global__ void reduce_rows_kernel(Inputs<scalar_t, F::NI> in, const at::opmath_type<scalar_t>* __restrict__ kc,
                                   double* __restrict__ partial, int64_t R, int64_t C, F f) {
  using acc_t = at::opmath_type<scalar_t>;
  __shared__ double tile[F::K][kRowsY][32];
  const int64_t c = int64_t(blockIdx.x) * 32 + threadIdx.x;
  acc_t acc[F::K];
#pragma unroll
  for (int s = 0; s < F::K; ++s) acc[s] = acc_t(0);
  if (c < C) {
    acc_t k[F::NK > 0 ? F::NK : 1];
#pragma unroll
    for (int i = 0; i < F::NK; ++i) k[i] = kc[i * C + c];
    for (int64_t r = int64_t(blockIdx.y) * kRowsY + threadIdx.y; r < R; r += int64_t(gridDim.y) * kRowsY) {
      acc_t v[F::NI];
#pragma unroll
      for (int i = 0; i < F::NI; ++i) v[i] = static_cast<acc_t>(in.p[i][r * C + c]);
      f(v, k, acc);
    }
  }
#pragma unroll
  for (int s = 0; s < F::K; ++s) tile[s][threadIdx.y][threadIdx.x] = static_cast<double>(acc[s]);
  __syncthreads();
  if (threadIdx.y == 0 && c < C) {
#pragma unroll
    for (int s = 0; s < F::K; ++s) {
      double t = 0;
      for (int y = 0; y < kRowsY; ++y) t += tile[s][y][threadIdx.x];
      partial[(int64_t(blockIdx.y) * F::K + s) * C + c] = t;
    }
  }
}

// ---------------------------------------------------------------------------------------------
// apply kernel: out[o][i] = g(in[.][i], coefficients of channel(i))
// ---------------------------------------------------------------------------------------------
// index_t is uint32_t whenever the tensor allows it: 64-bit division per element is slow.
template <typename scalar_t, typename G, typename index_t>
__global__ void apply_kernel(Inputs<scalar_t, G::NI> in, Outputs<scalar_t, G::NO> out,
                             const at::opmath_type<scalar_t>* __restrict__ kc, index_t total, index_t C, index_t S,
                             bool rows, G g) {
  using acc_t = at::opmath_type<scalar_t>;
  for (index_t i = index_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += index_t(gridDim.x) * blockDim.x) {
    const index_t c = rows ? i % C : (i / S) % C;
    acc_t v[G::NI], k[G::NK], o[G::NO];
#pragma unroll
    for (int j = 0; j < G::NI; ++j) v[j] = static_cast<acc_t>(in.p[j][i]);
#pragma unroll
    for (int j = 0; j < G::NK; ++j) k[j] = kc[j * C + c];
    g(v, k, o);
#pragma unroll
    for (int j = 0; j < G::NO; ++j) out.p[j][i] = static_cast<scalar_t>(o[j]);
  }
}

// ---------------------------------------------------------------------------------------------
// finalize kernels: one thread per channel; sums[k] = sum over splits of partial[split][k][c]
// ---------------------------------------------------------------------------------------------
template <int K>
__device__ void gather_sums(const double* __restrict__ partial, int splits, int64_t C, int64_t c, double (&sums)[K]) {
#pragma unroll
  for (int k = 0; k < K; ++k) sums[k] = 0;
  for (int s = 0; s < splits; ++s) {
#pragma unroll
    for (int k = 0; k < K; ++k) sums[k] += partial[(int64_t(s) * K + k) * C + c];
  }
}

// forward pass 1 -> k = rounded mean (coefficient array row 0)
template <typename acc_t>
__global__ void finalize_mean_kernel(const double* __restrict__ partial, int splits, int64_t C, double M,
                                     acc_t* __restrict__ shift) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s[1];
  gather_sums<1>(partial, splits, C, c, s);
  shift[c] = static_cast<acc_t>(s[0] / M);
}

// forward pass 2 -> mean, invstd and the apply coefficients (mean, w * invstd, b)
template <typename acc_t>
__global__ void finalize_forward_kernel(const double* __restrict__ partial, int splits, int64_t C, double M, double eps,
                                        const acc_t* __restrict__ shift, const acc_t* __restrict__ w,
                                        const acc_t* __restrict__ b, acc_t* __restrict__ mean,
                                        acc_t* __restrict__ invstd, acc_t* __restrict__ kc) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double s[2];
  gather_sums<2>(partial, splits, C, c, s);
  const double d = s[0] / M;
  const double var = fmax(s[1] / M - d * d, 0.0);
  const acc_t mu = static_cast<acc_t>(static_cast<double>(shift[c]) + d);
  const acc_t is = static_cast<acc_t>(1.0 / sqrt(var + eps));
  mean[c] = mu;
  invstd[c] = is;
  kc[c] = mu;
  kc[C + c] = w[c] * is;
  kc[2 * C + c] = b[c];
}

// backward: grad_weight = B, grad_bias = A, coefficients (w s, mean, c2, c3)
template <typename acc_t>
__global__ void finalize_backward_kernel(const double* __restrict__ partial, int splits, int64_t C, double M,
                                         const acc_t* __restrict__ w, const acc_t* __restrict__ mu,
                                         const acc_t* __restrict__ is, const acc_t* __restrict__ p,
                                         const acc_t* __restrict__ q, acc_t* __restrict__ gw, acc_t* __restrict__ gb,
                                         acc_t* __restrict__ kc) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  double sums[2] = {0, 0};
  if (partial != nullptr) gather_sums<2>(partial, splits, C, c, sums);
  const double A = sums[0], s = is[c], wc = w[c];
  const double B = s * sums[1];
  gw[c] = static_cast<acc_t>(B);
  gb[c] = static_cast<acc_t>(A);
  kc[c] = static_cast<acc_t>(wc * s);
  kc[C + c] = mu[c];
  kc[2 * C + c] = static_cast<acc_t>(s * (-wc * s * B - double(q[c]) * s * s) / M);
  kc[3 * C + c] = static_cast<acc_t>((double(p[c]) - wc * s * A) / M);
}

// double backward: the five [C] outputs and coefficients (e1, mean, e2, e3, f1, f2). From grad_x (rgw, rgb, rp:
// the backward's grad_weight, grad_bias and grad_mean; null for the op given grad_y), grad_y = ra gx +
// rb (x - mean) + rc is never formed: the sums are (Su, Sux1, Sugx), A = grad_bias, B1 = grad_weight / s, and the
// coefficients (e1, mean, e2, e3, f1 ra, f2, f1 rb, f1 rc) (csrc/batch_norm_kernels.h has the derivation).
template <typename acc_t>
__global__ void finalize_double_backward_kernel(const double* __restrict__ partial, int splits, int64_t C, double M,
                                                bool has_u, const acc_t* __restrict__ w, const acc_t* __restrict__ mu,
                                                const acc_t* __restrict__ is, const acc_t* __restrict__ al,
                                                const acc_t* __restrict__ be, const acc_t* __restrict__ q,
                                                const acc_t* __restrict__ rgw, const acc_t* __restrict__ rgb,
                                                const acc_t* __restrict__ rp, acc_t* __restrict__ dw,
                                                acc_t* __restrict__ dmean, acc_t* __restrict__ dis,
                                                acc_t* __restrict__ dgm, acc_t* __restrict__ dgs,
                                                acc_t* __restrict__ kc) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= C) return;
  const double s = is[c], wc = w[c], alc = al[c], bec = be[c], qc = q[c];
  double Su = 0, Sux1 = 0, Sugy = 0, A, B1, ra = 0, rb = 0, rc = 0;
  const bool rebuild = rgw != nullptr;
  if (rebuild) {
    double Sugx = 0;
    if (has_u) {
      double t[3];
      gather_sums<3>(partial, splits, C, c, t);
      Su = t[0], Sux1 = t[1], Sugx = t[2];
    }
    A = rgb[c];
    B1 = double(rgw[c]) / s;
    ra = 1.0 / (wc * s);
    rb = double(rgw[c]) * s / M + qc * s * s / (wc * M);
    rc = A / M - double(rp[c]) / (wc * s * M);
    Sugy = ra * Sugx + rb * Sux1 + rc * Su;
  } else if (has_u) {
    double t[5];
    gather_sums<5>(partial, splits, C, c, t);
    Su = t[0], Sux1 = t[1], Sugy = t[2], A = t[3], B1 = t[4];
  } else {
    double t[2];
    gather_sums<2>(partial, splits, C, c, t);
    A = t[0], B1 = t[1];
  }
  const double Sux = s * Sux1, B = s * B1;
  const double E = Sugy - A * Su / M - B * Sux / M;
  dw[c] = static_cast<acc_t>(s * E);
  dgm[c] = static_cast<acc_t>(Su / M);
  dgs[c] = static_cast<acc_t>(-s * s * Sux / M);
  const double sum_h = alc * A - wc * s * (A * Sux + B * Su) / M - qc * s * s * Su / M;
  dmean[c] = static_cast<acc_t>(-s * sum_h);
  dis[c] = static_cast<acc_t>(wc * E - 3 * qc * s * Sux / M - 2 * wc * B * Sux / M + alc * B1);
  const double f1 = s * alc - wc * s * s * Sux / M;
  kc[c] = static_cast<acc_t>(wc * s);
  kc[C + c] = mu[c];
  kc[2 * C + c] = static_cast<acc_t>(s * (alc - wc * s * Sux / M));
  kc[3 * C + c] = static_cast<acc_t>(bec - wc * s * Su / M);
  kc[4 * C + c] = static_cast<acc_t>(rebuild ? f1 * ra : f1);
  kc[5 * C + c] = static_cast<acc_t>(-(wc * s * s * B + qc * s * s * s) / M);
  if (rebuild) {
    kc[6 * C + c] = static_cast<acc_t>(f1 * rb);
    kc[7 * C + c] = static_cast<acc_t>(f1 * rc);
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
struct Shape {
  int64_t N, C, S;
  bool rows;
  int64_t M() const { return N * S; }
};

Shape bn_shape(const Tensor& x, at::MemoryFormat fmt) {
  Shape s{x.size(0), x.size(1), 1, false};
  for (int64_t d = 2; d < x.dim(); ++d) s.S *= x.size(d);
  s.rows = fmt != at::MemoryFormat::Contiguous || s.S == 1;
  return s;
}

at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.is_cuda(), op, ": expected CUDA tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, *), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x must have at least one value per channel, got shape ", x.sizes());
}

void check_like_x(const Tensor& t, const Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device");
}

void check_channel(const std::optional<Tensor>& t, const Tensor& x, const char* name, const char* op,
                   bool opmath_only) {
  if (!t.has_value()) return;
  const int64_t C = x.size(1);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == C, op, ": ", name, " must have shape [", C, "], got ", t->sizes());
  TORCH_CHECK(t->device() == x.device(), op, ": ", name, " must be on x's device");
  const auto acc = opmath_dtype(x.scalar_type());
  TORCH_CHECK(t->scalar_type() == acc || (!opmath_only && t->scalar_type() == x.scalar_type()), op, ": ", name,
              " must have dtype ", acc, (opmath_only ? "" : " or x's dtype"), ", got ", t->scalar_type());
}

Tensor channel_or(const std::optional<Tensor>& t, const Tensor& x, double fill) {
  const auto acc = opmath_dtype(x.scalar_type());
  if (t.has_value()) return t->to(acc).contiguous();
  return at::full({x.size(1)}, fill, x.options().dtype(acc));
}

Tensor empty_channel(const Tensor& x) { return at::empty({x.size(1)}, x.options().dtype(opmath_dtype(x.scalar_type()))); }

int num_splits(const Shape& sh) {
  // enough blocks to fill the device (a few per SM) without making the finalize sum long
  const int64_t per_channel = sh.rows ? (sh.M() + kRowsY * 16 - 1) / (kRowsY * 16)
                                      : (sh.M() + kThreads * 16 - 1) / (kThreads * 16);
  const int64_t channel_blocks = sh.rows ? (sh.C + 31) / 32 : sh.C;
  const int64_t want = std::max<int64_t>(1, 1024 / std::max<int64_t>(channel_blocks, 1));
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({per_channel, want, 65535})));
}

// Launches the reduction of functor F over `in`; returns the [splits, K, C] partial sums.
template <typename scalar_t, typename F>
Tensor launch_reduce(const Shape& sh, const Inputs<scalar_t, F::NI>& in, const at::opmath_type<scalar_t>* kc,
                     const Tensor& like, int& splits, cudaStream_t stream) {
  splits = num_splits(sh);
  Tensor partial = at::empty({splits, F::K, sh.C}, like.options().dtype(at::kDouble));
  if (!sh.rows) {
    const dim3 grid(static_cast<unsigned>(sh.C), static_cast<unsigned>(splits));
    reduce_nchw_kernel<scalar_t, F><<<grid, kThreads, 0, stream>>>(in, kc, partial.mutable_data_ptr<double>(), sh.N,
                                                                   sh.C, sh.S, F{});
  } else {
    const dim3 grid(static_cast<unsigned>((sh.C + 31) / 32), static_cast<unsigned>(splits));
    const dim3 block(32, kRowsY);
    reduce_rows_kernel<scalar_t, F><<<grid, block, 0, stream>>>(in, kc, partial.mutable_data_ptr<double>(), sh.M(),
                                                                sh.C, F{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return partial;
}

template <typename scalar_t, typename G>
void launch_apply(const Shape& sh, const Inputs<scalar_t, G::NI>& in, const Outputs<scalar_t, G::NO>& out,
                  const at::opmath_type<scalar_t>* kc, cudaStream_t stream) {
  const int64_t total = sh.N * sh.C * sh.S;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  if (total + int64_t(blocks) * kThreads < (int64_t(1) << 31)) {
    apply_kernel<scalar_t, G, uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        in, out, kc, static_cast<uint32_t>(total), static_cast<uint32_t>(sh.C), static_cast<uint32_t>(sh.S), sh.rows,
        G{});
  } else {
    apply_kernel<scalar_t, G, int64_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(in, out, kc, total, sh.C,
                                                                                              sh.S, sh.rows, G{});
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

unsigned channel_blocks(int64_t C) { return static_cast<unsigned>((C + 127) / 128); }

std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cuda(const Tensor& x_in, const std::optional<Tensor>& weight,
                                                         const std::optional<Tensor>& bias, double eps) {
  const char* op = "jsigr_fast::batch_norm_train";
  check_x(x_in, op);
  check_channel(weight, x_in, "weight", op, false);
  check_channel(bias, x_in, "bias", op, false);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = dense_memory_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Shape sh = bn_shape(x, fmt);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor mean = empty_channel(x), invstd = empty_channel(x);
  const Tensor w = channel_or(weight, x, 1.0), b = channel_or(bias, x, 0.0);
  Tensor kc = at::empty({3, sh.C}, mean.options());
  Tensor shift = empty_channel(x);
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_train_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const Inputs<scalar_t, 1> in{{x.const_data_ptr<scalar_t>()}};
    int splits = 0;
    Tensor p1 = launch_reduce<scalar_t, SumX>(sh, in, nullptr, x, splits, stream);
    finalize_mean_kernel<acc_t><<<channel_blocks(sh.C), 128, 0, stream>>>(
        p1.const_data_ptr<double>(), splits, sh.C, double(sh.M()), shift.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    Tensor p2 = launch_reduce<scalar_t, DevX>(sh, in, shift.const_data_ptr<acc_t>(), x, splits, stream);
    finalize_forward_kernel<acc_t><<<channel_blocks(sh.C), 128, 0, stream>>>(
        p2.const_data_ptr<double>(), splits, sh.C, double(sh.M()), eps, shift.const_data_ptr<acc_t>(),
        w.const_data_ptr<acc_t>(), b.const_data_ptr<acc_t>(), mean.mutable_data_ptr<acc_t>(),
        invstd.mutable_data_ptr<acc_t>(), kc.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    launch_apply<scalar_t, ApplyY>(sh, in, Outputs<scalar_t, 1>{{y.mutable_data_ptr<scalar_t>()}},
                                   kc.const_data_ptr<acc_t>(), stream);
  });
  return {y, mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cuda(const std::optional<Tensor>& grad_y_in,
                                                            const Tensor& x_in, const std::optional<Tensor>& weight,
                                                            const Tensor& mean, const Tensor& invstd,
                                                            const std::optional<Tensor>& grad_mean,
                                                            const std::optional<Tensor>& grad_invstd) {
  const char* op = "jsigr_fast::batch_norm_backward";
  check_x(x_in, op);
  if (grad_y_in.has_value()) check_like_x(*grad_y_in, x_in, "grad_y", op);
  check_channel(weight, x_in, "weight", op, false);
  check_channel(mean, x_in, "mean", op, true);
  check_channel(invstd, x_in, "invstd", op, true);
  check_channel(grad_mean, x_in, "grad_mean", op, true);
  check_channel(grad_invstd, x_in, "grad_invstd", op, true);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = dense_memory_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Shape sh = bn_shape(x, fmt);
  const bool has_gy = grad_y_in.has_value();
  const Tensor gy = has_gy ? grad_y_in->contiguous(fmt) : Tensor();
  Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor gw = empty_channel(x), gb = empty_channel(x);
  const Tensor w = channel_or(weight, x, 1.0), mu = mean.contiguous(), is = invstd.contiguous();
  const Tensor p = channel_or(grad_mean, x, 0.0), q = channel_or(grad_invstd, x, 0.0);
  Tensor kc = at::empty({4, sh.C}, mu.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int splits = 0;
    Tensor partial;
    if (has_gy) {
      const Inputs<scalar_t, 2> in{{gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>()}};
      partial = launch_reduce<scalar_t, GySums>(sh, in, mu.const_data_ptr<acc_t>(), x, splits, stream);
    }
    finalize_backward_kernel<acc_t><<<channel_blocks(sh.C), 128, 0, stream>>>(
        has_gy ? partial.const_data_ptr<double>() : nullptr, splits, sh.C, double(sh.M()), w.const_data_ptr<acc_t>(),
        mu.const_data_ptr<acc_t>(), is.const_data_ptr<acc_t>(), p.const_data_ptr<acc_t>(), q.const_data_ptr<acc_t>(),
        gw.mutable_data_ptr<acc_t>(), gb.mutable_data_ptr<acc_t>(), kc.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Outputs<scalar_t, 1> out{{gx.mutable_data_ptr<scalar_t>()}};
    if (has_gy) {
      launch_apply<scalar_t, ApplyGx>(
          sh, Inputs<scalar_t, 2>{{gy.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>()}}, out,
          kc.const_data_ptr<acc_t>(), stream);
    } else {
      launch_apply<scalar_t, ApplyGxNoGy>(sh, Inputs<scalar_t, 1>{{x.const_data_ptr<scalar_t>()}}, out,
                                          kc.const_data_ptr<acc_t>(), stream);
    }
  });
  return {gx, gw, gb};
}

using Grads7 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor>;

// The double backward given grad_y (rebuild == nullptr) or, for _from_grad_x, the backward's outputs
// (grad_x in grad_y's place, rebuild = its grad_weight, grad_bias).
Grads7 double_backward(const char* op, const std::optional<Tensor>& gg_x_in, const std::optional<Tensor>& gg_weight,
                       const std::optional<Tensor>& gg_bias, const Tensor& grad_y_in, const Tensor& x_in,
                       const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                       const std::optional<Tensor>& grad_mean, const std::optional<Tensor>& grad_invstd,
                       const std::pair<Tensor, Tensor>* rebuild) {
  check_x(x_in, op);
  check_like_x(grad_y_in, x_in, rebuild ? "grad_x" : "grad_y", op);
  if (gg_x_in.has_value()) check_like_x(*gg_x_in, x_in, "grad_grad_x", op);
  check_channel(gg_weight, x_in, "grad_grad_weight", op, true);
  check_channel(gg_bias, x_in, "grad_grad_bias", op, true);
  check_channel(weight, x_in, "weight", op, false);
  check_channel(mean, x_in, "mean", op, true);
  check_channel(invstd, x_in, "invstd", op, true);
  check_channel(grad_mean, x_in, "grad_mean", op, true);
  check_channel(grad_invstd, x_in, "grad_invstd", op, true);
  if (rebuild) {
    check_channel(rebuild->first, x_in, "grad_weight", op, true);
    check_channel(rebuild->second, x_in, "grad_bias", op, true);
  }
  const c10::cuda::CUDAGuard guard(x_in.device());
  const auto fmt = dense_memory_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Shape sh = bn_shape(x, fmt);
  const Tensor gy = grad_y_in.contiguous(fmt);
  const bool has_u = gg_x_in.has_value();
  const Tensor u = has_u ? gg_x_in->contiguous(fmt) : Tensor();
  Tensor d_gy = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor d_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor d_w = empty_channel(x), d_mean = empty_channel(x), d_invstd = empty_channel(x);
  Tensor d_gmean = empty_channel(x), d_ginvstd = empty_channel(x);
  const Tensor w = channel_or(weight, x, 1.0), mu = mean.contiguous(), is = invstd.contiguous();
  const Tensor alpha = channel_or(gg_weight, x, 0.0), beta = channel_or(gg_bias, x, 0.0);
  const Tensor q = channel_or(grad_invstd, x, 0.0);
  Tensor rgw, rgb, rp;
  if (rebuild) {
    rgw = rebuild->first.contiguous();
    rgb = rebuild->second.contiguous();
    rp = channel_or(grad_mean, x, 0.0);
  }
  Tensor kc = at::empty({rebuild ? 8 : 6, sh.C}, mu.options());
  auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_norm_double_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    int splits = 0;
    Tensor partial;
    const scalar_t* up = has_u ? u.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gyp = gy.const_data_ptr<scalar_t>();
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    const acc_t* mup = mu.const_data_ptr<acc_t>();
    if (rebuild && has_u) {
      partial = launch_reduce<scalar_t, DbwGxSums>(sh, Inputs<scalar_t, 3>{{up, gyp, xp}}, mup, x, splits, stream);
    } else if (has_u) {
      partial = launch_reduce<scalar_t, DbwSums>(sh, Inputs<scalar_t, 3>{{up, gyp, xp}}, mup, x, splits, stream);
    } else if (!rebuild) {
      partial = launch_reduce<scalar_t, GySums>(sh, Inputs<scalar_t, 2>{{gyp, xp}}, mup, x, splits, stream);
    }
    finalize_double_backward_kernel<acc_t><<<channel_blocks(sh.C), 128, 0, stream>>>(
        partial.defined() ? partial.const_data_ptr<double>() : nullptr, splits, sh.C, double(sh.M()), has_u,
        w.const_data_ptr<acc_t>(), mup, is.const_data_ptr<acc_t>(), alpha.const_data_ptr<acc_t>(),
        beta.const_data_ptr<acc_t>(), q.const_data_ptr<acc_t>(), rebuild ? rgw.const_data_ptr<acc_t>() : nullptr,
        rebuild ? rgb.const_data_ptr<acc_t>() : nullptr, rebuild ? rp.const_data_ptr<acc_t>() : nullptr,
        d_w.mutable_data_ptr<acc_t>(), d_mean.mutable_data_ptr<acc_t>(), d_invstd.mutable_data_ptr<acc_t>(),
        d_gmean.mutable_data_ptr<acc_t>(), d_ginvstd.mutable_data_ptr<acc_t>(), kc.mutable_data_ptr<acc_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    const Outputs<scalar_t, 2> out{{d_gy.mutable_data_ptr<scalar_t>(), d_x.mutable_data_ptr<scalar_t>()}};
    const acc_t* k = kc.const_data_ptr<acc_t>();
    if (rebuild && has_u) {
      launch_apply<scalar_t, ApplyDbwGx>(sh, Inputs<scalar_t, 3>{{up, gyp, xp}}, out, k, stream);
    } else if (rebuild) {
      launch_apply<scalar_t, ApplyDbwGxNoU>(sh, Inputs<scalar_t, 2>{{gyp, xp}}, out, k, stream);
    } else if (has_u) {
      launch_apply<scalar_t, ApplyDbw>(sh, Inputs<scalar_t, 3>{{up, gyp, xp}}, out, k, stream);
    } else {
      launch_apply<scalar_t, ApplyDbwNoU>(sh, Inputs<scalar_t, 2>{{gyp, xp}}, out, k, stream);
    }
  });
  return {d_gy, d_x, d_w, d_mean, d_invstd, d_gmean, d_ginvstd};
}

Grads7 batch_norm_double_backward_cuda(const std::optional<Tensor>& gg_x, const std::optional<Tensor>& gg_weight,
                                       const std::optional<Tensor>& gg_bias, const Tensor& grad_y, const Tensor& x,
                                       const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                       const std::optional<Tensor>& grad_mean,
                                       const std::optional<Tensor>& grad_invstd) {
  return double_backward("jsigr_fast::batch_norm_double_backward", gg_x, gg_weight, gg_bias, grad_y, x, weight, mean,
                         invstd, grad_mean, grad_invstd, nullptr);
}

Grads7 batch_norm_double_backward_from_grad_x_cuda(
    const std::optional<Tensor>& gg_x, const std::optional<Tensor>& gg_weight, const std::optional<Tensor>& gg_bias,
    const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias, const Tensor& x,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& grad_mean, const std::optional<Tensor>& grad_invstd) {
  const std::pair<Tensor, Tensor> rebuild{grad_weight, grad_bias};
  return double_backward("jsigr_fast::batch_norm_double_backward_from_grad_x", gg_x, gg_weight, gg_bias, grad_x, x,
                         weight, mean, invstd, grad_mean, grad_invstd, &rebuild);
}

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CUDA, m) {
  m.impl("batch_norm_train", &batch_norm_train_cuda);
  m.impl("batch_norm_backward", &batch_norm_backward_cuda);
  m.impl("batch_norm_double_backward", &batch_norm_double_backward_cuda);
  m.impl("batch_norm_double_backward_from_grad_x", &batch_norm_double_backward_from_grad_x_cuda);
}

}  // namespace jsigr_fast
