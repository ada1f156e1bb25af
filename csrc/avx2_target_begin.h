// Start compiling for AVX2 + FMA (+ F16C for half conversions) without per-file compiler flags
// (ATen's DispatchStub scheme): include this after everything the file shares with the rest of the
// library (ATen, c10, the standard library), then the kernels header, then avx2_target_end.h. Only
// at::vec (in its own inline namespace, named by CPU_CAPABILITY) and our kernels get AVX2 code.
// No include guard: one use per translation unit, GCC on x86-64 only.
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
