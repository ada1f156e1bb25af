// Every op schema of the jsigr_fast library, declared once.
//
// Kernels are registered per device elsewhere: csrc/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA),
// each with TORCH_LIBRARY_IMPL. A CPU-only build leaves the .cu files out and the dispatcher
// simply has no CUDA kernel (no #ifdef anywhere). Autograd and fake (shape-only) kernels are
// registered from Python in jsigr_fast/ops.py.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// Importing jsigr_fast._C from Python runs the static TORCH_LIBRARY initializers below.
// The module itself is empty: every op is reached through torch.ops.jsigr_fast.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(jsigr_fast, m) {
  // out[n] = sum_d (mask[n, d] * g[n, d])^2 over all non-batch dims; mask=None means all ones.
  m.def("masked_sq_norm(Tensor g, Tensor? mask) -> Tensor");
  // grad_g[n, d] = 2 * mask[n, d]^2 * g[n, d] * grad_out[n]
  m.def("masked_sq_norm_backward(Tensor grad_out, Tensor g, Tensor? mask) -> Tensor");

  // Train-mode batch norm over dim 1 of x (N, C, *): batch statistics, no running statistics
  // (the caller updates those). mean and invstd = 1/sqrt(var + eps) (biased var) are [C] in
  // float32 (float64 for float64 x); y has x's dtype and memory format (contiguous or channels-last).
  m.def("batch_norm_train(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  // The VJP of batch_norm_train given the cotangents (None = 0) of (y, mean, invstd); mean and
  // invstd are independent inputs here (x enters only through xhat = (x - mean) * invstd), so the
  // batch-statistics terms of second derivatives flow through grad_mean / grad_invstd.
  // Returns (grad_x, grad_weight, grad_bias); the [C] gradients are float32 (float64).
  m.def(
      "batch_norm_backward(Tensor? grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, "
      "Tensor? grad_mean, Tensor? grad_invstd) -> (Tensor, Tensor, Tensor)");
  // The VJP of batch_norm_backward: given the cotangents (None = 0) of (grad_x, grad_weight,
  // grad_bias), the gradients w.r.t. (grad_y, x, weight, mean, invstd, grad_mean, grad_invstd).
  // Derivation in csrc/README.md.
  m.def(
      "batch_norm_double_backward(Tensor? grad_grad_x, Tensor? grad_grad_weight, Tensor? grad_grad_bias, "
      "Tensor grad_y, Tensor x, Tensor? weight, Tensor mean, Tensor invstd, Tensor? grad_mean, "
      "Tensor? grad_invstd) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (csrc/batch_norm.cpp also defines batch_norm_cpu_isa() -> str: which CPU kernel build runs.)
}
