// CPU ops of the J-SIGR selective mask and of the bool-masked squared norm (schemas in
// csrc/ops.cpp, contracts in csrc/README.md, plain-PyTorch references in jsigr_fast/reference.py):
//
//   gradient_saliency_mask(g, beta, quantile?)                         -> bool mask, g's shape
//   threshold_mask(saliency, beta, quantile?)                          -> bool mask
//   adaptor_saliency_mask(g, weight, bias?, beta, quantile?, normalize) -> bool mask
//   masked_sq_norm_bool(g, mask)                                       -> [N]
//   masked_sq_norm_bool_backward(grad_out, g, mask)                    -> grad_g
//
// This file checks arguments, picks the layout, allocates outputs and calls the kernels of
// csrc/sample_ops_kernels.h — the AVX2 build when the CPU has it (and ATEN_CPU_CAPABILITY is
// not "default"), else the generic one (sample_cpu::kernels()).
//
// Layout. Per-sample ops only need each sample's features to be one contiguous block, in any
// order: contiguous and channels-last tensors are used as they are ("sample-major"), outputs
// take the input's memory format; anything else is copied to contiguous first. The adaptor's
// 1x1 convolution needs the channel structure and always works on a contiguous copy.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <optional>
#include <string>

#include "adaptor_params.h"
#include "memory_format.h"
#include "sample_ops_cpu.h"

namespace jsigr_fast {
namespace {

using at::Tensor;

using sample_cpu::kernels;

// Layout: dense_memory_format (csrc/memory_format.h), so each sample is one contiguous block of D features.
sample_cpu::Rows rows_of(const Tensor& t) {
  sample_cpu::Rows r;
  r.N = t.size(0);
  r.D = r.N == 0 ? 0 : t.numel() / r.N;
  return r;
}

void check_data(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": expected CPU tensors, got ", name, " on ", t.device());
  TORCH_CHECK(t.dim() >= 1, op, ": ", name, " must have a batch dimension, got a 0-d tensor");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be floating point, got ", t.scalar_type());
}

sample_cpu::Rule rule_of(double beta, std::optional<double> quantile, const char* op) {
  sample_cpu::Rule rule;
  rule.beta = beta;
  if (quantile.has_value()) {
    TORCH_CHECK(std::isfinite(*quantile) && *quantile >= 0.0 && *quantile <= 1.0, op,
                ": quantile must be in [0, 1], got ", *quantile);
    rule.quantile = *quantile;
  }
  return rule;
}

Tensor empty_mask(const Tensor& like, at::MemoryFormat fmt) {
  return at::empty(like.sizes(), like.options().dtype(at::kBool).memory_format(fmt));
}

Tensor gradient_saliency_mask_cpu(const Tensor& g, double beta, std::optional<double> quantile) {
  const char* op = "jsigr_fast::gradient_saliency_mask";
  check_data(g, "g", op);
  const auto rule = rule_of(beta, quantile, op);
  const auto fmt = dense_memory_format(g);
  const Tensor gc = g.contiguous(fmt);
  Tensor mask = empty_mask(g, fmt);
  kernels().gradient_mask(g.scalar_type(), rows_of(g), gc.const_data_ptr(), mask.mutable_data_ptr<bool>(), rule);
  return mask;
}

Tensor threshold_mask_cpu(const Tensor& saliency, double beta, std::optional<double> quantile) {
  const char* op = "jsigr_fast::threshold_mask";
  check_data(saliency, "saliency", op);
  const auto rule = rule_of(beta, quantile, op);
  const auto fmt = dense_memory_format(saliency);
  const Tensor mc = saliency.contiguous(fmt);
  Tensor mask = empty_mask(saliency, fmt);
  kernels().threshold_mask(saliency.scalar_type(), rows_of(saliency), mc.const_data_ptr(),
                           mask.mutable_data_ptr<bool>(), rule);
  return mask;
}

Tensor adaptor_saliency_mask_cpu(const Tensor& g, const Tensor& weight, const std::optional<Tensor>& bias, double beta,
                                 std::optional<double> quantile, bool normalize) {
  const char* op = "jsigr_fast::adaptor_saliency_mask";
  check_data(g, "g", op);
  TORCH_CHECK(g.dim() >= 2, op, ": g must have shape (N, C, *) or (N, D), got ", g.sizes());
  const auto rule = rule_of(beta, quantile, op);
  const auto r = rows_of(g);
  const AdaptorParams p = adaptor_params(g, r.D, weight, bias, op);
  sample_cpu::AdaptorArgs a;
  a.C = p.C;
  a.S = p.S;
  a.normalize = normalize;
  a.weight = p.weight.const_data_ptr();
  a.bias = p.bias.const_data_ptr();
  const Tensor gc = g.contiguous();
  Tensor mask = empty_mask(g, at::MemoryFormat::Contiguous);
  kernels().adaptor_mask(g.scalar_type(), r, gc.const_data_ptr(), mask.mutable_data_ptr<bool>(), a, rule);
  return mask;
}

void check_mask(const Tensor& mask, const Tensor& g, const char* op) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ", mask.scalar_type());
  TORCH_CHECK(mask.sizes() == g.sizes(), op, ": mask must have g's shape ", g.sizes(), ", got ", mask.sizes());
  TORCH_CHECK(mask.device() == g.device(), op, ": mask and g must be on the same device");
}

Tensor masked_sq_norm_bool_cpu(const Tensor& g, const Tensor& mask) {
  const char* op = "jsigr_fast::masked_sq_norm_bool";
  check_data(g, "g", op);
  check_mask(mask, g, op);
  const auto fmt = dense_memory_format(g);
  const Tensor gc = g.contiguous(fmt), mc = mask.contiguous(fmt);
  const auto r = rows_of(g);
  Tensor out = at::empty({r.N}, g.options());
  kernels().sq_norm(g.scalar_type(), r, gc.const_data_ptr(), mc.const_data_ptr<bool>(), out.mutable_data_ptr());
  return out;
}

Tensor masked_sq_norm_bool_backward_cpu(const Tensor& grad_out, const Tensor& g, const Tensor& mask) {
  const char* op = "jsigr_fast::masked_sq_norm_bool_backward";
  check_data(g, "g", op);
  check_mask(mask, g, op);
  const auto r = rows_of(g);
  TORCH_CHECK(grad_out.dim() == 1 && grad_out.size(0) == r.N, op, ": grad_out must have shape [", r.N, "], got ",
              grad_out.sizes());
  const auto fmt = dense_memory_format(g);
  const Tensor gc = g.contiguous(fmt), mc = mask.contiguous(fmt);
  const Tensor go = grad_out.to(g.scalar_type()).contiguous();
  Tensor grad_g = at::empty(g.sizes(), g.options().memory_format(fmt));
  kernels().sq_norm_backward(g.scalar_type(), r, go.const_data_ptr(), gc.const_data_ptr(), mc.const_data_ptr<bool>(),
                             grad_g.mutable_data_ptr());
  return grad_g;
}

// Which kernel build runs ("avx2" or "generic"): for tests and benchmark records.
std::string saliency_mask_cpu_isa() { return sample_cpu::kernels_isa(); }

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, CPU, m) {
  m.impl("gradient_saliency_mask", &gradient_saliency_mask_cpu);
  m.impl("threshold_mask", &threshold_mask_cpu);
  m.impl("adaptor_saliency_mask", &adaptor_saliency_mask_cpu);
  m.impl("masked_sq_norm_bool", &masked_sq_norm_bool_cpu);
  m.impl("masked_sq_norm_bool_backward", &masked_sq_norm_bool_backward_cpu);
}

TORCH_LIBRARY_FRAGMENT(jsigr_fast, m) {
  m.def("saliency_mask_cpu_isa() -> str", &saliency_mask_cpu_isa);
}

}  // namespace jsigr_fast
