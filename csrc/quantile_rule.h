// The quantile rule's count, shared by the CPU kernels (csrc/sample_ops_kernels.h, through
// sample_ops_cpu.h) and the CUDA ops (csrc/cuda/saliency_mask.cu, host code); the Python twin is
// jsigr_fast.saliency.quantile_kept (used by selective_mask and the Triton launchers), and all of them
// must return the same count for every (q, D).
//
// mask_quantile = q leaves the top q fraction of a sample's D features unpenalised: kept = the largest
// k in [0, D] with fl(k / D) <= q, fl the correctly rounded double division. Not floor(q * D): the
// product is rounded too, and for many decimal q it lands just below an integer (0.29 * 100 =
// 28.999999999999996, so floor keeps 28 features instead of 29). q is the double nearest the user's
// decimal and k / D is correctly rounded, so a q that is exactly some k / D keeps exactly k. fl(k / D)
// is non-decreasing in k, so the count is found from floor(q * D) (off by at most one) by stepping.
// Only host code: plain double arithmetic (nvcc's --use_fast_math does not touch host code).
#pragma once

#include <cstdint>

namespace jsigr_fast {

// q in [0, 1] (checked by the caller), D >= 0; returns kept in [0, D]. Penalised: D - kept.
inline int64_t quantile_kept(double q, int64_t D) {
  const double d = static_cast<double>(D);
  int64_t k = static_cast<int64_t>(q * d);  // floor for q * d >= 0
  while (k < D && static_cast<double>(k + 1) / d <= q) ++k;
  while (k > 0 && static_cast<double>(k) / d > q) --k;
  return k;
}

}  // namespace jsigr_fast
