// Argument checks of the loss-head ops, shared by the CPU (csrc/cross_entropy_cotangent.cpp) and CUDA
// (csrc/cuda/cross_entropy_cotangent.cu) kernels so that both raise the same messages (the Triton
// launchers of kernels/loss_head.py spell the same ones). The range of the targets is checked where
// the data lives: on the host for CPU tensors (naming the sample), by a device-side assert on the GPU
// (as ATen's nll_loss does: a host check would synchronise every call).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>

namespace jsigr_fast {

// logits (N, K) floating with K >= 1; target [N] integer on logits' device
inline void check_ce_args(const at::Tensor& logits, const at::Tensor& target, const char* op) {
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0, op, ": logits must have shape (N, K) with K >= 1, got ",
              logits.sizes());
  TORCH_CHECK(at::isFloatingType(logits.scalar_type()), op, ": logits must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), op, ": target must have shape [", logits.size(0),
              "], got ", target.sizes());
  TORCH_CHECK(at::isIntegralType(target.scalar_type(), /*includeBool=*/false) && target.device() == logits.device(),
              op, ": target must be an integer tensor on logits' device, got ", target.scalar_type(), " on ",
              target.device());
}

// the backward's optional cotangents: grad_loss [N], grad_cot logits' shape
inline void check_ce_cotangents(const std::optional<at::Tensor>& grad_loss, const std::optional<at::Tensor>& grad_cot,
                                const at::Tensor& logits, const char* op) {
  if (grad_loss.has_value()) {
    TORCH_CHECK(grad_loss->dim() == 1 && grad_loss->size(0) == logits.size(0), op, ": grad_loss must have shape [",
                logits.size(0), "], got ", grad_loss->sizes());
  }
  if (grad_cot.has_value()) {
    TORCH_CHECK(grad_cot->sizes() == logits.sizes(), op, ": grad_cot must have logits' shape ", logits.sizes(),
                ", got ", grad_cot->sizes());
  }
}

}  // namespace jsigr_fast
