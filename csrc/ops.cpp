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
  // batch_norm_double_backward without grad_y: given instead the outputs (grad_x, grad_weight, grad_bias)
  // of batch_norm_backward(grad_y, x, weight, mean, invstd, grad_mean, grad_invstd), from which grad_y
  // follows wherever weight * invstd != 0 (exact to rounding where |weight * invstd| is neither tiny nor huge:
  // the caller checks). The same 7 gradients, the first still the one w.r.t. grad_y; grad_y is never formed.
  // No derivative (the fused backend calls it where no graph is recorded).
  m.def(
      "batch_norm_double_backward_from_grad_x(Tensor? grad_grad_x, Tensor? grad_grad_weight, "
      "Tensor? grad_grad_bias, Tensor grad_x, Tensor grad_weight, Tensor grad_bias, Tensor x, Tensor? weight, "
      "Tensor mean, Tensor invstd, Tensor? grad_mean, Tensor? grad_invstd) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // ---- the selective mask of J-SIGR (csrc/saliency_mask.cpp; contracts in csrc/README.md) ----
  // Each returns a bool mask of the input's shape (gradient_saliency_mask / threshold_mask: its
  // memory format when contiguous or channels-last, else contiguous; adaptor_saliency_mask:
  // contiguous); no gradient (the indicator is a constant). The rule, per
  // sample n over its D features: quantile None: mask = M <= beta (beta rounded to the dtype, as
  // `M <= beta` does); quantile q: mask = M <= t_n, t_n the k-th smallest M of the sample,
  // k = D - floor(q * D) (ties at t_n included; k <= 0: all false; k >= D: all true).
  // M = |g| / max(max_d |g|, tiny): J-SIGR's default saliency, never materialised.
  m.def("gradient_saliency_mask(Tensor g, float beta, float? quantile) -> Tensor");
  // M = saliency (any precomputed map, e.g. a trained adaptor's output).
  m.def("threshold_mask(Tensor saliency, float beta, float? quantile) -> Tensor");
  // M = tanh(conv1x1(g / rms(g)) + bias) (SaliencyAdaptor's forward, no graph); rms per sample
  // when normalize; (N, D) inputs are one channel. weight: [C, C, 1, 1] or [C, C].
  m.def(
      "adaptor_saliency_mask(Tensor g, Tensor weight, Tensor? bias, float beta, float? quantile, "
      "bool normalize) -> Tensor");
  // masked_sq_norm with a bool mask (1 byte per feature instead of g's itemsize):
  // out[n] = sum_d [mask[n, d]] g[n, d]^2, and its backward grad_g = [mask] 2 g grad_out[n].
  m.def("masked_sq_norm_bool(Tensor g, Tensor mask) -> Tensor");
  m.def("masked_sq_norm_bool_backward(Tensor grad_out, Tensor g, Tensor mask) -> Tensor");

  // ---- the fused loss head (csrc/cross_entropy_cotangent.cpp) ----
  // loss[n] = logsumexp(logits[n]) - logits[n, target[n]] and cotangent = softmax(logits) -
  // onehot(target) (the input-gradient cotangent d sum_n loss_n / d logits), in one pass.
  m.def("cross_entropy_cotangent(Tensor logits, Tensor target) -> (Tensor, Tensor)");
  // Its VJP given the cotangents a (of loss) and b (of cotangent), None = 0, p = softmax(logits):
  // grad_logits = a[:, None] (p - onehot) + p * (b - sum_k p b).
  m.def(
      "cross_entropy_cotangent_backward(Tensor? grad_loss, Tensor? grad_cot, Tensor logits, Tensor target) "
      "-> Tensor");

  // ---- the fused backend's conv / ReLU rules as C++ autograd Functions (csrc/layer_rules.cpp) ----
  // conv2d_rule = F.conv2d(x, weight, bias, stride, padding, dilation, groups) (4-D, 2-element lists)
  // and relu_rule = relu(x), whose backward and double backward are ordinary convolution /
  // threshold kernels at every order (the rules of jsigr_fast.fused, without a Python node).
  m.def(
      "conv2d_rule(Tensor x, Tensor weight, Tensor? bias, int[] stride, int[] padding, int[] dilation, "
      "int groups) -> Tensor");
  m.def("relu_rule(Tensor x) -> Tensor");
  // (csrc/batch_norm.cpp also defines batch_norm_cpu_isa() -> str: which CPU kernel build runs.)
  // (csrc/saliency_mask.cpp also defines saliency_mask_cpu_isa() -> str, the same for its kernels.)
}
