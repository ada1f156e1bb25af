// Which build of our CPU kernels runs: each kernel family (batch norm, per-sample ops) is compiled
// twice, for the build's baseline ISA and for AVX2 + FMA + F16C (csrc/avx2_target_begin.h), and
// the AVX2 build is picked at run time when the CPU has those instructions and ATen's own
// capability allows it (ATEN_CPU_CAPABILITY=default forces the generic build, as it does ATen's).
#pragma once

#include <ATen/Version.h>

#include <string>

namespace jsigr_fast {

inline bool cpu_runs_avx2_build() {
  const std::string cap = at::get_cpu_capability();  // honours ATEN_CPU_CAPABILITY
  bool ok = cap == "AVX2" || cap == "AVX512";
#if defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
  ok = ok && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  ok = false;
#endif
  return ok;
}

}  // namespace jsigr_fast
