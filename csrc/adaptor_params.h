// The adaptor mask's parameter checks and their accumulator-type copies, shared by the CPU
// (csrc/saliency_mask.cpp) and CUDA (csrc/cuda/saliency_mask.cu) kernels of
// jsigr_fast::adaptor_saliency_mask (the Triton launcher, kernels/saliency_mask.py, raises the
// same messages): g is (N, C, *) — or (N, D), one channel, as SaliencyAdaptor treats it —, weight a
// 1x1 convolution's [C, C, 1, 1] (or [C, C]), bias [C] or none.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace jsigr_fast {

struct AdaptorParams {
  int64_t C = 0, S = 0;  // channels, features per channel (D = C * S)
  at::Tensor weight;     // [C, C] contiguous, accumulator type (double for double g, else float)
  at::Tensor bias;       // [C] contiguous, accumulator type (zeros when none)
};

// g already checked as data (floating, a batch dimension); D = g.numel() / N.
inline AdaptorParams adaptor_params(const at::Tensor& g, int64_t D, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, const char* op) {
  AdaptorParams p;
  p.C = g.dim() == 2 ? 1 : g.size(1);
  p.S = p.C == 0 ? 0 : D / p.C;
  const int64_t C = p.C;
  const bool square = weight.dim() >= 2 && weight.size(0) == C && weight.size(1) == C;
  TORCH_CHECK(square && (weight.dim() == 2 || (weight.dim() == 4 && weight.size(2) == 1 && weight.size(3) == 1)), op,
              ": weight must be a 1x1 convolution's [C, C, 1, 1] (or [C, C]) with C = ", C, ", got ", weight.sizes());
  TORCH_CHECK(weight.device() == g.device() && at::isFloatingType(weight.scalar_type()), op,
              ": weight must be a floating tensor on g's device");
  const auto acc = g.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  p.weight = weight.reshape({C, C}).to(acc).contiguous();
  if (bias.has_value()) {
    TORCH_CHECK(bias->dim() == 1 && bias->numel() == C && bias->device() == g.device() &&
                    at::isFloatingType(bias->scalar_type()),
                op, ": bias must be a floating [", C, "] tensor on g's device, got ", bias->sizes());
    p.bias = bias->to(acc).contiguous();
  } else {
    p.bias = at::zeros({C}, g.options().dtype(acc));
  }
  return p;
}

}  // namespace jsigr_fast
