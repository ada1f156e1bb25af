// The per-sample CPU kernels (selective masks, bool-masked squared norm, loss head) compiled for AVX2 + FMA (+ F16C), selected at run time by
// sample_ops_cpu_generic.cpp (kernels()) when the CPU supports them; the same scheme as batch_norm_cpu_avx2.cpp
// (shared headers included before the target pragma, at::vec in its own CPU_CAPABILITY namespace).
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

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#ifndef __AVX__
#define __AVX__ 1
#endif
#ifndef __AVX2__
#define __AVX2__ 1
#endif
#ifndef __FMA__
#define __FMA__ 1
#endif
#ifndef __F16C__
#define __F16C__ 1
#endif
#define CPU_CAPABILITY jsigr_avx2
#define CPU_CAPABILITY_AVX2
#define JSIGR_SAMPLE_ISA avx2
#include "sample_ops_kernels.h"
#pragma GCC pop_options

namespace jsigr_fast::sample_cpu {
const Kernels* avx2_kernels() { return &avx2::kernels(); }
}  // namespace jsigr_fast::sample_cpu

#else

namespace jsigr_fast::sample_cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace jsigr_fast::sample_cpu

#endif
