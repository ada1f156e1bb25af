// The per-sample CPU kernels (selective masks, bool-masked squared norm, loss head) for any CPU: at::vec at the build's baseline instruction set
// (see saliency_mask_cpu_avx2.cpp for the AVX2 build picked at run time).
#define JSIGR_SAMPLE_ISA generic
#include "sample_ops_kernels.h"

#include <ATen/Version.h>

#include <string>

namespace jsigr_fast::sample_cpu {
const Kernels& generic_kernels() { return generic::kernels(); }

const Kernels& kernels() {
  static const Kernels* k = [] {
    const Kernels* avx2 = avx2_kernels();
    const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
    bool ok = avx2 != nullptr && (cap == "AVX2" || cap == "AVX512");
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
    ok = ok && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    return ok ? avx2 : &generic_kernels();
  }();
  return *k;
}

const char* kernels_isa() { return &kernels() == avx2_kernels() ? "avx2" : "generic"; }
}  // namespace jsigr_fast::sample_cpu
