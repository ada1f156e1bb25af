// The batch-norm CPU kernels compiled for AVX2 + FMA (+ F16C for half conversions), selected at
// run time by csrc/batch_norm.cpp when the CPU supports them: ATen's DispatchStub scheme without
// per-file compiler flags. Everything this file shares with the rest of the library (ATen, c10, the
// standard library) is included *before* the target pragma, so only the at::vec code (in its own
// inline namespace, named by CPU_CAPABILITY below) and our kernels are compiled for AVX2.
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

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
// The target pragma enables the instructions but not the feature macros that sleef.h (included by
// the AVX2 at::vec headers) keys its declarations on; a whole-file -mavx2 would define them.
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
#define JSIGR_BN_ISA avx2
#include "batch_norm_kernels.h"
#pragma GCC pop_options

namespace jsigr_fast::bn_cpu {
const Kernels* avx2_kernels() { return &avx2::kernels(); }
}  // namespace jsigr_fast::bn_cpu

#else

namespace jsigr_fast::bn_cpu {
const Kernels* avx2_kernels() { return nullptr; }
}  // namespace jsigr_fast::bn_cpu

#endif
