// CUDA kernels for out[n] = sum_d (mask[n, d] * g[n, d])^2 and its backward.
//
// Memory-bound: one read of g (and of mask) per element. The grid is (blocks_per_row, N) so a
// small batch of large images still fills the device; each block reduces its slice with warp
// shuffles and adds one partial sum per block with atomicAdd into an fp32 (fp64 for double)
// accumulator, which is cast to g's dtype at the end.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
// c10 stream/guard headers rather than ATen/cuda/CUDAContext.h: the latter drags in cuBLAS and
// cuSPARSE headers we do not use (and that a bare nvcc install, like the CPU CI box, lacks).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

namespace jsigr_fast {
namespace {

constexpr int kThreads = 256;

template <typename acc_t>
__device__ acc_t block_reduce_sum(acc_t v) {
  __shared__ acc_t warp_sums[kThreads / 32];
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  v = threadIdx.x < kThreads / 32 ? warp_sums[lane] : acc_t(0);
  if (warp == 0) {
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffff, v, offset);
  }
  return v;
}

// g, mask: [N, D] contiguous; acc: [N] zero-initialised accumulator.
template <typename scalar_t, typename acc_t>
__global__ void masked_sq_norm_kernel(const scalar_t* __restrict__ g, const scalar_t* __restrict__ mask,
                                      acc_t* __restrict__ acc, int64_t D) {
  const int64_t n = blockIdx.y;
  const scalar_t* gr = g + n * D;
  const scalar_t* mr = mask ? mask + n * D : nullptr;
  acc_t sum = 0;
  for (int64_t d = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; d < D; d += int64_t(gridDim.x) * blockDim.x) {
    acc_t v = static_cast<acc_t>(gr[d]);
    if (mr) v *= static_cast<acc_t>(mr[d]);
    sum += v * v;
  }
  sum = block_reduce_sum(sum);
  if (threadIdx.x == 0) atomicAdd(acc + n, sum);
}

// grad_g[n, d] = 2 * mask[n, d]^2 * g[n, d] * grad_out[n]; all [N, D] contiguous, grad_out [N].
template <typename scalar_t>
__global__ void masked_sq_norm_backward_kernel(const scalar_t* __restrict__ grad_out, const scalar_t* __restrict__ g,
                                               const scalar_t* __restrict__ mask, scalar_t* __restrict__ grad_g,
                                               int64_t D, int64_t total) {
  using opmath_t = at::opmath_type<scalar_t>;
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const opmath_t m = mask ? static_cast<opmath_t>(mask[i]) : opmath_t(1);
    grad_g[i] = static_cast<scalar_t>(opmath_t(2) * m * m * static_cast<opmath_t>(g[i]) *
                                      static_cast<opmath_t>(grad_out[i / D]));
  }
}

void check_inputs(const at::Tensor& g, const std::optional<at::Tensor>& mask, const char* op) {
  TORCH_CHECK(g.is_cuda(), op, ": g must be a CUDA tensor");
  TORCH_CHECK(g.dim() >= 1, op, ": g must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), op, ": g must be floating point, got ", g.scalar_type());
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == g.sizes(), op, ": mask must have g's shape ", g.sizes(), ", got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == g.scalar_type(), op, ": mask must have g's dtype ", g.scalar_type(), ", got ",
                mask->scalar_type());
    TORCH_CHECK(mask->device() == g.device(), op, ": mask and g must be on the same device");
  }
}

at::Tensor masked_sq_norm_cuda(const at::Tensor& g, const std::optional<at::Tensor>& mask) {
  check_inputs(g, mask, "jsigr_fast::masked_sq_norm");
  const c10::cuda::CUDAGuard guard(g.device());
  const at::Tensor gc = g.contiguous();
  const std::optional<at::Tensor> mc = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  const int64_t N = g.size(0);
  const int64_t D = N == 0 ? 0 : g.numel() / N;
  const auto acc_dtype = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor acc = at::zeros({N}, g.options().dtype(acc_dtype));
  if (N == 0 || D == 0) return acc.to(g.scalar_type());
  // Enough blocks per row to cover D with ~4 elements per thread, capped so the atomics stay cheap.
  const int64_t blocks_x = std::min<int64_t>(std::max<int64_t>(1, D / (kThreads * 4)), 1024);
  TORCH_CHECK(N <= 65535, "jsigr_fast::masked_sq_norm: batch size above 65535 is not supported on CUDA");
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(N));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_sq_norm_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    masked_sq_norm_kernel<scalar_t, acc_t><<<grid, kThreads, 0, stream>>>(
        gc.const_data_ptr<scalar_t>(), mc.has_value() ? mc->const_data_ptr<scalar_t>() : nullptr,
        acc.mutable_data_ptr<acc_t>(), D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return acc.to(g.scalar_type());
}

at::Tensor masked_sq_norm_backward_cuda(const at::Tensor& grad_out, const at::Tensor& g,
                                        const std::optional<at::Tensor>& mask) {
  check_inputs(g, mask, "jsigr_fast::masked_sq_norm_backward");
  const c10::cuda::CUDAGuard guard(g.device());
  const int64_t N = g.size(0);
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == N,
              "jsigr_fast::masked_sq_norm_backward: grad_out must have shape [", N, "], got ", grad_out.sizes());
  const at::Tensor gc = g.contiguous();
  const at::Tensor go = grad_out.to(g.scalar_type()).contiguous();
  const std::optional<at::Tensor> mc = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  at::Tensor grad_g = at::empty_like(gc);
  const int64_t total = gc.numel();
  if (total == 0) return grad_g;
  const int64_t D = total / N;
  const int64_t blocks = std::min<int64_t>((total + kThreads - 1) / kThreads, 65535);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_sq_norm_backward_cuda", [&] {
    masked_sq_norm_backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
        go.const_data_ptr<scalar_t>(), gc.const_data_ptr<scalar_t>(),
        mc.has_value() ? mc->const_data_ptr<scalar_t>() : nullptr, grad_g.mutable_data_ptr<scalar_t>(), D, total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return grad_g;
}

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CUDA, m) {
  m.impl("masked_sq_norm", &masked_sq_norm_cuda);
  m.impl("masked_sq_norm_backward", &masked_sq_norm_backward_cuda);
}

}  // namespace jsigr_fast
