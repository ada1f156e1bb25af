// CUDA kernels of the fused loss head. Same ops and contracts as the CPU version
// (csrc/cross_entropy_cotangent.cpp; schemas in csrc/ops.cpp; reference in jsigr_fast/reference.py)
// and as the Triton launchers of kernels/loss_head.py:
//
//   cross_entropy_cotangent(logits [N, K], target [N])      -> (loss [N], cotangent [N, K])
//     loss[n] = logsumexp(z_n) - z_n[y_n],   cotangent[n] = softmax(z_n) - onehot(y_n)
//   cross_entropy_cotangent_backward(grad_loss? [N], grad_cot? [N, K], logits, target) -> grad_logits
//     grad[n] = a_n (p_n - onehot(y_n)) + p_n * (b_n - <p_n, b_n>),   p = softmax(z)
//
// One warp per row (K is 10..1000 for classifiers; a row of ImageNet-21k's 21843 classes is ~680
// elements per lane, still fine), kRowsPerBlock rows per block: max, sum of exp(z - max) and the
// outputs in strided passes over the row (re-reads come from L1), warp shuffles for the reductions,
// no shared memory and no atomics (deterministic). p = exp((z - max) - log s), as the CPU kernel
// writes it. Accumulation in float (double for double); half / bfloat16 are widened and each output is
// rounded once.
//
// Accuracy under --use_fast_math (setup.py): that flag maps expf / logf to __expf / __logf, whose
// error grows with |x| (2 + 1.2|x| ulp for __expf), so float exponentials and logarithms are taken in
// double precision (the double functions are not affected by the flag). It also flushes float
// denormals: probabilities below 2^-126 become 0 (an absolute error below 1.2e-38).
//
// Targets: checked in the kernel (CUDA_KERNEL_ASSERT, as ATen's nll_loss: a host check would
// synchronise every call), and never used to read outside the row.
//
// First run on a GPU (H200) 2026-11-23: exact against the reference (bench/results/
// gpu_session_h200_2026-11-23.md). CI (no GPU) compiles this file with nvcc (tests/test_cuda_compile.py) and
// executes its kernels in the CUDA-on-CPU emulator (tests/test_cuda_emulated.py);
// tests/test_triton_loss_head.py checks the Triton twin on CPU tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10 stream/guard headers rather than ATen/cuda/CUDAContext.h (which pulls in cuBLAS/cuSPARSE).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../cross_entropy_checks.h"

namespace jsigr_fast {
namespace {

using at::Tensor;

constexpr int kWarp = 32;
constexpr int kRowsPerBlock = 4;  // 128 threads: one warp per row
constexpr unsigned kFull = 0xffffffffu;

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

__device__ __forceinline__ float accurate_exp(float x) { return static_cast<float>(::exp(static_cast<double>(x))); }
__device__ __forceinline__ double accurate_exp(double x) { return ::exp(x); }
__device__ __forceinline__ float accurate_log(float x) { return static_cast<float>(::log(static_cast<double>(x))); }
__device__ __forceinline__ double accurate_log(double x) { return ::log(x); }

template <typename acc_t>
__device__ __forceinline__ acc_t warp_sum(acc_t v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

// max that keeps NaN (a NaN logit makes the row NaN through the sum of exponentials anyway)
template <typename acc_t>
__device__ __forceinline__ acc_t nan_max(acc_t a, acc_t b) {
  return (a > b || a != a) ? a : b;
}

template <typename acc_t>
__device__ __forceinline__ acc_t warp_max(acc_t v) {
  for (int o = kWarp / 2; o > 0; o >>= 1) v = nan_max(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

template <typename acc_t>
struct RowLse {
  acc_t m, log_s;
};

// (max_k z_k, log sum_k exp(z_k - max)) of one row, the same value in every lane of the warp
template <typename scalar_t, typename acc_t>
__device__ RowLse<acc_t> row_lse(const scalar_t* z, int64_t K, int lane) {
  acc_t m = -std::numeric_limits<acc_t>::infinity();
  for (int64_t k = lane; k < K; k += kWarp) m = nan_max(m, static_cast<acc_t>(z[k]));
  m = warp_max(m);
  acc_t s = 0;
  for (int64_t k = lane; k < K; k += kWarp) s += accurate_exp(static_cast<acc_t>(z[k]) - m);
  return {m, accurate_log(warp_sum(s))};
}

template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t softmax_at(const scalar_t* z, int64_t k, const RowLse<acc_t>& r) {
  return accurate_exp((static_cast<acc_t>(z[k]) - r.m) - r.log_s);
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    ce_forward_kernel(const scalar_t* __restrict__ z, const int64_t* __restrict__ y, scalar_t* __restrict__ loss,
                      scalar_t* __restrict__ cot, int64_t N, int64_t K) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;  // the whole warp: the shuffles below see full warps only
  const int lane = threadIdx.x % kWarp;
  const scalar_t* row = z + n * K;
  const int64_t t = y[n];
  CUDA_KERNEL_ASSERT(t >= 0 && t < K);
  const RowLse<acc_t> r = row_lse<scalar_t, acc_t>(row, K, lane);
  if (lane == 0) {
    const acc_t zt = (t >= 0 && t < K) ? static_cast<acc_t>(row[t]) : std::numeric_limits<acc_t>::quiet_NaN();
    loss[n] = static_cast<scalar_t>(r.log_s - (zt - r.m));
  }
  scalar_t* out = cot + n * K;
  for (int64_t k = lane; k < K; k += kWarp) {
    const acc_t p = softmax_at(row, k, r);
    out[k] = static_cast<scalar_t>(k == t ? p - acc_t(1) : p);
  }
}

template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kWarp * kRowsPerBlock)
    ce_backward_kernel(const scalar_t* __restrict__ ga, const scalar_t* __restrict__ gb,
                       const scalar_t* __restrict__ z, const int64_t* __restrict__ y, scalar_t* __restrict__ out,
                       int64_t N, int64_t K) {
  const int64_t n = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarp;
  if (n >= N) return;
  const int lane = threadIdx.x % kWarp;
  const scalar_t* row = z + n * K;
  const int64_t t = y[n];
  CUDA_KERNEL_ASSERT(t >= 0 && t < K);
  const RowLse<acc_t> r = row_lse<scalar_t, acc_t>(row, K, lane);
  const acc_t a = ga ? static_cast<acc_t>(ga[n]) : acc_t(0);
  const scalar_t* brow = gb ? gb + n * K : nullptr;
  // grad = p (c + b) - a onehot with c = a - <p, b>
  acc_t c = a;
  if (brow) {
    acc_t dot = 0;
    for (int64_t k = lane; k < K; k += kWarp) dot += softmax_at(row, k, r) * static_cast<acc_t>(brow[k]);
    c = a - warp_sum(dot);
  }
  scalar_t* o = out + n * K;
  for (int64_t k = lane; k < K; k += kWarp) {
    const acc_t p = softmax_at(row, k, r);
    const acc_t g = p * (brow ? c + static_cast<acc_t>(brow[k]) : c);
    o[k] = static_cast<scalar_t>(k == t ? g - a : g);
  }
}

unsigned blocks_for(int64_t N) { return static_cast<unsigned>((N + kRowsPerBlock - 1) / kRowsPerBlock); }

std::tuple<Tensor, Tensor> cross_entropy_cotangent_cuda(const Tensor& logits, const Tensor& target) {
  const char* op = "jsigr_fast::cross_entropy_cotangent";
  check_ce_args(logits, target, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Tensor z = logits.contiguous();
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t N = z.size(0), K = z.size(1);
  Tensor loss = at::empty({N}, z.options());
  Tensor cot = at::empty(z.sizes(), z.options());
  if (N == 0) return {loss, cot};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "cross_entropy_cotangent_cuda", [&] {
    ce_forward_kernel<scalar_t, acc_type<scalar_t>><<<blocks_for(N), kWarp * kRowsPerBlock, 0,
                                                      c10::cuda::getCurrentCUDAStream()>>>(
        z.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), loss.mutable_data_ptr<scalar_t>(),
        cot.mutable_data_ptr<scalar_t>(), N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, cot};
}

Tensor cross_entropy_cotangent_backward_cuda(const std::optional<Tensor>& grad_loss,
                                             const std::optional<Tensor>& grad_cot, const Tensor& logits,
                                             const Tensor& target) {
  const char* op = "jsigr_fast::cross_entropy_cotangent_backward";
  check_ce_args(logits, target, op);
  check_ce_cotangents(grad_loss, grad_cot, logits, op);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto dt = logits.scalar_type();
  // the cotangents in the logits' dtype first, as the CPU op does
  const Tensor ga = grad_loss.has_value() ? grad_loss->to(logits.device(), dt).contiguous() : Tensor();
  const Tensor gb = grad_cot.has_value() ? grad_cot->to(logits.device(), dt).contiguous() : Tensor();
  const Tensor z = logits.contiguous();
  const Tensor y = target.to(at::kLong).contiguous();
  const int64_t N = z.size(0), K = z.size(1);
  Tensor grad = at::empty(z.sizes(), z.options());
  if (N == 0) return grad;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dt, "cross_entropy_cotangent_backward_cuda", [&] {
    ce_backward_kernel<scalar_t, acc_type<scalar_t>><<<blocks_for(N), kWarp * kRowsPerBlock, 0,
                                                       c10::cuda::getCurrentCUDAStream()>>>(
        ga.defined() ? ga.const_data_ptr<scalar_t>() : nullptr, gb.defined() ? gb.const_data_ptr<scalar_t>() : nullptr,
        z.const_data_ptr<scalar_t>(), y.const_data_ptr<int64_t>(), grad.mutable_data_ptr<scalar_t>(), N, K);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CUDA, m) {
  m.impl("cross_entropy_cotangent", &cross_entropy_cotangent_cuda);
  m.impl("cross_entropy_cotangent_backward", &cross_entropy_cotangent_backward_cuda);
}

}  // namespace jsigr_fast
