// conv2d and ReLU with explicit double-backward rules, as C++ autograd Functions.
//
// The same formulas as the Python Functions of jsigr_fast/fused.py (_Conv2d, _ConvInputGrad,
// _ConvWeightGrad, _ReLU), which stay the reference and the path for forward mode, torch.func
// transforms and torch.compile. Why C++: the fused J-SIGR step applies these rules ~120 times
// (forward, two create-graph backwards, and their backward), and at CIFAR sizes a GPU step is
// mostly host work (bench/bench_overhead.py): a Python autograd.Function costs tens of Python
// calls per node, apply and backward, where this costs none.
//
//   conv2d_rule(x, w, b?, stride, padding, dilation, groups) = F.conv2d(x, w, b, ...)
//     backward with a graph: grad_x = ConvInputGrad(grad_out, w), grad_w = ConvWeightGrad(grad_out, x),
//     grad_b = sum grad_out; without one: one convolution_backward call.
//   ConvInputGrad(go, w) = conv_transpose(go, w)   [x only gives the shape]
//     backward: d go = conv2d(gg, w), d w = ConvWeightGrad(go, gg)
//   ConvWeightGrad(go, x) = weight gradient of conv2d(x, .) for go   [w only gives the shape]
//     backward: d go = conv2d(x, gg), d x = ConvInputGrad(go, gg)
// Each is linear in each argument, so the pairs differentiate into each other at every order, and
// every step is an ordinary convolution kernel (ATen's ConvolutionBackwardBackward0 has slow paths,
// pytorch#22577). Only what the running backward needs is computed: needs_input_grad(i) asks the
// engine (task_should_compute_output), so autograd.grad(out, x) computes no weight gradient.
// Under the legacy vmap of is_grads_batched (a Batched cotangent) the backward records ATen's own
// differentiable convolution_backward instead, as the Python rules do.
//
//   relu_rule(x) = relu(x), backward threshold_backward(grad, y.detach(), 0): unlike ATen's, its
//   graph has no branch to x (whose derivative is identically zero, a zeros_like per layer).
#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>
#include <vector>

namespace jsigr_fast {
namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::Function;
using torch::autograd::variable_list;

struct ConvParams {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;
};

void save_params(AutogradContext* ctx, const ConvParams& p) {
  ctx->saved_data["stride"] = p.stride;
  ctx->saved_data["padding"] = p.padding;
  ctx->saved_data["dilation"] = p.dilation;
  ctx->saved_data["groups"] = p.groups;
}

ConvParams load_params(AutogradContext* ctx) {
  return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
          ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
}

// A cotangent seen inside a vmapped backward (is_grads_batched: the legacy vmap; or torch.func.vmap).
bool batched(const Tensor& t) {
  const auto keys = t.key_set();
  return keys.has(c10::DispatchKey::Batched) || keys.has(c10::DispatchKey::FuncTorchBatched);
}

// Build the next rule node only where a graph is being recorded and the cotangent is a plain tensor.
bool record_rule(const Tensor& gg) { return at::GradMode::is_enabled() && !batched(gg); }

std::tuple<Tensor, Tensor, Tensor> conv_backward(const Tensor& go, const Tensor& x, const Tensor& w,
                                                 const ConvParams& p, std::array<bool, 3> mask, bool bias) {
  const std::vector<int64_t> output_padding(p.stride.size(), 0);
  const std::vector<int64_t> bias_sizes{w.size(0)};
  return at::convolution_backward(go, x, w, bias ? at::OptionalIntArrayRef(bias_sizes) : at::OptionalIntArrayRef(),
                                  p.stride, p.padding, p.dilation, /*transposed=*/false, output_padding, p.groups,
                                  mask);
}

Tensor conv(const Tensor& x, const Tensor& w, const ConvParams& p) {
  return at::conv2d(x, w, {}, p.stride, p.padding, p.dilation, p.groups);
}

struct ConvInputGrad : Function<ConvInputGrad> {
  static Tensor forward(AutogradContext* ctx, const Tensor& go, const Tensor& w, const Tensor& x, ConvParams p) {
    ctx->save_for_backward({go, w, x});
    save_params(ctx, p);
    return std::get<0>(conv_backward(go, x, w, p, {true, false, false}, false));
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads);
};

struct ConvWeightGrad : Function<ConvWeightGrad> {
  static Tensor forward(AutogradContext* ctx, const Tensor& go, const Tensor& x, const Tensor& w, ConvParams p) {
    ctx->save_for_backward({go, x, w});
    save_params(ctx, p);
    return std::get<1>(conv_backward(go, x, w, p, {false, true, false}, false));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &go = saved[0], &x = saved[1];
    const auto p = load_params(ctx);
    const Tensor& gg = grads[0];
    Tensor d_go, d_x;
    if (ctx->needs_input_grad(0)) d_go = conv(x, gg, p);
    if (ctx->needs_input_grad(1)) {
      d_x = record_rule(gg) ? ConvInputGrad::apply(go, gg, x, p)
                            : std::get<0>(conv_backward(go, x, gg, p, {true, false, false}, false));
    }
    return {d_go, d_x, Tensor(), Tensor()};
  }
};

variable_list ConvInputGrad::backward(AutogradContext* ctx, variable_list grads) {
  const auto saved = ctx->get_saved_variables();
  const Tensor &go = saved[0], &w = saved[1];
  const auto p = load_params(ctx);
  const Tensor& gg = grads[0];
  Tensor d_go, d_w;
  if (ctx->needs_input_grad(0)) d_go = conv(gg, w, p);
  if (ctx->needs_input_grad(1)) {
    d_w = record_rule(gg) ? ConvWeightGrad::apply(go, gg, w, p)
                          : std::get<1>(conv_backward(go, gg, w, p, {false, true, false}, false));
  }
  return {d_go, d_w, Tensor(), Tensor()};
}

struct Conv2dRule : Function<Conv2dRule> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x, const Tensor& w, const std::optional<Tensor>& b,
                        ConvParams p) {
    ctx->save_for_backward({x, w});
    save_params(ctx, p);
    ctx->saved_data["bias"] = b.has_value() && b->defined();
    return at::conv2d(x, w, b, p.stride, p.padding, p.dilation, p.groups);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &x = saved[0], &w = saved[1];
    const auto p = load_params(ctx);
    const bool has_bias = ctx->saved_data["bias"].toBool();  // an absent bias has no input edge
    const bool need_x = ctx->needs_input_grad(0), need_w = ctx->needs_input_grad(1);
    const bool need_b = has_bias && ctx->needs_input_grad(2);
    const Tensor& go = grads[0];
    Tensor gx, gw, gb;
    if (record_rule(go)) {  // a create-graph backward: pieces with their own rules
      if (need_x) gx = ConvInputGrad::apply(go, w, x, p);
      if (need_w) gw = ConvWeightGrad::apply(go, x, w, p);
      if (need_b) gb = go.sum({0, 2, 3});
    } else {
      std::tie(gx, gw, gb) = conv_backward(go, x, w, p, {need_x, need_w, need_b}, has_bias);
    }
    return {gx, gw, gb, Tensor()};
  }
};

struct ReluRule : Function<ReluRule> {
  static Tensor forward(AutogradContext* ctx, const Tensor& x) {
    Tensor y = at::relu(x);
    ctx->save_for_backward({y});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const Tensor y = ctx->get_saved_variables()[0].detach();  // d(grad_x)/dx = 0 almost everywhere
    return {at::threshold_backward(grads[0], y, 0)};
  }
};

void check_conv(const Tensor& x, const Tensor& w, at::IntArrayRef stride, at::IntArrayRef padding,
                at::IntArrayRef dilation) {
  TORCH_CHECK(x.dim() == 4 && w.dim() == 4, "conv2d_rule: x and weight must be 4-D, got ", x.dim(), "-D and ",
              w.dim(), "-D");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "conv2d_rule: stride, padding and dilation must have 2 elements each");
}

Tensor conv2d_rule_autograd(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, at::IntArrayRef stride,
                            at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv(x, w, stride, padding, dilation);
  return Conv2dRule::apply(x, w, b, ConvParams{stride.vec(), padding.vec(), dilation.vec(), groups});
}

// Below autograd (no graph to record, fake tensors): the plain forwards.
Tensor conv2d_rule_forward(const Tensor& x, const Tensor& w, const std::optional<Tensor>& b, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation, int64_t groups) {
  check_conv(x, w, stride, padding, dilation);
  return at::conv2d(x, w, b, stride, padding, dilation, groups);
}

Tensor relu_rule_autograd(const Tensor& x) { return ReluRule::apply(x); }

Tensor relu_rule_forward(const Tensor& x) { return at::relu(x); }

}  // namespace

TORCH_LIBRARY_IMPL(jsigr_fast, Autograd, m) {
  m.impl("conv2d_rule", &conv2d_rule_autograd);
  m.impl("relu_rule", &relu_rule_autograd);
}

TORCH_LIBRARY_IMPL(jsigr_fast, CompositeExplicitAutograd, m) {
  m.impl("conv2d_rule", &conv2d_rule_forward);
  m.impl("relu_rule", &relu_rule_forward);
}

}  // namespace jsigr_fast
