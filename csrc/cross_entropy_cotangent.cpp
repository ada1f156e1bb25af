// CPU ops of the fused loss head (schemas in csrc/ops.cpp, references in jsigr_fast/reference.py):
//
//   cross_entropy_cotangent(logits [N, K], target [N])      -> (loss [N], cotangent [N, K])
//     loss[n] = logsumexp(z_n) - z_n[y_n],   cotangent[n] = softmax(z_n) - onehot(y_n)
//   cross_entropy_cotangent_backward(grad_loss? [N], grad_cot? [N, K], logits, target) -> grad_logits
//     grad[n] = a_n (p_n - onehot(y_n)) + p_n * (b_n - <p_n, b_n>),   p = softmax(z)
//
// One pass over each row (max, sum of exponentials, then the K outputs) instead of ATen's
// log_softmax + nll_loss forward, the nll_loss / log_softmax backward that produce the input
// gradient's cotangent, and their double-backward nodes. K is small (10..1000): this saves kernel
// launches and autograd nodes, not FLOPs. The kernels are in csrc/sample_ops_kernels.h (AVX2 or
// generic build); the math is in opmath (float; double for double).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "cross_entropy_checks.h"
#include "sample_ops_cpu.h"

namespace jsigr_fast {
namespace {

using at::Tensor;

// the shared checks, then every target's range on the host (naming the sample); int64 targets
Tensor checked_target(const Tensor& logits, const Tensor& target, const char* op) {
  TORCH_CHECK(logits.device().is_cpu(), op, ": expected CPU tensors, got logits on ", logits.device());
  check_ce_args(logits, target, op);
  const int64_t N = logits.size(0), K = logits.size(1);
  Tensor y = target.to(at::kLong).contiguous();
  const int64_t* yp = y.const_data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n) {
    TORCH_CHECK(yp[n] >= 0 && yp[n] < K, op, ": target ", yp[n], " of sample ", n, " is out of range [0, ", K, ")");
  }
  return y;
}

sample_cpu::Rows rows_of(const Tensor& logits) {
  sample_cpu::Rows r;
  r.N = logits.size(0);
  r.D = logits.size(1);
  return r;
}

std::tuple<Tensor, Tensor> cross_entropy_cotangent_cpu(const Tensor& logits, const Tensor& target) {
  const Tensor y = checked_target(logits, target, "jsigr_fast::cross_entropy_cotangent");
  const Tensor z = logits.contiguous();
  Tensor loss = at::empty({logits.size(0)}, logits.options());
  Tensor cot = at::empty(logits.sizes(), logits.options());
  sample_cpu::kernels().ce_forward(logits.scalar_type(), rows_of(logits), z.const_data_ptr(),
                                   y.const_data_ptr<int64_t>(), loss.mutable_data_ptr(), cot.mutable_data_ptr());
  return {loss, cot};
}

Tensor cross_entropy_cotangent_backward_cpu(const std::optional<Tensor>& grad_loss, const std::optional<Tensor>& grad_cot,
                                            const Tensor& logits, const Tensor& target) {
  const char* op = "jsigr_fast::cross_entropy_cotangent_backward";
  const Tensor y = checked_target(logits, target, op);
  const auto dt = logits.scalar_type();
  check_ce_cotangents(grad_loss, grad_cot, logits, op);
  Tensor ga, gb;
  if (grad_loss.has_value()) ga = grad_loss->to(dt).contiguous();
  if (grad_cot.has_value()) gb = grad_cot->to(dt).contiguous();
  const Tensor z = logits.contiguous();
  Tensor grad = at::empty(logits.sizes(), logits.options());
  sample_cpu::kernels().ce_backward(dt, rows_of(logits), ga.defined() ? ga.const_data_ptr() : nullptr,
                                    gb.defined() ? gb.const_data_ptr() : nullptr, z.const_data_ptr(),
                                    y.const_data_ptr<int64_t>(), grad.mutable_data_ptr());
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CPU, m) {
  m.impl("cross_entropy_cotangent", &cross_entropy_cotangent_cpu);
  m.impl("cross_entropy_cotangent_backward", &cross_entropy_cotangent_backward_cpu);
}

}  // namespace jsigr_fast
