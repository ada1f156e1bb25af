// CPU ops of train-mode batch norm and its first and second derivatives (schemas in csrc/ops.cpp,
// formulas and derivation in csrc/README.md, plain-PyTorch references in jsigr_fast/reference.py):
//
//   batch_norm_train           (x, weight?, bias?, eps)                       -> (y, mean, invstd)
//   batch_norm_backward        (grad_y?, x, weight?, mean, invstd,
//                               grad_mean?, grad_invstd?)                     -> (grad_x, grad_weight, grad_bias)
//   batch_norm_double_backward (gg_x?, gg_weight?, gg_bias?, grad_y, x, weight?, mean, invstd,
//                               grad_mean?, grad_invstd?)                     -> 7 gradients
//   batch_norm_double_backward_from_grad_x
//                              (gg_x?, gg_weight?, gg_bias?, grad_x, grad_weight, grad_bias, x,
//                               weight?, mean, invstd, grad_mean?, grad_invstd?) -> the same 7
//
// This file checks arguments, picks the layout, allocates outputs and calls the kernels of
// csrc/batch_norm_kernels.h — the AVX2 build when the CPU has it (and ATEN_CPU_CAPABILITY is not
// "default"), else the generic one.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "batch_norm_cpu.h"
#include "cpu_isa.h"
#include "memory_format.h"

namespace jsigr_fast {
namespace {

using at::Tensor;

// layout: dense_memory_format (csrc/memory_format.h): contiguous, or channels-last when x is laid
// out that way.
bn_cpu::Shape bn_shape(const Tensor& x, at::MemoryFormat fmt) {
  bn_cpu::Shape s;
  s.N = x.size(0);
  s.C = x.size(1);
  s.S = 1;
  for (int64_t d = 2; d < x.dim(); ++d) s.S *= x.size(d);
  s.rows = fmt != at::MemoryFormat::Contiguous || s.S == 1;  // (N, C, 1...) contiguous is (N, C) rows
  return s;
}

const bn_cpu::Kernels& kernels() {
  static const bn_cpu::Kernels* k = [] {
    const bn_cpu::Kernels* avx2 = bn_cpu::avx2_kernels();
    return avx2 != nullptr && cpu_runs_avx2_build() ? avx2 : &bn_cpu::generic_kernels();
  }();
  return *k;
}

// ---------------------------------------------------------------------------------------------
// checks
// ---------------------------------------------------------------------------------------------
at::ScalarType opmath_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_x(const Tensor& x, const char* op) {
  TORCH_CHECK(x.device().is_cpu(), op, ": expected CPU tensors, got x on ", x.device());
  TORCH_CHECK(x.dim() >= 2, op, ": x must have shape (N, C, *), got ", x.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating point, got ", x.scalar_type());
  TORCH_CHECK(x.numel() > 0, op, ": x must have at least one value per channel, got shape ", x.sizes());
}

void check_like_x(const Tensor& t, const Tensor& x, const char* name, const char* op) {
  TORCH_CHECK(t.sizes() == x.sizes(), op, ": ", name, " must have x's shape ", x.sizes(), ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == x.scalar_type(), op, ": ", name, " must have x's dtype ", x.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), op, ": ", name, " must be on x's device");
}

// A [C] vector; opmath_only: float32 (float64 for float64 x), else also x's dtype (weight, bias).
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

// A [C] vector as a contiguous opmath tensor (filled with `fill` when absent).
Tensor channel_or(const std::optional<Tensor>& t, const Tensor& x, double fill) {
  const auto acc = opmath_dtype(x.scalar_type());
  if (t.has_value()) return t->to(acc).contiguous();
  return at::full({x.size(1)}, fill, x.options().dtype(acc));
}

Tensor empty_channel(const Tensor& x) { return at::empty({x.size(1)}, x.options().dtype(opmath_dtype(x.scalar_type()))); }

// ---------------------------------------------------------------------------------------------
// ops
// ---------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor, Tensor> batch_norm_train_cpu(const Tensor& x_in, const std::optional<Tensor>& weight,
                                                        const std::optional<Tensor>& bias, double eps) {
  const char* op = "jsigr_fast::batch_norm_train";
  check_x(x_in, op);
  check_channel(weight, x_in, "weight", op, false);
  check_channel(bias, x_in, "bias", op, false);
  TORCH_CHECK(eps >= 0, op, ": eps must be >= 0, got ", eps);
  const auto fmt = dense_memory_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  Tensor y = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor mean = empty_channel(x), invstd = empty_channel(x);
  const Tensor w = channel_or(weight, x, 1.0), b = channel_or(bias, x, 0.0);
  const bn_cpu::ForwardArgs a{x.const_data_ptr(), y.mutable_data_ptr(), mean.mutable_data_ptr(),
                              invstd.mutable_data_ptr(), w.const_data_ptr(), b.const_data_ptr(), eps};
  kernels().forward(x.scalar_type(), bn_shape(x, fmt), a);
  return {y, mean, invstd};
}

std::tuple<Tensor, Tensor, Tensor> batch_norm_backward_cpu(const std::optional<Tensor>& grad_y_in, const Tensor& x_in,
                                                           const std::optional<Tensor>& weight, const Tensor& mean,
                                                           const Tensor& invstd,
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
  const auto fmt = dense_memory_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Tensor gy = grad_y_in.has_value() ? grad_y_in->contiguous(fmt) : Tensor();
  Tensor gx = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor gw = empty_channel(x), gb = empty_channel(x);
  if (!gy.defined()) {
    gw.zero_();
    gb.zero_();
  }
  const Tensor w = channel_or(weight, x, 1.0), mu = mean.contiguous(), is = invstd.contiguous();
  const Tensor p = channel_or(grad_mean, x, 0.0), q = channel_or(grad_invstd, x, 0.0);
  const bn_cpu::BackwardArgs a{gy.defined() ? gy.const_data_ptr() : nullptr,
                               x.const_data_ptr(),
                               gx.mutable_data_ptr(),
                               gw.mutable_data_ptr(),
                               gb.mutable_data_ptr(),
                               w.const_data_ptr(),
                               mu.const_data_ptr(),
                               is.const_data_ptr(),
                               p.const_data_ptr(),
                               q.const_data_ptr()};
  kernels().backward(x.scalar_type(), bn_shape(x, fmt), a);
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
  check_channel(grad_mean, x_in, "grad_mean", op, true);  // given grad_y, enters linearly: no effect
  check_channel(grad_invstd, x_in, "grad_invstd", op, true);
  if (rebuild) {
    check_channel(rebuild->first, x_in, "grad_weight", op, true);
    check_channel(rebuild->second, x_in, "grad_bias", op, true);
  }
  const auto fmt = dense_memory_format(x_in);
  const Tensor x = x_in.contiguous(fmt);
  const Tensor gy = grad_y_in.contiguous(fmt);
  const Tensor u = gg_x_in.has_value() ? gg_x_in->contiguous(fmt) : Tensor();
  Tensor d_gy = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor d_x = at::empty(x.sizes(), x.options().memory_format(fmt));
  Tensor d_w = empty_channel(x), d_mean = empty_channel(x), d_invstd = empty_channel(x);
  Tensor d_gmean = empty_channel(x), d_ginvstd = empty_channel(x);
  const Tensor w = channel_or(weight, x, 1.0), mu = mean.contiguous(), is = invstd.contiguous();
  const Tensor alpha = channel_or(gg_weight, x, 0.0), beta = channel_or(gg_bias, x, 0.0);
  const Tensor q = channel_or(grad_invstd, x, 0.0);
  bn_cpu::DoubleBackwardArgs a{u.defined() ? u.const_data_ptr() : nullptr,
                               alpha.const_data_ptr(),
                               beta.const_data_ptr(),
                               gy.const_data_ptr(),
                               x.const_data_ptr(),
                               w.const_data_ptr(),
                               mu.const_data_ptr(),
                               is.const_data_ptr(),
                               q.const_data_ptr(),
                               d_gy.mutable_data_ptr(),
                               d_x.mutable_data_ptr(),
                               d_w.mutable_data_ptr(),
                               d_mean.mutable_data_ptr(),
                               d_invstd.mutable_data_ptr(),
                               d_gmean.mutable_data_ptr(),
                               d_ginvstd.mutable_data_ptr()};
  Tensor gw, gb, p;  // alive until the kernel returns
  if (rebuild) {
    gw = rebuild->first.contiguous();
    gb = rebuild->second.contiguous();
    p = channel_or(grad_mean, x, 0.0);
    a.rebuild_grad_weight = gw.const_data_ptr();
    a.rebuild_grad_bias = gb.const_data_ptr();
    a.rebuild_grad_mean = p.const_data_ptr();
  }
  kernels().double_backward(x.scalar_type(), bn_shape(x, fmt), a);
  return {d_gy, d_x, d_w, d_mean, d_invstd, d_gmean, d_ginvstd};
}

Grads7 batch_norm_double_backward_cpu(const std::optional<Tensor>& gg_x, const std::optional<Tensor>& gg_weight,
                                      const std::optional<Tensor>& gg_bias, const Tensor& grad_y, const Tensor& x,
                                      const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
                                      const std::optional<Tensor>& grad_mean,
                                      const std::optional<Tensor>& grad_invstd) {
  return double_backward("jsigr_fast::batch_norm_double_backward", gg_x, gg_weight, gg_bias, grad_y, x, weight, mean,
                         invstd, grad_mean, grad_invstd, nullptr);
}

Grads7 batch_norm_double_backward_from_grad_x_cpu(
    const std::optional<Tensor>& gg_x, const std::optional<Tensor>& gg_weight, const std::optional<Tensor>& gg_bias,
    const Tensor& grad_x, const Tensor& grad_weight, const Tensor& grad_bias, const Tensor& x,
    const std::optional<Tensor>& weight, const Tensor& mean, const Tensor& invstd,
    const std::optional<Tensor>& grad_mean, const std::optional<Tensor>& grad_invstd) {
  const std::pair<Tensor, Tensor> rebuild{grad_weight, grad_bias};
  return double_backward("jsigr_fast::batch_norm_double_backward_from_grad_x", gg_x, gg_weight, gg_bias, grad_x, x,
                         weight, mean, invstd, grad_mean, grad_invstd, &rebuild);
}

// Which kernel build runs ("avx2" or "generic"): for tests and benchmark records.
std::string batch_norm_cpu_isa() { return &kernels() == bn_cpu::avx2_kernels() ? "avx2" : "generic"; }

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CPU, m) {
  m.impl("batch_norm_train", &batch_norm_train_cpu);
  m.impl("batch_norm_backward", &batch_norm_backward_cpu);
  m.impl("batch_norm_double_backward", &batch_norm_double_backward_cpu);
  m.impl("batch_norm_double_backward_from_grad_x", &batch_norm_double_backward_from_grad_x_cpu);
}

TORCH_LIBRARY_FRAGMENT(jsigr_fast, m) {
  m.def("batch_norm_cpu_isa() -> str", &batch_norm_cpu_isa);
}

}  // namespace jsigr_fast
