// Interface between the per-sample ops — the selective mask and the bool-masked squared norm
// (csrc/saliency_mask.cpp), the loss head (csrc/cross_entropy_cotangent.cpp): checks, layout,
// allocation, registration — and their CPU kernels (csrc/sample_ops_kernels.h), compiled twice like
// the batch-norm kernels: for any CPU (sample_ops_cpu_generic.cpp) and with AVX2+FMA
// (sample_ops_cpu_avx2.cpp, picked at run time by kernels() below).
//
// Every tensor is seen as N rows of D contiguous features ("sample-major": contiguous or
// channels-last memory both qualify, since a per-sample reduction or an elementwise map does not
// care about the order of the features inside a sample). Pointers are untyped: data in the op's
// dtype, masks as bool (one byte), per-sample outputs in the op's dtype.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "quantile_rule.h"

namespace jsigr_fast::sample_cpu {

struct Rows {
  int64_t N = 0, D = 0;
};

// The selection rule shared by the mask kernels: quantile < 0 means "mask = M <= beta"; otherwise
// the k = D - quantile_kept(quantile, D) least salient features of each row (quantile_rule.h; ties at
// the k-th smallest value included), exactly as jsigr_fast.saliency.selective_mask.
struct Rule {
  double beta = 0.0;
  double quantile = -1.0;
};

// Adaptor mask: g viewed as (N, C, S) contiguous; weight [C * C] row-major (out, in) and bias [C]
// in opmath (float; double for double g).
struct AdaptorArgs {
  int64_t C = 1, S = 0;
  const void* weight;
  const void* bias;
  bool normalize = true;
};

struct Kernels {
  // M = |g| / max(max_d |g|, tiny) per row (never stored), then the rule.
  void (*gradient_mask)(c10::ScalarType, const Rows&, const void* g, bool* mask, const Rule&);
  // M given, then the rule.
  void (*threshold_mask)(c10::ScalarType, const Rows&, const void* M, bool* mask, const Rule&);
  // M = tanh(conv1x1(g / rms(g))) per row (never stored unless the rule needs the row), then the rule.
  void (*adaptor_mask)(c10::ScalarType, const Rows&, const void* g, bool* mask, const AdaptorArgs&, const Rule&);
  // out[n] = sum_d [mask] g^2; mask may be null (all ones).
  void (*sq_norm)(c10::ScalarType, const Rows&, const void* g, const bool* mask, void* out);
  // grad_g[n, d] = [mask] 2 grad_out[n] g[n, d].
  void (*sq_norm_backward)(c10::ScalarType, const Rows&, const void* grad_out, const void* g, const bool* mask,
                           void* grad_g);
  // Loss head over N rows of K logits (contiguous), target in [0, K):
  // loss[n] = logsumexp(z_n) - z_n[y_n], cot[n] = softmax(z_n) - onehot(y_n).
  void (*ce_forward)(c10::ScalarType, const Rows&, const void* logits, const int64_t* target, void* loss, void* cot);
  // grad[n] = a_n (p_n - onehot(y_n)) + p_n * (b_n - <p_n, b_n>), p = softmax(z); a (grad_loss, [N]) and
  // b (grad_cot, [N, K]) nullable (zero).
  void (*ce_backward)(c10::ScalarType, const Rows&, const void* grad_loss, const void* grad_cot, const void* logits,
                      const int64_t* target, void* grad_logits);
};

const Kernels& generic_kernels();
// nullptr when not compiled in (non-x86 or a compiler without target pragmas).
const Kernels* avx2_kernels();
// The build that runs: AVX2 when compiled in, the CPU has it and ATEN_CPU_CAPABILITY allows it.
const Kernels& kernels();
// "avx2" or "generic" (for tests and benchmark records).
const char* kernels_isa();

}  // namespace jsigr_fast::sample_cpu
