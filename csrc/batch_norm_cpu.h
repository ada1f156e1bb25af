// Interface between the batch-norm ops (csrc/batch_norm.cpp: checks, allocation, registration)
// and their CPU kernels (csrc/batch_norm_kernels.h), which are compiled twice: once for any x86-64 /
// ARM CPU (batch_norm_cpu_generic.cpp) and once with AVX2+FMA (batch_norm_cpu_avx2.cpp, picked at
// run time when the CPU has it and ATEN_CPU_CAPABILITY does not forbid it) — the ATen DispatchStub
// scheme, without needing per-file compiler flags in setup.py.
//
// Pointers are untyped: full-size tensors have x's dtype and the op's memory layout; every [C]
// array is in opmath (float, or double for double x) and always present (the caller fills ones or
// zeros for absent optionals), except the nullable ones marked below.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace jsigr_fast::bn_cpu {

struct Shape {
  int64_t N = 0, C = 0, S = 0;  // x viewed as (N, C, S), S = prod(spatial)
  bool rows = false;            // memory is N*S rows of C channels (channels-last, or S == 1)
  int64_t M() const { return N * S; }  // elements per channel
};

struct ForwardArgs {
  const void* x;
  void* y;
  void* mean;
  void* invstd;
  const void* weight;
  const void* bias;
  double eps;
};

struct BackwardArgs {
  const void* grad_y;  // nullable: zero
  const void* x;
  void* grad_x;
  void* grad_weight;
  void* grad_bias;
  const void* weight;
  const void* mean;
  const void* invstd;
  const void* grad_mean;
  const void* grad_invstd;
};

struct DoubleBackwardArgs {
  const void* gg_x;  // nullable: zero
  const void* gg_weight;
  const void* gg_bias;
  const void* grad_y;  // with rebuild_*: the backward's output grad_x, from which grad_y is rebuilt
  const void* x;
  const void* weight;
  const void* mean;
  const void* invstd;
  const void* grad_invstd;
  void* d_grad_y;
  void* d_x;
  void* d_weight;
  void* d_mean;
  void* d_invstd;
  void* d_grad_mean;
  void* d_grad_invstd;
  // batch_norm_double_backward_from_grad_x: the backward's [C] outputs grad_weight, grad_bias and its input
  // grad_mean; nullptr (all three) for batch_norm_double_backward, where grad_y is grad_y itself.
  const void* rebuild_grad_weight = nullptr;
  const void* rebuild_grad_bias = nullptr;
  const void* rebuild_grad_mean = nullptr;
};

struct Kernels {
  void (*forward)(c10::ScalarType, const Shape&, const ForwardArgs&);
  void (*backward)(c10::ScalarType, const Shape&, const BackwardArgs&);
  void (*double_backward)(c10::ScalarType, const Shape&, const DoubleBackwardArgs&);
};

const Kernels& generic_kernels();
// nullptr when not compiled in (non-x86 or a compiler without target pragmas).
const Kernels* avx2_kernels();

}  // namespace jsigr_fast::bn_cpu
