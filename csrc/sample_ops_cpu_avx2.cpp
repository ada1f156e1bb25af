// The per-sample CPU kernels (selective masks, bool-masked squared norm, loss head) compiled for
// AVX2 + FMA (+ F16C), selected at run time by sample_ops_cpu_generic.cpp (kernels(), csrc/cpu_isa.h);
// the same scheme as batch_norm_cpu_avx2.cpp.
#include "sample_ops_cpu.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "avx2_target_begin.h"
#define JSIGR_SAMPLE_ISA avx2
#include "sample_ops_kernels.h"
#include "avx2_target_end.h"

namespace jsigr_fast::sample_cpu {
const Kernels* avx2_kernels() { return &avx2::kernels(); }
}  // namespace jsigr_fast::sample_cpu

#else

namespace jsigr_fast::sample_cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace jsigr_fast::sample_cpu

#endif
