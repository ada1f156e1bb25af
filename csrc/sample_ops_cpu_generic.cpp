// The per-sample CPU kernels (selective masks, bool-masked squared norm, loss head) for any CPU: at::vec at the build's baseline instruction set
// (see sample_ops_cpu_avx2.cpp for the AVX2 build picked at run time).
#define JSIGR_SAMPLE_ISA generic
#include "sample_ops_kernels.h"

#include "cpu_isa.h"

namespace jsigr_fast::sample_cpu {
const Kernels& generic_kernels() { return generic::kernels(); }

const Kernels& kernels() {
  static const Kernels* k = [] {
    const Kernels* avx2 = avx2_kernels();
    return avx2 != nullptr && cpu_runs_avx2_build() ? avx2 : &generic_kernels();
  }();
  return *k;
}

const char* kernels_isa() { return &kernels() == avx2_kernels() ? "avx2" : "generic"; }
}  // namespace jsigr_fast::sample_cpu
