// Kernels for testing the CUDA emulator itself (tests/test_cuda_emulated.py): a correct block sum,
// the shuffle variants, and one deliberate bug of each kind the emulator claims to catch. Valid
// CUDA; only ever built for the emulator (translate(..., library="emu_selftest")).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

namespace {

using at::Tensor;
constexpr int kThreads = 128;

// out[b] = sum of x over block b's slice: shuffles within each warp, warp sums through shared
// memory. kBarrier = false drops the __syncthreads between the shared writes and the read.
template <bool kBarrier>
__global__ void block_sum_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float warp_sums[kThreads / 32];
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = i < n ? x[i] : 0.f;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffff, v, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = v;
  if (kBarrier) __syncthreads();
  if (threadIdx.x == 0) {
    float s = 0.f;
    for (int w = 0; w < kThreads / 32; ++w) s += warp_sums[w];
    out[blockIdx.x] = s;
  }
}

// out[k][t] for the shuffle variants: xor 5, up 3, down 6 with width 16, index 7 with width 8
__global__ void shuffles_kernel(const float* __restrict__ x, float* __restrict__ out) {
  const int t = threadIdx.x;
  const float v = x[t];
  out[0 * blockDim.x + t] = __shfl_xor_sync(0xffffffff, v, 5);
  out[1 * blockDim.x + t] = __shfl_up_sync(0xffffffff, v, 3);
  out[2 * blockDim.x + t] = __shfl_down_sync(0xffffffff, v, 6, 16);
  out[3 * blockDim.x + t] = __shfl_sync(0xffffffff, v, 7, 8);
}

// threads past n return before a barrier the others wait at
__global__ void early_return_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  __shared__ float s[kThreads];
  const int t = threadIdx.x;
  if (t >= n) return;
  s[t] = x[t];
  __syncthreads();
  out[t] = s[(t + 1) % n];
}

// the two halves of the block wait at different barriers
__global__ void divergent_barrier_kernel(float* __restrict__ out) {
  if (threadIdx.x < 64) {
    __syncthreads();
  } else {
    __syncthreads();
  }
  out[threadIdx.x] = 1.f;
}

// a full-warp shuffle in a block of 16 threads (lanes 16..31 do not exist)
__global__ void partial_warp_kernel(const float* __restrict__ x, float* __restrict__ out) {
  out[threadIdx.x] = __shfl_down_sync(0xffffffff, x[threadIdx.x], 1);
}

// lanes 16..31 exit, then lanes 0..15 shuffle with the full mask
__global__ void exited_lane_kernel(const float* __restrict__ x, float* __restrict__ out) {
  if (threadIdx.x >= 16) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffff, x[threadIdx.x], 16);
}

// a device-side assert on negative inputs
__global__ void assert_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    CUDA_KERNEL_ASSERT(x[i] >= 0.f);
    out[i] = x[i];
  }
}

// an off-by-one bound: the last thread reads one element past the end of x (wrong only under
// AddressSanitizer: the value read is multiplied by 0)
__global__ void off_by_one_kernel(const float* __restrict__ x, float* __restrict__ out, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) out[i < n ? i : 0] += 0.f * x[i];
}

// Each case launches its kernel on x (float32, 1-d) and returns what it wrote.
Tensor run(int64_t which, const Tensor& x_in) {
  const Tensor x = x_in.contiguous();
  const int n = static_cast<int>(x.numel());
  auto stream = c10::cuda::getCurrentCUDAStream();
  const float* xp = x.const_data_ptr<float>();
  switch (which) {
    case 0:
    case 1: {
      const int blocks = (n + kThreads - 1) / kThreads;
      Tensor out = at::empty({blocks}, x.options());
      if (which == 0) {
        block_sum_kernel<true><<<blocks, kThreads, 0, stream>>>(xp, out.mutable_data_ptr<float>(), n);
      } else {
        block_sum_kernel<false><<<blocks, kThreads, 0, stream>>>(xp, out.mutable_data_ptr<float>(), n);
      }
      return out;
    }
    case 2: {
      Tensor out = at::empty({4, n}, x.options());
      shuffles_kernel<<<1, n, 0, stream>>>(xp, out.mutable_data_ptr<float>());
      return out;
    }
    case 3: {
      Tensor out = at::zeros({kThreads}, x.options());
      early_return_kernel<<<1, kThreads, 0, stream>>>(xp, out.mutable_data_ptr<float>(), n);
      return out;
    }
    case 4: {
      Tensor out = at::zeros({kThreads}, x.options());
      divergent_barrier_kernel<<<1, kThreads, 0, stream>>>(out.mutable_data_ptr<float>());
      return out;
    }
    case 5: {
      Tensor out = at::zeros({16}, x.options());
      partial_warp_kernel<<<1, 16, 0, stream>>>(xp, out.mutable_data_ptr<float>());
      return out;
    }
    case 6: {
      Tensor out = at::zeros({32}, x.options());
      exited_lane_kernel<<<1, 32, 0, stream>>>(xp, out.mutable_data_ptr<float>());
      return out;
    }
    case 7: {
      Tensor out = at::zeros_like(x);
      assert_kernel<<<(n + kThreads - 1) / kThreads, kThreads, 0, stream>>>(xp, out.mutable_data_ptr<float>(), n);
      return out;
    }
    case 8: {  // an empty grid: the device refuses the launch
      Tensor out = at::zeros_like(x);
      assert_kernel<<<0, kThreads, 0, stream>>>(xp, out.mutable_data_ptr<float>(), n);
      return out;
    }
    case 9: {  // a block of 2048 threads: more than the device allows
      Tensor out = at::zeros_like(x);
      assert_kernel<<<1, 2048, 0, stream>>>(xp, out.mutable_data_ptr<float>(), n);
      return out;
    }
    case 10: {
      Tensor out = at::zeros_like(x);
      off_by_one_kernel<<<(n + kThreads) / kThreads, kThreads, 0, stream>>>(xp, out.mutable_data_ptr<float>(), n);
      return out;
    }
  }
  TORCH_CHECK(false, "no self-test case ", which);
}

}  // namespace

TORCH_LIBRARY(emu_selftest, m) { m.def("run(int which, Tensor x) -> Tensor"); }

TORCH_LIBRARY_IMPL(emu_selftest, CUDA, m) { m.impl("run", &run); }
