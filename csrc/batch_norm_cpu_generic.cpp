// The batch-norm CPU kernels for any CPU: at::vec at the build's baseline instruction set
// (SSE2 on x86-64; see batch_norm_cpu_avx2.cpp for the AVX2 build picked at run time).
#define JSIGR_BN_ISA generic
#include "batch_norm_kernels.h"

namespace jsigr_fast::bn_cpu {
const Kernels& generic_kernels() { return generic::kernels(); }
}  // namespace jsigr_fast::bn_cpu
