// CPU kernels for the per-sample masked squared norm, the reduction at the heart of every
// input-gradient penalty:  out[n] = sum_d (mask[n, d] * g[n, d])^2.
//
// Parallel over samples (at::parallel_for, OpenMP); within a sample the float path is
// vectorized (at::vec) and accumulated block-wise into a double, so a 150k-feature ImageNet
// sample sums with ~1e-7 relative error instead of the ~1e-5 a single float running sum gives.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <optional>

namespace jsigr_fast {
namespace {

void check_inputs(const at::Tensor& g, const std::optional<at::Tensor>& mask, const char* op) {
  TORCH_CHECK(g.dim() >= 1, op, ": g must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(g.scalar_type()), op, ": g must be floating point, got ", g.scalar_type());
  if (mask.has_value()) {
    TORCH_CHECK(mask->sizes() == g.sizes(), op, ": mask must have g's shape ", g.sizes(), ", got ", mask->sizes());
    TORCH_CHECK(mask->scalar_type() == g.scalar_type(), op, ": mask must have g's dtype ", g.scalar_type(),
                ", got ", mask->scalar_type());
    TORCH_CHECK(mask->device() == g.device(), op, ": mask and g must be on the same device");
  }
}

// Sum of squares of (m * g) over [0, D) for one sample; m == nullptr means no mask.
template <typename scalar_t>
double row_sq_norm(const scalar_t* g, const scalar_t* m, int64_t D) {
  double total = 0.0;
  for (int64_t d = 0; d < D; ++d) {
    const double v = m ? static_cast<double>(m[d]) * static_cast<double>(g[d]) : static_cast<double>(g[d]);
    total += v * v;
  }
  return total;
}

template <>
double row_sq_norm<float>(const float* g, const float* m, int64_t D) {
  using Vec = at::vec::Vectorized<float>;
  constexpr int64_t kBlock = 1024;  // float partial sums over at most kBlock/Vec::size() terms per lane
  double total = 0.0;
  for (int64_t start = 0; start < D; start += kBlock) {
    const int64_t end = std::min(start + kBlock, D);
    Vec acc(0.f);
    int64_t d = start;
    for (; d + Vec::size() <= end; d += Vec::size()) {
      Vec v = Vec::loadu(g + d);
      if (m) v = v * Vec::loadu(m + d);
      acc = at::vec::fmadd(v, v, acc);
    }
    float lanes[Vec::size()];
    acc.store(lanes);
    double block = 0.0;
    for (int64_t i = 0; i < Vec::size(); ++i) block += lanes[i];
    for (; d < end; ++d) {
      const float v = m ? m[d] * g[d] : g[d];
      block += static_cast<double>(v) * v;
    }
    total += block;
  }
  return total;
}

at::Tensor masked_sq_norm_cpu(const at::Tensor& g, const std::optional<at::Tensor>& mask) {
  check_inputs(g, mask, "jsigr_fast::masked_sq_norm");
  const at::Tensor gc = g.contiguous();
  const std::optional<at::Tensor> mc = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  const int64_t N = g.size(0);
  const int64_t D = N == 0 ? 0 : g.numel() / N;
  at::Tensor out = at::empty({N}, g.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_sq_norm_cpu", [&] {
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* mp = mc.has_value() ? mc->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        op[n] = static_cast<scalar_t>(row_sq_norm<scalar_t>(gp + n * D, mp ? mp + n * D : nullptr, D));
      }
    });
  });
  return out;
}

at::Tensor masked_sq_norm_backward_cpu(const at::Tensor& grad_out, const at::Tensor& g,
                                       const std::optional<at::Tensor>& mask) {
  check_inputs(g, mask, "jsigr_fast::masked_sq_norm_backward");
  const int64_t N = g.size(0);
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == N,
              "jsigr_fast::masked_sq_norm_backward: grad_out must have shape [", N, "], got ", grad_out.sizes());
  const at::Tensor gc = g.contiguous();
  const at::Tensor go = grad_out.to(g.scalar_type()).contiguous();
  const std::optional<at::Tensor> mc = mask.has_value() ? std::optional<at::Tensor>(mask->contiguous()) : std::nullopt;
  const int64_t D = N == 0 ? 0 : g.numel() / N;
  at::Tensor grad_g = at::empty_like(gc);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "masked_sq_norm_backward_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = gc.const_data_ptr<scalar_t>();
    const scalar_t* mp = mc.has_value() ? mc->const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* gop = go.const_data_ptr<scalar_t>();
    scalar_t* outp = grad_g.mutable_data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const opmath_t scale = opmath_t(2) * static_cast<opmath_t>(gop[n]);
        const scalar_t* gr = gp + n * D;
        const scalar_t* mr = mp ? mp + n * D : nullptr;
        scalar_t* orow = outp + n * D;
        for (int64_t d = 0; d < D; ++d) {
          const opmath_t mm = mr ? static_cast<opmath_t>(mr[d]) : opmath_t(1);
          orow[d] = static_cast<scalar_t>(scale * mm * mm * static_cast<opmath_t>(gr[d]));
        }
      }
    });
  });
  return grad_g;
}

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CPU, m) {
  m.impl("masked_sq_norm", &masked_sq_norm_cpu);
  m.impl("masked_sq_norm_backward", &masked_sq_norm_backward_cpu);
}

}  // namespace jsigr_fast
