// The batch-norm CPU kernels compiled for AVX2 + FMA (+ F16C for half conversions), selected at
// run time by csrc/batch_norm.cpp when the CPU supports them (csrc/cpu_isa.h). Everything this file
// shares with the rest of the library is included *before* avx2_target_begin.h, so only at::vec
// and our kernels are compiled for AVX2.
#include "batch_norm_cpu.h"

#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "avx2_target_begin.h"
#define JSIGR_BN_ISA avx2
#include "batch_norm_kernels.h"
#include "avx2_target_end.h"

namespace jsigr_fast::bn_cpu {
const Kernels* avx2_kernels() { return &avx2::kernels(); }
}  // namespace jsigr_fast::bn_cpu

#else

namespace jsigr_fast::bn_cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace jsigr_fast::bn_cpu

#endif
