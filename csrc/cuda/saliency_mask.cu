// CUDA kernels of J-SIGR's selective mask and of the bool-masked squared norm. Same ops, contracts
// and layout rules as the CPU version (csrc/saliency_mask.cpp, csrc/sample_ops_kernels.h; schemas
// in csrc/ops.cpp; references in jsigr_fast/reference.py) and as the Triton launchers of
// kernels/saliency_mask.py:
//
//   gradient_saliency_mask(g, beta, quantile?)        M = |g| / max(max_d |g|, tiny), then the rule
//   threshold_mask(saliency, beta, quantile?)         M given, then the rule
//   adaptor_saliency_mask(g, W, b?, beta, quantile?, normalize)
//                                                     M = tanh(conv1x1(g / rms(g)) + b), then the rule
//   masked_sq_norm_bool(g, mask)                      out[n] = sum_d [mask] g^2
//   masked_sq_norm_bool_backward(grad_out, g, mask)   grad_g = [mask] (2 grad_out[n]) g
//
// Layout: each sample's D features must be one contiguous block ("sample-major": contiguous or
// channels-last(3d) memory, used as it is; anything else is copied to contiguous), element n * D + d.
//
// Launches. gradient mask, beta rule: (1) abs_max_kernel, N * splits blocks, each the max over a
// strided slice of one sample, combined with one atomicMax per block into an [N] key buffer
// (max is order-independent, so deterministic); (2) mask_kernel, one grid-stride elementwise pass
// recomputing M (never stored) and writing one byte per feature. Quantile rule: a k-th-smallest
// selection per sample has no simple single-kernel form for D ~ 1.5e5, so mask_kernel first writes
// M (rounded to the dtype: the reference's values exactly) to an [N, D] buffer, at::kthvalue (the
// function the reference uses: same NaN-last order and ties) gives the per-sample threshold t_n,
// and mask_kernel compares. threshold_mask: kthvalue on the input, then the compare.
//
// Exactness (bit-identical masks to selective_mask(gradient_saliency(g)) != 0). setup.py builds the
// .cu files with --use_fast_math (-ftz=true, -prec-div=false): a plain `a / b` on floats would be an
// approximate division and denormals would be flushed (a denormal M compared with beta = 0 would
// flip). So every float operation the result depends on is spelled out:
//   * |x| by clearing the sign bit; the per-sample max on the bit patterns as integers (for
//     non-negative floats integer order == float order, every NaN is above +inf, so the max
//     propagates NaN like torch.amax); peak = max(key, key(tiny)) keeps NaN;
//   * M = |g| / peak by inline PTX div.rn.f32 / div.rn.f64 (IEEE, no flush); bfloat16 / half:
//     computed in float and rounded to the dtype (c10's round-to-nearest-even conversions);
//   * the comparison by inline PTX setp.le (no .ftz); beta rounded to the dtype on the host
//     (static_cast<scalar_t>(beta), as the CPU kernel and `M <= beta` do).
// The backward's products use inline PTX mul.rn too, so it matches the CPU kernel bit for bit;
// the norm's sums only to rounding (another summation order).
//
// Adaptor mask: rms per sample from sq_norm_kernel without a mask (rounded on the host in g's dtype
// step by step, as the reference computes sqrt(mean(g^2) + tiny)), then adaptor_kernel, one
// grid-stride pass over the N*D outputs in NCHW order: output (n, o, s) reads the C inputs g[n, c, s]
// through channel / spatial strides (a channels-last g is read in place), divides each by rms
// (div.rn) and rounds it to the dtype, sums b_o + sum_c W_oc x_c with fma, and applies tanh in double
// precision (not the float tanhf, which --use_fast_math may turn into tanh.approx.f32, ~2^-11
// accurate). Not bit-identical to the reference (cuDNN's conv sums in its own order): features
// whose M lies within rounding of the threshold may differ, as with the CPU kernel. The mask is
// contiguous whatever g's layout (the CPU op's contract); the quantile rule writes M for kthvalue.
//
// First run on a GPU (H200) 2026-11-23: exact against the reference (bench/results/
// gpu_session_h200_2026-11-23.md). CI (no GPU) compiles this file with nvcc (tests/test_cuda_compile.py) and
// *executes* its kernels in the CUDA-on-CPU emulator (tests/test_cuda_emulated.py: barrier and
// shuffle rules, poisoned shared memory, both thread orders; not the fast-math arithmetic, which
// the PTX checks cover); tests/test_triton_mask.py checks the Triton twin on CPU tensors.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
// c10 stream/guard headers rather than ATen/cuda/CUDAContext.h (which pulls in cuBLAS/cuSPARSE).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../adaptor_params.h"
#include "../memory_format.h"
#include "../quantile_rule.h"

namespace jsigr_fast {
namespace {

using at::Tensor;

constexpr int kThreads = 256;
constexpr int64_t kMaxElementwiseBlocks = 65535;  // grid-stride beyond that

// mask_kernel modes
constexpr int kGradMask = 0;    // M from g and the peak, compare, write the mask
constexpr int kGradWriteM = 1;  // M from g and the peak, write M (g's dtype)
constexpr int kThreshMask = 2;  // M given, compare, write the mask

// ---------------------------------------------------------------------------------------------
// exact scalar operations (independent of -ftz / -prec-div / --use_fast_math)
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ float div_rn(float a, float b) {
  float r;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double div_rn(double a, double b) {
  double r;
  asm("div.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b));
  return r;
}
__device__ __forceinline__ float mul_rn(float a, float b) {
  float r;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(r) : "f"(a), "f"(b));
  return r;
}
__device__ __forceinline__ double mul_rn(double a, double b) {
  double r;
  asm("mul.rn.f64 %0, %1, %2;" : "=d"(r) : "d"(a), "d"(b));
  return r;
}
// a <= b, false when either is NaN; denormals compared as they are
__device__ __forceinline__ bool le_exact(float a, float b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.le.f32 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "f"(a), "f"(b));
  return r != 0;
}
__device__ __forceinline__ bool le_exact(double a, double b) {
  unsigned r;
  asm("{\n\t.reg .pred p;\n\tsetp.le.f64 p, %1, %2;\n\tselp.u32 %0, 1, 0, p;\n\t}" : "=r"(r) : "d"(a), "d"(b));
  return r != 0;
}
// |x| by the sign bit, and the integer key of |x| (order-preserving, NaN above +inf)
__device__ __forceinline__ float abs_bits(float x) { return __int_as_float(__float_as_int(x) & 0x7fffffff); }
__device__ __forceinline__ double abs_bits(double x) {
  return __longlong_as_double(__double_as_longlong(x) & 0x7fffffffffffffffLL);
}
__device__ __forceinline__ int abs_key(float x) { return __float_as_int(x) & 0x7fffffff; }
__device__ __forceinline__ long long abs_key(double x) { return __double_as_longlong(x) & 0x7fffffffffffffffLL; }
__device__ __forceinline__ float from_key(int k) { return __int_as_float(k); }
__device__ __forceinline__ double from_key(long long k) { return __longlong_as_double(k); }

// v rounded to scalar_t's precision, as acc_t (identity for float and double)
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t round_to(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return v;
  } else {
    return static_cast<acc_t>(static_cast<scalar_t>(v));
  }
}

template <typename scalar_t>
using acc_type = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
template <typename acc_t>
using bits_type = std::conditional_t<std::is_same_v<acc_t, double>, long long, int>;

// The key buffer's data as bits_t. long long (what atomicMax takes) is not int64_t (long) on
// Linux, and libtorch instantiates data_ptr<T> only for its scalar types: data_ptr<long long>
// compiles but is an undefined symbol when the extension is loaded. So the buffer is read as the
// int32_t / int64_t of its dtype and reinterpreted (same size and representation).
template <typename bits_t>
using key_storage_t = std::conditional_t<sizeof(bits_t) == 8, int64_t, int32_t>;
template <typename bits_t>
bits_t* key_data(Tensor& keys) {
  static_assert(sizeof(bits_t) == sizeof(key_storage_t<bits_t>));
  return reinterpret_cast<bits_t*>(keys.mutable_data_ptr<key_storage_t<bits_t>>());
}
template <typename bits_t>
const bits_t* key_data(const Tensor& keys) {
  return reinterpret_cast<const bits_t*>(keys.const_data_ptr<key_storage_t<bits_t>>());
}

// ---------------------------------------------------------------------------------------------
// block reductions (the result is valid in thread 0)
// ---------------------------------------------------------------------------------------------
struct MaxOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a > b ? a : b; }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

template <typename T, typename Op>
__device__ T block_reduce(T v, Op op, T identity) {
  __shared__ T warp_vals[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffff, v, offset));
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_vals[lane] : identity;
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_down_sync(0xffffffff, v, offset));
  }
  return v;
}

// ---------------------------------------------------------------------------------------------
// kernels
// ---------------------------------------------------------------------------------------------
// g: [N, D] sample-major; keys: [N] zero-initialised, atomicMax of the keys of |g| (block b covers
// sample b / splits, slice b % splits).
template <typename scalar_t, typename acc_t, typename bits_t>
__global__ void abs_max_kernel(const scalar_t* __restrict__ g, bits_t* __restrict__ keys, int64_t D, int64_t splits) {
  const int64_t n = blockIdx.x / splits, s = blockIdx.x % splits;
  const scalar_t* row = g + n * D;
  bits_t best = 0;
  for (int64_t d = s * kThreads + threadIdx.x; d < D; d += splits * kThreads) {
    const bits_t k = abs_key(static_cast<acc_t>(row[d]));
    best = k > best ? k : best;
  }
  best = block_reduce(best, MaxOp{}, bits_t(0));
  if (threadIdx.x == 0) atomicMax(keys + n, best);
}

// src: [N, D] sample-major, g (kGradMask, kGradWriteM) or M (kThreshMask);
// keys: [N] (gradient modes; the peak is max(key, tiny_key), NaN kept);
// thr: [N] per-sample thresholds, or null for the scalar beta (already rounded to the dtype);
// mask: [N, D] bool (compare modes); m_out: [N, D] scalar_t (kGradWriteM).
template <int MODE, typename scalar_t, typename acc_t, typename bits_t>
__global__ void mask_kernel(const scalar_t* __restrict__ src, const bits_t* __restrict__ keys, bits_t tiny_key,
                            const acc_t* __restrict__ thr, acc_t beta, bool* __restrict__ mask,
                            scalar_t* __restrict__ m_out, int64_t D, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / D;
    const acc_t x = static_cast<acc_t>(src[i]);
    acc_t m;
    if constexpr (MODE == kThreshMask) {
      m = x;
    } else {
      const bits_t k = keys[n];
      const acc_t peak = from_key(k > tiny_key ? k : tiny_key);
      m = round_to<scalar_t>(div_rn(abs_bits(x), peak));
    }
    if constexpr (MODE == kGradWriteM) {
      m_out[i] = static_cast<scalar_t>(m);  // exact: m is already rounded
    } else {
      mask[i] = le_exact(m, thr ? thr[n] : beta);
    }
  }
}

// g: [N, D] sample-major; mask: [N, D] bool, or null for the plain sum of g^2 (the adaptor's rms);
// part: [N, splits] double (block b: sample b / splits, slice b % splits), acc_t sums within the block.
template <typename scalar_t, typename acc_t>
__global__ void sq_norm_kernel(const scalar_t* __restrict__ g, const bool* __restrict__ mask,
                               double* __restrict__ part, int64_t D, int64_t splits) {
  const int64_t n = blockIdx.x / splits, s = blockIdx.x % splits;
  const scalar_t* row = g + n * D;
  const bool* mrow = mask ? mask + n * D : nullptr;
  acc_t sum = 0;
  for (int64_t d = s * kThreads + threadIdx.x; d < D; d += splits * kThreads) {
    // exact select: a masked-out NaN does not leak
    const acc_t v = !mrow || mrow[d] ? static_cast<acc_t>(row[d]) : acc_t(0);
    sum += v * v;
  }
  sum = block_reduce(sum, SumOp{}, acc_t(0));
  if (threadIdx.x == 0) part[blockIdx.x] = static_cast<double>(sum);
}

// grad_g[n, d] = mask ? (2 grad_out[n]) g : 0; grad_out [N] in g's dtype.
template <typename scalar_t, typename acc_t>
__global__ void sq_norm_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ g,
                                        const bool* __restrict__ mask, scalar_t* __restrict__ grad_g, int64_t D,
                                        int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const acc_t scale = mul_rn(acc_t(2), static_cast<acc_t>(grad_out[i / D]));
    grad_g[i] = static_cast<scalar_t>(mask[i] ? mul_rn(scale, static_cast<acc_t>(g[i])) : acc_t(0));
  }
}

// g: (N, C, S) data, element (n, c, s) at n * D + c * sc + s * ss; rms: [N]; W: [C, C]; b: [C]
// (accumulator type). kGradMask: compare with thr[n] (or beta), write the bool mask;
// kGradWriteM: write M (g's dtype). Outputs [N, D] contiguous.
template <int MODE, typename scalar_t, typename acc_t>
__global__ void adaptor_kernel(const scalar_t* __restrict__ g, const acc_t* __restrict__ rms,
                               const acc_t* __restrict__ W, const acc_t* __restrict__ b,
                               const acc_t* __restrict__ thr, acc_t beta, bool* __restrict__ mask,
                               scalar_t* __restrict__ m_out, int64_t D, int64_t S, int64_t C, int64_t sc,
                               int64_t ss, int64_t total) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t n = i / D, r = i - n * D, o = r / S, s = r - o * S;
    const scalar_t* src = g + n * D + s * ss;
    const acc_t* w = W + o * C;
    const acc_t rn = rms[n];
    acc_t pre = b[o];
    for (int64_t c = 0; c < C; ++c) {
      const acc_t x = round_to<scalar_t>(div_rn(static_cast<acc_t>(src[c * sc]), rn));  // divided in g's dtype
      pre = fma(w[c], x, pre);
    }
    const acc_t m = round_to<scalar_t>(static_cast<acc_t>(::tanh(static_cast<double>(pre))));
    if constexpr (MODE == kGradWriteM) {
      m_out[i] = static_cast<scalar_t>(m);  // exact: m is already rounded
    } else {
      mask[i] = le_exact(m, thr ? thr[n] : beta);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// host side
// ---------------------------------------------------------------------------------------------
// Layout: dense_memory_format (csrc/memory_format.h), as the CPU op: each sample one block of D features.
struct Rows {
  int64_t N = 0, D = 0;
  int64_t total() const { return N * D; }
};

Rows rows_of(const Tensor& t) {
  Rows r;
  r.N = t.size(0);
  r.D = r.N == 0 ? 0 : t.numel() / r.N;
  return r;
}

void check_data(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.is_cuda(), op, ": expected CUDA tensors, got ", name, " on ", t.device());
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
}

void check_quantile(std::optional<double> quantile, const char* op) {
  if (quantile.has_value()) {
    TORCH_CHECK(std::isfinite(*quantile) && *quantile >= 0.0 && *quantile <= 1.0, op,
                ": quantile must be in [0, 1], got ", *quantile);
  }
}

void check_mask(const Tensor& mask, const Tensor& g, const char* op) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == g.sizes(), op, ": mask must have g's shape ", g.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == g.device(), op, ": mask and g must be on the same device");
}

// [N, D] view of a sample-major tensor (element n * D + d)
Tensor flat_rows(const Tensor& t, const Rows& r) { return t.as_strided({r.N, r.D}, {r.D, 1}); }

// enough blocks to fill the device when N is small; each block still covers >= 8 * kThreads features
int64_t num_splits(const Rows& r) {
  const int64_t by_size = std::max<int64_t>(1, r.D / (kThreads * 8));
  const int64_t by_batch = std::max<int64_t>(1, 4096 / std::max<int64_t>(r.N, 1));
  return std::min(by_size, by_batch);
}

unsigned elementwise_blocks(int64_t total) {
  return static_cast<unsigned>(std::min<int64_t>((total + kThreads - 1) / kThreads, kMaxElementwiseBlocks));
}

// k features penalised per sample: all but the quantile_kept(q, D) most salient (../quantile_rule.h,
// shared with the CPU kernels; not floor(q D), which float rounding of q * D can leave one short).
int64_t quantile_k(const Rows& r, double q) { return r.D - quantile_kept(q, r.D); }

// The compare launch, given M's source (g with its peak keys, or M itself) and the rule's
// threshold: a per-sample [N] acc tensor (quantile) or beta.
template <int MODE, typename scalar_t>
void launch_mask(const Tensor& src, const Tensor* keys, const Tensor* thr, double beta, Tensor& out, const Rows& r) {
  using acc_t = acc_type<scalar_t>;
  using bits_t = bits_type<acc_t>;
  const acc_t tiny = static_cast<acc_t>(std::numeric_limits<scalar_t>::min());
  bits_t tiny_key;
  std::memcpy(&tiny_key, &tiny, sizeof(bits_t));
  const acc_t beta_r = static_cast<acc_t>(static_cast<scalar_t>(beta));  // as `M <= beta` rounds it
  bool* mask = nullptr;
  scalar_t* m_out = nullptr;
  if constexpr (MODE == kGradWriteM) {
    m_out = out.mutable_data_ptr<scalar_t>();
  } else {
    mask = out.mutable_data_ptr<bool>();
  }
  auto stream = c10::cuda::getCurrentCUDAStream();
  mask_kernel<MODE, scalar_t, acc_t, bits_t><<<elementwise_blocks(r.total()), kThreads, 0, stream>>>(
      src.const_data_ptr<scalar_t>(), keys ? key_data<bits_t>(*keys) : nullptr, tiny_key,
      thr ? thr->const_data_ptr<acc_t>() : nullptr, beta_r, mask, m_out, r.D, r.total());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// per-sample k-th smallest of the sample-major M, in the accumulator type
Tensor kth_thresholds(const Tensor& M, const Rows& r, int64_t k) {
  const auto acc = M.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return std::get<0>(at::kthvalue(flat_rows(M, r), k, 1)).to(acc).contiguous();
}

Tensor gradient_saliency_mask_cuda(const Tensor& g, double beta, std::optional<double> quantile) {
  const char* op = "jsigr_fast::gradient_saliency_mask";
  check_data(g, "g", op);
  check_quantile(quantile, op);
  const c10::cuda::CUDAGuard guard(g.device());
  const auto fmt = dense_memory_format(g);
  const Tensor gc = g.contiguous(fmt);
  const Rows r = rows_of(g);
  Tensor mask = at::empty(g.sizes(), g.options().dtype(at::kBool).memory_format(fmt));
  if (r.total() == 0) return mask;
  int64_t k = 0;
  if (quantile.has_value()) {
    k = quantile_k(r, *quantile);
    if (k <= 0 || k >= r.D) return mask.fill_(k > 0);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "gradient_saliency_mask_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    using bits_t = bits_type<acc_t>;
    const auto key_dtype = std::is_same_v<bits_t, int> ? at::kInt : at::kLong;
    Tensor keys = at::zeros({r.N}, g.options().dtype(key_dtype));
    const int64_t splits = num_splits(r);
    abs_max_kernel<scalar_t, acc_t, bits_t><<<static_cast<unsigned>(r.N * splits), kThreads, 0,
                                             c10::cuda::getCurrentCUDAStream()>>>(
        gc.const_data_ptr<scalar_t>(), key_data<bits_t>(keys), r.D, splits);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!quantile.has_value()) {
      launch_mask<kGradMask, scalar_t>(gc, &keys, nullptr, beta, mask, r);
      return;
    }
    Tensor M = at::empty(g.sizes(), g.options().memory_format(fmt));
    launch_mask<kGradWriteM, scalar_t>(gc, &keys, nullptr, 0.0, M, r);
    const Tensor thr = kth_thresholds(M, r, k);
    launch_mask<kThreshMask, scalar_t>(M, nullptr, &thr, 0.0, mask, r);
  });
  return mask;
}

Tensor threshold_mask_cuda(const Tensor& saliency, double beta, std::optional<double> quantile) {
  const char* op = "jsigr_fast::threshold_mask";
  check_data(saliency, "saliency", op);
  check_quantile(quantile, op);
  const c10::cuda::CUDAGuard guard(saliency.device());
  const auto fmt = dense_memory_format(saliency);
  const Tensor mc = saliency.contiguous(fmt);
  const Rows r = rows_of(saliency);
  Tensor mask = at::empty(saliency.sizes(), saliency.options().dtype(at::kBool).memory_format(fmt));
  if (r.total() == 0) return mask;
  Tensor thr;
  if (quantile.has_value()) {
    const int64_t k = quantile_k(r, *quantile);
    if (k <= 0 || k >= r.D) return mask.fill_(k > 0);
    thr = kth_thresholds(mc, r, k);
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, saliency.scalar_type(), "threshold_mask_cuda", [&] {
    launch_mask<kThreshMask, scalar_t>(mc, nullptr, thr.defined() ? &thr : nullptr, beta, mask, r);
  });
  return mask;
}

// [N] double sum over each sample of [mask] g^2 (mask undefined: all features)
Tensor sample_sq_sums(const Tensor& gc, const Tensor& mc, const Rows& r) {
  const int64_t splits = num_splits(r);
  Tensor part = at::empty({r.N, splits}, gc.options().dtype(at::kDouble));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gc.scalar_type(), "sample_sq_sums_cuda", [&] {
    sq_norm_kernel<scalar_t, acc_type<scalar_t>><<<static_cast<unsigned>(r.N * splits), kThreads, 0,
                                                   c10::cuda::getCurrentCUDAStream()>>>(
        gc.const_data_ptr<scalar_t>(), mc.defined() ? mc.const_data_ptr<bool>() : nullptr,
        part.mutable_data_ptr<double>(), r.D, splits);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return part.sum(1);  // deterministic: fixed partials, fixed order
}

Tensor adaptor_saliency_mask_cuda(const Tensor& g, const Tensor& weight, const std::optional<Tensor>& bias,
                                  double beta, std::optional<double> quantile, bool normalize) {
  const char* op = "jsigr_fast::adaptor_saliency_mask";
  check_data(g, "g", op);
  TORCH_CHECK(g.dim() >= 2, op, ": g must have shape (N, C, *) or (N, D), got ", g.sizes());
  check_quantile(quantile, op);
  const Rows r = rows_of(g);
  const AdaptorParams p = adaptor_params(g, r.D, weight, bias, op);
  const int64_t C = p.C, S = p.S;
  const Tensor &w = p.weight, &b = p.bias;
  const auto acc = w.scalar_type();
  const c10::cuda::CUDAGuard guard(g.device());
  Tensor mask = at::empty(g.sizes(), g.options().dtype(at::kBool));
  if (r.total() == 0) return mask;
  int64_t k = 0;
  if (quantile.has_value()) {
    k = quantile_k(r, *quantile);
    if (k <= 0 || k >= r.D) return mask.fill_(k > 0);
  }
  const auto fmt = dense_memory_format(g);
  const Tensor gc = g.contiguous(fmt);
  // channel / spatial strides of the (N, C, S) data: NCHW, or channels-last(3d) read in place
  const int64_t sc = fmt == at::MemoryFormat::Contiguous ? S : 1, ss = fmt == at::MemoryFormat::Contiguous ? 1 : C;
  Tensor rms;
  if (normalize) {  // as the reference rounds it: mean in g's dtype, + tiny, sqrt
    const double tiny = g.scalar_type() == at::kDouble ? std::numeric_limits<double>::min()
                      : g.scalar_type() == at::kHalf   ? 6.103515625e-05  // 2^-14
                                                       : std::numeric_limits<float>::min();
    const Tensor ms = (sample_sq_sums(gc, Tensor(), r) / static_cast<double>(r.D)).to(g.scalar_type());
    rms = (ms + tiny).sqrt().to(acc).contiguous();
  } else {
    rms = at::ones({r.N}, g.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "adaptor_saliency_mask_cuda", [&] {
    using acc_t = acc_type<scalar_t>;
    auto launch = [&](auto mode, const Tensor* thr, Tensor& out) {
      constexpr int MODE = decltype(mode)::value;
      bool* mk = nullptr;
      scalar_t* m_out = nullptr;
      if constexpr (MODE == kGradWriteM) {
        m_out = out.mutable_data_ptr<scalar_t>();
      } else {
        mk = out.mutable_data_ptr<bool>();
      }
      adaptor_kernel<MODE, scalar_t, acc_t><<<elementwise_blocks(r.total()), kThreads, 0,
                                              c10::cuda::getCurrentCUDAStream()>>>(
          gc.const_data_ptr<scalar_t>(), rms.const_data_ptr<acc_t>(), w.const_data_ptr<acc_t>(),
          b.const_data_ptr<acc_t>(), thr ? thr->const_data_ptr<acc_t>() : nullptr,
          static_cast<acc_t>(static_cast<scalar_t>(beta)), mk, m_out, r.D, S, C, sc, ss, r.total());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (!quantile.has_value()) {
      launch(std::integral_constant<int, kGradMask>{}, nullptr, mask);
      return;
    }
    Tensor M = at::empty(g.sizes(), g.options());
    launch(std::integral_constant<int, kGradWriteM>{}, nullptr, M);
    const Tensor thr = kth_thresholds(M, r, k);
    launch_mask<kThreshMask, scalar_t>(M, nullptr, &thr, 0.0, mask, r);
  });
  return mask;
}

Tensor masked_sq_norm_bool_cuda(const Tensor& g, const Tensor& mask) {
  const char* op = "jsigr_fast::masked_sq_norm_bool";
  check_data(g, "g", op);
  check_mask(mask, g, op);
  const c10::cuda::CUDAGuard guard(g.device());
  const auto fmt = dense_memory_format(g);
  const Tensor gc = g.contiguous(fmt), mc = mask.contiguous(fmt);
  const Rows r = rows_of(g);
  if (r.total() == 0) return at::zeros({r.N}, g.options());
  return sample_sq_sums(gc, mc, r).to(g.scalar_type());
}

Tensor masked_sq_norm_bool_backward_cuda(const Tensor& grad_out, const Tensor& g, const Tensor& mask) {
  const char* op = "jsigr_fast::masked_sq_norm_bool_backward";
  check_data(g, "g", op);
  check_mask(mask, g, op);
  const Rows r = rows_of(g);
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == r.N, op, ": grad_out must have shape [", r.N, "], got ",
              grad_out.sizes());
  TORCH_CHECK(grad_out.device() == g.device(), op, ": grad_out and g must be on the same device");
  const c10::cuda::CUDAGuard guard(g.device());
  const auto fmt = dense_memory_format(g);
  const Tensor gc = g.contiguous(fmt), mc = mask.contiguous(fmt);
  const Tensor go = grad_out.to(g.scalar_type()).contiguous();
  Tensor grad_g = at::empty(g.sizes(), g.options().memory_format(fmt));
  if (r.total() == 0) return grad_g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_sq_norm_bool_backward_cuda", [&] {
    sq_norm_backward_kernel<scalar_t, acc_type<scalar_t>><<<elementwise_blocks(r.total()), kThreads, 0,
                                                            c10::cuda::getCurrentCUDAStream()>>>(
        go.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(), mc.const_data_ptr<bool>(),
        grad_g.mutable_data_ptr<scalar_t>(), r.D, r.total());
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_g;
}

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CUDA, m) {
  m.impl("gradient_saliency_mask", &gradient_saliency_mask_cuda);
  m.impl("threshold_mask", &threshold_mask_cuda);
  m.impl("adaptor_saliency_mask", &adaptor_saliency_mask_cuda);
  m.impl("masked_sq_norm_bool", &masked_sq_norm_bool_cuda);
  m.impl("masked_sq_norm_bool_backward", &masked_sq_norm_bool_backward_cuda);
}

}  // namespace jsigr_fast
