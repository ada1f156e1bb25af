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
}
